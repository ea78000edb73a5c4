"""Sharded traced models equal the unsharded module (max abs diff <= 1e-4)."""

import pytest
import torch
from builders import build_mlp, build_tiny_bert, mlp_reference, tiny_bert_reference
from conftest import minilm_builder

import tracer


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_mlp_parity(tp):
    x = torch.randn(3, 5, 16)
    with tracer.parallel_model_trace(build_mlp, (x,), tp_degree=tp) as model:
        assert (model(x) - mlp_reference()(x)).abs().max() <= 1e-5
        y = torch.randn(1, 9, 16)  # another shape through the same graph
        assert (model(y) - mlp_reference()(y)).abs().max() <= 1e-5


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_tiny_bert_attention_parity(tp):
    ids = torch.randint(0, 101, (2, 12))
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    with torch.no_grad():
        expected = tiny_bert_reference()(input_ids=ids, attention_mask=mask, return_dict=False)[0]
    with tracer.parallel_model_trace(build_tiny_bert, (ids, mask), tp_degree=tp) as model:
        got = model(ids, mask)
    assert (got - expected)[mask.bool()].abs().max() <= 1e-4


def test_minilm_tp2_parity(minilm_tp2, minilm_inputs, minilm_reference):
    got = minilm_tp2(*minilm_inputs)
    mask = minilm_inputs[1].bool()
    assert (got - minilm_reference)[mask].abs().max() <= 1e-4


@pytest.mark.parametrize("tp", [1, 4])
def test_minilm_parity(tp, minilm_inputs, minilm_reference):
    with tracer.parallel_model_trace(minilm_builder(), minilm_inputs, tp_degree=tp) as model:
        got = model(*minilm_inputs)
    mask = minilm_inputs[1].bool()
    assert (got - minilm_reference)[mask].abs().max() <= 1e-4


def test_shards_really_are_sharded(minilm_tp2):
    """Each rank holds half of every column/row-parallel weight, and the all-reduce is in the graph."""
    for rank in range(2):
        graph = minilm_tp2.rank_modules(rank)[0]
        qkv = getattr(graph.layers, "0").attn.qkv.weight  # query, key, value fused
        assert tuple(qkv.shape) == (3 * 192, 384)
        assert tuple(graph.embeddings.word.weight.shape) == (15261, 384)
        assert "tpserve::all_reduce" in str(graph.inlined_graph)
        # the op takes no group name (each thread binds its group): (x, rank, world_size) only
        reduces = [n for n in graph.inlined_graph.nodes() if n.kind() == "tpserve::all_reduce"]
        assert reduces and all([i.type().kind() for i in n.inputs()] == ["TensorType", "IntType", "IntType"]
                               for n in reduces)
