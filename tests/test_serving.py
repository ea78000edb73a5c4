"""REST and gRPC through a real TorchServe: embeddings equal SentenceTransformer.encode()."""

import concurrent.futures
import ipaddress
import json
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request

import psutil
import pytest
import torch
from conftest import MINILM_DIR
from serving import post_json

from handler import grpc_client
from tracer.builder.encoder_checkpoint import trace_checkpoint
from tracer.engine.embedder import Embedder
from tracer.errors import TextTooLongError

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


LONG = "word " * 400  # ~400 tokens > max_seq_length (256)


@pytest.mark.parametrize("body, content_type, status, message", [
    (b"", "text/plain", 400, "empty text"),
    ("   ", "text/plain", 400, "empty text"),
    (b"\xff\xfe\xfa", "text/plain", 400, "not valid UTF-8"),
    (b"\xff\xfe\xfa", "text/plain; charset=utf-8", 400, "not valid UTF-8"),
    (b"\xff\xfe\xfa", "application/octet-stream", 415, "Content-Type application/octet-stream is not accepted"),
    (b"\x89PNG\r\n", "image/png", 415, "'Content-Type: text/plain'"),
    (b"some text", "application/x-www-form-urlencoded", 415, "curl --data sends it"),
    (b"some text", "text/plain; charset=latin-1", 415, "bodies are UTF-8"),
    ('{"inputs": ["ok", "\\ud800"]}', "application/json", 400, "text 1 is not valid Unicode"),
    ('{"inputs": "\\udfff x"}', "application/json", 400, "text 0 is not valid Unicode"),
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
    got_status, headers, got = served.post(body, content_type)
    assert got_status == status and message in got["error"] and got["status"] == status
    assert headers["content-type"] == "application/json"
    ok_status, _, ok = served.post("a good request after a bad one")
    assert ok_status == 200 and len(ok) == 384


@pytest.mark.parametrize("content_type", ["text/plain", "text/html", "text/markdown; charset=UTF-8", "",
                                          "application/json", "application/vnd.api+json"])
def test_accepted_content_types(served, encode, content_type):
    body = json.dumps({"inputs": ["typed text"]}) if "json" in content_type else "typed text"
    status, headers, got = served.post(body, content_type)
    assert status == 200 and headers["content-type"] == "application/json"
    assert_same(got, encode(["typed text"]))


def test_get_has_no_method_in_torchserve_so_it_is_an_empty_body_400(served):
    """TorchServe 0.12 routes GET /predictions/NAME to the handler without telling it the method
    (README: HTTP details); the empty body is answered 400 with a hint to POST."""
    url = f"http://127.0.0.1:{served.ports['inference']}/predictions/minilm"
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(url, timeout=30)
    assert error.value.code == 400 and error.value.headers["content-type"] == "application/json"
    assert "POST a body" in json.loads(error.value.read())["error"]


# one token per word: n words are n + 2 tokens ([CLS] ... [SEP]), so 130 and 200 words fill the
# bucket 256 and 260 and 600 words are truncated at max_seq_length
ONE_TOKEN_WORDS = "the quick brown fox jumps over a lazy dog while parallel ranks share the work".split()
WORDS_OF = {n: " ".join((ONE_TOKEN_WORDS * 60)[:n]) for n in (5, 130, 200, 260, 600)}


def test_every_length_equals_sentence_transformers_default_encode(served, encode):
    """Default buckets reach max_seq_length (256): parity with encode() at its default settings for
    every length, truncation where sentence-transformers truncates (and then a header)."""
    texts = list(WORDS_OF.values())
    expected = encode(texts)  # SentenceTransformer defaults: max_seq_length 256
    status, _, body = served.post(json.dumps({"inputs": texts}), "application/json")
    assert status == 200
    assert_same(body, expected)
    for n, text in WORDS_OF.items():
        status, headers, body = served.post(text)
        assert status == 200
        assert_same(body, expected[list(WORDS_OF).index(n)])
        assert (headers.get("X-Tpserve-Truncated") == "true") == (n >= 260), n  # 260 words > 256 tokens


def test_too_long_can_be_rejected_with_413_instead(store):
    embedder = Embedder(store / "minilm.shards", too_long="reject")
    try:
        with pytest.raises(TextTooLongError, match="the limit is 256"):
            embedder.token_ids(["short", LONG])
        assert len(embedder.embed(["short"])[0]) == 384
    finally:
        embedder.close()


LENGTHS = [5, 200, 17, 17, 60, 31, 120, 9, 90, 250, 16, 33] * 2


def test_packed_calls_follow_the_measured_costs_and_equal_each_text_alone(store, encode):
    """plan(), packed (make serve's store): each text in exactly one call of at most batch_size texts
    whose tokens fit its bucket, costing no more than filling calls in order until one overflows."""
    embedder = Embedder(store / "minilm.shards")
    try:
        assert embedder.packed
        embedder.warm_up()
        assert set(embedder.costs) == {(b, 1) for b in embedder.buckets}
        plan = embedder.plan(LENGTHS)
        assert [i for _, members in plan for i in members] == list(range(len(LENGTHS)))
        assert all(len(members) <= embedder.batch_size and sum(LENGTHS[i] for i in members) <= bucket
                   for bucket, members in plan)
        greedy, tokens, texts = 0.0, 0, 0
        for n in LENGTHS + [10**9]:
            if texts == embedder.batch_size or tokens + n > embedder.buckets[-1]:
                greedy += embedder.cost(next(b for b in embedder.buckets if tokens <= b), 1)
                tokens, texts = 0, 0
            tokens, texts = tokens + n, texts + 1
        assert sum(embedder.cost(bucket, 1) for bucket, _ in plan) <= greedy + 1e-9
        assert_same(embedder.embed(MIXED), encode(MIXED))
    finally:
        embedder.close()


def test_padded_sub_batches_follow_the_measured_costs_and_equal_each_text_alone(tmp_path, encode):
    """plan(), padded layout: each text in exactly one sub-batch of at most batch_size, padded to a
    bucket that holds it; merging lengths only where the warm-up's timings say one call is cheaper."""
    trace_checkpoint(MINILM_DIR, 1, [16, 64, 128, 256], tmp_path, batch_size=4, layout="padded")
    embedder = Embedder(tmp_path)
    try:
        assert not embedder.packed
        embedder.warm_up()
        assert set(embedder.costs) == {(b, r) for b in embedder.buckets for r in (1, embedder.batch_size)}
        plan = embedder.plan(LENGTHS)
        assert sorted(i for _, members in plan for i in members) == list(range(len(LENGTHS)))
        assert all(len(members) <= embedder.batch_size and max(LENGTHS[i] for i in members) <= bucket
                   for bucket, members in plan)
        cost = sum(embedder.cost(bucket, len(members)) for bucket, members in plan)
        per_bucket, full = {}, embedder.batch_size  # the plan before: sub-batches of one bucket each
        for n in LENGTHS:
            bucket = next(b for b in embedder.buckets if n <= b)
            per_bucket[bucket] = per_bucket.get(bucket, 0) + 1
        assert cost <= sum(embedder.cost(b, full) * (r // full) + (embedder.cost(b, r % full) if r % full else 0)
                           for b, r in per_bucket.items()) + 1e-9
        assert_same(embedder.embed(MIXED), encode(MIXED))
    finally:
        embedder.close()


def test_buckets_below_max_seq_length_warn_and_truncate_there(tmp_path, encode):
    result = subprocess.run([sys.executable, "-m", "tracer", "trace", "--tp-degree", "1", "--buckets", "16,64",
                             "--output", str(tmp_path / "short")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "warning: the largest bucket (64) is below the model's max_seq_length (256)" in result.stderr
    embedder = Embedder(tmp_path / "short")
    try:
        ids, truncated = embedder.token_ids([WORDS_OF[130]])
        assert truncated and len(ids[0]) == 64
        assert_same(embedder.embed([WORDS_OF[130]]), encode([WORDS_OF[130]], max_seq_length=64))
    finally:
        embedder.close()


def _metrics(served) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{served.ports['metrics']}/metrics", timeout=10) as r:
        return r.read().decode()


def _sample(text: str, name: str, bucket: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") and f'bucket="{bucket}"' in line)


def test_metrics_in_prometheus_format_count_texts_and_keep_every_observation(served):
    before = _metrics(served)
    served.post(json.dumps({"inputs": ["count me", "and me", "me too"]}), "application/json")  # 3 texts, bucket 16
    after = _metrics(served)
    assert "# TYPE TextsPerBucket counter" in after
    assert _sample(after, "TextsPerBucket", "16") - _sample(before, "TextsPerBucket", "16") == 3
    for name in ("ModelSeconds", "PaddingRatio"):  # histograms: rates, averages and quantiles in PromQL
        assert f"# TYPE {name} histogram" in after
        assert _sample(after, f"{name}_count", "16") - _sample(before, f"{name}_count", "16") == 1
        assert _sample(after, f"{name}_sum", "16") > _sample(before, f"{name}_sum", "16")


def test_timings_say_where_a_served_request_spent_its_time(served):
    """handler/timings.py (bench/serving.py's breakdown): one line per request, found by the client's
    X-Request-Id, with the handler's wall-clock start/end and each phase's seconds."""
    texts = ["where does the time go", "a second text of the same request"]
    sent = time.time()
    request = urllib.request.Request(served.url, data=json.dumps({"inputs": texts}).encode(), method="POST",
                                     headers={"Content-Type": "application/json", "X-Request-Id": "timed-1"})
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.status == 200 and len(json.loads(response.read())) == 2
    received = time.time()
    lines = [json.loads(line) for line in served.timings.read_text().splitlines()]
    (line,) = [r for r in lines if r["id"] == "timed-1"]
    assert sent <= line["start"] <= line["end"] <= received and line["batch"] >= 1
    own, shared = line["own"], line["shared"]
    assert 0 < own["tokenize"] <= own["preprocess"] and own["serialize"] > 0
    assert shared["rows_16"] >= 2 and 0 < shared["model_16"] <= shared["inference"] <= line["end"] - line["start"]


# ---- OpenAI-compatible routes, with the official client ------------------------------------------
def test_openai_embeddings_base64_default_and_float_equal_encode(served, encode):
    from tokenizers import Tokenizer

    client = served.openai(timeout=60)
    texts = MIXED[:5]
    reply = client.embeddings.create(model="minilm", input=texts)  # the client asks for base64 and decodes it
    assert reply.object == "list" and reply.model == "minilm" and [d.index for d in reply.data] == list(range(5))
    assert_same([d.embedding for d in reply.data], encode(texts))
    tokenizer = Tokenizer.from_file(str(MINILM_DIR / "tokenizer.json"))
    tokenizer.no_padding()  # the checkpoint's file pads to 128
    tokens = sum(len(e.ids) for e in tokenizer.encode_batch(texts))
    assert reply.usage.prompt_tokens == reply.usage.total_tokens == tokens
    floats = client.embeddings.create(model="minilm", input=texts[0], encoding_format="float")
    assert_same(floats.data[0].embedding, encode([texts[0]]))
    ids = tokenizer.encode(texts[1]).ids  # token-id arrays are ids of the model's own tokenizer
    by_ids = client.embeddings.create(model="minilm", input=[ids, ids[:3]], encoding_format="float")
    assert_same(by_ids.data[0].embedding, encode([texts[1]]))
    assert by_ids.usage.prompt_tokens == len(ids) + 3


def test_openai_embeddings_with_curl(served, encode):
    """The README's curl, as a user runs it."""
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    url = f"http://127.0.0.1:{served.ports['inference']}/predictions/minilm/1.0/v1/embeddings"
    command = [curl, "-s", "-w", "\n%{http_code} %{content_type}", url, "-H", "Content-Type: application/json",
               "--data", '{"model": "minilm", "input": ["first text", "second text"]}']
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    body, status = out.rsplit("\n", 1)
    assert status == "200 application/json"
    reply = json.loads(body)
    assert_same([d["embedding"] for d in reply["data"]], encode(["first text", "second text"]))


def test_openai_models_and_errors_in_openai_shape(served):
    import openai

    client = served.openai(timeout=60)
    assert [m.id for m in client.models.list().data] == ["minilm"]
    with pytest.raises(openai.BadRequestError, match="384 dimensions"):
        client.embeddings.create(model="minilm", input="x", dimensions=128)
    assert client.embeddings.create(model="minilm", input="x", dimensions=384).data[0].embedding
    with pytest.raises(openai.BadRequestError, match="outside this model's vocabulary"):
        client.embeddings.create(model="minilm", input=[[101, 10**9, 102]])
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="minilm", prompt="an embedding model does not complete")
    url = f"http://127.0.0.1:{served.ports['inference']}/predictions/minilm/1.0/v1/embeddings"
    body = json.dumps({"input": "\ud800"}).encode()  # a lone surrogate, JSON-escaped
    request = urllib.request.Request(url, body, {"Content-Type": "application/json"}, method="POST")
    with pytest.raises(urllib.error.HTTPError) as bad:
        urllib.request.urlopen(request, timeout=60)
    assert bad.value.code == 400 and bad.value.headers["Content-Type"] == "application/json"
    error = json.loads(bad.value.read())["error"]
    assert set(error) == {"message", "type", "code"} and "not valid Unicode" in error["message"]


def test_openai_and_native_requests_in_one_batch_each_get_their_own_shape(served, encode):
    client = served.openai(timeout=60)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        openai_replies = [pool.submit(client.embeddings.create, model="minilm", input=[t], encoding_format="float")
                          for t in MIXED[:4]]
        native = [pool.submit(served.post, t) for t in MIXED[4:8]]
        for text, reply in zip(MIXED[:4], openai_replies, strict=True):
            assert_same(reply.result().data[0].embedding, encode([text]))
        for text, reply in zip(MIXED[4:8], native, strict=True):
            status, _, body = reply.result()
            assert status == 200
            assert_same(body, encode([text]))


# ---- Open Inference Protocol (KServe v2), REST and gRPC ------------------------------------------
def _v2_post(server, body: dict):
    return post_json(f"http://127.0.0.1:{server.ports['inference']}/v2/models/minilm/infer", body, timeout=60)


def test_open_inference_rest_bytes_in_fp32_out(served, encode):
    texts = MIXED[:3]
    status, body = _v2_post(served, {"id": "r1", "inputs": [{"name": "text", "shape": [3], "datatype": "BYTES",
                                                              "data": texts}]})
    assert status == 200 and body["id"] == "r1" and body["model_name"] == "minilm"
    (output,) = body["outputs"]
    assert output["name"] == "embedding" and output["datatype"] == "FP32" and output["shape"] == [3, 384]
    assert_same([output["data"][i * 384:(i + 1) * 384] for i in range(3)], encode(texts))
    status, error = _v2_post(served, {"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}]})
    assert status == 400 and "datatype must be BYTES" in error["error"]
    live = urllib.request.urlopen(f"http://127.0.0.1:{served.ports['inference']}/v2/health/live", timeout=10)
    assert json.loads(live.read()) == {"live": True}


def test_open_inference_grpc_model_infer_ready_and_a_bad_request_fails_only_itself(served, encode):
    target = f"127.0.0.1:{served.ports['grpc']}"
    assert grpc_client.model_ready(target, "minilm")
    assert grpc_client.model_metadata(target, "minilm")["name"] == "minilm"
    assert grpc_client.model_metadata(target, "minilm")["versions"] == ["1.0"]
    texts = ["héllo wörld", MIXED[6]]
    assert_same(grpc_client.infer_v2(texts, target, "minilm"), encode(texts))
    with pytest.raises(grpc_client.PredictionError, match="text 0 is empty") as bad:
        grpc_client.infer_v2([" "], target, "minilm")
    assert bad.value.status == 400
    with concurrent.futures.ThreadPoolExecutor(4) as pool:  # the worker was not restarted: answers at once
        results = list(pool.map(lambda t: grpc_client.infer_v2([t], target, "minilm", timeout=10), MIXED[:4]))
    assert_same([r[0] for r in results], encode(MIXED[:4]))


def test_clients_need_neither_torchserve_nor_torch(served, encode):
    script = ("import sys, json\nfrom handler.rest_client import Client\n"
              f"print(json.dumps(Client('http://127.0.0.1:{served.ports['inference']}').embed(['a', 'b c'])))\n"
              "print(sorted(m for m in ('ts', 'torch', 'tracer', 'grpc') if m in sys.modules))\n"
              "from handler import grpc_client\n"
              f"print(json.dumps(grpc_client.infer_v2(['a'], '127.0.0.1:{served.ports['grpc']}')))\n"
              "print(sorted(m for m in ('ts', 'torch') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.splitlines()
    assert_same(json.loads(out[0]), encode(["a", "b c"]))
    assert out[1] == "[]"  # the REST client: standard library only
    assert_same(json.loads(out[2]), encode(["a"]))
    assert out[3] == "[]"  # the gRPC client: grpcio, no TorchServe, no torch
    from handler.rest_client import Client, PredictionError

    with pytest.raises(PredictionError, match="empty text") as bad:
        Client(f"http://127.0.0.1:{served.ports['inference']}").embed([""])
    assert bad.value.status == 400


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
