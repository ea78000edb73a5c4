"""Package traced shards as a TorchServe model archive with torch-model-archiver.

The shards folder is passed as ONE --extra-files folder: its contents (tp_{rank}/, manifest.json,
tokenizer/) land in the model dir with subfolders kept. (Listing files from
several folders instead would silently flatten same-named files such as tp_0/bucket_0.pt.)
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..artifacts import MANIFEST, Manifest
from ..errors import ManifestError, UsageError
from .encoder_checkpoint import check_output_dir

_HANDLER_DIR = Path(__file__).resolve().parents[2] / "handler"
HANDLERS = {"embedding": _HANDLER_DIR / "encoder_handler.py", "classification": _HANDLER_DIR / "encoder_handler.py",
            "generation": _HANDLER_DIR / "generation_handler.py"}
ASYNC_GENERATION_HANDLER = _HANDLER_DIR / "async_generation_handler.py"  # --async-worker


@dataclass
class ServeSettings:
    """What TorchServe and our handler read from the archive's model-config.yaml; None: the default
    for the model's kind. Flags of `python -m tracer archive|build` (no need to unzip a .mar)."""

    max_batch_delay_ms: int = 1              # measured: 1 beats 2 ms alone and under load (README)
    batch_size: int | None = None         # TorchServe batchSize (generation: the traced rows, fixed)
    workers: int = 1                      # minWorkers = maxWorkers
    threads_per_rank: int | None = None   # None: cores // (workers x tp) (handler/worker_threads.py)
    response_timeout_s: int | None = None
    startup_timeout_s: int = 600          # loading verifies checksums and binds every rank's weights
    too_long: str = "truncate"            # embeddings: or "reject" (413)
    max_inputs_per_request: int = 64      # encoders: texts per request (embed, classify)
    max_documents_per_request: int = 1000  # classification: documents per rerank request
    max_new_tokens: int = 256             # generation: the default when a request gives none
    continuous_batching: bool = False     # generation: join and leave at every token (handler docstring)
    async_worker: bool = False            # generation: the worker runs the loop (async_generation_handler.py)
    prefill_chunk: int = 256              # generation, continuous batching: prompt tokens prefilled per step
    prefix_caching: bool = True           # generation: reuse a cache row's prefix (engine/prefix_cache.py)
    prompt_lookup: bool = True            # generation: greedy rows draft tokens from their context

    def check(self, kind: str | None = None) -> None:
        if self.max_batch_delay_ms < 1:  # measured: a lone request then waits 100 ms for its batch
            raise UsageError(f"--max-batch-delay must be >= 1 ms (TorchServe reads 0 as its default, 100 ms), "
                             f"got {self.max_batch_delay_ms}")
        flags = {"batch_size": "serve-batch-size", "workers": "workers", "threads_per_rank": "threads-per-rank",
                 "response_timeout_s": "response-timeout",
                 "startup_timeout_s": "startup-timeout", "max_inputs_per_request": "max-inputs-per-request",
                 "max_documents_per_request": "max-documents-per-request",
                 "max_new_tokens": "max-new-tokens"}
        for name, flag in flags.items():
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UsageError(f"--{flag} must be >= 1, got {value}")
        if self.prefill_chunk < 0:
            raise UsageError(f"--prefill-chunk must be >= 0 (0: whole prompts), got {self.prefill_chunk}")
        if self.too_long not in ("truncate", "reject"):
            raise UsageError(f"--too-long must be truncate or reject, got {self.too_long!r}")
        for flag, on in (("continuous-batching", self.continuous_batching), ("async-worker", self.async_worker)):
            if kind in ("embedding", "classification") and on:
                raise UsageError(f"--{flag} is for generation models")
        if self.continuous_batching and self.async_worker:
            raise UsageError("--async-worker runs continuous batching in the worker: leave out --continuous-batching")
        if kind == "generation" and self.batch_size is not None:
            raise UsageError("--serve-batch-size is for embeddings: a generation model's batch is its traced "
                             "--batch-size (one KV-cache row per request)")


