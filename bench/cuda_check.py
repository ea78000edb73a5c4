"""GPU check for the process executor (run where a CUDA GPU exists): tp=1 on cuda:0 over NCCL
equals the unsharded Hugging Face model, for an encoder (a tiny BERT's hidden states) and a decoder
(a random Llama with grouped-query attention: 64 greedy tokens of each of 4 prompts equal
generate()'s, its KV cache kept on the GPU between steps). Prints one JSON line per model.

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

PROMPTS = [[5, 17, 33, 2, 9], [7] * 13, [100, 3], [42]]


def report(model: str, ok: bool, **facts) -> None:
    print(json.dumps({"model": model, "device": torch.cuda.get_device_name(0), "torch": torch.__version__, "tp": 1,
                      "executor": "processes/nccl", **facts, "ok": ok}))


def encoder() -> None:
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
    report("tiny BERT", diff <= 1e-4, max_abs_diff=diff, load_and_first_call_s=round(load_and_first_call_s, 2))


def decoder() -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tracer.builder.decoder_checkpoint import trace_decoder
    from tracer.engine.generator import Generator, SamplingParams

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=False, eos_token_id=None, bos_token_id=None, pad_token_id=None)
    hf = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        expected = [hf.generate(torch.tensor([p]), max_new_tokens=64, min_new_tokens=64, do_sample=False)[0, len(p):]
                    .tolist() for p in PROMPTS]
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        trace_decoder(Path(tmp), json.loads((Path(tmp) / "config.json").read_text()), 1, Path(tmp) / "tp1",
                      prefill=[16, 64], max_context=128, batch_size=2)
        started = time.time()
        generator = Generator(Path(tmp) / "tp1", executor="processes", device="cuda")
        try:
            got = [c.token_ids for c in generator.generate(PROMPTS, SamplingParams(max_new_tokens=64))]
        finally:
            generator.close()
    same = sum(a == b for g, e in zip(got, expected, strict=True) for a, b in zip(g, e, strict=True))
    report("random Llama (GQA)", got == expected, greedy_tokens_equal=f"{same}/{64 * len(PROMPTS)}",
           load_and_generate_s=round(time.time() - started, 2))


if __name__ == "__main__":
    encoder()
    decoder()
