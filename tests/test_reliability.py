"""Reliability and security against a real TorchServe: soak, faults, hostile input, integrity."""

import base64
import concurrent.futures
import functools
import http.client
import io
import json
import os
import random
import re
import signal
import string
import time
import zipfile

import psutil
import pytest
import torch
from builders import build_minilm_with_fault_in_rank_one
from conftest import MINILM_DIR
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serving import HandlerBatch, start_server

from bench.soak import mixed_texts, soak
from handler.request_parsing import RequestError, parse_texts
from tracer.builder.archive import build_archive
from tracer.builder.encoder_checkpoint import trace_checkpoint
from tracer.engine.embedder import Embedder


def _workers(server) -> list[psutil.Process]:
    """The model's running worker processes (killed ones linger as zombies until reaped)."""
    workers = []
    for process in server.our_processes()[1:]:
        try:
            if "model_service_worker" in " ".join(process.cmdline()):
                workers.append(process)
        except psutil.Error:  # exited, or a zombie
            pass
    return workers


def test_short_soak_16_clients_mixed_lengths(served, store):
    texts = mixed_texts()
    embedder = Embedder(store / "minilm.shards")
    reference = {t: torch.tensor(v) for t, v in zip(texts, embedder.embed(texts), strict=True)}
    embedder.close()
    result = soak(served.ports["inference"], "minilm", served.process.pid, texts, reference, clients=16, seconds=20)
    print(json.dumps(result))
    assert result["requests"] > 50
    assert result["failed"] == 0 and result["wrong"] == 0, result["first_failures"]
    assert result["rss_growth"] < 0.05


ALPHABET = string.printable + "éü中文🙂\u200b\x00"
BODIES = st.one_of(
    st.binary(max_size=300),
    st.text(alphabet=ALPHABET, max_size=300),
    st.builds(json.dumps, st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                                       lambda inner: st.lists(inner, max_size=4)
                                       | st.dictionaries(st.sampled_from(["inputs", "text", "x"]), inner, max_size=3),
                                       max_leaves=8)),
    st.builds(lambda xs: json.dumps({"inputs": xs}), st.lists(st.text(alphabet=ALPHABET, max_size=40), max_size=70)),
)
CONTENT_TYPES = st.sampled_from(["text/plain", "application/json", "application/octet-stream", "text/html",
                                 "application/json; charset=utf-8", ""])


@settings(max_examples=400, deadline=None)
@given(value=st.one_of(BODIES, st.builds(bytearray, st.binary(max_size=50))), content_type=CONTENT_TYPES)
def test_fuzz_request_parsing_only_ever_raises_request_error(value, content_type):
    try:
        texts, _ = parse_texts(value, content_type, 64)
    except RequestError as exc:
        assert 400 <= exc.status < 500
    else:
        assert texts and all(isinstance(t, str) and t.strip() for t in texts)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=BODIES, content_type=CONTENT_TYPES)
def test_fuzz_live_server_never_5xx_never_a_dead_worker(served, body, content_type):
    worker_pids = {p.pid for p in _workers(served)}
    status, _, _ = served.post(body, content_type or "application/x-unknown")
    assert status < 500
    assert {p.pid for p in _workers(served)} == worker_pids


# Hostile request bodies: each must fail only its own request (4xx), whatever else is in the batch.
HOSTILE = st.one_of(
    st.sampled_from([
        ("application/json", b'{"inputs": ["\\ud800"]}'),           # lone surrogate, valid JSON
        ("application/json", b'{"inputs": "a \\udfff b"}'),
        ("application/json", b'{"inputs": '),
        ("text/plain", b"\xff\xfe"),
        ("text/plain", "\ud800".encode("utf-8", "surrogatepass")),  # a surrogate as raw bytes: invalid UTF-8
        ("application/x-www-form-urlencoded", b"a=b"),
        ("image/png", b"\x89PNG"),
        ("text/plain", b""),
        ("application/json", json.dumps({"inputs": ["x"] * 65}).encode()),
    ]),
    st.tuples(CONTENT_TYPES, BODIES.map(lambda b: b.encode("utf-8", "surrogatepass") if isinstance(b, str) else b)),
)
GOOD_TEXTS = st.text(alphabet=string.ascii_letters + " éü中文🙂", min_size=1, max_size=60).filter(str.strip)


