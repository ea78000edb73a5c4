"""The porting contract: code written for neuronx_distributed runs after changing the import name only.

The spelling comes from the NxD inference API text (tests/data/nxd-inference-trace-api.rst, a copy
of shared/reference/): `neuronx_distributed.trace.parallel_model_trace(...)` after a plain
`import neuronx_distributed`, so `tracer.trace.parallel_model_trace(...)` after `import tracer`. Each
check runs in a fresh Python process, where nothing but the script itself has imported a submodule:
a change to the package's lazy import machinery that breaks the spelling fails here."""

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import tracer

REFERENCE = Path(__file__).parent / "data" / "nxd-inference-trace-api.rst"


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    script = cwd / "port.py"
    script.write_text(textwrap.dedent(code))
    return subprocess.run([sys.executable, str(script)], cwd=cwd, capture_output=True, text=True, timeout=300)


def _documented_calls() -> list[tuple[str, list[tuple[str, str | None]]]]:
    """[(path after `neuronx_distributed.`, [(parameter, default or None)])] for each `def` the text gives."""
    calls = []
    for path, params in re.findall(r"def neuronx_distributed\.([\w.]+)\((.*)\)", REFERENCE.read_text()):
        parsed = [(p.split("=")[0].strip(), p.split("=")[1].strip() if "=" in p else None) for p in params.split(",")]
        calls.append((path, parsed))
    return calls


def test_the_reference_names_three_calls():
    assert [path for path, _ in _documented_calls()] == [
        "trace.parallel_model_trace", "trace.parallel_model_save", "trace.parallel_model_load"]


def test_every_documented_call_resolves_after_a_plain_import(tmp_path):
    """Each `neuronx_distributed.X.Y(params)` of the text is `tracer.X.Y` after `import tracer`, and
    takes the text's parameters first, in its order, with its defaults."""
    out = _python(f"""
        import inspect
        import tracer

        for path, params in {_documented_calls()!r}:
            target = tracer
            for part in path.split("."):
                target = getattr(target, part)
            ours = list(inspect.signature(target).parameters.values())[:len(params)]
            assert [p.name for p in ours] == [name for name, _ in params], (path, ours)
            for p, (name, default) in zip(ours, params):
                want = inspect.Parameter.empty if default is None else eval(default)
                assert p.default == want, (path, name, p.default, want)
        print("ok")
        """, tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_submodules_resolve_as_attributes_and_are_listed(tmp_path):
    out = _python("""
        import tracer

        for path in ["trace", "bucketing", "errors", "parallel_layers", "parallel_layers.layers",
                     "parallel_layers.parallel_state", "parallel_layers.load",
                     "parallel_layers.layers.ColumnParallelLinear", "errors.BucketSelectionError"]:
            target = tracer
            for part in path.split("."):
                target = getattr(target, part)
        assert {"trace", "parallel_layers", "bucketing", "errors"} <= set(dir(tracer))
        print("ok")
        """, tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_submodule_list_matches_the_package():
    package = Path(tracer.__file__).parent
    on_disk = {p.stem for p in package.glob("*.py") if not p.stem.startswith("_")}
    on_disk |= {p.name for p in package.iterdir() if (p / "__init__.py").exists()}
    assert set(tracer._SUBMODULES) == on_disk


NXD_EXAMPLE = """
    import torch
    import tracer
    from tqdm import tqdm


    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = tracer.parallel_layers.layers.ParallelEmbedding(50, 16)
            self.up = tracer.parallel_layers.layers.ColumnParallelLinear(16, 32, gather_output=False)
            self.down = tracer.parallel_layers.layers.RowParallelLinear(32, 16, input_is_parallel=True)

        def forward(self, ids):
            return self.down(torch.relu(self.up(self.embed(ids))))


    def checkpoint():
        torch.manual_seed(0)
        return {"embed.weight": torch.randn(50, 16), "up.weight": torch.randn(32, 16), "up.bias": torch.randn(32),
                "down.weight": torch.randn(16, 32), "down.bias": torch.randn(16)}


    def get_model():
        assert tracer.parallel_layers.parallel_state.get_tensor_model_parallel_size() == 2
        model = Net()
        for _ in tqdm(range(3), desc="loading"):  # a progress bar, as transformers' loaders show one
            pass
        tracer.parallel_layers.load(checkpoint(), model)
        return model, {}


    if __name__ == "__main__":
        buckets = [4, 8]
        examples = [torch.zeros(1, n, dtype=torch.long) for n in buckets]
        config = tracer.bucketing.BucketModelConfig(tracer.bucketing.sequence_length_bucket_kernel(buckets))
        model = tracer.trace.parallel_model_trace(get_model, examples, inline_weights_to_neff=False,
                                                  bucket_config=config, tp_degree=2)
        tracer.trace.parallel_model_save(model, "saved")
        loaded = tracer.trace.parallel_model_load("saved")

        weights = checkpoint()  # the same network, unsharded and eager
        ids = torch.tensor([[3, 1, 4, 1, 5, 9]])
        hidden = torch.relu(weights["embed.weight"][ids] @ weights["up.weight"].T + weights["up.bias"])
        expected = hidden @ weights["down.weight"].T + weights["down.bias"]
        got = loaded(ids)
        assert got.shape == (1, 8, 16), got.shape  # the 8-token bucket, right-padded
        torch.testing.assert_close(got[:, :6], expected, atol=1e-5, rtol=1e-5)
        try:
            loaded(torch.zeros(1, 9, dtype=torch.long))
        except tracer.errors.BucketSelectionError:
            pass
        else:
            raise AssertionError("9 tokens ran in buckets of at most 8")
        loaded.close()
        print("ok")
"""


def test_nxd_example_runs_as_spelled_and_exits_without_warnings(tmp_path):
    """The inference example with every name spelled as NxD code spells it, module-level `import
    tracer` only. It exits cleanly: no resource_tracker report of semaphores leaked by the trace
    workers (their progress bars make one each), no other warning."""
    out = _python(NXD_EXAMPLE, tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
    assert "loading" in out.stderr  # the progress bars ran (each makes a semaphore in its worker)
    noise = [line for line in out.stderr.splitlines()
             if re.search(r"warn|leaked|resource_tracker|Traceback", line, re.IGNORECASE)]
    assert noise == [], noise
