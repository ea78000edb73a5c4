"""The grid each GGUF block puts its weights on, per 32 weights: (scale, minimum), w = scale * q + minimum,
so that tpserve's int4 / int8 weights hold the file's own values (cpu_layers.quantize(grid=...)) instead
of a grid of their own laid over them (which rounds a second time: Gemma 3 270M's Q4_K_M file, teacher-
forced, agreed with fp32 on 91 % of next tokens on our own grids; docs/models.md has the numbers).

    Q8_0  d * q, q in -128..127        -> int8: scale |d|, minimum -128 |d|        (exact)
    Q4_0  d * (q - 8), q in 0..15      -> int4: scale |d|, minimum -8 |d|          (exact; d < 0: -7 |d|, rounded)
    Q4_1  d * q + m                    -> int4: scale d, minimum m                 (exact)
    Q5_0  d * (q - 16), q in 0..31     -> int8: scale |d|, minimum -128 |d|        (exact)
    Q5_1  d * q + m                    -> int8: scale d, minimum m                 (exact)
    Q4_K  d sc_j * q - dmin m_j        -> int4: scale d sc_j, minimum -dmin m_j    (float16 rounds the products)
    Q5_K  the same with q in 0..31     -> int8                                     (the same)

Q6_K (16-weight sub-blocks, two scales in a group of 32) has no such grid: int8's own holds it.
"""

from __future__ import annotations

import numpy as np

GRIDS_FILE = "gguf_grids.safetensors"


def _halves(raw: np.ndarray) -> np.ndarray:
    return raw.copy().view(np.float16).astype(np.float32)[..., 0]


def block_grid(type_name: str, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(scale, minimum) per 32 weights of `blocks` [n, bytes per block] (uint8) of one GGUF type, or
    None where the type has no grid of tpserve's shape."""
    if type_name in ("Q8_0", "Q4_0", "Q5_0", "Q4_1", "Q5_1"):
        d = _halves(blocks[:, 0:2])
        if type_name in ("Q4_1", "Q5_1"):
            return d, _halves(blocks[:, 2:4])
        # d (q - c) with d < 0 (Q4_0's and Q5_0's quantizers divide by the signed extreme) is |d| (c - q):
        # the same grid with a positive scale, which tpserve's blocks need; its lowest value then lies one
        # step higher: Q4_0's -7 |d| (float16 may round it), int8's -128 |d| still holds it
        lowest = {"Q8_0": 128.0, "Q5_0": 128.0, "Q4_0": 8.0}[type_name]
        return np.abs(d), -np.where((d < 0) & (lowest == 8.0), 7.0, lowest) * np.abs(d)
    if type_name in ("Q4_K", "Q5_K"):
        from gguf.quants import Q4_K

        d, dmin = _halves(blocks[:, 0:2]), _halves(blocks[:, 2:4])
        sc, m = Q4_K.get_scale_min(blocks[:, 4:16])  # 8 sub-blocks of 32
        return (d[:, None] * sc.astype(np.float32)).reshape(-1), (-dmin[:, None] * m.astype(np.float32)).reshape(-1)
    return None


def tensor_grids(path, model) -> dict[str, np.ndarray]:
    """{"NAME.scale" / "NAME.minimum": [rows, features / 32]} for every weight of the GGUF file at `path`
    whose type has a grid, by its Hugging Face name as transformers loads it into `model` (rows permuted
    as transformers permutes the weights: Llama's q and k)."""
    import gguf
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    from .gguf_import import gguf_architecture

    reader = gguf.GGUFReader(str(path))
    processor = TENSOR_PROCESSORS.get(gguf_architecture(path), TensorProcessor)(config=model.config.to_dict())
    names = get_gguf_hf_weights_map(model, processor)
    out = {}
    for tensor in reader.tensors:
        if tensor.name not in names or tensor.data.ndim != 2:
            continue
        rows = tensor.data.shape[0]
        size = gguf.GGML_QUANT_SIZES[tensor.tensor_type][1]  # bytes per block
        grid = block_grid(tensor.tensor_type.name, np.ascontiguousarray(tensor.data).reshape(-1, size))
        if grid is None:
            continue
        for part, values in zip(("scale", "minimum"), grid, strict=True):
            values = processor.process(weights=values.reshape(rows, -1), name=tensor.name, tensor_key_mapping=names,
                                       parsed_parameters={"config": model.config.to_dict()}).weights
            out[f"{names[tensor.name]}.{part}"] = np.ascontiguousarray(values)
    return out