@pytest.fixture(scope="module")
def batch_handler(store):
    batch = HandlerBatch(store / "minilm.shards")
    yield batch
    batch.handler.embedder.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(good=st.lists(GOOD_TEXTS, min_size=1, max_size=7), hostile=st.lists(HOSTILE, min_size=1, max_size=3),
       data=st.data())
def test_fuzz_batches_a_hostile_request_fails_only_itself(batch_handler, good, hostile, data):
    """Hypothesis-made batches of good and hostile bodies through the handler's batch entry point:
    every good request gets its right embedding, every hostile one a 4xx of its own."""
    requests = [("text/plain", t.encode()) for t in good] + list(hostile)
    order = data.draw(st.permutations(range(len(requests))))
    answers = batch_handler.run([requests[i] for i in order])
    expected = batch_handler.handler.embedder.embed(good)
    for position, i in enumerate(order):
        status, body = answers[position]
        if i < len(good):
            assert status == 200, body
            assert (torch.tensor(body) - torch.tensor(expected[i])).abs().max() <= 1e-4
        else:
            assert 400 <= status < 500 or status == 200, body  # a random body may well be a good text
            if status != 200:
                assert body["status"] == status and body["error"]


def _v2(texts: list[str], datatype: str = "BYTES", **more) -> bytes:
    return json.dumps({**more, "inputs": [{"name": "text", "shape": [len(texts)], "datatype": datatype,
                                           "data": texts}]}).encode()


def test_every_protocol_in_one_batch_a_hostile_request_fails_only_itself(batch_handler):
    """Native, OpenAI and KServe v2 (REST and gRPC) requests, good and hostile, shuffled into one
    batch: every good one gets its right embedding in its protocol's shape, every hostile one its
    own error in its protocol's shape."""
    openai = {"url_path": "v1/embeddings"}
    grpc_text = base64.b64encode(b"gRPC text").decode()
    good = [  # (request, its texts, where its embeddings are in the answer)
        (("text/plain", b"native text"), ["native text"], lambda b: [b]),
        (("application/json", json.dumps({"input": ["openai text"], "encoding_format": "float"}).encode(), openai),
         ["openai text"], lambda b: [d["embedding"] for d in b["data"]]),
        (("application/json", _v2(["v2 text", "another"], id="r1")), ["v2 text", "another"],
         lambda b: [b["outputs"][0]["data"][:384], b["outputs"][0]["data"][384:]]),
        ((None, _v2([grpc_text], id="g1", model_name="minilm")), ["gRPC text"], lambda b: [b["outputs"][0]["data"]]),
    ]
    hostile = [  # (request, its status, a check of its error body)
        (("application/json", json.dumps({"input": "x", "dimensions": 3}).encode(), openai), 400,
         lambda b: b["error"]["type"] == "invalid_request_error"),
        (("application/json", json.dumps({"input": [[101, 10**9]]}).encode(), openai), 400,
         lambda b: "vocabulary" in b["error"]["message"]),
        (("application/json", b'{"input": "x"}', {"url_path": "v1/nope"}), 404, lambda b: b["error"]["code"] == 404),
        (("application/json", _v2(["1.0"], "FP32")), 400, lambda b: "BYTES" in b["error"]),
        (("application/json", b'{"inputs": "a \\udfff b"}'), 400, lambda b: b["status"] == 400),
        # gRPC: TorchServe ignores the status, so the error is an output of a well-formed answer
        ((None, _v2(["!!not base64"], id="g2", model_name="minilm")), 200,
         lambda b: b["id"] == "g2" and b["outputs"][0]["name"] == "error"),
    ]
    cases = [("good", *g) for g in good] + [("hostile", *h) for h in hostile]
    random.Random(7).shuffle(cases)
    answers = batch_handler.run([case[1] for case in cases])
    for (kind, _, a, b), (status, body) in zip(cases, answers, strict=True):
        if kind == "good":
            texts, embeddings = a, b
            assert status == 200, body
            got, want = torch.tensor(embeddings(body)), torch.tensor(batch_handler.handler.embedder.embed(texts))
            assert (got - want).abs().max() <= 1e-4
        else:
            assert status == a and b(body), body


