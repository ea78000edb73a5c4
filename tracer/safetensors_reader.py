"""Read slices of a .safetensors file straight into destination tensors.

safe_open + get_slice maps the file and copies the slice out of the mapping, so a rank briefly
holds its shard twice (mapped pages + parameter). Plain reads into the parameter's own memory keep
a rank's peak at one copy of its shard and never touch the bytes of other ranks' slices.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping

import torch

from .errors import CheckpointFormatError

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def _bytes_of(t: torch.Tensor) -> memoryview:
    return memoryview(t.view(-1).view(torch.uint8).numpy())


class TensorOnDisk:
    def __init__(self, fd: int, offset: int, entry: dict) -> None:
        self._fd, self._offset = fd, offset + entry["data_offsets"][0]
        self.dtype = _DTYPES[entry["dtype"]]
        self.shape = tuple(entry["shape"])

    def _pread_into(self, dest: torch.Tensor, offset: int) -> None:
        buffer = _bytes_of(dest)
        while buffer:
            n = os.preadv(self._fd, [buffer], offset)
            if n <= 0:
                raise OSError("safetensors file is truncated")
            buffer, offset = buffer[n:], offset + n

    def read_into(self, dest: torch.Tensor, dim: int = 0, start: int = 0, length: int | None = None) -> None:
        """dest.copy_(full_tensor.narrow(dim, start, length)) without reading anything else."""
        if not self.shape:  # a scalar
            self._pread_into(dest, self._offset)
            return
        length = self.shape[dim] - start if length is None else length
        if dest.dtype != self.dtype or not dest.is_contiguous():
            staged = torch.empty(dest.shape, dtype=self.dtype)
            self.read_into(staged, dim, start, length)
            dest.copy_(staged)
            return
        if tuple(dest.shape) != self.shape[:dim] + (length,) + self.shape[dim + 1:]:
            raise ValueError(f"slice of {self.shape} along dim {dim} does not fit {tuple(dest.shape)}")
        outer = 1
        for size in self.shape[:dim]:
            outer *= size
        inner = dest.element_size()
        for size in self.shape[dim + 1:]:
            inner *= size
        rows = dest.view(outer, length * inner // dest.element_size()) if outer > 1 else dest.view(1, -1)
        for row in range(outer):  # one contiguous run per outer index
            self._pread_into(rows[row], self._offset + (row * self.shape[dim] + start) * inner)


class SafetensorsFile(Mapping):
    def __init__(self, path) -> None:
        self._fd = os.open(path, os.O_RDONLY)
        header_size = int.from_bytes(os.pread(self._fd, 8, 0), "little")
        try:
            if not 2 <= header_size <= os.fstat(self._fd).st_size - 8:
                raise ValueError(f"header size {header_size}")
            header = json.loads(os.pread(self._fd, header_size, 8))
        except (ValueError, UnicodeDecodeError) as exc:
            os.close(self._fd)
            raise CheckpointFormatError(f"{path}: not a safetensors file ({exc})") from None
        header.pop("__metadata__", None)
        self._entries = {k: TensorOnDisk(self._fd, 8 + header_size, v) for k, v in header.items()}

    def __getitem__(self, key: str) -> TensorOnDisk:
        return self._entries[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def close(self) -> None:
        os.close(self._fd)
