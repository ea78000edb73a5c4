"""Tracing semantics: buckets, shared weights, states, max_parallel_compilations, refusals."""

import json
import os
import subprocess
import sys

import pytest
import torch
from builders import build_counter, build_fails_on_rank_one, build_offset, build_tiny_bert, tiny_bert_reference

import tracer
from tracer import errors
from tracer.parallel_layers import ColumnParallelLinear, load, parallel_state

BUCKETS = [8, 16, 32]


def _bucket_examples():
    return [(torch.ones(2, n, dtype=torch.long), torch.ones(2, n, dtype=torch.long)) for n in BUCKETS]


@pytest.fixture(scope="module")
def bucketed_bert(tmp_path_factory):
    config = tracer.BucketModelConfig(tracer.sequence_length_bucket_kernel(BUCKETS))
    with tracer.parallel_model_trace(build_tiny_bert, _bucket_examples(), tp_degree=2, inline_weights_to_neff=False,
                                     bucket_config=config, compiler_workdir=tmp_path_factory.mktemp("bb")) as model:
        yield model


@pytest.mark.parametrize("length", [1, 5, 8, 9, 16, 17, 32])
def test_bucket_choice_and_padding_never_change_results(bucketed_bert, length):
    ids = torch.randint(1, 101, (2, length))
    mask = torch.ones_like(ids)
    mask[1, length // 2 + 1:] = 0
    padded, bucket = bucketed_bert.select_bucket([ids, mask])
    assert bucket == next(i for i, b in enumerate(BUCKETS) if length <= b)
    assert padded[0].shape == (2, BUCKETS[bucket]) and padded[1][:, length:].sum() == 0
    with torch.no_grad():
        expected = tiny_bert_reference()(input_ids=ids, attention_mask=mask, return_dict=False)[0]
    got = bucketed_bert(ids, mask)[:, :length]
    assert (got - expected)[mask.bool()].abs().max() <= 1e-4


def test_too_long_for_every_bucket_is_a_named_error(bucketed_bert):
    ids = torch.ones(1, 33, dtype=torch.long)
    with pytest.raises(errors.BucketSelectionError, match="33 exceeds the largest bucket 32"):
        bucketed_bert(ids, ids)
    assert bucketed_bert(ids[:, :10], ids[:, :10]).shape == (1, 16, 32)  # still serving


def test_buckets_share_one_copy_of_weights(bucketed_bert):
    for rank in range(2):
        graphs = bucketed_bert.rank_modules(rank)
        pointers = [{n: p.data_ptr() for n, p in g.named_parameters()} for g in graphs]
        assert len(pointers[0]) > 10 and all(p == pointers[0] for p in pointers[1:])
    files = json.loads((bucketed_bert.load_dir / "manifest.json").read_text())["files"]
    assert sorted(f for f in files if f.endswith(".safetensors")) == ["tp_0/weights.safetensors",
                                                                      "tp_1/weights.safetensors"]
    # the saved graphs carry empty placeholders only: the weights live once, in weights.safetensors
    stripped = torch.jit.load(str(bucketed_bert.load_dir / "tp_0/bucket_2.pt"))
    assert all(p.numel() == 0 for p in stripped.parameters())


def test_func_kwargs_reach_each_bucket():
    config = tracer.BucketModelConfig(tracer.sequence_length_bucket_kernel([4, 8]),
                                      func_kwargs=[{"offset": 1.0}, {"offset": 2.0}])
    examples = [(torch.ones(1, 4),), (torch.ones(1, 8),)]
    with tracer.parallel_model_trace(build_offset, examples, tp_degree=1, inline_weights_to_neff=False,
                                     bucket_config=config) as model:
        assert model(torch.ones(1, 3)).item() == 1.0
        assert model(torch.ones(1, 6)).item() == 2.0


@pytest.mark.parametrize("inline", [True, False])
def test_states_keep_aliased_outputs_between_calls(inline):
    x = torch.ones(1, 4)
    with tracer.parallel_model_trace(build_counter, (x,), tp_degree=2, inline_weights_to_neff=inline) as model:
        first, calls1 = model(x)
        second, calls2 = model(x)
        assert calls1.item() == 1 and calls2.item() == 2
        assert torch.allclose(second, 2 * first)
        for rank in range(2):  # every rank kept its own copy up to date
            assert model.rank_modules(rank)[0].calls.item() == 2


def test_states_are_shared_across_buckets():
    config = tracer.BucketModelConfig(tracer.sequence_length_bucket_kernel([1, 2]))
    examples = [(torch.ones(1, 1, 4),), (torch.ones(1, 2, 4),)]
    with tracer.parallel_model_trace(build_counter, examples, tp_degree=1, inline_weights_to_neff=False,
                                     bucket_config=config) as model:
        assert model(torch.ones(1, 1, 4))[1].item() == 1
        assert model(torch.ones(1, 2, 4))[1].item() == 2
        assert model(torch.ones(1, 1, 4))[1].item() == 3


@pytest.mark.parametrize("limit", [1, 2])
def test_max_parallel_compilations_is_never_exceeded(limit, tmp_path):
    x = torch.ones(1, 4)
    with tracer.parallel_model_trace(build_counter, (x,), tp_degree=4, max_parallel_compilations=limit,
                                     compiler_workdir=tmp_path):
        timing = json.loads((tmp_path / "artifacts/manifest.json").read_text())["trace_timing"]
    events = sorted([(t["start"], 1) for t in timing] + [(t["end"], -1) for t in timing])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    assert peak <= limit
    assert (tmp_path / "artifacts/tp_3/trace.log").read_text().startswith("rank 3 bucket 0")


def test_rank_failure_is_a_named_error_and_the_model_keeps_serving():
    with tracer.parallel_model_trace(build_fails_on_rank_one, (torch.ones(2, 6),), tp_degree=2) as model:
        with pytest.raises(errors.RankExecutionError, match="rank 1 failed"):
            model(torch.ones(2, 4))  # rank 1 cannot reshape 8 elements to (-1, 3)
        assert model(torch.ones(2, 6)).shape == (2, 6)
        assert model(torch.ones(1, 6)).shape == (1, 6)


def test_refuses_unknown_compiler_args():
    with pytest.raises(errors.CompilerArgsError, match="--model-type=transformer"):
        tracer.parallel_model_trace(build_counter, (torch.ones(1, 4),), compiler_args="--model-type=transformer")


def test_refuses_func_that_workers_cannot_import():
    with pytest.raises(errors.TraceError, match="module-level function"):
        tracer.parallel_model_trace(lambda: build_counter(), (torch.ones(1, 4),))


def test_bucket_config_requires_separate_weights():
    config = tracer.BucketModelConfig(tracer.sequence_length_bucket_kernel([4]))
    with pytest.raises(ValueError, match="inline_weights_to_neff=False"):
        tracer.parallel_model_trace(build_counter, [(torch.ones(1, 4),)], bucket_config=config)


def test_trace_error_names_the_rank():
    with pytest.raises(errors.TraceError, match="rank 0 failed"):
        tracer.parallel_model_trace(build_counter, (torch.ones(1, 5),))  # 5 features into a 4-wide layer


def test_load_refuses_missing_and_unexpected_keys():
    parallel_state.set_tensor_model_parallel_rank(1, 2)
    try:
        layer = ColumnParallelLinear(4, 8)
        full = {"weight": torch.arange(32.0).reshape(8, 4), "bias": torch.arange(8.0)}
        load(full, layer)
        assert torch.equal(layer.weight, full["weight"][4:]) and torch.equal(layer.bias, full["bias"][4:])
        with pytest.raises(errors.CheckpointKeyError, match=r"missing keys \['bias'\], unexpected keys \['extra'\]"):
            load({"weight": full["weight"], "extra": torch.zeros(1)}, layer)
        with pytest.raises(errors.CheckpointShapeError, match=r"\(8, 5\)"):
            load({"weight": torch.zeros(8, 5), "bias": full["bias"]}, layer)
    finally:
        parallel_state.destroy_model_parallel()


def test_load_reads_safetensors_slices(tmp_path):
    from safetensors.torch import save_file

    full = {"weight": torch.randn(8, 4), "bias": torch.randn(8)}
    save_file(full, tmp_path / "w.safetensors")
    parallel_state.set_tensor_model_parallel_rank(0, 2)
    try:
        layer = ColumnParallelLinear(4, 8)
        load(tmp_path / "w.safetensors", layer)
        assert torch.equal(layer.weight, full["weight"][:4])
    finally:
        parallel_state.destroy_model_parallel()


def test_importing_tracer_builds_and_loads_no_cpp(tmp_path):
    """The C++ collectives are built when a rank runtime or trace worker first needs them: not on
    `import tracer`, `tracer.errors`, the CLI's --help or the archive step (a fresh cache stays empty)."""
    script = ("import torch, tracer, tracer.errors, tracer.builder.archive, tracer.engine.embedder, tracer.trace\n"
              "from tracer import BucketModelConfig, sequence_length_bucket_kernel\n"
              "print(hasattr(torch.ops.tpserve, 'all_reduce'))\n")
    env = dict(os.environ, TPSERVE_CACHE_DIR=str(tmp_path / "cache"))
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    assert not (tmp_path / "cache").exists()