def test_live_server_batch_of_8_one_hostile_client_fails_no_good_request(served, store):
    """batchSize 8: six clients of good text and one sending hostile bodies at the same time."""
    texts = mixed_texts(24)
    embedder = Embedder(store / "minilm.shards")
    reference = dict(zip(texts, embedder.embed(texts), strict=True))
    embedder.close()
    hostile = [("application/json", '{"inputs": ["\\ud800"]}'), ("application/json", '{"inputs": '),
               ("text/plain", b"\xff"), ("image/png", b"\x89PNG"), ("application/x-www-form-urlencoded", "a b")]
    stop_at = time.monotonic() + 8

    def good_client(seed: int) -> list[str]:
        problems, rng = [], random.Random(seed)
        while time.monotonic() < stop_at:
            text = rng.choice(texts)
            status, _, body = served.post(text)
            if status != 200 or (torch.tensor(body) - torch.tensor(reference[text])).abs().max() > 1e-4:
                problems.append(f"{status}: {str(body)[:80]}")
        return problems

    def hostile_client() -> list[int]:
        statuses = []
        while time.monotonic() < stop_at:
            for content_type, body in hostile:
                statuses.append(served.post(body, content_type)[0])
        return statuses

    with concurrent.futures.ThreadPoolExecutor(7) as pool:
        good = [pool.submit(good_client, seed) for seed in range(6)]
        bad = pool.submit(hostile_client)
        problems = [p for f in good for p in f.result()]
        statuses = bad.result()
    print(f"hostile requests: {len(statuses)}, statuses {sorted(set(statuses))}")
    assert not problems, problems[:5]
    assert statuses and all(400 <= s < 500 for s in statuses)


def test_body_over_the_size_limit_is_413(served):
    status, _, _ = served.post("word " * 300_000)  # 1.5 MB > max_request_size (1 MiB)
    assert status == 413
    assert served.post("a good request")[0] == 200


def test_exception_inside_one_rank_is_5xx_and_the_next_request_succeeds(tmp_path):
    shards = tmp_path / "faulty.shards"
    trace_checkpoint(MINILM_DIR, 2, [16, 32], shards, func=functools.partial(build_minilm_with_fault_in_rank_one,
                                                                             MINILM_DIR))
    build_archive(shards, "faulty", tmp_path / "store")
    server = start_server(tmp_path, tmp_path / "store", "faulty")
    try:
        for _ in range(2):  # no hang, no deadlock of the other rank: it fails and serves again
            status, _, body = server.post("tensor parallel inference")  # token ids >= 3000: rank 1 fails
            assert status == 500 and "rank 1 failed" in body["error"]
            status, _, body = server.post("the of and")  # token ids < 3000
            assert status == 200 and len(body) == 384
    finally:
        server.stop()


def test_request_while_the_model_loads_waits_or_gets_503_never_a_crash(tmp_path, store):
    """TorchServe 0.12 queues a request that arrives while the model's worker loads (503 only when
    no worker can take it); either way the worker is not disturbed and the answer is right."""
    server = start_server(tmp_path, store, wait_for_models=False)
    try:
        statuses, started = [], time.monotonic()
        while time.monotonic() < started + 120 and (not statuses or statuses[-1] != 200):
            statuses.append(server.post("are you up?")[0])
            time.sleep(0.05)
        print(f"first answer after {time.monotonic() - started:.1f}s; statuses {statuses}")
        assert statuses[-1] == 200 and set(statuses[:-1]) <= {503}
        assert len(_workers(server)) == 1
    finally:
        server.stop()


