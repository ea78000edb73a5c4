"""Bucketing with torch-neuronx's meaning: one traced graph per input shape ("bucket"), and a
TorchScript kernel that picks the bucket and pads the inputs to it at call time."""


from collections.abc import Callable, Sequence
from typing import Any, List, Tuple  # noqa: UP035

import torch
from torch import nn


class BucketModelConfig:
    """bucket_kernel: a factory returning a scriptable function or module
    `(inputs: List[Tensor]) -> (inputs padded/sliced to the bucket, bucket index tensor)`.
    func_kwargs: one dict per bucket, passed to `func(**kwargs)` when that bucket is traced."""

    def __init__(self, bucket_kernel: Callable[..., Any], shared_state_buffer: Any = None,
                 shared_state_buffer_preprocessor: Callable | None = None,
                 func_kwargs: Sequence[dict] | None = None) -> None:
        if not callable(bucket_kernel):
            raise TypeError("bucket_kernel must be a factory function returning the kernel")
        if shared_state_buffer is not None or shared_state_buffer_preprocessor is not None:
            # Not needed by encoder models; refuse rather than silently ignore.
            raise NotImplementedError("shared_state_buffer is not supported by the CPU backend")
        self.bucket_kernel = bucket_kernel
        self.shared_state_buffer = shared_state_buffer
        self.shared_state_buffer_preprocessor = shared_state_buffer_preprocessor
        self.func_kwargs = list(func_kwargs) if func_kwargs is not None else None

    def scripted_kernel(self) -> torch.jit.ScriptModule:
        kernel = self.bucket_kernel()
        if isinstance(kernel, (torch.jit.ScriptModule, torch.jit.ScriptFunction)):
            return kernel
        return torch.jit.script(kernel)


def check_buckets(buckets: Sequence[int]) -> list[int]:
    """Sequence buckets as ints, or ValueError: non-empty, positive, strictly ascending."""
    buckets = [int(b) for b in buckets]
    if not buckets or any(b <= 0 for b in buckets) or buckets != sorted(set(buckets)):
        raise ValueError(f"buckets must be positive and strictly ascending, got {buckets}")
    return buckets


def powers_of_two(first: int, last: int) -> list[int]:
    """first, 2*first, ... below last, then last itself (e.g. 16, 32, 64, 128, 256)."""
    out = []
    while first < last:
        out.append(first)
        first *= 2
    return out + [last]


