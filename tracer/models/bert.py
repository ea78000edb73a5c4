"""BERT encoder (Hugging Face BertModel architecture) built from tensor-parallel layers.

Parameter names equal Hugging Face's, so parallel_layers.load reads an unsharded HF checkpoint.
Per layer: Q/K/V and the FFN input are column-parallel (each rank owns heads / FFN columns, no
gather); the attention output and FFN output are row-parallel (one all-reduce each).

Two layouts of a batch: padded rows [B, S] with an attention mask (forward), or texts packed end to
end into one row of tokens [T] with their offsets (packed): no padding inside the batch, so the
linear layers compute only real tokens, and tpserve::packed_attention keeps the texts apart.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from ..parallel_layers import (
    ColumnParallelLinear,
    ParallelEmbedding,
    RowParallelLinear,
    backend,
    parallel_state,
    project,
)
from ..parallel_layers.cpu_layers import FusedLinear
from ..runtime import native_ops


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"

    @classmethod
    def from_dict(cls, config: dict) -> BertConfig:
        return cls(**{f.name: config[f.name] for f in fields(cls) if f.name in config})


class BertEmbeddings(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = ParallelEmbedding(c.vocab_size, c.hidden_size)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        if positions is None:
            # not torch.arange(..., device=...): tracing would bake the device into the graph
            positions = torch.ones_like(input_ids[:1]).cumsum(dim=1) - 1
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        return self.LayerNorm(x + self.token_type_embeddings(token_type_ids))


class BertSelfAttention(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        tp = parallel_state.get_tensor_model_parallel_size()
        if c.num_attention_heads % tp:
            raise ValueError(f"num_attention_heads={c.num_attention_heads} is not divisible by tp_degree={tp}")
        self.local_heads = c.num_attention_heads // tp
        self.head_dim = c.hidden_size // c.num_attention_heads
        self.query = ColumnParallelLinear(c.hidden_size, c.hidden_size, gather_output=False)
        self.key = ColumnParallelLinear(c.hidden_size, c.hidden_size, gather_output=False)
        self.value = ColumnParallelLinear(c.hidden_size, c.hidden_size, gather_output=False)
        self.fused = False

    def fuse(self) -> None:
        """After loading: query, key and value as one projection (one op and one pass over the input)."""
        self.qkv = FusedLinear([self.query, self.key, self.value])
        del self.query, self.key, self.value
        self.fused = True

    def _qkv(self, x: torch.Tensor, rows: torch.Tensor | None) -> list[torch.Tensor]:
        if self.fused:
            return self.qkv(x, rows)
        return [project(layer, x, rows) for layer in (self.query, self.key, self.value)]

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.size(0), x.size(1), self.local_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, S, H] with mask_bias [B, 1, 1, S], or packed: x [T, H] with mask_bias the offsets [R + 1]
        and rows its real tokens (offsets[R])."""
        if x.dim() == 2:
            shape = (x.size(0), self.local_heads, self.head_dim)
            q, k, v = (t.view(shape) for t in self._qkv(x, rows))
            context = native_ops.packed_attention(q, k, v, mask_bias, self.head_dim ** -0.5)
            return context.reshape(x.size(0), self.local_heads * self.head_dim)
        q, k, v = map(self._heads, self._qkv(x, None))
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_bias)
        return context.transpose(1, 2).reshape(x.size(0), x.size(1), self.local_heads * self.head_dim)


class BertDenseOutput(nn.Module):
    """Row-parallel projection back to hidden size, residual, LayerNorm (HF's *Output blocks)."""

    def __init__(self, in_features: int, c: BertConfig) -> None:
        super().__init__()
        self.dense = RowParallelLinear(in_features, c.hidden_size, input_is_parallel=True)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        return self.LayerNorm(project(self.dense, x, rows) + residual)


