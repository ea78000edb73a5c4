"""Does TorchServe's async mode help the embedding handler? One run: MiniLM as `make serve` builds it
(tp 2, batch 8, fp32), archived twice: as today, and with `asyncCommunication: true` (batchSize 1)
and a handler whose `handle` is a coroutine around the same one (this file writes it into the copy:
a benchmark-only variant, not shipped). One TorchServe serves both; a single short text per request,
one client, the two taking turns request by request.

    .venv/bin/python -m bench.async_embeddings      # ~3 minutes
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from bench.common import http_session, table, write_results

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from serving import start_server  # noqa: E402

ASYNC_HANDLER = '''"""Benchmark-only: the embedding handler on TorchServe's async worker (bench/async_embeddings.py)."""
from handler.encoder_handler import EncoderHandler


from ts.handler_utils.utils import send_intermediate_predict_response


class AsyncEncoderHandler(EncoderHandler):
    async def handle(self, data, context):
        # as handler/async_generation_handler.py answers: the answer as a chunk, then an empty end
        # marked ts_stream_next "false" (the async frontend forgets a job only on that, and sends
        # such a first REST response without its HTTP head)
        answers = EncoderHandler.handle(self, data, context)
        send_intermediate_predict_response(answers, dict(context.request_ids), "Intermediate response", 200,
                                           context)
        for idx in range(len(answers)):
            context.set_response_header(idx, "ts_stream_next", "false")
        return [""] * len(answers)
'''
TEXT = "A short sentence to embed."
ROUNDS = 300


def async_copy(store: Path) -> None:
    """minilm-async: the minilm folder with the async handler and asyncCommunication."""
    target = store / "minilm-async"
    shutil.copytree(store / "minilm", target)
    (target / "encoder_handler.py").write_text(ASYNC_HANDLER)
    manifest = target / "MAR-INF" / "MANIFEST.json"
    record = json.loads(manifest.read_text())
    record["model"]["modelName"] = "minilm-async"
    manifest.write_text(json.dumps(record))
    config = yaml.safe_load((target / "model-config.yaml").read_text())
    config.update(asyncCommunication=True, batchSize=1)
    (target / "model-config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def main() -> None:
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:
        store = Path(tmp) / "store"
        subprocess.run([sys.executable, "-m", "tracer", "build", "--tp-degree", "2", "--batch-size", "8",
                        "--model-name", "minilm", "--export-path", str(store), "--archive-format", "no-archive"],
                       check=True, capture_output=True)
        async_copy(store)
        (Path(tmp) / "ts").mkdir()
        server = start_server(Path(tmp) / "ts", store, "minilm,minilm-async")
        port = server.ports["inference"]
        try:
            sessions = {name: http_session(port, f"/predictions/{name}", lambda text: (
                "application/json", json.dumps({"inputs": text}).encode()))() for name in ("minilm", "minilm-async")}
            for send in sessions.values():
                for i in range(20):
                    send(TEXT, f"warm-{i}")
            latencies = {name: [] for name in sessions}
            for i in range(ROUNDS):
                for name, send in sessions.items():
                    start = time.perf_counter()
                    send(TEXT, f"{name}-{i}")
                    latencies[name].append((time.perf_counter() - start) * 1000)
        finally:
            server.stop()
    rows = [[name, f"{statistics.median(v):.2f}", f"{sorted(v)[int(len(v) * 0.9)]:.2f}"]
            for name, v in latencies.items()]
    print(table(["MiniLM tp 2, one short text, one client", "median ms", "p90 ms"], rows))
    print("wrote", write_results("async_embeddings", [
        {"handler": name, "median_ms": statistics.median(v), "p90_ms": sorted(v)[int(len(v) * 0.9)]}
        for name, v in latencies.items()], rounds=ROUNDS))


if __name__ == "__main__":
    main()
