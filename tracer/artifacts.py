"""The saved-model layout and its integrity checks.

save_dir/manifest.json           tp_degree, buckets, backend, torch version, input signature, sha256s
save_dir/bucket_kernel.pt        TorchScript bucket kernel (bucketed models only)
save_dir/tp_{rank}/bucket_{b}.pt TorchScript graph of rank `rank` for bucket b
save_dir/tp_{rank}/weights.safetensors  the rank's weights, shared by its buckets (non-inline only)

Only TorchScript, safetensors and JSON are read back: loading never unpickles Python objects.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch

from .errors import (
    ChecksumMismatchError,
    ManifestError,
    MissingRankError,
    TorchVersionMismatchError,
    TpDegreeMismatchError,
)

MANIFEST = "manifest.json"
FORMAT = "tpserve-tp/1"
BACKEND = "cpu-torchscript"


def rank_dir(root: Path, rank: int) -> Path:
    return root / f"tp_{rank}"


def bucket_file(rank: int, bucket: int) -> str:
    return f"tp_{rank}/bucket_{bucket}.pt"


def weights_file(rank: int) -> str:
    return f"tp_{rank}/weights.safetensors"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def torch_version() -> str:
    return torch.__version__.split("+")[0]


def write_manifest(root: Path, *, tp_degree: int, inline_weights: bool, buckets: list[dict],
                   aliases: dict[str, int], files: dict[str, str], extra: dict | None = None) -> dict:
    """files: {relative path: sha256}, hashed by whoever wrote them (trace workers, in parallel)."""
    manifest = {
        "format": FORMAT,
        "backend": BACKEND,
        "torch_version": torch_version(),
        "tp_degree": tp_degree,
        "inline_weights": inline_weights,
        "buckets": buckets,
        "aliases": aliases,
        "bucket_kernel": "bucket_kernel.pt" if (root / "bucket_kernel.pt").exists() else None,
        "files": dict(sorted(files.items())),
        **(extra or {}),
    }
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_verified_manifest(root: Path, tp_degree: int | None = None) -> dict:
    """The manifest of `root`, after checking every rank dir and file it names. Files that the
    manifest does not name are ignored."""
    path = root / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{root}: no {MANIFEST}; not a tpserve model directory")
    try:
        manifest = json.loads(path.read_text())
        saved_tp = int(manifest["tp_degree"])
        files = dict(manifest["files"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ManifestError(f"{path}: unreadable manifest ({exc})") from exc
    if manifest.get("format") != FORMAT:
        raise ManifestError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    if tp_degree is not None and tp_degree != saved_tp:
        raise TpDegreeMismatchError(f"{root}: saved with tp_degree={saved_tp}, asked for tp_degree={tp_degree}")
    present = {int(m.group(1)) for p in root.glob("tp_*") if (m := re.fullmatch(r"tp_(\d+)", p.name))}
    for rank in range(saved_tp):
        if rank not in present:
            raise MissingRankError(f"{root}: rank directory tp_{rank} is missing (tp_degree={saved_tp})")
    if extra := sorted(r for r in present if r >= saved_tp):
        raise TpDegreeMismatchError(
            f"{root}: manifest says tp_degree={saved_tp} but rank directories {[f'tp_{r}' for r in extra]} exist")
    if manifest.get("torch_version") != torch_version():
        raise TorchVersionMismatchError(
            f"{root}: traced with torch {manifest.get('torch_version')}, running torch {torch_version()}; re-trace")
    for name, expected in files.items():
        file = root / name
        if not file.is_file():
            raise MissingRankError(f"{root}: {name} is missing")
        if sha256(file) != expected:
            raise ChecksumMismatchError(f"{root}: {name} does not match its sha256 in {MANIFEST}")
    return manifest


def copy_artifacts(source: Path, target: Path, manifest: dict) -> None:
    """Copy the manifest and every file it names (nothing else), checking each sha256 on the way."""
    for name, expected in manifest["files"].items():
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        with open(source / name, "rb") as src, open(target / name, "wb") as dst:
            for block in iter(lambda: src.read(1 << 20), b""):
                digest.update(block)
                dst.write(block)
        if digest.hexdigest() != expected:
            raise ChecksumMismatchError(f"{source}: {name} changed since it was traced")
    (target / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
