"""Rerankers, classifiers and prompted embedders served by a real TorchServe: every protocol (native,
Cohere / Jina through the official cohere client, KServe v2 over REST and gRPC, TorchServe's gRPC),
answers equal to CrossEncoder / Hugging Face, and hostile requests in a batch that fail only themselves."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
import torch
from family_models import cross_encoder, sentence_model, sentences
from serving import HandlerBatch, build_mar, start_server

from handler import grpc_client
from handler.rest_client import Client, PredictionError

QUERY = "What is the capital of France?"
DOCUMENTS = sentences()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    return {"reranker": cross_encoder(root / "reranker", "bert", seed=3),
            "classifier": cross_encoder(root / "classifier", "distilbert", labels=3, seed=4),
            "prompted": sentence_model(root / "prompted", "bert", pooling="mean", include_prompt=False,
                                       prompts={"query": "query: ", "passage": "passage: "},
                                       default_prompt_name="query", max_seq_length=64)}


@pytest.fixture(scope="module")
def store(tmp_path_factory, folders):
    store = tmp_path_factory.mktemp("rerank_store")
    for name, folder in folders.items():
        build_mar(store, name, tp=2, batch_size=4, extra=["--model", str(folder), "--max-documents-per-request", "50"])
    return store


@pytest.fixture(scope="module")
def served(tmp_path_factory, store):
    server = start_server(tmp_path_factory.mktemp("ts"), store, "reranker,classifier,prompted")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def expected(folders):
    """CrossEncoder's scores and order for QUERY x DOCUMENTS, the classifier's softmax per text, the
    prompted embedder's embeddings of DOCUMENTS per prompt."""
    from sentence_transformers import CrossEncoder, SentenceTransformer
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    cross = CrossEncoder(str(folders["reranker"]), device="cpu")
    pairs = [(QUERY, d) for d in DOCUMENTS]
    classifier = AutoModelForSequenceClassification.from_pretrained(folders["classifier"]).eval()
    encoded = AutoTokenizer.from_pretrained(folders["classifier"])(DOCUMENTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        probabilities = torch.softmax(classifier(**encoded).logits, -1)
    embedder = SentenceTransformer(str(folders["prompted"]), device="cpu")
    return {"scores": cross.predict(pairs).tolist(), "order": [r["corpus_id"] for r in cross.rank(QUERY, DOCUMENTS)],
            "probabilities": probabilities,
            "embeddings": {name: embedder.encode(DOCUMENTS, prompt_name=name) for name in ("query", "passage")}}


def _post(served, path: str, body, content_type: str = "application/json"):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{served.ports['inference']}{path}", data=data,
                                     method="POST", headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def test_native_rerank_equals_cross_encoder(served, expected):
    """TEI's shape: [{"index", "score", "text"?}] by score; sigmoid unless raw_scores; top_n."""
    client = Client(f"http://127.0.0.1:{served.ports['inference']}")
    answer = client.rerank(QUERY, DOCUMENTS, model="reranker")
    assert [a["index"] for a in answer] == expected["order"]
    assert max(abs(a["score"] - expected["scores"][a["index"]]) for a in answer) <= 1e-4
    top = client.rerank(QUERY, DOCUMENTS, model="reranker", top_n=3, return_text=True, raw_scores=True)
    assert [a["index"] for a in top] == expected["order"][:3] and top[0]["text"] == DOCUMENTS[top[0]["index"]]
    logit = torch.logit(torch.tensor(expected["scores"][top[0]["index"]], dtype=torch.float64)).item()
    assert abs(top[0]["score"] - logit) <= 1e-3


def test_cohere_client_reranks_through_the_v1_and_v2_routes(served, expected):
    """The official cohere client, as LangChain's and LlamaIndex's Cohere rerankers call it."""
    import cohere

    base = f"http://127.0.0.1:{served.ports['inference']}/predictions/reranker/1.0"
    v2 = cohere.ClientV2(api_key="unused", base_url=base, timeout=60)
    answer = v2.rerank(model="reranker", query=QUERY, documents=DOCUMENTS, top_n=4)
    assert [r.index for r in answer.results] == expected["order"][:4]
    assert max(abs(r.relevance_score - expected["scores"][r.index]) for r in answer.results) <= 1e-4
    v1 = cohere.Client(api_key="unused", base_url=base, timeout=60)
    answer = v1.rerank(model="reranker", query=QUERY, documents=[{"text": d} for d in DOCUMENTS],
                       return_documents=True)
    assert [r.index for r in answer.results] == expected["order"]
    assert all(r.document.text == DOCUMENTS[r.index] for r in answer.results)


def test_rerank_over_kserve_v2_and_grpc(served, expected):
    status, answer = _post(served, "/v2/models/reranker/infer", {"id": "7", "inputs": [
        {"name": "query", "shape": [1], "datatype": "BYTES", "data": [QUERY]},
        {"name": "documents", "shape": [len(DOCUMENTS)], "datatype": "BYTES", "data": DOCUMENTS}]})
    assert status == 200 and answer["id"] == "7" and answer["outputs"][0]["name"] == "scores"
    assert max(abs(a - b) for a, b in zip(answer["outputs"][0]["data"], expected["scores"], strict=True)) <= 1e-4
    target = f"127.0.0.1:{served.ports['grpc']}"
    got = grpc_client.rerank_v2(QUERY, DOCUMENTS, target, "reranker")
    assert max(abs(a - b) for a, b in zip(got, expected["scores"], strict=True)) <= 1e-4
    assert [a["index"] for a in grpc_client.rerank(QUERY, DOCUMENTS, target, "reranker")] == expected["order"]
    with pytest.raises(PredictionError, match="empty document"):
        grpc_client.rerank(QUERY, ["fine", " "], target, "reranker")


def test_classify_equals_hugging_face(served, expected):
    status, answer = _post(served, "/predictions/classifier", {"inputs": DOCUMENTS})
    assert status == 200 and len(answer) == len(DOCUMENTS)
    for row, labels in zip(expected["probabilities"], answer, strict=True):
        assert {d["label"]: d["score"] for d in labels} == pytest.approx(
            {f"label_{c}": p.item() for c, p in zip("abc", row, strict=True)}, abs=1e-5)
        assert [d["score"] for d in labels] == sorted((d["score"] for d in labels), reverse=True)
    status, one = _post(served, "/predictions/classifier", DOCUMENTS[1].encode(), "text/plain")
    assert status == 200 and one == answer[1]
    status, answer = _post(served, "/v2/models/classifier/infer", {"inputs": [
        {"name": "text", "shape": [2], "datatype": "BYTES", "data": DOCUMENTS[:2]}]})
    assert status == 200 and answer["outputs"][0]["shape"] == [2, 3]
    assert answer["outputs"][0]["data"] == pytest.approx(expected["probabilities"][:2].flatten().tolist(), abs=1e-5)


def test_prompts_by_name_and_the_default(served, expected):
    """Native "prompt_name"; without one (and on OpenAI's route) the model's default prompt."""
    for name in ("query", "passage"):
        status, answer = _post(served, "/predictions/prompted", {"inputs": DOCUMENTS, "prompt_name": name})
        assert status == 200 and torch.allclose(torch.tensor(answer), torch.tensor(expected["embeddings"][name]),
                                                atol=1e-4)
    status, answer = _post(served, "/predictions/prompted", {"inputs": DOCUMENTS})
    assert torch.allclose(torch.tensor(answer), torch.tensor(expected["embeddings"]["query"]), atol=1e-4)
    status, answer = _post(served, "/predictions/prompted", {"inputs": ["x"], "prompt_name": "nope"})
    assert status == 400 and "unknown prompt_name 'nope'" in answer["error"]
    status, answer = _post(served, "/predictions/prompted/1.0/v1/embeddings", {"input": DOCUMENTS[:2]})
    got = [d["embedding"] for d in answer["data"]]
    assert torch.allclose(torch.tensor(got), torch.tensor(expected["embeddings"]["query"][:2]), atol=1e-4)


def test_routes_a_model_does_not_serve_are_404(served):
    status, answer = _post(served, "/predictions/prompted/1.0/v1/rerank", {"query": "q", "documents": ["d"]})
    assert status == 404 and "v1/embeddings" in answer["error"]["message"]
    status, answer = _post(served, "/predictions/reranker/1.0/v1/embeddings", {"input": "x"})
    assert status == 404 and "v1/rerank" in answer["error"]["message"]


HOSTILE = [
    ("v1/rerank", {"query": QUERY, "documents": ["fine", ""]}, 400, "empty document"),
    ("v1/rerank", {"query": QUERY, "documents": ["a \ud800 b"]}, 400, "lone surrogate"),
    ("v1/rerank", {"query": QUERY, "documents": ["x"] * 10_000}, 413,
     "10000 documents in one request; the limit is 50"),
    ("v1/rerank", {"query": QUERY, "documents": []}, 400, "non-empty list"),
    ("v1/rerank", {"query": 3, "documents": ["d"]}, 400, '"query" must be a string'),
    ("v1/rerank", {"query": QUERY, "documents": ["d"], "top_n": 0}, 400, "top_n"),
    ("", {"query": QUERY, "texts": ["d"], "frobnicate": 1}, 400, "unknown fields ['frobnicate']"),
    ("", {"query": QUERY, "texts": "not a list"}, 400, "non-empty list"),
]


def test_hostile_rerank_requests_in_one_batch_fail_only_themselves(store, expected):
    """One handler batch of good rerank requests (native and Cohere routes) and each hostile one: every
    good request gets CrossEncoder's answer, every hostile one its own 4xx."""
    batch = HandlerBatch(store / "reranker.shards", "reranker", {"max_documents_per_request": 50})
    try:
        good = [("", {"query": QUERY, "texts": DOCUMENTS}), ("v1/rerank", {"query": QUERY, "documents": DOCUMENTS})]
        requests = [*good, *((path, body) for path, body, _, _ in HOSTILE), *good]
        # json.dumps escapes the lone surrogate ("\\ud800"): valid JSON, a string no tokenizer takes
        answers = batch.run([("application/json", json.dumps(body).encode(), {"url_path": path})
                             for path, body in requests])
        for (status, answer), (path, _) in zip(answers[:2] + answers[-2:], good * 2, strict=True):
            results = answer if path == "" else answer["results"]
            order = [r["index"] for r in results]
            score = "score" if path == "" else "relevance_score"
            assert status == 200 and order == expected["order"]
            assert max(abs(r[score] - expected["scores"][r["index"]]) for r in results) <= 1e-4
        for (status, answer), (path, _, want_status, message) in zip(answers[2:-2], HOSTILE, strict=True):
            text = answer["error"]["message"] if path else answer["error"]
            assert status == want_status and message in text, (status, answer)
    finally:
        batch.handler.embedder.close()


def test_live_server_keeps_serving_after_hostile_reranks(served, expected):
    for path, body, status, _ in HOSTILE[:3]:
        prefix = "/predictions/reranker" + (f"/1.0/{path}" if path else "")
        assert _post(served, prefix, json.dumps(body).encode())[0] == status
    status, answer = _post(served, "/predictions/reranker", {"query": QUERY, "texts": DOCUMENTS})
    assert status == 200 and [a["index"] for a in answer] == expected["order"]
