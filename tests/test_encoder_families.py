"""Every encoder family, every pooling, classifiers and rerankers: tiny random-weight checkpoints
(tests/family_models.py) traced at tp 1, 2 and 3 (padded heads) equal what sentence-transformers,
CrossEncoder and Hugging Face compute from the same folders."""

from __future__ import annotations

import pytest
import torch
from family_models import DECODER_FAMILIES, ENCODER_FAMILIES, cross_encoder, hf_model, sentence_model, sentences

from tracer.builder.encoder_checkpoint import trace_checkpoint
from tracer.engine.embedder import Embedder
from tracer.errors import PromptNameError

# A family's usual pooling, so that every mode is some family's: bge (BERT) is CLS, the decoders last token.
POOLING = {"bert": "cls", "distilbert": "weightedmean", "roberta": "mean_sqrt_len_tokens", "xlm-roberta": "mean",
           "camembert": "max", "mpnet": "mean", "modernbert": "mean", **dict.fromkeys(DECODER_FAMILIES, "lasttoken")}


def _assert_same(got, expected, floor=0.99999, atol=1e-4):
    got, expected = torch.tensor(got), torch.as_tensor(expected)
    cosine = torch.nn.functional.cosine_similarity(got, expected, dim=-1)
    assert cosine.min() >= floor and (got - expected).abs().max() <= atol, (cosine, (got - expected).abs().max())


def _embedder(model_dir, tp, out, **kwargs) -> Embedder:
    trace_checkpoint(model_dir, tp, None, out, batch_size=4, **kwargs)
    return Embedder(out)


@pytest.mark.parametrize("family, tp", [(f, tp) for f in ENCODER_FAMILIES + DECODER_FAMILIES for tp in (1, 2)]
                         + [("bert", 3), ("modernbert", 3), ("qwen3", 3)])
def test_family_embeddings_equal_sentence_transformers(family, tp, tmp_path):
    """Packed (the default): each family at tp 1 and 2; tp 3 splits 4 heads as 2 + 2 + 2 padding."""
    from sentence_transformers import SentenceTransformer

    folder = sentence_model(tmp_path / family, family, pooling=POOLING[family], max_seq_length=48,
                            normalize=family != "camembert", seed=tp)
    expected = SentenceTransformer(str(folder), device="cpu").encode(sentences())
    embedder = _embedder(folder, tp, tmp_path / "shards")
    try:
        assert embedder.packed and embedder.model.tp_degree == tp
        _assert_same(embedder.embed(sentences()), expected)
    finally:
        embedder.close()


@pytest.mark.parametrize("family", ["bert", "mpnet", "modernbert", "qwen3"])
def test_padded_layout_equals_sentence_transformers(family, tmp_path):
    """Rows padded to a bucket (the layout neuronx_distributed's compiler takes): the window, the relative
    bias and the causal mask as SDPA masks."""
    from sentence_transformers import SentenceTransformer

    folder = sentence_model(tmp_path / family, family, pooling=POOLING[family], max_seq_length=48)
    expected = SentenceTransformer(str(folder), device="cpu").encode(sentences())
    embedder = _embedder(folder, 2, tmp_path / "shards", layout="padded")
    try:
        assert not embedder.packed
        _assert_same(embedder.embed(sentences()), expected)
    finally:
        embedder.close()


def test_every_pooling_mode_prompts_dense_and_lower_casing(tmp_path):
    """sentence-transformers' modules as configured: all six pooling modes concatenated with the prompt's
    tokens left out (include_prompt false), two Dense modules (Tanh; Identity with a residual), Normalize,
    max_seq_length, do_lower_case over a case-sensitive tokenizer; prompts by name, the default prompt
    when none is named."""
    from sentence_transformers import SentenceTransformer
    from torch import nn

    modes = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
    folder = sentence_model(tmp_path / "st", "bert", pooling=modes, include_prompt=False,
                            dense=[(16, nn.Tanh(), False), (16, nn.Identity(), True)],
                            prompts={"query": "query: ", "passage": "Passage : ", "none": ""},
                            default_prompt_name="query", max_seq_length=40, do_lower_case=True, lowercase=False)
    reference = SentenceTransformer(str(folder), device="cpu")
    embedder = _embedder(folder, 2, tmp_path / "shards")
    try:
        texts = sentences()
        # [CLS] query : and [CLS] passage : (lower-cased), the trailing [SEP] not counted
        assert embedder.dimension == 16 and {k: embedder.prompt_skip[k] for k in ("query", "passage", "none")} == {
            "query": 3, "passage": 3, "none": 0}
        _assert_same(embedder.embed(texts), reference.encode(texts))  # the default prompt, "query"
        for name in ("passage", "none"):
            _assert_same(embedder.embed(texts, name), reference.encode(texts, prompt_name=name))
        with pytest.raises(PromptNameError, match="unknown prompt_name 'nope'; this model's prompts: document, "
                                                  "none, passage, query"):
            embedder.token_ids(["x"], "nope")
        ids, truncated = embedder.token_ids([texts[6]])
        assert truncated and len(ids[0]) == 40
    finally:
        embedder.close()


