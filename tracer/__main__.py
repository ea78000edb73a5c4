"""Offline tracer: trace a checkpoint into tensor-parallel shards, package them as a TorchServe .mar.

Every misuse is found before any work starts and reported as one `error:` line (exit 2); a failure
of the work itself is one `error:` line too (exit 1). TPSERVE_DEBUG=1 shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# Only light imports here: `--help` and usage errors must not wait for torch.
from .errors import TpServeError, UsageError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one clear line and argparse's exit code 2, not a usage dump
        print(f"error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(2)


class _Help(argparse.RawDescriptionHelpFormatter):
    def _get_help_string(self, action) -> str:  # show defaults, but not "None"/"False" of optional flags
        if action.default in (None, False, argparse.SUPPRESS) or action.required or "default" in action.help:
            return action.help
        return f"{action.help} (default: {action.default})"


def _buckets(text: str) -> list[int]:
    try:
        return [int(b) for b in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _add_trace_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="a Hugging Face checkpoint dir, a .gguf file, or 'minilm' / 'smollm2' (embedded); the "
                        "family and task come from its config.json and sentence-transformers files (`python -m "
                        "tracer models` lists them) (default: minilm)")
    p.add_argument("--tp-degree", type=int, required=True, help="tensor-parallel degree")
    p.add_argument("--buckets", type=_buckets, default=None,
                   help="sequence buckets (embeddings) or prompt-length buckets (generation), e.g. 16,32,64,128 "
                        "(default: 16, 32, 48, 64, 96, ... up to max_seq_length; for generation 16, 24, ... 64, "
                        "80, 96, 112, 128, 160, ... up to --max-context)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="batch size each bucket is traced with: texts (or query-document pairs) per call for "
                        "packed encoders (default: 1 for embeddings, 8 for classification / rerank, 4 for "
                        "generation)")
    p.add_argument("--layout", choices=["packed", "padded"], default=None,
                   help="encoders: packed (a batch's texts end to end, no padding computed; buckets are tokens "
                        "per call) or padded (rows padded to a bucket length). Default: packed for "
                        "sentence-transformers models and classifiers, padded for a plain encoder")
    p.add_argument("--max-context", type=int, default=None,
                   help="generation: prompt + generated tokens per sequence (default: 1024, or the model's limit)")
    p.add_argument("--max-parallel-compilations", type=int, default=None,
                   help="ranks traced at once (default: all)")
    p.add_argument("--weights", choices=["fp32", "bf16", "int8", "int4", "auto"], default=None,
                   help="generation: weight-only quantized linear layers and LM head, in groups of 32 weights "
                        "with a float16 scale and minimum each: int8 (9/32 of fp32's bytes; holds GGUF Q8_0 / "
                        "Q4_x blocks exactly), int4 (5/32: llama.cpp's Q4_1; the LM head int8), auto (a GGUF "
                        "file's own precision per tensor: Q4_x / Q4_K as int4, Q5_x / Q6_K / Q8_0 as int8, floats "
                        "fp32). Embeddings: bf16 (bfloat16 GEMMs: faster batches where the CPU has AMX / AVX-512 "
                        "BF16) or int8 (faster single short texts); their cosine to fp32 in docs/serving.md "
                        "(default: auto for a .gguf file, else fp32)")


def _add_archive_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-name", required=True, help="name of the model in TorchServe")
    p.add_argument("--export-path", type=Path, default=Path("model_store"), help="where the .mar goes")
    p.add_argument("--archive-format", choices=["default", "no-archive"], default="default",
                   help="default: NAME.mar; no-archive: a folder (large models)")
    p.add_argument("--max-batch-delay", type=int, default=1,
                   help="TorchServe maxBatchDelay in ms (>= 1: TorchServe reads 0 as 100)")
    p.add_argument("--serve-batch-size", type=int, default=None,
                   help="embeddings: TorchServe batchSize (default: the traced --batch-size); a generation "
                        "model's batch is its traced --batch-size")
    p.add_argument("--workers", type=int, default=1, help="TorchServe workers (minWorkers = maxWorkers)")
    p.add_argument("--threads-per-rank", type=int, default=None,
                   help="intra-op threads of each rank (default: the cores shared out, cores // (workers x tp))")
    p.add_argument("--response-timeout", type=int, default=None,
                   help="TorchServe responseTimeout in s (default: 120 embeddings, 300 generation)")
    p.add_argument("--startup-timeout", type=int, default=600, help="TorchServe startupTimeout in s")
    p.add_argument("--too-long", choices=["truncate", "reject"], default="truncate",
                   help="embeddings: a text over max_seq_length is truncated (as sentence-transformers) or 413")
    p.add_argument("--max-inputs-per-request", type=int, default=64,
                   help="encoders: texts in one request (embed, classify); more is 413")
    p.add_argument("--max-documents-per-request", type=int, default=1000,
                   help="rerankers: documents in one rerank request; more is 413")
    p.add_argument("--max-new-tokens", type=int, default=256,
                   help="generation: tokens generated when a request does not say")
    p.add_argument("--continuous-batching", action="store_true",
                   help="generation: requests join and leave the running batch at every token, and a client "
                        "that goes away stops its generation (costs a TorchServe round trip per token; gRPC "
                        "streams then arrive in one message)")
    p.add_argument("--async-worker", action="store_true",
                   help="generation: the worker runs continuous batching itself (TorchServe's async mode): "
                        "tokens stream out without a TorchServe round trip per token")
    p.add_argument("--prefill-chunk", type=int, default=256,
                   help="generation with --continuous-batching: prompt tokens prefilled per step, so a long "
                        "prompt does not stall the running streams (0: whole prompts)")
    p.add_argument("--no-prefix-caching", action="store_true",
                   help="generation: prefill every prompt whole instead of reusing a cache row's prefix")
    p.add_argument("--no-prompt-lookup", action="store_true",
                   help="generation: greedy requests do not draft tokens from their context unless they ask "
                        "(\"prompt_lookup\": true)")
    p.add_argument("--torchrun", action="store_true",
                   help="TorchServe torchrun mode: one process per rank (parallelType tp) instead of rank threads")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m tracer", description=__doc__, formatter_class=_Help)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{trace,archive,build,models}",
                                     parser_class=_Parser)
    trace = commands.add_parser("trace", help="trace a checkpoint into tensor-parallel shards", formatter_class=_Help)
    _add_trace_args(trace)
    trace.add_argument("--output", type=Path, required=True, help="shards directory to write")
    archive = commands.add_parser("archive", help="package shards as a TorchServe .mar", formatter_class=_Help)
    archive.add_argument("--shards", type=Path, required=True, help="directory written by `trace`")
    _add_archive_args(archive)
    build = commands.add_parser("build", help="trace, then archive", formatter_class=_Help)
    _add_trace_args(build)
    build.add_argument("--output", type=Path, default=None, help="shards directory (default: EXPORT_PATH/NAME.shards)")
    _add_archive_args(build)
    commands.add_parser("models", help="list the model families and tasks --model takes", formatter_class=_Help)
    return parser


def models_table() -> str:
    """The families --model takes, by config.json's model_type, and what each is built for."""
    from .models import registry

    rows = [("model_type", *registry.TASKS)]
    for model_type in sorted({*registry.ENCODERS, *registry.DECODER_EMBEDDERS, *registry.GENERATORS}):
        tasks = registry.tasks(model_type)
        rows.append((model_type, *("yes" if t in tasks else "-" for t in registry.TASKS)))
    width = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, width, strict=True)).rstrip() for r in rows]
    return "\n".join(lines + ["", "embedding: a sentence-transformers folder (every Pooling mode, Dense, Normalize, "
                              "prompts) or a plain encoder (per-token hidden states); a decoder (llama, mistral, "
                              "qwen2, qwen3) with a sentence-transformers folder embeds with last-token pooling.",
                              "classification: *ForSequenceClassification checkpoints: rerankers (cross-encoders) "
                              "and classifiers.", "generation: *ForCausalLM checkpoints and GGUF files."])


