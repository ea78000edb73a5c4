"""Where neuronx_distributed and torch_neuronx are installed, tracer.* delegates to them.

There is no Neuron hardware here: a FAKE neuronx_distributed package (it only records the call)
stands in for it, to check the delegation and TPSERVE_BACKEND=cpu."""

import os
import subprocess
import sys


def test_delegates_to_neuronx_distributed_when_installed(tmp_path):
    (tmp_path / "neuronx_distributed").mkdir()
    (tmp_path / "neuronx_distributed" / "__init__.py").write_text("")
    (tmp_path / "neuronx_distributed" / "trace.py").write_text(
        "def parallel_model_trace(func, example_inputs, **kwargs):\n"
        "    return ('neuron', kwargs['tp_degree'], kwargs['compiler_args'])\n")
    (tmp_path / "torch_neuronx").mkdir()
    (tmp_path / "torch_neuronx" / "__init__.py").write_text("")
    script = ("import torch, tracer\n"
              "print(tracer.parallel_model_trace(print, torch.ones(1), tp_degree=8, compiler_args='--O2'))\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "('neuron', 8, '--O2')"
    env["TPSERVE_BACKEND"] = "cpu"  # forced CPU backend: our own checks run (and refuse --O2)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "CompilerArgsError" in out.stderr
