"""STAND-IN: the real module takes the rank from the Neuron runtime; tests set it with set_rank."""

_size, _rank = 1, 0


def initialize_model_parallel(tensor_model_parallel_size: int = 1) -> None:
    global _size
    _size = tensor_model_parallel_size


def set_rank(rank: int, size: int) -> None:  # stand-in only
    global _size, _rank
    _size, _rank = size, rank


def get_tensor_model_parallel_size() -> int:
    return _size


def get_tensor_model_parallel_rank() -> int:
    return _rank