def _check(args) -> None:
    """Every usage check of the command, before any work (UsageError)."""
    from .builder.archive import check_archive_args, check_shards
    from .builder.encoder_checkpoint import check_checkpoint, check_output_dir
    from .builder.model_source import model_kind, read_config, resolve_model

    if args.command in ("trace", "build"):
        if args.max_parallel_compilations is not None and args.max_parallel_compilations < 1:
            raise UsageError(f"--max-parallel-compilations must be >= 1, got {args.max_parallel_compilations}")
        gguf = args.model is not None and str(args.model).endswith(".gguf") or str(args.model) == "smollm2"
        args.weights = args.weights or ("auto" if gguf else "fp32")
        args.model = resolve_model(args.model)
        args.config = read_config(args.model)  # the family first
        args.kind = model_kind(args.config, args.model)
        args.output = args.output or args.export_path / f"{args.model_name}.shards"
        if args.kind in ("embedding", "classification"):
            if args.max_context is not None:
                raise UsageError("--max-context is for generation models; embeddings read up to max_seq_length")
            # packed texts per call: a dynamic batch's texts (or a rerank request's pairs) in one call
            if args.batch_size is None:
                args.batch_size = 8 if args.kind == "classification" else 1
            _, args.buckets, _, args.layout = check_checkpoint(args.model, args.tp_degree, args.buckets,
                                                               args.batch_size, args.max_parallel_compilations,
                                                               args.layout, args.weights)
        else:
            if args.layout is not None:
                raise UsageError("--layout is for embedding and classification models")
            from .builder.decoder_checkpoint import check_decoder

            check_decoder(args.model, args.config, args.tp_degree, args.buckets, args.batch_size, args.max_context,
                          args.weights)
    else:
        check_shards(args.shards)
    if args.command in ("archive", "build"):
        kind = args.kind if args.command == "build" else check_shards(args.shards).model.get("kind")
        check_archive_args(args.model_name, args.export_path, args.archive_format, _settings(args), kind)
    if args.command in ("trace", "build"):
        check_output_dir(args.output)