class BertAttention(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.self = BertSelfAttention(c)
        self.output = BertDenseOutput(c.hidden_size, c)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        return self.output(self.self(x, mask_bias, rows), x, rows)


class BertIntermediate(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        if c.hidden_act != "gelu":
            raise ValueError(f"hidden_act {c.hidden_act!r} is not supported (only 'gelu')")
        self.dense = ColumnParallelLinear(c.hidden_size, c.intermediate_size, gather_output=False)

    def forward(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        return F.gelu(project(self.dense, x, rows))


class BertLayer(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.attention = BertAttention(c)
        self.intermediate = BertIntermediate(c)
        self.output = BertDenseOutput(c.intermediate_size, c)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        x = self.attention(x, mask_bias, rows)
        return self.output(self.intermediate(x, rows), x, rows)


class BertEncoder(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(c) for _ in range(c.num_hidden_layers))

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x, mask_bias, rows)
        return x


class ParallelBertModel(nn.Module):
    """forward(input_ids, attention_mask[, token_type_ids]) -> last_hidden_state [B, S, H]."""

    # Checkpoint keys this model has no use for (HF's pooler; old checkpoints' position_ids buffer).
    unused_checkpoint_keys = ("pooler.", "embeddings.position_ids")

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.embeddings(input_ids, token_type_ids)
        mask_bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        return self.encoder(x, mask_bias)

    def packed(self, input_ids: torch.Tensor, positions: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Texts packed end to end: input_ids, positions [T] (each text's own 0, 1, ...), offsets [R + 1]
        (text r is tokens offsets[r] .. offsets[r + 1] - 1; tokens past offsets[R] are padding) ->
        last_hidden_state [T, H], each text's tokens as if it had run alone."""
        x = self.embeddings(input_ids, torch.zeros_like(input_ids), positions)
        return self.encoder(x, offsets, offsets[-1:])  # the linears skip the bucket's padding tokens


def quantize_encoder(model: ParallelBertModel) -> None:
    """Every linear layer of the encoder to int8 weights in groups of 32 (layers.quantize); the
    embeddings and LayerNorms stay fp32. Inputs, as the kernel rounds them per group: 16 bits for the
    LayerNorm outputs (q / k / v, where attention amplifies an error, and the FFN's input, whose
    channels run up to 16x their median), 8 bits for the attention output's and the FFN output's
    projections, half the integer work. Measured on all-MiniLM-L6-v2 against sentence-transformers
    (cosine, lowest of 96 texts): every input at 8 bits 0.992, q / k / v alone at 8 bits 0.993, the
    FFN input alone 0.9987, this choice 0.9995; every input at 16 bits 0.9998 but no faster than fp32
    on a batch of mixed texts (README)."""
    for layer in model.encoder.layer:
        attention = layer.attention.self
        projections = [attention.qkv] if attention.fused else [attention.query, attention.key, attention.value]
        for linear, input_bits in [*((p, 16) for p in projections), (layer.attention.output.dense, 8),
                                   (layer.intermediate.dense, 16), (layer.output.dense, 8)]:
            linear.quantize(8, input_bits)


def load_bert(model_dir, prefix: str = "", weights: str = "fp32") -> tuple[ParallelBertModel, dict]:
    """Build this rank's shard of the BERT checkpoint in `model_dir` (config.json plus
    model.safetensors or pytorch_model.bin): fp32, bf16 (the encoder's linear layers' weights in
    bfloat16: layers.to_bfloat16) or int8 (quantize_encoder). A `func` for parallel_model_trace via
    functools.partial."""
    import json
    from pathlib import Path

    from ..parallel_layers import load

    model_dir = Path(model_dir)
    config = BertConfig.from_dict(json.loads((model_dir / "config.json").read_text()))
    model = ParallelBertModel(config)
    checkpoint = model_dir / "model.safetensors"
    if not checkpoint.exists():
        checkpoint = model_dir / "pytorch_model.bin"
    load(checkpoint, model, prefix=prefix, ignore_unexpected=ParallelBertModel.unused_checkpoint_keys)
    if backend.NAME == "cpu":  # loaded by Hugging Face's names, run fused (neuronx_distributed's compiler fuses
        for layer in model.encoder.layer:  # on its own)
            layer.attention.self.fuse()
    if weights == "int8":
        quantize_encoder(model)
    elif weights == "bf16":
        for module in model.encoder.modules():
            if hasattr(module, "to_bfloat16"):  # tpserve's linear layers, fused or not
                module.to_bfloat16()
    elif weights != "fp32":
        raise ValueError(f"BERT weights are fp32, bf16 or int8, got {weights!r}")
    return model.eval(), {}
