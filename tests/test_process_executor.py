"""Ranks as torch.distributed processes (gloo here; NCCL on CUDA), from the same saved shards."""

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
from builders import build_tiny_bert, tiny_bert_reference
from serving import build_mar, start_server

import tracer
from tracer import errors
from tracer.engine.embedder import Embedder


@pytest.fixture(scope="module")
def saved(minilm_tp2, tmp_path_factory):
    path = tmp_path_factory.mktemp("saved")
    tracer.parallel_model_save(minilm_tp2, path)
    return path


def test_processes_equal_threads_on_minilm_tp2(saved, minilm_tp2, minilm_inputs):
    with tracer.parallel_model_load(saved, executor="processes") as model:
        assert "RankProcesses" in repr(model)
        got = model(*minilm_inputs)
        short = model(minilm_inputs[0][:1, :20], minilm_inputs[1][:1, :20])
    assert (got - minilm_tp2(*minilm_inputs)).abs().max() <= 1e-5
    assert (short - minilm_tp2(minilm_inputs[0][:1, :20], minilm_inputs[1][:1, :20])).abs().max() <= 1e-5


def test_rendezvous_store_listens_on_loopback_only(saved):
    with tracer.parallel_model_load(saved, executor="processes") as model:
        port = model._executor.port
        mine = [c for c in psutil.Process().net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
        assert [c.laddr.ip for c in mine if c.laddr.port == port] == ["127.0.0.1"]


def test_killed_rank_is_a_named_error_within_30s(saved, minilm_inputs):
    with tracer.parallel_model_load(saved, executor="processes") as model:
        model(*minilm_inputs)
        os.kill(model._executor.pids()[1], signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(errors.RankDiedError, match="rank 1"):
            model(*minilm_inputs)
        assert time.monotonic() - started < 30
        with pytest.raises(errors.RankDiedError, match="load the model again"):
            model(*minilm_inputs)


def test_hung_rank_is_a_named_error_within_30s(saved, minilm_inputs):
    with tracer.parallel_model_load(saved, executor="processes", collective_timeout_s=5) as model:
        model(*minilm_inputs)
        os.kill(model._executor.pids()[1], signal.SIGSTOP)  # alive but never answers
        started = time.monotonic()
        with pytest.raises(errors.RankExecutionError):
            model(*minilm_inputs)
        assert time.monotonic() - started < 30


def test_rank_processes_die_with_a_sigkilled_parent(saved):
    script = ("import sys, time, tracer\n"
              "m = tracer.parallel_model_load(sys.argv[1], executor='processes')\n"
              "print(*m._executor.pids(), flush=True)\n"
              "time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", script, str(saved)], stdout=subprocess.PIPE, text=True)
    try:
        children = [int(p) for p in parent.stdout.readline().split()]
        assert len(children) == 2 and all(psutil.pid_exists(p) for p in children)
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_running(p) for p in children):
        time.sleep(0.1)
    assert not any(_running(p) for p in children)


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_cuda_refuses_more_ranks_than_gpus(saved):
    with pytest.raises(ValueError, match=f"needs 2 GPUs; {torch.cuda.device_count()} visible"):
        if torch.cuda.device_count() >= 2:
            pytest.skip("this machine has 2 GPUs")
        tracer.parallel_model_load(saved, executor="processes", device="cuda")


def test_tensors_cross_to_rank_processes_by_value():
    """Inputs and outputs go through the pipes as bytes (a pickled tensor would take a new
    shared-memory segment each call); every dtype, shape and layout comes back equal."""
    import pickle

    from tracer.runtime.rank_processes import _from_wire, _to_wire

    values = (torch.randn(3, 4).t(), [torch.tensor(5), torch.ones(2, dtype=torch.bfloat16)], None,
              torch.tensor([True, False]), torch.arange(6).view(2, 3)[:, 1:], torch.empty(0, 4))
    back = _from_wire(pickle.loads(pickle.dumps(_to_wire(values))))
    assert back[2] is None and isinstance(back[1], list)
    for got, sent in zip([back[0], *back[1], *back[3:]], [values[0], *values[1], *values[3:]], strict=True):
        assert got.dtype == sent.dtype and got.shape == sent.shape and torch.equal(got, sent)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
def test_cuda_tp1_parity_on_cuda0(tmp_path):
    ids = torch.randint(0, 101, (2, 12))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        expected = tiny_bert_reference()(input_ids=ids, attention_mask=mask, return_dict=False)[0]
    model = tracer.parallel_model_trace(build_tiny_bert, (ids, mask), tp_degree=1)
    tracer.parallel_model_save(model, tmp_path)
    model.close()
    with tracer.parallel_model_load(tmp_path, executor="processes", device="cuda") as on_gpu:
        got = on_gpu(ids, mask)
    assert (got - expected).abs().max() <= 1e-4


def test_torchserve_torchrun_mode_end_to_end(tmp_path):
    """parallelType tp + torchrun: each rank's worker loads only its shard; rank 0 answers."""
    store = tmp_path / "store"
    build_mar(store, name="minilmtr", batch_size=1, extra=["--torchrun"])
    server = start_server(tmp_path, store, "minilmtr")
    try:
        names = [" ".join(p.cmdline()) for p in server.our_processes()]
        assert any("torchrun" in n for n in names)
        assert sum("model_service_worker" in n and "torchrun" not in n for n in names) == 2  # one per rank
        status, _, body = server.post("tensor parallel inference over gloo")
        assert status == 200 and len(body) == 384
        embedder = Embedder(store / "minilmtr.shards")  # the same shards as rank threads, in-process
        expected = embedder.embed(["tensor parallel inference over gloo"])[0]
        embedder.close()
        assert torch.allclose(torch.tensor(body), torch.tensor(expected), atol=1e-5)
        assert server.post("")[0] == 400 and server.post("still serving")[0] == 200
    finally:
        server.stop()