def half_steps(first: int, last: int) -> list[int]:
    """Powers of two with the midpoints between them, then last (16, 32, 48, 64, 96, 128, 192, ...):
    a prompt is padded by at most a half, not doubled (prefill time grows with the padded length)."""
    out = []
    for bucket in powers_of_two(first, last)[:-1]:
        out += [bucket, bucket + bucket // 2] if bucket >= 32 else [bucket]
    return [b for b in out if b < last] + [last]


def _quarter_steps(buckets: list[int], top: int) -> list[int]:
    """buckets extended by quarter steps of the power of two at or below the last one (64: 80, 96,
    112, 128; then 160, 192, ...) up to top, the last one top."""
    while buckets[-1] < top:
        quarter = (1 << (buckets[-1].bit_length() - 1)) // 4
        buckets.append(min((buckets[-1] // quarter + 1) * quarter, top))
    return buckets


def prompt_buckets(last: int) -> list[int]:
    """Prompt-length buckets of a decoder: steps of 8 tokens from 16 to 64, then quarter steps (80, 96,
    112, 128, 160, ...), then last. A prompt's prefill time grows with its padded length (~1.2 ms per
    token for SmolLM2 fp32 here) and is all of its time to first token, so short prompts (a chat
    template alone is ~30 tokens) are padded by at most 7 tokens and longer ones by at most a quarter
    over a power of two; graphs are cheap when the weights are shared (inline_weights=False)."""
    if last <= 64:
        return [*range(16, last, 8), last]
    return _quarter_steps(list(range(16, 65, 8)), last)


def packed_token_buckets(max_tokens: int, texts: int, largest: int = 1024) -> list[int]:
    """Token buckets of an encoder taking texts packed end to end (PackedTokensBucketKernel): half
    steps up to one longest text (16, 32, 48, ... max_tokens), then quarter steps up to `texts`
    longest texts or `largest` tokens, whichever is less (a batch of more tokens runs as several
    calls: beyond ~1000 rows a GEMM is no faster per row)."""
    return _quarter_steps(half_steps(16, max_tokens), max(max_tokens, min(largest, texts * max_tokens)))


class SequenceLengthBucketKernel(nn.Module):
    """Picks the smallest bucket >= the sequence length (dim 1) and right-pads every input with 0
    (pad token id 0, attention mask 0). Longer than the largest bucket: an error, never garbage."""

    buckets: List[int]  # noqa: UP006 - TorchScript reads class annotations, not list[int]

    def __init__(self, buckets: Sequence[int]) -> None:
        super().__init__()
        self.buckets = check_buckets(buckets)

    def forward(self, inputs: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        length = inputs[0].size(1)
        for index, bucket in enumerate(self.buckets):
            if length <= bucket:
                padded: list[torch.Tensor] = []
                for x in inputs:
                    padded.append(torch.nn.functional.pad(x, [0, 0] * (x.dim() - 2) + [0, bucket - length]))
                return padded, torch.tensor([index])
        raise ValueError(f"sequence length {length} exceeds the largest bucket {self.buckets[-1]}")


class PackedTokensBucketKernel(nn.Module):
    """Inputs of texts packed end to end: `token_inputs` tensors [T] (input_ids, positions, token types,
    the pooling mask), then one [n] (each text's length): the smallest bucket >= T tokens, the token
    inputs right-padded with 0 (tokens in no text: the model ignores them), the lengths padded with 0
    to the `texts` every graph takes (absent texts)."""

    buckets: List[int]  # noqa: UP006 - TorchScript reads class annotations, not list[int]
    texts: int
    token_inputs: int

    def __init__(self, buckets: Sequence[int], texts: int, token_inputs: int = 4) -> None:
        super().__init__()
        self.buckets, self.texts, self.token_inputs = check_buckets(buckets), int(texts), int(token_inputs)

    def forward(self, inputs: List[torch.Tensor]) -> Tuple[List[torch.Tensor], torch.Tensor]:  # noqa: UP006
        if len(inputs) != self.token_inputs + 1:
            raise ValueError(f"a packed encoder takes {self.token_inputs} inputs [tokens] and lengths [texts]")
        for x in inputs:
            if x.dim() != 1:
                raise ValueError(f"a packed encoder takes {self.token_inputs} inputs [tokens] and lengths [texts]")
        tokens, count = inputs[0].size(0), inputs[-1].size(0)
        for x in inputs[1:-1]:
            if x.size(0) != tokens:
                raise ValueError(f"an input of {x.size(0)} tokens beside {tokens} input_ids")
        if count > self.texts:
            raise ValueError(f"{count} texts exceed the {self.texts} one call takes")
        for index, bucket in enumerate(self.buckets):
            if tokens <= bucket:
                padded: List[torch.Tensor] = []  # noqa: UP006
                for x in inputs[:-1]:
                    padded.append(torch.nn.functional.pad(x, [0, bucket - tokens]))
                padded.append(torch.nn.functional.pad(inputs[-1], [0, self.texts - count]))
                return padded, torch.tensor([index])
        raise ValueError(f"{tokens} tokens exceed the largest bucket {self.buckets[-1]}")


def packed_tokens_bucket_kernel(buckets: Sequence[int], texts: int,
                                token_inputs: int = 4) -> Callable[..., torch.jit.ScriptModule]:
    """A `bucket_kernel` factory for an encoder taking packed texts."""
    PackedTokensBucketKernel(buckets, texts, token_inputs)

    def factory(*_: Any) -> torch.jit.ScriptModule:
        return torch.jit.script(PackedTokensBucketKernel(buckets, texts, token_inputs))

    return factory


def sequence_length_bucket_kernel(buckets: Sequence[int]) -> Callable[..., torch.jit.ScriptModule]:
    """A ready `bucket_kernel` factory for BucketModelConfig."""
    SequenceLengthBucketKernel(buckets)  # validate now, not at trace time

    def factory(*_: Any) -> torch.jit.ScriptModule:
        return torch.jit.script(SequenceLengthBucketKernel(buckets))

    return factory


class DecoderBucketKernel(nn.Module):
    """Buckets of a decoder (tracer/models/decoder.py), inputs [input_ids, positions, slots, last]:
    several tokens per row (prefill) take the smallest prefill bucket >= their count, padded on the
    right with token 0 at the next positions (written to the cache past the prompt, never attended,
    overwritten as generation reaches them); one token per row (generation) takes the graph of its
    row count (one of `rows`) and the smallest context bucket that holds every row's position.
    Bucket index: prefill buckets first, then the contexts of rows[0], of rows[1], ..."""

    prefill: List[int]  # noqa: UP006
    contexts: List[int]  # noqa: UP006
    rows: List[int]  # noqa: UP006

    def __init__(self, prefill: Sequence[int], contexts: Sequence[int], rows: Sequence[int]) -> None:
        super().__init__()
        self.prefill, self.contexts, self.rows = check_buckets(prefill), check_buckets(contexts), check_buckets(rows)

    def forward(self, inputs: List[torch.Tensor]) -> Tuple[List[torch.Tensor], torch.Tensor]:  # noqa: UP006
        ids, positions = inputs[0], inputs[1]
        length = ids.size(1)
        if length == 1:
            return inputs, torch.tensor([self.generation_bucket(ids.size(0), int(positions.max()) + 1)])
        index = self.prefill_bucket(length)
        pad = self.prefill[index] - length
        more = positions[:, -1:] + torch.ones_like(positions[:, :1]).expand(-1, pad).cumsum(1)
        return [torch.nn.functional.pad(ids, [0, pad]), torch.cat([positions, more], 1),
                inputs[2], inputs[3]], torch.tensor([index])

    def generation_bucket(self, rows: int, needed: int) -> int:
        """The bucket of a step of `rows` rows whose cache positions reach `needed` (also called
        eagerly: tracer.engine.generator picks its buckets without a call of the scripted kernel)."""
        if rows not in self.rows:
            raise ValueError(f"a generation step has {rows} rows; the graphs have {self.rows}")
        first = len(self.prefill) + self.rows.index(rows) * len(self.contexts)
        for index, context in enumerate(self.contexts):
            if needed <= context:
                return first + index
        raise ValueError(f"position {needed - 1} is past the largest context bucket {self.contexts[-1]}")

    def prefill_bucket(self, length: int) -> int:
        """The bucket of a prompt of `length` tokens (padded on the right to the bucket's length)."""
        for index, bucket in enumerate(self.prefill):
            if length <= bucket:
                return index
        raise ValueError(f"{length} tokens exceed the largest prefill bucket {self.prefill[-1]}")


def decoder_bucket_kernel(prefill: Sequence[int], contexts: Sequence[int],
                          rows: Sequence[int]) -> Callable[..., torch.jit.ScriptModule]:
    """A `bucket_kernel` factory for a decoder's prefill and generation graphs."""
    DecoderBucketKernel(prefill, contexts, rows)

    def factory(*_: Any) -> torch.jit.ScriptModule:
        return torch.jit.script(DecoderBucketKernel(prefill, contexts, rows))

    return factory