def _settings(args):
    from .builder.archive import ServeSettings

    return ServeSettings(max_batch_delay_ms=args.max_batch_delay, batch_size=args.serve_batch_size,
                         workers=args.workers, threads_per_rank=args.threads_per_rank,
                         response_timeout_s=args.response_timeout,
                         startup_timeout_s=args.startup_timeout, too_long=args.too_long,
                         max_inputs_per_request=args.max_inputs_per_request,
                         max_documents_per_request=args.max_documents_per_request, max_new_tokens=args.max_new_tokens,
                         continuous_batching=args.continuous_batching, async_worker=args.async_worker,
                         prefill_chunk=args.prefill_chunk,
                         prefix_caching=not args.no_prefix_caching, prompt_lookup=not args.no_prompt_lookup)


def _run(args) -> None:
    shards = args.shards if args.command == "archive" else None
    if args.command in ("trace", "build"):
        started = time.time()
        if args.kind in ("embedding", "classification"):
            from .builder.encoder_checkpoint import trace_checkpoint

            trace_checkpoint(args.model, args.tp_degree, args.buckets, args.output, args.batch_size,
                             args.max_parallel_compilations, layout=args.layout, weights=args.weights)
            what = f"layout={args.layout} buckets={args.buckets} weights={args.weights}"
        else:
            from .builder.decoder_checkpoint import trace_decoder

            info = trace_decoder(args.model, args.config, args.tp_degree, args.output, args.buckets, args.batch_size,
                                 args.max_context, args.max_parallel_compilations, args.weights).model
            what = (f"prompt buckets={info['prefill_buckets']} context buckets={info['context_buckets']} "
                    f"batch={info['decoder']['max_batch']} weights={info['decoder']['weights']}")
        print(f"traced {args.model} tp={args.tp_degree} {what} into {args.output} in {time.time() - started:.1f}s")
        shards = args.output
    if args.command in ("archive", "build"):
        from .builder.archive import build_archive

        target = build_archive(shards, args.model_name, args.export_path, args.archive_format, _settings(args),
                               args.torchrun)
        print(f"wrote {target}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "models":
        print(models_table())
        return 0
    try:
        _check(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        _run(args)
    except UsageError as exc:  # found only once the work began (e.g. inside a converted GGUF)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (TpServeError, OSError, RuntimeError, ValueError) as exc:
        if os.environ.get("TPSERVE_DEBUG"):
            raise
        print(f"error: {type(exc).__name__}: {exc}" if not isinstance(exc, TpServeError) else f"error: {exc}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
