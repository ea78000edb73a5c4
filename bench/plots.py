"""PNG charts of the benchmarks' JSON results (bench/results/*.json, from bench.common.write_results).

    .venv/bin/python -m bench.plots [--results bench/results] [--out docs/images]

One chart per file it has data for; a chart whose JSON is missing is skipped with a line on stderr:

    embeddings-throughput.png  serving.json: served req/s per workload, one line per setup
    rerank.png                 rerank.json: pairs/s at 1 and 4 clients per setup
    generation-latency.png     generation.json: first-token and per-token ms per system, memory floors
    streams.png                generation.json: tpserve tokens/s at 1 and 4 concurrent streams
    served-breakdown.png       serving_breakdown.json: a served request's mean ms per part, stacked

Matplotlib (the bench extra) draws with its Agg backend (no display); the files are byte-identical for
the same JSON (no timestamp or version in the PNG's metadata), so regenerating them leaves git quiet.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

WIDTH_IN, DPI = 8.0, 110  # 880 px: GitHub's page width, where 10-point text stays legible
WEIGHT_COLORS = {"fp32": "tab:blue", "bf16": "tab:purple", "int8": "tab:orange", "int4": "tab:green",
                 "Q4_1": "tab:red"}
plt.rcParams.update({"font.size": 9, "axes.titlesize": 10, "axes.grid": True, "grid.alpha": 0.3,
                     "axes.axisbelow": True})


def caption(record: dict) -> str:
    """Where and when the numbers come from, under each chart's title."""
    quick = " · quick smoke run" if record.get("quick") else ""
    return f"{record['machine']} · {record['date'][:10]} · commit {record['commit']}{quick}"


def figure(record: dict, title: str, height_in: float, **subplots):
    fig, axes = plt.subplots(figsize=(WIDTH_IN, height_in), layout="constrained", **subplots)
    fig.suptitle(f"{title}\n{caption(record)}", fontsize=10)
    return fig, axes


def wrap(label: str, width: int = 34) -> str:
    return "\n".join(textwrap.wrap(label, width))


def embeddings_throughput(record: dict):
    """Served req/s per workload (x: short texts at 1 client, mixed at 8 and 16), one line per served
    setup; the in-process rows are left out (one point each, not served)."""
    rows = [r for r in record["rows"] if not r["setup"].startswith("in-process")]
    if not rows:
        return None
    workloads = sorted({(r["texts"], r["clients"]) for r in rows}, key=lambda w: (w[0] != "short", w[1]))
    setups = list(dict.fromkeys(r["setup"] for r in rows))
    fig, ax = figure(record, "Served embeddings throughput (all-MiniLM-L6-v2, REST, closed-loop clients)",
                     3.4 + 0.17 * len(setups))
    markers = "osD^v<>ph*"
    for i, setup in enumerate(setups):
        points = {(r["texts"], r["clients"]): r["req_per_s"] for r in rows if r["setup"] == setup}
        xs = [x for x, w in enumerate(workloads) if w in points]
        ax.plot(xs, [points[workloads[x]] for x in xs], marker=markers[i % len(markers)], color=f"C{i % 10}",
                linestyle="-" if setup.startswith("tpserve") else "--", label=setup)  # peers dashed
    ax.set_xticks(range(len(workloads)), [f"{texts} texts, {clients} client{'s' * (clients > 1)}"
                                          for texts, clients in workloads])
    ax.set_xlabel("workload (one text per request: short 4–8 words, mixed 3–110 words; closed-loop clients)")
    ax.set_ylabel("throughput (requests/s)")
    ax.set_ylim(bottom=0)
    fig.legend(loc="outside lower center", ncols=2, fontsize=8)
    return fig


