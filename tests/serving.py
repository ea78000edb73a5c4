"""A real TorchServe on free 127.0.0.1 ports in a temp dir, for serving tests."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil

from handler import server

ROOT = Path(__file__).resolve().parent.parent


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def build_mar(store: Path, name: str = "minilm", tp: int = 2, batch_size: int = 4, extra: list[str] = ()) -> Path:
    subprocess.run([sys.executable, "-m", "tracer", "build", "--tp-degree", str(tp), "--batch-size", str(batch_size),
                    "--model-name", name, "--export-path", str(store), *extra], check=True, capture_output=True)
    return store / f"{name}.mar"


def write_config(path: Path, store: Path, model: str) -> dict[str, int]:
    """The project's config.properties with free ports and this store."""
    inference, management, metrics, grpc_inference, grpc_management, worker = free_ports(6)
    ports = {"inference": inference, "management": management, "metrics": metrics, "grpc": grpc_inference}
    text = (ROOT / "config.properties").read_text()
    for key, port in [("inference_address", inference), ("management_address", management),
                      ("metrics_address", metrics)]:
        text = re.sub(rf"^{key}=http://127.0.0.1:\d+", f"{key}=http://127.0.0.1:{port}", text, flags=re.M)
    text = re.sub(r"^grpc_inference_port=\d+", f"grpc_inference_port={grpc_inference}", text, flags=re.M)
    text = re.sub(r"^grpc_management_port=\d+", f"grpc_management_port={grpc_management}", text, flags=re.M)
    text = re.sub(r"^model_store=.*", f"model_store={store}", text, flags=re.M)
    # each model (comma-separated): an archive, or a no-archive folder
    load = ",".join(f"{m}.mar" if (store / f"{m}.mar").exists() else m for m in model.split(","))
    text = re.sub(r"^load_models=.*", f"load_models={load}", text, flags=re.M)
    # workers talk to the frontend on /tmp/.ts.sock.<port>, 9000 by default: apart from `make serve`'s
    text += f"initial_worker_port={worker}\n"
    path.write_text(text)
    return ports


@dataclass
class Server:
    process: subprocess.Popen
    ports: dict[str, int]
    log_dir: Path
    model: str = "minilm"
    timings: Path | None = None  # handler/timings.py's file, where the workers were told to write it

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports['inference']}/predictions/{self.model}"

    def post(self, body: bytes | str, content_type: str = "text/plain", timeout: float = 60):
        """(status, headers, parsed JSON or raw text)"""
        data = body.encode() if isinstance(body, str) else body
        request = urllib.request.Request(self.url, data=data, method="POST", headers={"Content-Type": content_type})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                status, headers, raw = response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as exc:
            status, headers, raw = exc.code, dict(exc.headers), exc.read()
        try:
            return status, headers, json.loads(raw)
        except ValueError:
            return status, headers, raw.decode(errors="replace")

    def openai(self, timeout: float = 120):
        """The official openai client on this model's OpenAI-compatible routes (no retries)."""
        import openai

        base_url = f"http://127.0.0.1:{self.ports['inference']}/predictions/{self.model}/1.0/v1"
        return openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=timeout)

    def our_processes(self) -> list[psutil.Process]:
        frontend = psutil.Process(self.process.pid)
        return [frontend, *frontend.children(recursive=True)]

    def stop(self) -> None:
        if self.process.poll() is None:
            server.stop(self.process.pid)
            self.process.wait(timeout=30)


class HandlerBatch:
    """What TorchServe's worker hands EncoderHandler.handle(): bodies (undecoded: the handler turns
    TorchServe's decoding off) and a Context with one RequestProcessor of headers per request."""

    def __init__(self, handler_dir, name: str = "minilm", settings: dict | None = None) -> None:
        import ts
        from ts.context import Context
        from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

        from handler.encoder_handler import EncoderHandler

        metrics = MetricsCacheYamlImpl(str(Path(ts.__file__).parent / "configs" / "metrics.yaml"))
        metrics.initialize_cache()
        self.context = Context(name, str(handler_dir), None, 8, None, ts.__version__, metrics=metrics,
                               model_yaml_config={"handler": settings or {"max_inputs_per_request": 64}})
        self.handler = EncoderHandler()
        self.handler.initialize(self.context)

    def run(self, requests: list[tuple]) -> list[tuple[int, object]]:
        """requests: (Content-Type, body) or (Content-Type, body, more headers); Content-Type None:
        no HTTP headers at all (what a gRPC ModelInfer request carries)."""
        from ts.context import RequestProcessor

        self.context.request_processor = [
            RequestProcessor({} if r[0] is None else {"Content-Type": r[0], **(r[2] if len(r) > 2 else {})})
            for r in requests]
        self.context.metrics.request_ids = {i: f"r{i}" for i in range(len(requests))}
        answers = self.handler.handle([{"body": bytearray(r[1])} for r in requests], self.context)
        assert len(answers) == len(requests)
        statuses = [self.context.get_response_status(i)[0] for i in range(len(requests))]
        return [(status, json.loads(answer)) for status, answer in zip(statuses, answers, strict=True)]


def start_server(tmp: Path, store: Path, model: str = "minilm", wait_for_models: bool = True) -> Server:
    ports = write_config(tmp / "config.properties", store, model)
    process = server.start(tmp / "config.properties", store, tmp / "logs", timeout_s=300,
                           wait_for_models=wait_for_models)
    return Server(process, ports, tmp / "logs", model)


def post_json(url: str, body, timeout: float = 120) -> tuple[int, dict]:
    """(status, the JSON answer) of a POST of `body` (a dict, or bytes sent as they are), errors included."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
