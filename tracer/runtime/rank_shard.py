"""One rank's part of a saved model: its traced graphs (one per bucket) bound to one shared copy of
its weights and one set of state tensors, whichever bucket runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from .. import artifacts
from . import native_ops
from .huge_pages import load_weights


def _resolve(module: torch.jit.ScriptModule, dotted: str) -> tuple[torch.jit.ScriptModule, str]:
    *path, leaf = dotted.split(".")
    for part in path:
        module = getattr(module, part)
    return module, leaf


def get_tensor(module: torch.jit.ScriptModule, dotted: str) -> torch.Tensor:
    owner, leaf = _resolve(module, dotted)
    return getattr(owner, leaf)


def set_tensor(module: torch.jit.ScriptModule, dotted: str, value: torch.Tensor) -> None:
    """Rebind a graph's parameter/buffer to `value` itself (no copy): graphs of several buckets then
    share one tensor, and an in-place write by one is seen by all."""
    owner, leaf = _resolve(module, dotted)
    owner._c.setattr(leaf, value)


class RankShard:
    def __init__(self, load_dir: Path, manifest: artifacts.Manifest, rank: int, device: str = "cpu") -> None:
        native_ops.ops()  # the graphs call tpserve:: ops: the library must be loaded first
        self.graphs = [torch.jit.load(str(load_dir / artifacts.bucket_file(rank, b)), map_location=device)
                       for b in range(len(manifest.buckets))]
        if not manifest.inline_weights:
            weights = load_dir / artifacts.weights_file(rank)
            if device == "cpu":  # weights and KV caches (memory, not files) in 2 MB pages
                shared = load_weights(weights, manifest.runtime_states)
            else:
                shared = load_file(str(weights), device=device)
                for name, spec in manifest.runtime_states.items():
                    shared[name] = torch.zeros(spec["shape"], dtype=getattr(torch, spec["dtype"]), device=device)
            for name, source in manifest.ties.items():  # tied weights: stored once, one tensor for both
                shared[name] = shared[source]
        else:  # state tensors must still be one per rank, whichever bucket updates them
            shared = {name: get_tensor(self.graphs[0], name) for name in manifest.aliases}
        for graph in self.graphs:
            for name, tensor in shared.items():
                set_tensor(graph, name, tensor)
            graph.eval()
        self.states = [(get_tensor(self.graphs[0], name), index) for name, index in manifest.aliases.items()]
        self._state_indices = {index for _, index in self.states}

    def run(self, bucket: int, inputs: list[torch.Tensor], keep_states: bool = True) -> Any:
        """The graph's outputs; with keep_states=False the outputs that are states are None (they stay
        here: a rank process then sends back the logits, not every KV cache, each call)."""
        output = self.graphs[bucket](*inputs)
        for state, index in self.states:  # input->output aliases: keep the update for the next call
            if output[index] is not state:  # the graph returned a new tensor rather than updating it in
                state.copy_(output[index])  # place (a KV cache is updated in place: 60 checks a step)
        if keep_states or not self.states:
            return output
        return tuple(None if i in self._state_indices else x for i, x in enumerate(output))