def rerank(record: dict):
    """pairs/s per setup, a bar for 1 client and one for 4 (horizontal: the setup names are long)."""
    rows = record["rows"]
    setups = list(dict.fromkeys(r["setup"] for r in rows))
    clients = sorted({r["clients"] for r in rows})
    if not setups:
        return None
    value = {(r["setup"], r["clients"]): r["pairs_per_s"] for r in rows}
    fig, ax = figure(record, f"Rerank throughput: 1 query × {record.get('documents', '?')} documents per request",
                     1.6 + 0.22 * len(setups) * len(clients))
    height = 0.8 / len(clients)
    for i, n in enumerate(clients):
        ys = [y + (i - (len(clients) - 1) / 2) * height for y in range(len(setups))]
        bars = ax.barh(ys, [value.get((s, n), 0) for s in setups], height, color=f"C{i}",
                       label=f"{n} client{'s' * (n > 1)}")
        ax.bar_label(bars, fmt="%.0f", padding=2, fontsize=8)
    ax.set_yticks(range(len(setups)), [wrap(s, 44) for s in setups])
    ax.invert_yaxis()  # the first setup on top, as in the table
    ax.set_xlabel("throughput (query–document pairs scored per second)")
    ax.margins(x=0.12)  # room for the bar labels
    fig.legend(loc="outside lower center", ncols=len(clients))
    return fig


def generation_latency(record: dict):
    """First-token and per-token ms (1 stream) per system, bars coloured by weights; the memory
    floors (every weight byte read once per token at copy bandwidth) as dashed lines on per token."""
    bars = [r for r in record["rows"] if r["system"] != "memory floor"]
    floors = [r for r in record["rows"] if r["system"] == "memory floor"]
    if not bars:
        return None
    fig, (first, token) = figure(record, f"{record.get('model', 'SmolLM2')} generation latency, 2 threads "
                                 "(lower is better)", 2.0 + 0.32 * len(bars), ncols=2, sharey=True)
    ys = range(len(bars))
    colors = [WEIGHT_COLORS.get(r["weights"], "tab:gray") for r in bars]
    hatches = ["" if r["system"].startswith("tpserve") else "//" for r in bars]  # the peers hatched
    for ax, key in ((first, "first_token_ms"), (token, "per_token_ms")):
        values = [r[key] or 0 for r in bars]  # None (not measured): no bar
        drawn = ax.barh(ys, values, 0.7, color=colors, hatch=hatches, edgecolor="white")
        ax.bar_label(drawn, labels=[f"{v:.3g}" if v else "" for v in values], padding=2, fontsize=8)
        ax.margins(x=0.18)  # room for the bar labels
    for floor in floors:
        token.axvline(floor["per_token_ms"], color=WEIGHT_COLORS.get(floor["weights"], "black"), linestyle="--",
                      linewidth=1.2, label=f"memory floor, {floor['weights']} ({floor['weights_mb']:.0f} MB)")
    first.set_yticks(ys, [wrap(r["label"], 38) for r in bars])
    first.invert_yaxis()
    first.set_xlabel(f"time to first token (ms; prompt {record.get('first_token_prompt_tokens', '?')} tokens)")
    token.set_xlabel(f"per token, 1 stream (ms; {record.get('new_tokens', '?')} new tokens)")
    from matplotlib.patches import Patch

    weights = list(dict.fromkeys(r["weights"] for r in bars))
    handles = [Patch(color=WEIGHT_COLORS.get(w, "tab:gray"), label=f"{w} weights") for w in weights]
    handles += [Patch(facecolor="white", edgecolor="gray", hatch="//", label="peer (Hugging Face, llama.cpp)")]
    handles += token.get_legend_handles_labels()[0]
    fig.legend(handles=handles, loc="outside lower center", ncols=3, fontsize=8)
    return fig


