"""Module-level model builders for parallel_model_trace (trace workers import them by name)."""

from __future__ import annotations

import torch
from torch import nn

from tracer.models import bert
from tracer.models.encoder import Encoder
from tracer.parallel_layers import ColumnParallelLinear, RowParallelLinear, load, parallel_state

TINY_BERT = dict(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                 max_position_embeddings=64)


class Mlp(nn.Module):
    """Exercises every layer flag: row-parallel with a full input, column-parallel gathering."""

    def __init__(self, parallel: bool) -> None:
        super().__init__()
        if parallel:
            self.up = ColumnParallelLinear(16, 64, gather_output=True)
            self.down = RowParallelLinear(64, 16, input_is_parallel=False)
        else:
            self.up, self.down = nn.Linear(16, 64), nn.Linear(64, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x))) + x


def mlp_reference() -> Mlp:
    torch.manual_seed(1)
    return Mlp(parallel=False).eval()


def build_mlp() -> tuple[nn.Module, dict]:
    model = Mlp(parallel=True)
    load(mlp_reference().state_dict(), model)
    return model, {}


def tiny_bert_reference():
    """An unsharded Hugging Face BertModel with random weights (the parity reference)."""
    from transformers import BertConfig as HFConfig
    from transformers import BertModel

    torch.manual_seed(2)
    return BertModel(HFConfig(**TINY_BERT), add_pooling_layer=False).eval()


def build_tiny_bert(**_bucket_kwargs) -> tuple[nn.Module, dict]:
    """Our BERT family's encoder (models/bert.py), loaded by the family's names from the reference."""
    reference = tiny_bert_reference()
    config = bert.FAMILY.config(reference.config)
    model = Encoder(config)
    load(reference.state_dict(), model, aliases=bert.FAMILY.checkpoint_names(model.state_dict(), config, ""),
         ignore_unexpected=bert.FAMILY.unused)
    return model.eval(), {}


class Counter(nn.Module):
    """Stateful: `calls` counts calls through an input->output alias (output 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = ColumnParallelLinear(4, 8, gather_output=True)
        self.register_buffer("calls", torch.zeros(1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls = self.calls + 1
        return self.proj(x) * calls, calls


def build_counter(**_bucket_kwargs) -> tuple[nn.Module, dict]:
    torch.manual_seed(3)
    model = Counter()
    return model, {model.calls: 1}


class FailsOnRankOne(nn.Module):
    """Rank 1 reshapes its input to (-1, 3): fine for the traced shape, an error for others,
    while rank 0 is already waiting in the all-reduce."""

    def __init__(self) -> None:
        super().__init__()
        self.rank = parallel_state.get_tensor_model_parallel_rank()
        self.down = RowParallelLinear(6, 6, input_is_parallel=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rank == 1:
            x = x.reshape(-1, 3).reshape(x.shape)
        return self.down(x)


def build_fails_on_rank_one() -> tuple[nn.Module, dict]:
    return FailsOnRankOne(), {}


class Offset(nn.Module):
    def __init__(self, offset: float) -> None:
        super().__init__()
        self.offset = offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum(dim=1) * 0 + self.offset  # a constant baked into each bucket's graph


def build_offset(offset: float) -> tuple[nn.Module, dict]:
    """func_kwargs reach func: each bucket's graph returns its own `offset`."""
    return Offset(offset), {}


class FaultInRankOne(nn.Module):
    """A served model with a bug in rank 1 only: any token id >= 3000 makes rank 1 index out of
    range at run time (tracing sees only ones), while rank 0 waits in the all-reduce."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.rank = parallel_state.get_tensor_model_parallel_rank()

    def forward(self, ids: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        if self.rank == 1:
            ids = ids + torch.zeros(1, dtype=ids.dtype).index_select(0, (ids.max() // 3000).reshape(1))
        return self.model(ids, *rest)


def build_minilm_with_fault_in_rank_one(model_dir) -> tuple[nn.Module, dict]:
    """MiniLM in the tracer's default layout for it (packed) with FaultInRankOne's bug."""
    from tracer.models.encoders import load_sentence_model

    model, states = load_sentence_model(model_dir, packed=True)
    return FaultInRankOne(model).eval(), states
