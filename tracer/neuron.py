"""Delegation to AWS neuronx_distributed where it (and torch_neuronx) is installed.

On a Neuron host the same tracer.* calls run neuronx_distributed's own tracing; elsewhere the CPU
backend of this package runs. TPSERVE_BACKEND=cpu forces the CPU backend even on a Neuron host.
"""

from __future__ import annotations

import importlib
import importlib.util
import os


def available() -> bool:
    if os.environ.get("TPSERVE_BACKEND", "auto") == "cpu":
        return False
    return all(importlib.util.find_spec(name) is not None for name in ("neuronx_distributed", "torch_neuronx"))


def module(name: str):
    return importlib.import_module(f"neuronx_distributed.{name}")
