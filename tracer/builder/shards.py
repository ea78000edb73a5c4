"""A shards folder for the offline tracer: trace the checkpoint's `func` into one saved model (graphs
sharing one copy of each rank's weights), copy the checkpoint's tokenizer next to it, record what the
model is, and write the manifest last, covering all of it. Encoders and decoders both end here."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from .. import artifacts
from ..bucketing import BucketModelConfig
from ..trace import parallel_model_save, parallel_model_trace


def copy_tokenizer(model_dir: Path, output: Path, manifest: artifacts.Manifest, names: tuple[str, ...]) -> None:
    """The checkpoint's tokenizer files (those of `names` it has) into output/tokenizer/, covered
    by the manifest (the caller writes it)."""
    present = [name for name in names if (model_dir / name).is_file()]
    if present:
        (output / artifacts.TOKENIZER_DIR).mkdir(exist_ok=True)
    for name in present:
        shutil.copyfile(model_dir / name, output / artifacts.TOKENIZER_DIR / name)
    manifest.add_files(output, [f"{artifacts.TOKENIZER_DIR}/{name}" for name in present])


def trace_into_shards(func, examples: list[tuple], bucket_config: BucketModelConfig, tp_degree: int,
                      max_parallel_compilations: int | None, model_dir: Path, output: Path,
                      tokenizer_files: tuple[str, ...], model_info: dict) -> artifacts.Manifest:
    """The saved model in `output`, its manifest's model info = model_info + source and trace time."""
    started = time.time()
    model = parallel_model_trace(func, examples, tp_degree=tp_degree, inline_weights_to_neff=False,
                                 bucket_config=bucket_config, max_parallel_compilations=max_parallel_compilations)
    parallel_model_save(model, output)
    manifest = model.manifest
    model.close()
    copy_tokenizer(model_dir, output, manifest, tokenizer_files)
    manifest.model = {**model_info, "source": str(model_dir), "trace_seconds": round(time.time() - started, 2)}
    manifest.write(output)  # last, covering the tokenizer too
    return manifest
