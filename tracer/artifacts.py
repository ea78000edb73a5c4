"""The saved-model format: one typed manifest, written last, covering every file the server uses.

save_dir/manifest.json                  Manifest: schema, versions, tp_degree, bucket signatures,
                                        states, model info, sha256 of every file below
save_dir/bucket_kernel.pt               TorchScript bucket kernel (bucketed models only)
save_dir/tp_{rank}/bucket_{b}.pt        TorchScript graph of rank `rank` for bucket b
save_dir/tp_{rank}/weights.safetensors  the rank's weights, shared by its buckets (non-inline only)
save_dir/tokenizer/*                    the checkpoint's tokenizer files (offline tracer)

Loading verifies all of it (read_verified_manifest) and reads back only TorchScript, safetensors
and JSON: never unpickled Python objects. A model is served by the tpserve version that built it:
the handler and the runtime come from the installed package, so another version is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path

from .errors import (
    ChecksumMismatchError,
    ManifestError,
    MissingRankError,
    TorchVersionMismatchError,
    TpDegreeMismatchError,
    TpServeVersionMismatchError,
)

MANIFEST = "manifest.json"
FORMAT = "tpserve-tp"
SCHEMA = 2  # 2: one manifest covers tokenizer/ and the model info; collectives without a group name
BACKEND = "cpu-torchscript"
BUCKET_KERNEL = "bucket_kernel.pt"
TOKENIZER_DIR = "tokenizer"


def rank_dir(root: Path, rank: int) -> Path:
    return root / f"tp_{rank}"


def bucket_file(rank: int, bucket: int) -> str:
    return f"tp_{rank}/bucket_{bucket}.pt"


def weights_file(rank: int) -> str:
    return f"tp_{rank}/weights.safetensors"


def tokenizer_file(root: Path) -> Path:
    return Path(root) / TOKENIZER_DIR / "tokenizer.json"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def torch_version() -> str:
    import torch

    return torch.__version__.split("+")[0]


def tpserve_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tpserve")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0+source"


@dataclasses.dataclass
class Manifest:
    tp_degree: int
    inline_weights: bool
    buckets: list[dict]              # per bucket: {"index", "inputs": [{"shape", "dtype"}, ...]}
    aliases: dict[str, int]          # state tensor name -> output index written back after each call
    files: dict[str, str]            # every file the model is served from -> sha256
    bucket_kernel: str | None = None
    runtime_states: dict[str, dict] = dataclasses.field(default_factory=dict)  # name -> shape, dtype: zeros at load
    ties: dict[str, str] = dataclasses.field(default_factory=dict)  # name -> the stored tensor it shares (tied weights)
    model: dict | None = None        # what the engine needs to serve it (offline tracer), e.g. pooling
    trace_timing: list = dataclasses.field(default_factory=list)
    format: str = FORMAT
    schema: int = SCHEMA
    backend: str = BACKEND
    torch_version: str = dataclasses.field(default_factory=torch_version)
    tpserve_version: str = dataclasses.field(default_factory=tpserve_version)

    def sequence_buckets(self) -> list[int]:
        """The sequence length of each bucket: the last dim of the first input (input_ids [rows,
        length], or an encoder's packed tokens [T])."""
        return [b["inputs"][0]["shape"][-1] for b in self.buckets]

    def batch_size(self) -> int:
        """Rows per call (dim 0 of the first input), or texts per call of a packed encoder."""
        if self.model and self.model.get("layout") == "packed":
            return int(self.model["texts_per_call"])
        return self.buckets[0]["inputs"][0]["shape"][0]

    def write(self, root: Path) -> None:
        """Atomically: a reader sees the old manifest or the new one, never half of one."""
        self.files = dict(sorted(self.files.items()))
        partial = Path(root) / f".{MANIFEST}.{os.getpid()}.tmp"
        partial.write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")
        partial.replace(Path(root) / MANIFEST)

    def add_files(self, root: Path, names: list[str]) -> None:
        """Cover files written after tracing (tokenizer, ...); call write() afterwards."""
        for name in names:
            self.files[name] = sha256(Path(root) / name)

    @classmethod
    def read(cls, root: Path) -> Manifest:
        path = Path(root) / MANIFEST
        if not path.is_file():
            raise ManifestError(f"{root}: no {MANIFEST}; not a tpserve model directory")
        try:
            data = json.loads(path.read_text())
            if data.get("format") != FORMAT or data.get("schema") != SCHEMA:
                raise ManifestError(f"{path}: format {data.get('format')!r} schema {data.get('schema')!r}, "
                                    f"expected {FORMAT!r} schema {SCHEMA} (re-trace with this tpserve)")
            names = {f.name for f in dataclasses.fields(cls)}
            manifest = cls(**{k: v for k, v in data.items() if k in names})
            manifest.tp_degree = int(manifest.tp_degree)
            manifest.files = dict(manifest.files)
        except ManifestError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ManifestError(f"{path}: unreadable manifest ({exc})") from exc
        return manifest


def read_verified_manifest(root: Path, tp_degree: int | None = None) -> Manifest:
    """The manifest of `root`, after checking versions, every rank dir and every file it names.
    Files that the manifest does not name are ignored (and never read)."""
    root = Path(root)
    manifest = Manifest.read(root)
    saved_tp = manifest.tp_degree
    if tp_degree is not None and tp_degree != saved_tp:
        raise TpDegreeMismatchError(f"{root}: saved with tp_degree={saved_tp}, asked for tp_degree={tp_degree}")
    present = {int(m.group(1)) for p in root.glob("tp_*") if (m := re.fullmatch(r"tp_(\d+)", p.name))}
    for rank in range(saved_tp):
        if rank not in present:
            raise MissingRankError(f"{root}: rank directory tp_{rank} is missing (tp_degree={saved_tp})")
    if extra := sorted(r for r in present if r >= saved_tp):
        raise TpDegreeMismatchError(
            f"{root}: manifest says tp_degree={saved_tp} but rank directories {[f'tp_{r}' for r in extra]} exist")
    if manifest.torch_version != torch_version():
        raise TorchVersionMismatchError(
            f"{root}: traced with torch {manifest.torch_version}, running torch {torch_version()}; re-trace")
    if manifest.tpserve_version != tpserve_version():
        raise TpServeVersionMismatchError(
            f"{root}: built by tpserve {manifest.tpserve_version}, running tpserve {tpserve_version()}; "
            "rebuild it with this version (the handler and runtime come from the installed tpserve)")
    for name, expected in manifest.files.items():
        file = root / name
        if not file.is_file():
            raise MissingRankError(f"{root}: {name} is missing")
        if sha256(file) != expected:
            raise ChecksumMismatchError(f"{root}: {name} does not match its sha256 in {MANIFEST}")
    return manifest


def copy_artifacts(source: Path, target: Path, manifest: Manifest) -> None:
    """Copy every file the manifest names (nothing else), checking each sha256 on the way; the
    manifest goes last."""
    for name, expected in manifest.files.items():
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        with open(source / name, "rb") as src, open(target / name, "wb") as dst:
            for block in iter(lambda: src.read(1 << 20), b""):
                digest.update(block)
                dst.write(block)
        if digest.hexdigest() != expected:
            raise ChecksumMismatchError(f"{source}: {name} changed since it was traced")
    manifest.write(target)
