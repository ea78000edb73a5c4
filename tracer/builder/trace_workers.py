"""What one trace worker process does: build and trace one rank's shard for every bucket."""

from __future__ import annotations

import json
import multiprocessing
import multiprocessing.connection
import multiprocessing.util
import os
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from .. import artifacts
from ..errors import TraceError, last_line
from ..parallel_layers import parallel_state
from ..runtime import collectives
from ..runtime.rank_shard import set_tensor


def _alias_names(model: torch.nn.Module, states, outputs: int) -> dict[str, int]:
    """Map the state tensors of func()'s `states` ({tensor: output index}) to attribute names."""
    if not states:
        return {}
    owned = {id(t): name for name, t in [*model.named_parameters(), *model.named_buffers()]}
    aliases = {}
    for tensor, index in dict(states).items():
        if id(tensor) not in owned:
            raise ValueError("states: every state tensor must be a parameter or buffer of the model")
        if not 0 <= int(index) < outputs:
            raise ValueError(f"states: output index {index} out of range for {outputs} outputs")
        aliases[owned[id(tensor)]] = int(index)
    return aliases


def _non_persistent(model: torch.nn.Module) -> set[str]:
    return {f"{prefix}.{name}" if prefix else name
            for prefix, module in model.named_modules() for name in module._non_persistent_buffers_set}


def _count_outputs(output) -> int:
    return len(output) if isinstance(output, (tuple, list)) else 1


def _memory_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in MiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets VmHWM to the current RSS
        f.write("5")


def trace_rank(func, rank: int, tp_degree: int, examples: list[tuple], func_kwargs: list[dict],
               inline_weights: bool, options: dict, out_dir: str, intra_op_threads: int) -> dict:
    started = time.time()
    torch.set_num_threads(intra_op_threads)
    parallel_state.set_tensor_model_parallel_rank(rank, tp_degree)
    collectives.bind_trace()
    root = Path(out_dir)
    rank_path = artifacts.rank_dir(root, rank)
    rank_path.mkdir(parents=True, exist_ok=True)
    log = open(rank_path / "trace.log", "w")
    files, aliases, weight_shapes, runtime_states, ties = {}, {}, None, {}, {}
    built_with, build_mb = None, 0.0
    for bucket, (example, kwargs) in enumerate(zip(examples, func_kwargs, strict=True)):
        t0 = time.time()
        if built_with != kwargs:  # buckets with the same func_kwargs trace the same model
            model = states = None
            _reset_peak_rss()
            before = _memory_mb("VmRSS")
            model, states = func(**kwargs)
            model.eval()
            build_mb = max(build_mb, _memory_mb("VmHWM") - before)
            built_with = kwargs
        with torch.no_grad():
            output = model(*example)
            aliases = _alias_names(model, states, _count_outputs(output))
            traced = torch.jit.trace(model, example, check_trace=options["check_trace"], strict=options["strict"])
        if not inline_weights:  # weights once per rank; graphs carry empty placeholders
            tensors, ties = _untied(traced)
            shapes = {name: tuple(t.shape) for name, t in tensors.items()}
            # a state that is a non-persistent buffer (a KV cache) is run-time memory: allocated
            # (zeros) at load, never written to disk
            non_persistent = _non_persistent(model)
            runtime_states = {name: {"shape": list(tensors[name].shape),
                                     "dtype": str(tensors[name].dtype).removeprefix("torch.")}
                              for name in aliases if name in non_persistent}
            saved = {name: t for name, t in tensors.items() if name not in runtime_states}
            if weight_shapes is None:
                save_file(saved, str(root / artifacts.weights_file(rank)))
                files[artifacts.weights_file(rank)] = artifacts.sha256(root / artifacts.weights_file(rank))
                weight_shapes = shapes
            elif shapes != weight_shapes:
                raise ValueError(f"bucket {bucket} builds weights that differ from bucket 0's; buckets share weights")
            for name, tensor in tensors.items():
                set_tensor(traced, name, torch.empty(0, dtype=tensor.dtype))
            for name, source in ties.items():
                set_tensor(traced, name, torch.empty(0, dtype=tensors[source].dtype))
        torch.jit.save(traced, str(root / artifacts.bucket_file(rank, bucket)))
        files[artifacts.bucket_file(rank, bucket)] = artifacts.sha256(root / artifacts.bucket_file(rank, bucket))
        line = f"rank {rank} bucket {bucket} {[tuple(x.shape) for x in example]}: traced in {time.time() - t0:.2f}s"
        log.write(line + "\n")
        print(f"[tpserve] {line}", file=sys.stderr, flush=True)
        del traced
    log.close()
    timing = {"rank": rank, "start": started, "end": time.time(), "build_peak_rss_mb": round(build_mb, 1)}
    (rank_path / "trace_timing.json").write_text(json.dumps(timing))
    return {"rank": rank, "files": files, "aliases": aliases, "runtime_states": runtime_states, "ties": ties,
            **timing}


def _untied(traced: torch.jit.ScriptModule) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The graph's parameters and buffers by name, each tensor once, and {name: the name it is tied
    to} for the others (a tied LM head and embedding: stored once, bound to both at load)."""
    tensors, ties, first = {}, {}, {}
    for name, t in [*traced.named_parameters(remove_duplicate=False), *traced.named_buffers(remove_duplicate=False)]:
        key = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and key in first:
            ties[name] = first[key]
        else:
            first[key] = name
            tensors[name] = t.detach().contiguous()
    return tensors, ties


def _worker_main(conn, args: tuple) -> None:
    try:
        conn.send((True, trace_rank(*args)))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent as text (may not pickle)
        conn.send((False, last_line(exc)))
    finally:
        conn.close()
        # What multiprocessing runs when a target returns: its finalizers unlink the semaphores this
        # process made (tqdm's lock, which transformers' progress bars create), else the parent's
        # resource tracker reports them "leaked" at shutdown. Then skip the interpreter's teardown
        # (~1.4 s with torch loaded): the result is sent.
        multiprocessing.util._exit_function()
        os._exit(0)


def run_trace_workers(worker_args: list[tuple], max_running: int) -> list[dict]:
    """One fresh spawned process per rank, at most `max_running` alive at once."""
    context = multiprocessing.get_context("spawn")
    pending, running, results, started = list(worker_args), {}, [], []
    try:
        while pending or running:
            while pending and len(running) < max_running:
                args = pending.pop(0)
                receiver, sender = context.Pipe(duplex=False)
                process = context.Process(target=_worker_main, args=(sender, args), daemon=True)
                process.start()
                sender.close()
                running[receiver] = (args[1], process)
                started.append(process)
            for receiver in multiprocessing.connection.wait(list(running)):
                rank, process = running.pop(receiver)
                try:
                    ok, value = receiver.recv()
                except EOFError:
                    process.join()
                    ok, value = False, (f"trace worker died (exit code {process.exitcode}); a script that "
                                        "traces needs `if __name__ == '__main__':`")
                if not ok:
                    raise TraceError(f"tracing rank {rank} failed: {value}")
                results.append(value)
    finally:
        for process in started:
            if process.is_alive() and any(process is p for _, p in running.values()):
                process.kill()
            process.join()
    return results
