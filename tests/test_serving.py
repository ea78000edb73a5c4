"""REST and gRPC through a real TorchServe: embeddings equal SentenceTransformer.encode()."""

import concurrent.futures
import ipaddress
import json
import subprocess
import sys
import urllib.request

import psutil
import pytest
import torch
from conftest import MINILM_DIR

from handler import grpc_client
from handler.embedder import Embedder
from handler.request_parsing import RequestError

WORDS = "serving sharded transformer models with bucketed traced graphs keeps latency low".split()
# 1 to 80 words: up to 120 tokens, every bucket, nothing truncated
MIXED = [" ".join((WORDS * 20)[:n]) for n in (1, 3, 7, 12, 20, 33, 50, 64, 80, 60, 2, 5, 9, 15, 27, 40)]


@pytest.fixture(scope="module")
def encode():
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(MINILM_DIR), device="cpu")

    def run(texts, max_seq_length=256):
        model.max_seq_length = max_seq_length
        return torch.tensor(model.encode(texts))

    return run


def assert_same(got, expected):
    got = torch.tensor(got)
    if got.dim() == 1:
        got, expected = got[None], expected.reshape(1, -1)
    assert got.shape == expected.shape
    assert torch.nn.functional.cosine_similarity(got, expected, dim=1).min() >= 0.99999
    assert (got - expected).abs().max() <= 1e-4


def test_rest_single_text(served, encode):
    status, _, body = served.post("tensor parallel inference on CPU")
    assert status == 200
    assert_same(body, encode(["tensor parallel inference on CPU"]))
    status, _, body = served.post(json.dumps({"inputs": "tensor parallel inference on CPU"}), "application/json")
    assert status == 200
    assert_same(body, encode(["tensor parallel inference on CPU"]))


def test_rest_list_in_order(served, encode):
    status, _, body = served.post(json.dumps({"inputs": MIXED}), "application/json")
    assert status == 200 and len(body) == len(MIXED)
    assert_same(body, encode(MIXED))


def test_rest_16_concurrent_mixed_lengths(served, encode):
    expected = encode(MIXED)
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda t: served.post(t), MIXED))
    for (status, _, body), want in zip(answers, expected, strict=True):
        assert status == 200
        assert_same(body, want)


def test_grpc_single_list_and_concurrent(served, encode):
    target = f"127.0.0.1:{served.ports['grpc']}"
    assert_same(grpc_client.embed(MIXED[3], target), encode([MIXED[3]]))
    assert_same(grpc_client.embed(MIXED[:5], target), encode(MIXED[:5]))
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda t: grpc_client.embed(t, target), MIXED))
    assert_same(answers, encode(MIXED))


@pytest.mark.parametrize("texts, status, message", [("", 400, "empty text"), (["ok", " "], 400, "empty text"),
                                                     (["t"] * 65, 413, "the limit is 64")])
def test_grpc_bad_input_is_a_named_error_and_the_next_request_succeeds(served, texts, status, message):
    target = f"127.0.0.1:{served.ports['grpc']}"
    with pytest.raises(grpc_client.PredictionError, match=message) as error:
        grpc_client.embed(texts, target)
    assert error.value.status == status
    assert len(grpc_client.embed("still serving", target)) == 384


LONG = "word " * 400  # ~400 tokens > the largest bucket (128)


@pytest.mark.parametrize("body, content_type, status, message", [
    (b"", "text/plain", 400, "empty text"),
    ("   ", "text/plain", 400, "empty text"),
    (b"\xff\xfe\xfa", "text/plain", 400, "not valid UTF-8"),
    (b"\xff\xfe\xfa", "application/octet-stream", 400, "not valid UTF-8"),
    ('{"inputs": ', "application/json", 400, "not valid JSON"),
    ('{"inputs": 5}', "application/json", 400, '"inputs" must be'),
    ('{"inputs": []}', "application/json", 400, '"inputs" must be'),
    ('{"inputs": ["ok", 3]}', "application/json", 400, '"inputs" must be'),
    ('{"text": "hi"}', "application/json", 400, "expected a text/plain body"),
    ('["a", "b"]', "application/json", 400, "expected a text/plain body"),
    ('{"inputs": ["ok", ""]}', "application/json", 400, "empty text"),
    (json.dumps({"inputs": ["t"] * 65}), "application/json", 413, "the limit is 64"),
])
def test_bad_input_is_4xx_and_the_next_request_succeeds(served, body, content_type, status, message):
    got_status, _, got = served.post(body, content_type)
    assert got_status == status and message in got["error"]
    ok_status, _, ok = served.post("a good request after a bad one")
    assert ok_status == 200 and len(ok) == 384


def test_text_longer_than_the_largest_bucket_is_truncated_with_a_header(served, encode):
    status, headers, body = served.post(LONG)
    assert status == 200 and headers.get("X-Tpserve-Truncated") == "true"
    assert_same(body, encode([LONG], max_seq_length=128))  # = sentence-transformers truncating to 128 tokens


def test_too_long_can_be_rejected_with_413_instead(store):
    embedder = Embedder(store / "minilm.shards", too_long="reject")
    try:
        with pytest.raises(RequestError, match="the largest bucket is 128") as error:
            embedder.token_ids(["short", LONG])
        assert error.value.status == 413
        assert len(embedder.embed(["short"])[0]) == 384
    finally:
        embedder.close()


def test_metrics_in_prometheus_format(served):
    served.post("count me")
    with urllib.request.urlopen(f"http://127.0.0.1:{served.ports['metrics']}/metrics", timeout=10) as r:
        text = r.read().decode()
    assert "# TYPE RequestsPerBucket counter" in text and 'bucket="16"' in text
    assert "PaddingFraction{" in text and "ModelTime{" in text


def test_every_listener_is_on_loopback(served):
    listeners = [(p.pid, c.laddr) for p in served.our_processes() for c in p.net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN]
    assert len(listeners) >= 5  # inference, management, metrics, gRPC x2
    for pid, laddr in listeners:
        ip = ipaddress.ip_address(laddr.ip)
        ip = ip.ipv4_mapped or ip if ip.version == 6 else ip
        assert ip.is_loopback, (pid, laddr)


def test_stop_leaves_no_process_behind(served):
    """Last in this module: `python -m handler.server stop` (what `make stop` runs)."""
    pids = [p.pid for p in served.our_processes()]
    assert len(pids) >= 2  # the frontend and the model's worker
    subprocess.run([sys.executable, "-m", "handler.server", "stop", "--log-dir", str(served.log_dir)], check=True)
    served.process.wait(timeout=30)
    ps = subprocess.run(["ps", "-eo", "pid=,stat="], capture_output=True, text=True, check=True).stdout
    running = {int(pid) for pid, stat in (line.split() for line in ps.splitlines()) if not stat.startswith("Z")}
    assert not set(pids) & running  # exited zombies wait for init to reap them: not running