def model_config(manifest: Manifest, settings: ServeSettings | None = None, torchrun: bool = False) -> dict:
    """model-config.yaml: TorchServe's worker settings plus our handler's. torchrun=True: TorchServe
    starts each worker as tp_degree processes with torchrun, one rank each (parallelType tp)."""
    s = settings or ServeSettings()
    generation = manifest.model.get("kind") == "generation"
    config = {
        "minWorkers": s.workers,
        "maxWorkers": s.workers,
        # generation: the requests of one batch decode together, one cache row each
        "batchSize": manifest.model["decoder"]["max_batch"] if generation else s.batch_size or manifest.batch_size(),
        "maxBatchDelay": s.max_batch_delay_ms,
        "responseTimeout": s.response_timeout_s or (300 if generation else 120),
        "startupTimeout": s.startup_timeout_s,
        "handler": {"tp_degree": manifest.tp_degree, "max_new_tokens": s.max_new_tokens,
                    "prefill_chunk": s.prefill_chunk, "prefix_caching": s.prefix_caching,
                    "prompt_lookup": s.prompt_lookup} if generation else {
            "tp_degree": manifest.tp_degree,
            "max_inputs_per_request": s.max_inputs_per_request,
            "max_documents_per_request": s.max_documents_per_request,
            "too_long": s.too_long,
        },
    }
    if generation and s.continuous_batching:  # one handler call per step (handler/generation_handler.py)
        config["continuousBatching"] = True
    if generation and s.async_worker:  # requests reach the worker one by one, as they arrive
        config["asyncCommunication"] = True
        config["batchSize"] = 1
    if s.threads_per_rank is not None:
        config["handler"]["threads_per_rank"] = s.threads_per_rank
    if torchrun:
        config["parallelType"] = "tp"
        # rendezvous on loopback with a free port (as `torchrun --standalone`), not the fixed 29400
        config["torchrun"] = {"nproc-per-node": manifest.tp_degree, "rdzv-endpoint": "127.0.0.1:0"}
    return config


def handler_file(manifest: Manifest, settings: ServeSettings | None) -> Path:
    if manifest.model.get("kind") == "generation" and settings is not None and settings.async_worker:
        return ASYNC_GENERATION_HANDLER
    return HANDLERS[manifest.model.get("kind", "embedding")]


def check_shards(shards: Path) -> Manifest:
    """The manifest of a folder written by `python -m tracer trace` (checksums are verified when
    the model is loaded)."""
    try:
        manifest = Manifest.read(shards) if (shards / MANIFEST).is_file() else None
    except ManifestError as exc:
        raise UsageError(str(exc)) from None
    if manifest is None or manifest.model is None:
        raise UsageError(f"{shards}: not a traced shards folder (run `python -m tracer trace` first)")
    return manifest


def check_archive_args(model_name: str, export_path: Path, archive_format: str,
                       settings: ServeSettings | None = None, kind: str | None = None) -> None:
    if archive_format not in ("default", "no-archive"):
        raise UsageError(f"--archive-format must be default or no-archive, got {archive_format!r}")
    if not model_name or not model_name.replace("-", "").replace("_", "").isalnum() or not model_name.isascii():
        raise UsageError(f"--model-name may hold letters, digits, - and _ only, got {model_name!r}")
    (settings or ServeSettings()).check(kind)
    check_output_dir(export_path, "--export-path")


def build_archive(shards: Path, model_name: str, export_path: Path, archive_format: str = "default",
                  settings: ServeSettings | None = None, torchrun: bool = False) -> Path:
    manifest = check_shards(shards)
    check_archive_args(model_name, export_path, archive_format, settings, manifest.model.get("kind"))
    export_path.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        config_file = Path(tmp) / "model-config.yaml"
        config_file.write_text(yaml.safe_dump(model_config(manifest, settings, torchrun), sort_keys=False))
        command = [sys.executable, "-m", "model_archiver.model_packaging", "--model-name", model_name,
                   "--version", "1.0", "--handler", str(handler_file(manifest, settings)),
                   "--extra-files", str(shards),
                   "--config-file", str(config_file), "--export-path", str(export_path),
                   "--archive-format", archive_format, "--force"]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"torch-model-archiver failed: {result.stderr.strip().splitlines()[-1:]}")
    return export_path / (f"{model_name}.mar" if archive_format == "default" else model_name)
