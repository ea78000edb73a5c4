"""parallel_layers.load: fill a tensor-parallel model from the UNSHARDED model's checkpoint."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from ..errors import CheckpointKeyError, CheckpointShapeError
from ..safetensors_reader import SafetensorsFile
from . import backend
from .cpu_layers import copy_slice, shape_of


@contextlib.contextmanager
def _open(checkpoint) -> Iterator[Mapping]:
    if isinstance(checkpoint, Mapping):
        yield checkpoint
        return
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        source = SafetensorsFile(path)
        try:
            yield source
        finally:
            source.close()
    else:  # weights_only: a checkpoint must not be able to run code
        yield torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def checkpoint_keys(checkpoint) -> set[str]:
    """The tensor names a checkpoint file holds (a .safetensors header, or a .bin's state dict)."""
    with _open(checkpoint) as source:
        return set(source)


class Rows:
    """Rows start .. start + count - 1 of a checkpoint tensor (dim 0), read like one: a fused projection's
    part (ModernBERT's Wqkv holds q, k and v; Phi-3's gate_up_proj gate and up), so that each part is
    split by heads or columns as a tensor of its own would be, and a rank reads only its slice."""

    def __init__(self, source, start: int, count: int) -> None:
        full = shape_of(source)
        if not 0 <= start and start + count <= full[0]:
            raise CheckpointShapeError(f"rows {start}..{start + count - 1} of a checkpoint tensor of shape {full}")
        self.source, self.start = source, start
        self.shape, self.dtype = (count, *full[1:]), source.dtype

    def read_into(self, dest: torch.Tensor, dim: int = 0, start: int = 0, length: int | None = None) -> None:
        length = self.shape[dim] - start if length is None else length
        if dim == 0:
            copy_slice(dest, self.source, 0, self.start + start, length)
            return
        rows = torch.empty(self.shape, dtype=dest.dtype)
        copy_slice(rows, self.source, 0, self.start, self.shape[0])
        dest.copy_(rows.narrow(dim, start, length))


def load(checkpoint, model: torch.nn.Module, sharded: bool = False, *, prefix: str = "",
         ignore_unexpected: tuple[str, ...] = (), aliases: dict | None = None) -> None:
    """Copy `checkpoint` into `model`.

    checkpoint: a state dict, or a path to a .safetensors / .pt(.bin) file. With sharded=False its
    keys and shapes are the unsharded model's and every parallel layer copies its rank's slice;
    with sharded=True the tensors are already this rank's shards. `prefix` is prepended to model
    keys (e.g. "bert."); checkpoint keys starting with one of `ignore_unexpected` may stay unused.
    aliases: {model key: checkpoint key, or (checkpoint key, first row, rows)} for a key the
    checkpoint does not hold by the model's name (a tied head; another naming; part of a fused tensor).
    """
    targets = model.state_dict(keep_vars=True)
    with _open(checkpoint) as source:
        def resolve(name: str):
            """(checkpoint key, tensor or Rows) for model key `name`, or (key, None) where absent."""
            ref = (aliases or {}).get(name, name) if name not in source else name
            key, rows = (ref, None) if isinstance(ref, str) else (ref[0], ref[1:])
            if key not in source:
                return key, None
            return key, source[key] if rows is None else Rows(source[key], *rows)

        resolved = {name: resolve(prefix + name) for name in targets}
        missing = sorted(key for key, value in resolved.values() if value is None)
        used = {key for key, _ in resolved.values()}
        unexpected = sorted(k for k in set(source) - used if not k.startswith(ignore_unexpected))
        if missing or unexpected:
            raise CheckpointKeyError(
                f"checkpoint does not match the model: missing keys {missing}, unexpected keys {unexpected}")
        with torch.no_grad():
            for name, target in targets.items():
                key, value = resolved[name]
                loader = getattr(target, "weight_loader", None)
                if loader is None and getattr(target, "tensor_model_parallel", False):
                    loader = _load_partition  # a neuronx_distributed layer's shard
                if loader is not None and not sharded:
                    loader(target, value)
                    continue
                if shape_of(value) != tuple(target.shape):
                    raise CheckpointShapeError(
                        f"{key}: checkpoint shape {shape_of(value)}, model shape {tuple(target.shape)}")
                copy_slice(target, value)


def _load_partition(target: torch.Tensor, source) -> None:
    """This rank's block of `source` along the shard's partition_dim, as neuronx_distributed's layers
    split (contiguous blocks, rank order; the last block zero-padded where the size does not divide)."""
    dim, stride = target.partition_dim, getattr(target, "partition_stride", 1)
    full, local = shape_of(source), tuple(target.shape)
    state = backend.parallel_state
    tp, rank = state.get_tensor_model_parallel_size(), state.get_tensor_model_parallel_rank()
    other_dims_match = len(full) == len(local) and all(
        f == n for i, (f, n) in enumerate(zip(full, local, strict=True)) if i != dim)
    if stride != 1 or not other_dims_match or not local[dim] * (tp - 1) < full[dim] <= local[dim] * tp:
        raise CheckpointShapeError(f"checkpoint shape {full} does not split into shards of {local} "
                                   f"along dim {dim} (stride {stride}) over tp {tp}")
    start = rank * local[dim]
    count = max(0, min(local[dim], full[dim] - start))
    target.zero_()
    if count:
        copy_slice(target.narrow(dim, 0, count), source, dim, start, count)
