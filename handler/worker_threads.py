"""How many intra-op threads each rank of a TorchServe worker gets.

Every worker of a model runs tp_degree ranks on the same machine, so by default the cores are
shared out: cores // (workers x tp_degree), at least 1. Oversubscribing (each of 2 workers with 2
threads per rank on 2 cores) makes every rank wait for the others' time slices. The archive's
--threads-per-rank (model-config.yaml `handler: threads_per_rank`) overrides it.
"""

from __future__ import annotations

import os


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the cores this process may use (containers, taskset)
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def threads_per_rank(model_yaml_config: dict) -> int:
    settings = model_yaml_config.get("handler", {})
    if settings.get("threads_per_rank"):
        return int(settings["threads_per_rank"])
    workers = int(model_yaml_config.get("minWorkers") or 1)
    return max(1, cores() // (workers * int(settings.get("tp_degree") or 1)))
