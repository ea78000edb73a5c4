"""Weight formats on a random Llama: teacher-forced top-1 agreement with Hugging Face fp32 and
perplexity on the fixed text (tests/data/quality_text.txt, SmolLM2's tokenizer), for fp32, int8 and
int4 at tp 1 and 2. The second model next to SmolLM2 (bench/generation.py): its weights are Gaussian,
not already on a 4-bit grid as SmolLM2's GGUF linears are, so int4 rounds here. Initialised with
std 0.1 (not HF's 0.02) so that its next-token distributions are peaked rather than near-uniform.

    .venv/bin/python -m bench.quantization_quality
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import torch

from bench.common import table
from bench.generation import QUALITY_TEXT, hf_reference


def main() -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tracer.builder.decoder_checkpoint import trace_decoder
    from tracer.builder.gguf_import import convert_gguf, smollm2_gguf
    from tracer.engine.generator import Generator

    torch.set_num_threads(2)
    tokenizer = AutoTokenizer.from_pretrained(str(convert_gguf(smollm2_gguf())))
    tokens = list(tokenizer(QUALITY_TEXT.read_text())["input_ids"])
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False, initializer_range=0.1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "random-llama"
        LlamaForCausalLM(config).eval().save_pretrained(directory)
        hf_top1, hf_perplexity = hf_reference(directory, tokens)
        hf_config = json.loads((directory / "config.json").read_text())
        for tp in (1, 2):
            for weights in ("fp32", "int8", "int4"):
                shards = Path(tmp) / f"tp{tp}-{weights}"
                trace_decoder(directory, hf_config, tp, shards, prefill=[16], max_context=512, batch_size=1,
                              weights=weights)
                generator = Generator(shards)
                top1, logprobs = generator.teacher_forced(tokens[:1], tokens[1:])
                generator.close()
                agreement = sum(a == b for a, b in zip(top1, hf_top1, strict=True)) / len(top1)
                perplexity = math.exp(-sum(logprobs) / len(logprobs))
                rows.append([f"tp={tp} {weights}", f"{agreement:.1%}", f"{perplexity:.1f}",
                             f"{perplexity / hf_perplexity:.4f}"])
    print(f"random Llama (4 layers, hidden 256, 8 heads / 2 KV heads, vocabulary 49152, std 0.1), "
          f"{len(tokens)} tokens of tests/data/quality_text.txt; HF fp32 perplexity {hf_perplexity:.1f}")
    print(table(["model", "top-1 agreement with HF fp32", "perplexity", "÷ HF fp32"], rows))
    sensitivity(config, tokens)


def sensitivity(config, tokens: list[int]) -> None:
    """How far any rounding of this model's linear weights moves its next tokens: Hugging Face eager
    with the weights rounded to fp16, bf16 (an 8-bit mantissa), int8 groups of 32 (simulated) or
    multiplied by 1 + 1e-3 noise, top-1 agreement with its fp32 self."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()  # the same seed: the same weights as above
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.tensor([tokens])
    with torch.no_grad():
        reference = model(ids).logits[0, :-1]
    top2 = reference.topk(2, -1).values

    def int8_groups(w: torch.Tensor) -> torch.Tensor:
        g = w.reshape(w.shape[0], -1, 32)
        low = g.amin(-1, keepdim=True)
        step = (g.amax(-1, keepdim=True) - low) / 255
        return (torch.round((g - low) / step) * step + low).reshape(w.shape)

    rows = []
    for name, rounding in [("fp16", lambda w: w.half().float()), ("bf16", lambda w: w.bfloat16().float()),
                           ("int8, groups of 32 (min-max)", int8_groups),
                           ("fp32 × (1 + 1e-3 noise)", lambda w: w * (1 + 1e-3 * torch.randn_like(w)))]:
        model.load_state_dict({k: rounding(v) if v.dim() == 2 and "embed" not in k else v for k, v in state.items()})
        with torch.no_grad():
            agreement = (model(ids).logits[0, :-1].argmax(-1) == reference.argmax(-1)).float().mean()
        rows.append([name, f"{agreement:.1%}"])
    print(f"its sensitivity (Hugging Face eager, linear weights rounded; median gap between its top two "
          f"logits {(top2[:, 0] - top2[:, 1]).median():.2f}, logit std {reference.std():.2f}):")
    print(table(["linear weights", "top-1 agreement with fp32"], rows))


if __name__ == "__main__":
    main()