def test_prompts_of_a_decoder_embedder(tmp_path):
    """Qwen3-Embedding's way: an instruction prompt for queries, none for documents, last-token pooling."""
    from sentence_transformers import SentenceTransformer

    prompts = {"query": "Instruct: find the passage that answers the question\nQuery:", "document": ""}
    folder = sentence_model(tmp_path / "qwen3", "qwen3", pooling="lasttoken", prompts=prompts, max_seq_length=64)
    reference = SentenceTransformer(str(folder), device="cpu")
    embedder = _embedder(folder, 2, tmp_path / "shards")
    try:
        for name in ("query", "document"):
            _assert_same(embedder.embed(sentences(), name), reference.encode(sentences(), prompt_name=name))
    finally:
        embedder.close()


def test_a_plain_encoder_serves_its_hidden_states_padded(tmp_path):
    """No sentence-transformers folder: per-token hidden states (padded rows), as the Hugging Face model."""
    from transformers import AutoModel, AutoTokenizer

    folder = hf_model(tmp_path / "mpnet", "mpnet")
    trace_checkpoint(folder, 2, [16, 32], tmp_path / "shards", batch_size=2)
    embedder = Embedder(tmp_path / "shards")
    try:
        assert not embedder.packed and embedder.per_token
        encoded = AutoTokenizer.from_pretrained(folder)(["a short text", "what is the capital of france"],
                                                        padding=True, return_tensors="pt")
        with torch.no_grad():
            expected = AutoModel.from_pretrained(folder)(**encoded).last_hidden_state
        got = torch.tensor(embedder.embed(["a short text", "what is the capital of france"]))
        mask = encoded["attention_mask"].bool()
        assert (got[:, : mask.size(1)][mask] - expected[mask]).abs().max() <= 1e-4
    finally:
        embedder.close()


PAIRS = [("What is the capital of France?", d) for d in sentences()]


@pytest.mark.parametrize("family, labels, tp", [
    ("bert", 1, 2), ("xlm-roberta", 1, 1), ("distilbert", 3, 2), ("mpnet", 2, 1), ("modernbert", 3, 2),
    ("roberta", 1, 3), ("camembert", 2, 2),
])
def test_classifier_logits_and_reranking_equal_hugging_face(family, labels, tp, tmp_path):
    """*ForSequenceClassification: logits of pairs (token types where the family has them) and of single
    texts equal the Hugging Face model's; a one-label cross-encoder ranks as CrossEncoder.rank() does,
    its scores CrossEncoder.predict()'s (sigmoid) within 1e-4."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tracer.engine import scores

    folder = cross_encoder(tmp_path / family, family, labels=labels, seed=tp)
    reference = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    embedder = _embedder(folder, tp, tmp_path / "shards")
    try:
        assert embedder.task == "classification" and embedder.labels["id2label"][0] == "label_a"
        for inputs in (PAIRS, sentences()):
            columns = [list(c) for c in zip(*inputs, strict=True)] if isinstance(inputs[0], tuple) else [inputs]
            encoded = tokenizer(*columns, padding=True, truncation=True, return_tensors="pt")
            with torch.no_grad():
                expected = reference(**encoded).logits
            got = torch.tensor(embedder.embed(inputs))
            assert (got - expected).abs().max() <= 1e-4, (got, expected)
        if labels == 1:
            from sentence_transformers import CrossEncoder

            cross = CrossEncoder(str(folder), device="cpu")
            got = [scores.relevance(v) for v in embedder.embed(PAIRS)]
            assert (torch.tensor(got) - torch.tensor(cross.predict(PAIRS))).abs().max() <= 1e-4
            ranked = cross.rank(PAIRS[0][0], [d for _, d in PAIRS])
            assert scores.ranked(got) == [r["corpus_id"] for r in ranked]
    finally:
        embedder.close()


def test_long_pairs_truncate_as_cross_encoder_does(tmp_path):
    """A pair longer than max_seq_length: longest-first truncation (the longer text loses tokens first),
    both texts' special tokens kept, as Hugging Face's tokenizer with truncation=True."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = cross_encoder(tmp_path / "bert", "bert")
    (folder / "tokenizer_config.json").write_text((folder / "tokenizer_config.json").read_text().replace(
        '"model_max_length": 512', '"model_max_length": 32'))
    embedder = _embedder(folder, 1, tmp_path / "shards")
    try:
        long_pair = (sentences()[5], sentences()[6])
        encoded, truncated = embedder.token_ids([long_pair])
        tokenizer = AutoTokenizer.from_pretrained(folder)
        expected = tokenizer(*long_pair, truncation=True, max_length=32)
        assert truncated and encoded[0].ids == expected["input_ids"] and encoded[0].types == expected["token_type_ids"]
        with torch.no_grad():
            logits = AutoModelForSequenceClassification.from_pretrained(folder)(
                **tokenizer(*long_pair, truncation=True, max_length=32, return_tensors="pt")).logits
        assert abs(embedder.embed([long_pair])[0][0] - logits[0, 0].item()) <= 1e-4
    finally:
        embedder.close()


def test_multi_label_scores_are_a_sigmoid_each(tmp_path):
    from tracer.engine import scores

    folder = cross_encoder(tmp_path / "bert", "bert", labels=3, problem_type="multi_label_classification")
    embedder = _embedder(folder, 1, tmp_path / "shards")
    try:
        logits = embedder.embed(["a text"])[0]
        got = {d["label"]: d["score"] for d in scores.label_scores(logits, embedder.labels)}
        assert embedder.labels["multi_label"]
        assert got == pytest.approx({f"label_{c}": torch.sigmoid(torch.tensor(x)).item()
                                     for c, x in zip("abc", logits, strict=True)})
    finally:
        embedder.close()