def test_sigkilled_worker_is_restarted_even_mid_load(tmp_path, store):
    server = start_server(tmp_path, store)
    try:
        old = _workers(server)
        killed_at = time.monotonic()
        for worker in old:
            worker.send_signal(signal.SIGKILL)
        # kill the replacement too, while it is loading the model
        deadline = time.monotonic() + 60
        while not (new := [w for w in _workers(server) if w.pid not in {o.pid for o in old}]):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        new[0].send_signal(signal.SIGKILL)
        statuses = []
        while time.monotonic() < killed_at + 120:
            statuses.append(server.post("still there?")[0])
            if statuses[-1] == 200:
                break
            time.sleep(0.05)
        recovery_s = time.monotonic() - killed_at
        print(f"recovered in {recovery_s:.1f}s after 2 SIGKILLs; statuses before: {sorted(set(statuses[:-1]))}")
        assert statuses[-1] == 200 and set(statuses[:-1]) <= {503}  # TorchServe queues or answers 503
        for worker in [*old, new[0]]:
            assert not psutil.pid_exists(worker.pid) or worker.status() == psutil.STATUS_ZOMBIE
    finally:
        server.stop()


def _rewrite_mar(source, target, edit) -> None:
    """Copy a .mar, letting edit(name, data) return new bytes or None (drop the entry)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(buffer, "w") as dst:
        for item in src.infolist():
            data = edit(item.filename, src.read(item.filename))
            if data is not None:
                dst.writestr(item, data)
    target.write_bytes(buffer.getvalue())


def _flip_byte(name, data):
    return data[:100] + bytes([data[100] ^ 0xFF]) + data[101:] if name == "tp_1/bucket_0.pt" else data


def _edit_tokenizer(name, data):
    if name != "tokenizer/tokenizer.json":
        return data
    return data.replace(b'"[UNK]"', b'"[UNKNOWN]"', 1)  # a quietly different vocabulary


# Live, two of the refusals (each start ends at the handler's first refusal, ~6 s); every other
# refusal (missing rank, tp / torch / tpserve version mismatch) is the same handler path and is
# tested in-process in test_save_load.py.
@pytest.mark.parametrize("edit, reason", [
    (_flip_byte, "ChecksumMismatchError: "),
    (_edit_tokenizer, "ChecksumMismatchError: .*tokenizer/tokenizer.json"),
])
def test_worker_refuses_damaged_artifacts_with_a_one_line_reason(tmp_path, store, edit, reason):
    (tmp_path / "bad").mkdir()
    _rewrite_mar(store / "minilm.mar", tmp_path / "bad" / "minilm.mar", edit)
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="worker cannot start: tpserve: refusing to load"):
        start_server(tmp_path, tmp_path / "bad")
    print(f"refused in {time.monotonic() - started:.1f}s")  # at the first refusal, not after TorchServe's retries
    refusals = [line for line in (tmp_path / "logs" / "model_log.log").read_text().splitlines()
                if "tpserve: refusing to load" in line]
    assert refusals and re.search(reason, refusals[0])
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(tmp_path) in " ".join(p.info["cmdline"] or [])]


def test_http_keeps_serving_after_a_client_disconnects_mid_request(served):
    connection = http.client.HTTPConnection("127.0.0.1", served.ports["inference"], timeout=10)
    connection.putrequest("POST", "/predictions/minilm")
    connection.putheader("Content-Type", "text/plain")
    connection.putheader("Content-Length", "1000")
    connection.endheaders(b"only part of the body")
    connection.close()
    assert served.post("still serving")[0] == 200
    assert os.path.exists(served.log_dir)
