"""A small gRPC client for TorchServe's inference API.

    python -m handler.grpc_client "some text" ["another text" ...] [--target 127.0.0.1:7070] [--model minilm]

Stubs are generated on first use from the inference.proto inside the installed TorchServe jar
(grpcio-tools + googleapis-common-protos) into ~/.cache/tpserve/grpc-<hash>/, so they always match
the installed TorchServe and grpcio. One text is sent as the "body" input; several are sent as a
JSON {"inputs": [...]} in the "json" input, and come back as a list of embeddings in order.

TorchServe 0.12's gRPC Predictions answers OK whatever status the handler set, so a bad input
comes back as the handler's {"error", "status"} body; embed() raises PredictionError for it.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import sys
import zipfile
from pathlib import Path

from tracer.cache_dir import cache_dir


class PredictionError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status, self.message = status, message


def _stub_modules():
    import google.rpc.status_pb2
    import grpc_tools
    import ts
    from grpc_tools import protoc

    jar = Path(ts.__file__).parent / "frontend" / "model-server.jar"
    with zipfile.ZipFile(jar) as archive:
        proto = archive.read("inference.proto")
    out = cache_dir() / f"grpc-{hashlib.sha256(proto + grpc_tools.__file__.encode()).hexdigest()[:16]}"
    if not (out / "inference_pb2_grpc.py").is_file():
        out.mkdir(parents=True, exist_ok=True)
        (out / "inference.proto").write_bytes(proto)
        googleapis = Path(google.rpc.status_pb2.__file__).parent.parent.parent
        well_known = Path(grpc_tools.__file__).parent / "_proto"
        code = protoc.main(["protoc", f"-I{out}", f"-I{googleapis}", f"-I{well_known}", f"--python_out={out}",
                            f"--grpc_python_out={out}", str(out / "inference.proto")])
        if code != 0:
            raise RuntimeError(f"protoc failed ({code}) generating stubs into {out}")
    sys.path.insert(0, str(out))
    return importlib.import_module("inference_pb2"), importlib.import_module("inference_pb2_grpc")


def embed(texts: str | list[str], target: str = "127.0.0.1:7070", model: str = "minilm", timeout: float = 60):
    """One embedding for a string, a list of embeddings for a list. Raises grpc.RpcError on errors."""
    import grpc

    pb2, pb2_grpc = _stub_modules()
    if isinstance(texts, str):
        inputs = {"body": texts.encode()}
    else:
        inputs = {"json": json.dumps({"inputs": texts}).encode()}
    with grpc.insecure_channel(target) as channel:
        stub = pb2_grpc.InferenceAPIsServiceStub(channel)
        response = stub.Predictions(pb2.PredictionsRequest(model_name=model, input=inputs), timeout=timeout)
    result = json.loads(response.prediction)
    if isinstance(result, dict) and "error" in result:
        raise PredictionError(result.get("status", 500), result["error"])
    return result


def stream_generate(body: dict, target: str = "127.0.0.1:7070", model: str = "smollm2", timeout: float = 300):
    """Yields the JSON lines of a streamed generation ({"token_id", "text"}, the last with
    finish_reason and usage) over TorchServe's StreamPredictions."""
    import grpc

    pb2, pb2_grpc = _stub_modules()
    request = pb2.PredictionsRequest(model_name=model, input={"json": json.dumps({**body, "stream": True}).encode()})
    with grpc.insecure_channel(target) as channel:
        for response in pb2_grpc.InferenceAPIsServiceStub(channel).StreamPredictions(request, timeout=timeout):
            for line in response.prediction.decode().splitlines():
                result = json.loads(line)
                if "error" in result:
                    raise PredictionError(result.get("status", 500), result["error"])
                yield result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m handler.grpc_client", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("texts", nargs="+")
    parser.add_argument("--target", default="127.0.0.1:7070")
    parser.add_argument("--model", default="minilm")
    args = parser.parse_args(argv)
    import grpc

    try:
        result = embed(args.texts[0] if len(args.texts) == 1 else args.texts, args.target, args.model)
    except grpc.RpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except PredictionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
