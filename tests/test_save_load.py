"""Save -> load (also in a fresh process), concurrency, close, and every load refusal."""

import json
import subprocess
import sys
import threading

import pytest
import torch

import tracer
from tracer import errors


def test_save_load_in_fresh_process(minilm_tp2, minilm_inputs, tmp_path):
    tracer.parallel_model_save(minilm_tp2, tmp_path / "saved")
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == ["manifest.json", "tp_0", "tp_1"]
    torch.save(minilm_inputs, tmp_path / "inputs.pt")
    script = (
        "import sys, torch, tracer\n"
        "inputs = torch.load(sys.argv[2])\n"
        "with tracer.parallel_model_load(sys.argv[1]) as m:\n"
        "    torch.save(m(*inputs), sys.argv[3])\n"
    )
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "saved"), str(tmp_path / "inputs.pt"),
                    str(tmp_path / "out.pt")], check=True)
    assert torch.equal(torch.load(tmp_path / "out.pt"), minilm_tp2(*minilm_inputs))


def test_manifest_contents(minilm_tp2, tmp_path):
    tracer.parallel_model_save(minilm_tp2, tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["tp_degree"] == 2 and manifest["backend"] == "cpu-torchscript"
    assert manifest["torch_version"] == torch.__version__.split("+")[0]
    assert manifest["buckets"][0]["inputs"] == [{"shape": [2, 128], "dtype": "int64"}] * 2
    assert set(manifest["files"]) == {"tp_0/bucket_0.pt", "tp_1/bucket_0.pt"}
    assert all(len(h) == 64 for h in manifest["files"].values())


def test_concurrent_callers_get_their_own_answers(minilm_tp2, minilm_inputs):
    ids, mask = minilm_inputs
    rows = [(ids[i:i + 1, :n], mask[i:i + 1, :n]) for i in range(2) for n in (16, 40, 128)]
    expected = [minilm_tp2(*r) for r in rows]
    got = [None] * len(rows) * 3

    def call(k):
        got[k] = minilm_tp2(*rows[k % len(rows)])

    threads = [threading.Thread(target=call, args=(k,)) for k in range(len(got))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert all(torch.equal(g, expected[k % len(rows)]) for k, g in enumerate(got))


def test_close_releases_rank_threads_and_repr(minilm_tp2, tmp_path):
    tracer.parallel_model_save(minilm_tp2, tmp_path)
    before = set(threading.enumerate())
    model = tracer.parallel_model_load(tmp_path)
    assert "tp_degree=2" in repr(model) and "buckets=1" in repr(model)
    with model:
        started = set(threading.enumerate()) - before
        assert [t.name for t in started] == ["tpserve-rank-1"]  # rank 0 runs on the caller
    assert not any(t.is_alive() for t in started)
    with pytest.raises(errors.ModelClosedError):
        model(torch.zeros(2, 128, dtype=torch.long), torch.ones(2, 128, dtype=torch.long))


@pytest.fixture
def saved(minilm_tp2, tmp_path):
    tracer.parallel_model_save(minilm_tp2, tmp_path / "m")
    return tmp_path / "m"


def test_refuses_missing_manifest(saved):
    (saved / "manifest.json").unlink()
    with pytest.raises(errors.ManifestError, match="no manifest.json"):
        tracer.parallel_model_load(saved)


def test_refuses_missing_rank_dir(saved):
    import shutil

    shutil.rmtree(saved / "tp_1")
    with pytest.raises(errors.MissingRankError, match="tp_1"):
        tracer.parallel_model_load(saved)


def test_refuses_tp_mismatch(saved):
    with pytest.raises(errors.TpDegreeMismatchError, match="tp_degree=2"):
        tracer.parallel_model_load(saved, tp_degree=4)
    (saved / "tp_2").mkdir()
    with pytest.raises(errors.TpDegreeMismatchError, match="tp_2"):
        tracer.parallel_model_load(saved)


def test_refuses_flipped_byte(saved):
    path = saved / "tp_1" / "bucket_0.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(errors.ChecksumMismatchError, match="tp_1/bucket_0.pt"):
        tracer.parallel_model_load(saved)


def test_refuses_other_torch_version(saved):
    manifest = json.loads((saved / "manifest.json").read_text())
    manifest["torch_version"] = "1.13.1"
    (saved / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(errors.TorchVersionMismatchError, match="1.13.1"):
        tracer.parallel_model_load(saved)


@pytest.mark.parametrize("field, value, error, match", [
    ("tpserve_version", "0.0.1", "TpServeVersionMismatchError", "built by tpserve 0.0.1"),
    ("schema", 1, "ManifestError", "schema 1"),
    ("format", "tpserve-tp/1", "ManifestError", "re-trace"),
])
def test_refuses_another_tpserve_version_or_format(saved, field, value, error, match):
    """The handler and runtime come from the installed tpserve: a model built by another version
    (or in an older format) is refused with a named error, never half-understood."""
    manifest = json.loads((saved / "manifest.json").read_text())
    manifest[field] = value
    (saved / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(getattr(errors, error), match=match):
        tracer.parallel_model_load(saved)


def test_manifest_is_typed_and_records_versions(saved):
    from importlib.metadata import version

    from tracer.artifacts import SCHEMA, Manifest

    manifest = Manifest.read(saved)
    assert manifest.schema == SCHEMA and manifest.tpserve_version == version("tpserve")
    assert manifest.tp_degree == 2 and manifest.sequence_buckets() == [128] and manifest.batch_size() == 2


def test_rank_graphs_of_another_process_are_a_named_error(saved):
    with tracer.parallel_model_load(saved, executor="processes") as model:
        with pytest.raises(errors.RankNotLocalError, match="runs in process"):
            model.rank_modules(1)


def test_ignores_files_not_in_manifest(saved, minilm_inputs, minilm_tp2):
    (saved / "tp_0" / "notes.txt").write_text("left by a user")
    (saved / "README").write_text("x")
    with tracer.parallel_model_load(saved) as model:
        assert torch.equal(model(*minilm_inputs), minilm_tp2(*minilm_inputs))


def test_refuses_wrong_inputs(minilm_tp2):
    with pytest.raises(errors.InputSignatureError, match="expected 2 inputs"):
        minilm_tp2(torch.zeros(1, 8, dtype=torch.long))
    with pytest.raises(errors.InputSignatureError, match="int64"):
        minilm_tp2(torch.zeros(1, 8), torch.ones(1, 8))