def streams(record: dict):
    """tpserve's tokens/s (all streams together) at 1 and 4 concurrent streams, a line per tp and
    weights: colour by weights, line style by tp."""
    rows = [r for r in record["rows"] if r.get("tokens_per_s_1_stream") and r.get("tokens_per_s_4_streams")]
    if not rows:
        return None
    fig, ax = figure(record, f"{record.get('model', 'SmolLM2')} in-process: tokens/s against concurrent streams", 4.6)
    styles, markers = {1: "-", 2: "--", 3: ":"}, {1: "o", 2: "s", 3: "^"}
    for r in rows:
        ax.plot([1, 4], [r["tokens_per_s_1_stream"], r["tokens_per_s_4_streams"]],
                color=WEIGHT_COLORS.get(r["weights"], "tab:gray"), linestyle=styles.get(r["tp"], "-."),
                marker=markers.get(r["tp"], "x"), label=f"tp={r['tp']}, {r['weights']}")
    ax.set_xticks([1, 4])
    ax.set_xlabel("concurrent streams (one batch)")
    ax.set_ylabel("throughput (tokens/s, all streams together)")
    ax.set_ylim(bottom=0)
    ax.legend(loc="upper left", ncols=2, fontsize=8)
    return fig


def served_breakdown(record: dict):
    """Per workload a panel, per served setup a horizontal bar of its parts' mean ms stacked (they
    add up to the mean latency, written at the bar's end)."""
    rows = record["rows"]
    if not rows:
        return None
    workloads = list(dict.fromkeys((r["texts"], r["clients"]) for r in rows))
    parts = list(rows[0]["parts_ms"])
    setups = list(dict.fromkeys(r["setup"] for r in rows))
    fig, axes = figure(record, "Where a served embeddings request's time goes (mean ms per request)",
                       1.3 + len(workloads) * (0.5 + 0.26 * len(setups)), nrows=len(workloads), squeeze=False)
    for ax, (texts, clients) in zip(axes[:, 0], workloads, strict=True):
        here = {r["setup"]: r for r in rows if (r["texts"], r["clients"]) == (texts, clients)}
        names = [s for s in setups if s in here]
        left = [0.0] * len(names)
        for i, part in enumerate(parts):
            # clock skew between the client and the worker can make a part a hair below 0: drawn as 0
            widths = [max(0.0, here[s]["parts_ms"][part]) for s in names]
            ax.barh(range(len(names)), widths, 0.7, left=left, color=f"C{i}", label=part)
            left = [a + b for a, b in zip(left, widths, strict=True)]
        for y, s in enumerate(names):
            ax.text(left[y], y, f" {here[s]['mean_latency_ms']:.1f} ms", va="center", fontsize=8)
        ax.set_yticks(range(len(names)), [s.removeprefix("tpserve ") for s in names])
        ax.invert_yaxis()
        ax.margins(x=0.15)  # room for the total
        ax.set_title(f"{texts} texts, {clients} client{'s' * (clients > 1)}", loc="left")
        ax.set_xlabel("mean time per request (ms)")
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="outside lower center", ncols=4, fontsize=8)
    return fig


CHARTS = [("embeddings-throughput.png", "serving", embeddings_throughput), ("rerank.png", "rerank", rerank),
          ("generation-latency.png", "generation", generation_latency), ("streams.png", "generation", streams),
          ("served-breakdown.png", "serving_breakdown", served_breakdown)]


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(prog="python -m bench.plots", description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "results",
                        help="the folder of the benchmarks' JSON (default: bench/results)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent.parent / "docs" / "images",
                        help="where the PNGs go (default: docs/images)")
    args = parser.parse_args(argv)
    written = []
    for png, name, draw in CHARTS:
        source = args.results / f"{name}.json"
        if not source.exists():
            print(f"{png}: skipped, no {source}", file=sys.stderr)
            continue
        fig = draw(json.loads(source.read_text()))
        if fig is None:
            print(f"{png}: skipped, nothing to draw in {source}", file=sys.stderr)
            continue
        args.out.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.out / png, dpi=DPI, metadata={"Software": None})  # no version: the same bytes each time
        plt.close(fig)
        written.append(args.out / png)
        print(f"wrote {args.out / png}")
    return written


if __name__ == "__main__":
    main()
