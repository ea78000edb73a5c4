"""GPU check for the process executor (run where a CUDA GPU exists): tp=1 on cuda:0 over NCCL
equals the unsharded Hugging Face model. Prints one JSON line.

    PYTHONPATH=.:tests python3 -m bench.cuda_check
"""

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from builders import build_tiny_bert, tiny_bert_reference  # noqa: E402

import tracer  # noqa: E402


def main() -> None:
    ids = torch.randint(0, 101, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    with torch.no_grad():
        expected = tiny_bert_reference()(input_ids=ids, attention_mask=mask, return_dict=False)[0]
    with tempfile.TemporaryDirectory() as tmp:
        model = tracer.parallel_model_trace(build_tiny_bert, (ids, mask), tp_degree=1)
        tracer.parallel_model_save(model, tmp)
        model.close()
        started = time.time()
        with tracer.parallel_model_load(tmp, executor="processes", device="cuda") as on_gpu:
            got = on_gpu(ids, mask)
            load_and_first_call_s = time.time() - started
    diff = (got - expected)[mask.bool()].abs().max().item()
    print(json.dumps({"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "tp": 1,
                      "executor": "processes/nccl", "max_abs_diff": diff, "ok": diff <= 1e-4,
                      "load_and_first_call_s": round(load_and_first_call_s, 2)}))


if __name__ == "__main__":
    main()
