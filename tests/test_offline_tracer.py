"""The offline tracer CLI: MiniLM shards equal SentenceTransformer.encode(), .mar layout, misuse."""

import json
import subprocess
import sys
import zipfile

import pytest
import torch
from conftest import MINILM_DIR

import tracer
from tracer.hf_checkpoint import load_tokenizer, trace_checkpoint

BUCKETS = [16, 32, 64, 128]
WORDS = "the quick brown fox jumps over a lazy dog while tensor parallel ranks share the work".split()
# token counts land in every bucket: 16, 32, 64 and 128
SENTENCES = [" ".join(WORDS[: n % len(WORDS) + 1] + WORDS * (n // len(WORDS))) for n in (3, 12, 25, 50, 90, 120)]


def _cli(*args, check=True):
    result = subprocess.run([sys.executable, "-m", "tracer", *args], capture_output=True, text=True)
    if check:
        assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    result = _cli("build", "--tp-degree", "2", "--buckets", ",".join(map(str, BUCKETS)), "--batch-size", "2",
                  "--model-name", "minilm", "--export-path", str(store))
    assert result.stderr.count("[tpserve] rank") == 2 * len(BUCKETS)  # one progress line per rank x bucket
    assert "traced" in result.stdout and "wrote" in result.stdout
    return store


@pytest.fixture(scope="module")
def reference():
    from sentence_transformers import SentenceTransformer

    return torch.tensor(SentenceTransformer(str(MINILM_DIR), device="cpu").encode(SENTENCES))


def _embed(model, shards_dir):
    tokenizer = load_tokenizer(shards_dir)
    out, buckets = [], []
    for text in SENTENCES:
        ids = torch.tensor([tokenizer.encode(text).ids])
        buckets.append(model.select_bucket([ids, torch.ones_like(ids)])[1])
        out.append(model(ids, torch.ones_like(ids))[0])
    return torch.stack(out), buckets


def _assert_matches(got, expected):
    cosine = torch.nn.functional.cosine_similarity(got, expected, dim=1)
    assert cosine.min() >= 0.99999
    assert (got - expected).abs().max() <= 1e-4


def test_tp2_build_equals_sentence_transformers(built, reference):
    shards = built / "minilm.shards"
    with tracer.parallel_model_load(shards) as model:
        got, buckets = _embed(model, shards)
    assert sorted(set(buckets)) == [0, 1, 2, 3]  # every bucket exercised
    _assert_matches(got, reference)


@pytest.mark.parametrize("tp", [1, 4])
def test_other_tp_degrees_equal_sentence_transformers(tp, tmp_path, reference):
    trace_checkpoint(MINILM_DIR, tp, BUCKETS, tmp_path)
    with tracer.parallel_model_load(tmp_path) as model:
        got, _ = _embed(model, tmp_path)
    _assert_matches(got, reference)


def test_padding_within_a_batch_never_changes_a_result(built, reference):
    shards = built / "minilm.shards"
    tokenizer = load_tokenizer(shards)
    encoded = [tokenizer.encode(t).ids for t in SENTENCES[:2]]
    ids = torch.zeros(2, 32, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, e in enumerate(encoded):
        ids[row, : len(e)], mask[row, : len(e)] = torch.tensor(e), 1
    with tracer.parallel_model_load(shards) as model:
        _assert_matches(model(ids, mask), reference[:2])


def test_mar_layout(built):
    with zipfile.ZipFile(built / "minilm.mar") as mar:
        names = set(mar.namelist())
        config = mar.read("model-config.yaml").decode()
        info = json.loads(mar.read("tpserve-model.json"))
    for rank in range(2):
        assert {f"tp_{rank}/weights.safetensors"} | {f"tp_{rank}/bucket_{b}.pt" for b in range(4)} <= names
    assert {"manifest.json", "bucket_kernel.pt", "tokenizer/tokenizer.json", "tokenizer/vocab.txt",
            "model-config.yaml", "embedding_handler.py", "MAR-INF/MANIFEST.json"} <= names
    assert "batchSize: 2" in config and "tp_degree: 2" in config and "startupTimeout" in config
    assert info["output"] == "sentence_embedding" and info["sentence_transformers"] == {"pooling": "mean",
                                                                                         "normalize": True}


def test_no_archive_format(built, tmp_path):
    _cli("archive", "--shards", str(built / "minilm.shards"), "--model-name", "folder", "--export-path",
         str(tmp_path), "--archive-format", "no-archive")
    assert (tmp_path / "folder" / "tp_1" / "weights.safetensors").is_file()


@pytest.fixture
def gpt2_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "tokenizer.json").write_text("{}")
    return tmp_path


@pytest.mark.parametrize("args, message", [
    (["trace", "--tp-degree", "5", "--output", "OUT"], "does not divide num_attention_heads=12"),
    (["trace", "--tp-degree", "2", "--buckets", "32,16", "--output", "OUT"], "strictly ascending"),
    (["trace", "--tp-degree", "2", "--buckets", "0,16", "--output", "OUT"], "positive"),
    (["trace", "--tp-degree", "2", "--buckets", "128,1024", "--output", "OUT"], "max_position_embeddings=512"),
    (["trace", "--tp-degree", "2", "--buckets", "a,b", "--output", "OUT"], "comma-separated integers"),
    (["trace", "--tp-degree", "2", "--batch-size", "0", "--output", "OUT"], "--batch-size must be >= 1"),
    (["trace", "--tp-degree", "2"], "required: --output"),
    (["trace", "--tp-degree", "2", "--model", "NOWHERE", "--output", "OUT"], "no config.json"),
    (["trace", "--tp-degree", "2", "--model", "GPT2", "--output", "OUT"], "'gpt2' is not supported; supported: Bert"),
    (["archive", "--shards", "NOWHERE", "--model-name", "m"], "not a traced shards folder"),
    (["archive", "--shards", "NOWHERE", "--model-name", "m", "--archive-format", "tgz"], "invalid choice"),
    (["frobnicate"], "invalid choice"),
])
def test_misuse_exits_nonzero_with_one_clear_line(args, message, tmp_path, gpt2_dir):
    args = [a.replace("OUT", str(tmp_path / "out")).replace("GPT2", str(gpt2_dir)) for a in args]
    result = _cli(*args, check=False)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert not (tmp_path / "out").exists()  # nothing was written
