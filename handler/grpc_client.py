"""A small gRPC client for TorchServe's inference API and its Open Inference Protocol (KServe v2).

    python -m handler.grpc_client "some text" ["another text" ...] [--target 127.0.0.1:7070] [--model minilm]

Needs grpcio, grpcio-tools and googleapis-common-protos, not TorchServe: the .proto files ship in
handler/protos/ (copied from TorchServe 0.12's frontend jar, Apache-2.0) and stubs are generated on
first use into ~/.cache/tpserve/grpc-<hash>/, so they always match the installed grpcio. One text is
sent as the "body" input; several are sent as a JSON {"inputs": [...]} in the "json" input, and come
back as a list of embeddings in order. infer_v2() calls ModelInfer of TorchServe's
open_inference_grpc.proto (package org.pytorch.serve.grpc.openinference, not KServe's `inference`).

TorchServe 0.12's gRPC answers OK whatever status the handler set, so a bad input comes back as the
handler's error body (or, for ModelInfer, an "error" output); both raise PredictionError here.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import sys
from pathlib import Path

from handler.rest_client import PredictionError  # noqa: F401 - raised here too, one class for both clients
from tracer.cache_dir import cache_dir

PROTOS = Path(__file__).parent / "protos"


def _stub_modules(name: str = "inference"):
    """(name_pb2, name_pb2_grpc) for protos/NAME.proto, generated once per proto and grpcio-tools."""
    import google.rpc.status_pb2
    import grpc_tools
    from grpc_tools import protoc

    proto = (PROTOS / f"{name}.proto").read_bytes()
    out = cache_dir() / f"grpc-{hashlib.sha256(proto + grpc_tools.__file__.encode()).hexdigest()[:16]}"
    if not (out / f"{name}_pb2_grpc.py").is_file():
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{name}.proto").write_bytes(proto)
        googleapis = Path(google.rpc.status_pb2.__file__).parent.parent.parent
        well_known = Path(grpc_tools.__file__).parent / "_proto"
        code = protoc.main(["protoc", f"-I{out}", f"-I{googleapis}", f"-I{well_known}", f"--python_out={out}",
                            f"--grpc_python_out={out}", str(out / f"{name}.proto")])
        if code != 0:
            raise RuntimeError(f"protoc failed ({code}) generating stubs into {out}")
    if str(out) not in sys.path:
        sys.path.insert(0, str(out))
    return importlib.import_module(f"{name}_pb2"), importlib.import_module(f"{name}_pb2_grpc")


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


def rerank(query: str, documents: list[str], target: str = "127.0.0.1:7070", model: str = "reranker",
           timeout: float = 60, **options) -> list[dict]:
    """A reranker's [{"index", "score"}] for the documents, highest score first (the native rerank body,
    in the "json" input of Predictions; options: raw_scores, return_text, top_n)."""
    import grpc

    pb2, pb2_grpc = _stub_modules()
    body = json.dumps({"query": query, "texts": documents, **options}).encode()
    with grpc.insecure_channel(target) as channel:
        response = pb2_grpc.InferenceAPIsServiceStub(channel).Predictions(
            pb2.PredictionsRequest(model_name=model, input={"json": body}), timeout=timeout)
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


def _model_infer(tensors: dict[str, list[str]], target: str, model: str, timeout: float, request_id: str):
    """ModelInfer of the Open Inference Protocol with BYTES inputs {name: texts}: its outputs by name."""
    import grpc

    pb2, pb2_grpc = _stub_modules("open_inference_grpc")
    inputs = [pb2.ModelInferRequest.InferInputTensor(
        name=name, datatype="BYTES", shape=[len(texts)],
        contents=pb2.InferTensorContents(bytes_contents=[t.encode() for t in texts]))
        for name, texts in tensors.items()]
    with grpc.insecure_channel(target) as channel:
        response = pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            pb2.ModelInferRequest(model_name=model, id=request_id, inputs=inputs), timeout=timeout)
    outputs = {o.name: o for o in response.outputs}
    if "error" in outputs:  # TorchServe writes BYTES outputs as JSON text: "\"400: ...\""
        status, _, message = json.loads(outputs["error"].contents.bytes_contents[0]).partition(": ")
        raise PredictionError(int(status), message)
    return outputs


def infer_v2(texts: list[str], target: str = "127.0.0.1:7070", model: str = "minilm", timeout: float = 60,
             request_id: str = "") -> list[list[float]]:
    """Embeddings of texts through the Open Inference Protocol's ModelInfer (BYTES in, FP32 out)."""
    out = _model_infer({"text": texts}, target, model, timeout, request_id)["embedding"]
    rows, dim = out.shape
    data = list(out.contents.fp32_contents)
    return [data[i * dim:(i + 1) * dim] for i in range(rows)]


def rerank_v2(query: str, documents: list[str], target: str = "127.0.0.1:7070", model: str = "reranker",
              timeout: float = 60) -> list[float]:
    """Each document's relevance, in document order, through ModelInfer ("query" and "documents" in,
    FP32 "scores" out)."""
    out = _model_infer({"query": [query], "documents": documents}, target, model, timeout, "")["scores"]
    return list(out.contents.fp32_contents)


def model_ready(target: str = "127.0.0.1:7070", model: str = "minilm", timeout: float = 10) -> bool:
    """ModelReady of the Open Inference Protocol (TorchServe: a healthy worker per minWorkers)."""
    import grpc

    pb2, pb2_grpc = _stub_modules("open_inference_grpc")
    with grpc.insecure_channel(target) as channel:
        return pb2_grpc.GRPCInferenceServiceStub(channel).ModelReady(
            pb2.ModelReadyRequest(name=model), timeout=timeout).ready


def model_metadata(target: str = "127.0.0.1:7070", model: str = "minilm", timeout: float = 10) -> dict:
    """ModelMetadata of the Open Inference Protocol: TorchServe's frontend answers it itself with the
    model's name and registered versions (no tensor metadata)."""
    import grpc

    pb2, pb2_grpc = _stub_modules("open_inference_grpc")
    with grpc.insecure_channel(target) as channel:
        meta = pb2_grpc.GRPCInferenceServiceStub(channel).ModelMetadata(
            pb2.ModelMetadataRequest(name=model), timeout=timeout)
    return {"name": meta.name, "versions": list(meta.versions), "platform": meta.platform}


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
