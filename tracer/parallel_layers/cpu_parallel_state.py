"""Which tensor-parallel rank this code builds, and of how many (neuronx_distributed's names)."""

_size: int | None = None
_rank: int = 0


def initialize_model_parallel(tensor_model_parallel_size: int = 1) -> None:
    """Set the tensor-parallel size. Inside a trace worker the rank is already set by tpserve."""
    global _size
    if not isinstance(tensor_model_parallel_size, int) or tensor_model_parallel_size < 1:
        raise ValueError(f"tensor_model_parallel_size must be an int >= 1, got {tensor_model_parallel_size!r}")
    if _rank >= tensor_model_parallel_size:
        raise ValueError(f"rank {_rank} does not fit tensor_model_parallel_size {tensor_model_parallel_size}")
    _size = tensor_model_parallel_size


def set_tensor_model_parallel_rank(rank: int, size: int) -> None:
    """Used by trace workers: this process builds rank `rank` of `size`."""
    global _size, _rank
    if not 0 <= rank < size:
        raise ValueError(f"rank {rank} out of range for tensor parallel size {size}")
    _size, _rank = size, rank


def destroy_model_parallel() -> None:
    global _size, _rank
    _size, _rank = None, 0


def model_parallel_is_initialized() -> bool:
    return _size is not None


def get_tensor_model_parallel_size() -> int:
    return _size if _size is not None else 1


def get_tensor_model_parallel_rank() -> int:
    return _rank
