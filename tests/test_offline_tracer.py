"""The offline tracer CLI: MiniLM shards equal SentenceTransformer.encode(), .mar layout, misuse."""

import json
import subprocess
import sys
import time
import zipfile

import pytest
import torch
import yaml
from conftest import MINILM_DIR

import tracer
from tracer.builder.encoder_checkpoint import check_weights, trace_checkpoint
from tracer.engine.embedder import load_tokenizer
from tracer.errors import UsageError

BUCKETS = [16, 32, 64, 128]
WORDS = "the quick brown fox jumps over a lazy dog while tensor parallel ranks share the work".split()
# token counts land in every bucket: 16, 32, 64 and 128
SENTENCES = [" ".join(WORDS[: n % len(WORDS) + 1] + WORDS * (n // len(WORDS))) for n in (3, 12, 25, 50, 90, 120)]


def _cli(*args, check=True):
    result = subprocess.run([sys.executable, "-m", "tracer", *args], capture_output=True, text=True)
    if check:
        assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    result = _cli("build", "--tp-degree", "2", "--buckets", ",".join(map(str, BUCKETS)), "--batch-size", "2",
                  "--model-name", "minilm", "--export-path", str(store))
    assert result.stderr.count("[tpserve] rank") == 2 * len(BUCKETS)  # one progress line per rank x bucket
    assert "traced" in result.stdout and "wrote" in result.stdout
    return store


@pytest.fixture(scope="module")
def reference():
    from sentence_transformers import SentenceTransformer

    return torch.tensor(SentenceTransformer(str(MINILM_DIR), device="cpu").encode(SENTENCES))


def _inputs(ids: list[int], packed: bool) -> list[torch.Tensor]:
    """One text as a packed call (input_ids, positions, token types, pooling mask, lengths) or a padded
    row (input_ids, mask, token types, pooling mask)."""
    ids = torch.tensor(ids)
    if packed:
        return [ids, torch.arange(len(ids)), torch.zeros_like(ids), torch.ones_like(ids), torch.tensor([len(ids)])]
    return [ids[None], torch.ones_like(ids[None]), torch.zeros_like(ids[None]), torch.ones_like(ids[None])]


def _embed(model, shards_dir):
    tokenizer = load_tokenizer(shards_dir)
    packed = model.manifest.model["layout"] == "packed"
    out, buckets = [], []
    for text in SENTENCES:
        inputs = _inputs(tokenizer.encode(text).ids, packed)
        buckets.append(model.select_bucket(inputs)[1])
        out.append(model(*inputs)[0])
    return torch.stack(out), buckets


def _assert_matches(got, expected):
    cosine = torch.nn.functional.cosine_similarity(got, expected, dim=1)
    assert cosine.min() >= 0.99999
    assert (got - expected).abs().max() <= 1e-4


def test_tp2_build_equals_sentence_transformers(built, reference):
    shards = built / "minilm.shards"
    with tracer.parallel_model_load(shards) as model:
        assert model.manifest.model["layout"] == "packed"  # a sentence-transformers model's default
        got, buckets = _embed(model, shards)
    assert sorted(set(buckets)) == [0, 1, 2, 3]  # every bucket exercised
    _assert_matches(got, reference)


@pytest.mark.parametrize("tp, layout", [(1, "packed"), (4, "padded")])
def test_other_tp_degrees_and_layouts_equal_sentence_transformers(tp, layout, tmp_path, reference):
    trace_checkpoint(MINILM_DIR, tp, BUCKETS, tmp_path, batch_size=2, layout=layout)
    with tracer.parallel_model_load(tmp_path) as model:
        got, _ = _embed(model, tmp_path)
        _assert_matches(got, reference)
        if layout == "padded":  # padding within a batch never changes a result
            encoded = [load_tokenizer(tmp_path).encode(t).ids for t in SENTENCES[:2]]
            ids = torch.zeros(2, 32, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, e in enumerate(encoded):
                ids[row, : len(e)], mask[row, : len(e)] = torch.tensor(e), 1
            _assert_matches(model(ids, mask, torch.zeros_like(ids), mask), reference[:2])


@pytest.mark.parametrize("weights, cosine_floor", [("bf16", 0.9999), ("int8", 0.999)])
def test_bf16_and_int8_builds_stay_close_to_sentence_transformers(weights, cosine_floor, tmp_path, reference):
    """--weights bf16: the encoder's linear layers hold bfloat16 weights and run bfloat16 GEMMs (cosine
    measured 0.99995 at the lowest of 96 texts); int8 (models/encoder.py's quantize): int8 weights in
    groups of 32, inputs rounded to 16 or 8 bits (0.9995). Both really changed: further from
    sentence-transformers than fp32's 1e-4, every linear layer of the mode."""
    trace_checkpoint(MINILM_DIR, 2, BUCKETS, tmp_path, batch_size=2, weights=weights)  # tp 2: shards of each
    with tracer.parallel_model_load(tmp_path) as model:
        assert model.manifest.model["weights"] == weights
        got, _ = _embed(model, tmp_path)
        layer = getattr(model.rank_modules(0)[0].encoder.layers, "0")
        for linear in (layer.attn.qkv, layer.attn.o, layer.mlp.up, layer.mlp.down):
            held = linear.weight.dtype if weights == "bf16" else linear.qweight.dtype
            assert held == (torch.bfloat16 if weights == "bf16" else torch.uint8)
    cosine = torch.nn.functional.cosine_similarity(got, reference, dim=1)
    assert cosine.min() >= cosine_floor and (got - reference).abs().max() > 1e-4, cosine


def test_int8_groups_must_lie_inside_each_rank():
    with pytest.raises(UsageError, match="hidden_size=48 / tp 1 is not a multiple of 32"):
        check_weights({"hidden_size": 48, "intermediate_size": 64}, 1, "int8")


def test_packing_texts_together_never_changes_a_result(built, reference):
    """Two texts end to end in one call, padded to its token bucket: each as if it ran alone; a call
    with fewer texts than the graph takes, or the wrong inputs, is answered or refused clearly."""
    shards = built / "minilm.shards"
    tokenizer = load_tokenizer(shards)
    with tracer.parallel_model_load(shards) as model:
        for pair in ((0, 1), (1, 3), (2, 0)):
            encoded = [tokenizer.encode(SENTENCES[i]).ids for i in pair]
            ids = torch.tensor(encoded[0] + encoded[1])
            positions = torch.cat([torch.arange(len(encoded[0])), torch.arange(len(encoded[1]))])
            types, pool = torch.zeros_like(ids), torch.ones_like(ids)
            _assert_matches(model(ids, positions, types, pool, torch.tensor([len(e) for e in encoded])),
                            reference[list(pair)])
        with pytest.raises(ValueError, match="3 texts exceed the 2 one call takes"):
            model(ids, positions, types, pool, torch.tensor([1, 1, 1]))
        with pytest.raises(ValueError, match="expected int64 with 1 dims"):
            model(ids[None], positions[None], types[None], pool[None], torch.tensor([1]))
        with pytest.raises(ValueError, match="expected 5 inputs"):
            model(ids[None], torch.ones_like(ids[None]))


def test_mar_layout(built):
    with zipfile.ZipFile(built / "minilm.mar") as mar:
        names = set(mar.namelist())
        config = mar.read("model-config.yaml").decode()
        manifest = json.loads(mar.read("manifest.json"))
    for rank in range(2):
        assert {f"tp_{rank}/weights.safetensors"} | {f"tp_{rank}/bucket_{b}.pt" for b in range(4)} <= names
    assert {"manifest.json", "bucket_kernel.pt", "tokenizer/tokenizer.json", "tokenizer/vocab.txt",
            "model-config.yaml", "encoder_handler.py", "MAR-INF/MANIFEST.json"} <= names
    assert "batchSize: 2" in config and "tp_degree: 2" in config and "startupTimeout" in config
    assert "buckets" not in config  # stored once, in the manifest's bucket signatures
    info = manifest["model"]
    assert info["output"] == "sentence_embedding" and info["kind"] == "embedding" and info["family"] == "bert"
    assert info["sentence_transformers"] == {"pooling": ["mean"], "include_prompt": True, "dense": [],
                                             "normalize": True, "prompts": {}, "default_prompt_name": None,
                                             "do_lower_case": False, "max_seq_length": 256}
    assert info["dimension"] == 384 and info["max_seq_length"] == 256
    assert info["layout"] == "packed" and info["texts_per_call"] == 2
    # one manifest covers every file served: graphs, weights, bucket kernel and tokenizer
    served = {n for n in names if not n.startswith("MAR-INF/") and n not in (
        "manifest.json", "model-config.yaml", "encoder_handler.py") and not n.endswith("/")}
    assert served - {f"tp_{r}/{f}" for r in range(2) for f in ("trace.log", "trace_timing.json")} == set(
        manifest["files"])


def test_no_archive_format(built, tmp_path):
    _cli("archive", "--shards", str(built / "minilm.shards"), "--model-name", "folder", "--export-path",
         str(tmp_path), "--archive-format", "no-archive")
    assert (tmp_path / "folder" / "tp_1" / "weights.safetensors").is_file()


@pytest.fixture
def gpt2_dir(tmp_path):
    """Only a gpt2 config.json: the architecture is refused before missing files are noticed."""
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    return tmp_path / "gpt2"


@pytest.fixture
def broken_dir(tmp_path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text('{"model_type": "bert",')
    return tmp_path / "broken"


@pytest.mark.parametrize("args, message", [
    (["trace", "--tp-degree", "5", "--output", "OUT"], "does not divide the MLP's intermediate size 1536"),
    (["trace", "--tp-degree", "2", "--buckets", "32,16", "--output", "OUT"], "strictly ascending"),
    (["trace", "--tp-degree", "2", "--buckets", "0,16", "--output", "OUT"], "positive"),
    (["trace", "--tp-degree", "2", "--buckets", "128,1024", "--layout", "padded", "--output", "OUT"],
     "exceeds the model's 512 positions"),
    (["trace", "--tp-degree", "2", "--buckets", "128,1024", "--batch-size", "2", "--output", "OUT"],
     "1024 tokens is more than one call holds (2 texts (--batch-size) of up to 256 tokens)"),
    (["trace", "--tp-degree", "2", "--layout", "packed", "--model", "smollm2", "--output", "OUT"],
     "--layout is for embedding and classification models"),
    (["trace", "--tp-degree", "2", "--buckets", "a,b", "--output", "OUT"], "comma-separated integers"),
    (["trace", "--tp-degree", "2", "--batch-size", "0", "--output", "OUT"], "--batch-size must be >= 1"),
    (["trace", "--tp-degree", "2", "--max-parallel-compilations", "0", "--output", "OUT"],
     "--max-parallel-compilations must be >= 1"),
    (["trace", "--tp-degree", "2"], "required: --output"),
    (["trace", "--tp-degree", "2", "--model", "NOWHERE", "--output", "OUT"], "no config.json"),
    (["trace", "--tp-degree", "2", "--model", "GPT2", "--output", "OUT"],
     "'gpt2' is not supported; supported: bert (embedding/classification)"),
    (["trace", "--tp-degree", "2", "--model", "BROKEN", "--output", "OUT"], "config.json: not valid JSON"),
    (["trace", "--tp-degree", "2", "--output", "FILE"], "exists and is not a directory"),
    (["trace", "--tp-degree", "2", "--output", "FILE/sub"], "is not a directory"),
    (["build", "--tp-degree", "2", "--model-name", "bad name", "--export-path", "OUT"], "--model-name may hold"),
    (["build", "--tp-degree", "2", "--model-name", "m", "--export-path", "FILE"], "--export-path"),
    (["archive", "--shards", "NOWHERE", "--model-name", "m"], "not a traced shards folder"),
    (["archive", "--shards", "NOWHERE", "--model-name", "m", "--archive-format", "tgz"], "invalid choice"),
    (["frobnicate"], "invalid choice"),
    (["trace", "--tp-degree", "1", "--max-context", "64", "--output", "OUT"], "--max-context is for generation"),
    (["trace", "--tp-degree", "1", "--weights", "int4", "--output", "OUT"],
     "embedding and classification models take fp32, bf16 or int8"),
    (["trace", "--tp-degree", "1", "--model", "GGUF", "--output", "OUT"], "not a readable GGUF file"),
    ([], "required: {trace,archive,build,models} (see `python -m tracer --help`)"),
])
def test_misuse_exits_2_with_one_clear_line_before_any_work(args, message, tmp_path, gpt2_dir, broken_dir, capsys):
    """The CLI's entry point in this process (a subprocess per case spent ~2 s importing torch; the
    real command line is the next test's)."""
    from tracer.__main__ import main

    (tmp_path / "file").write_text("not a directory")
    (tmp_path / "bad.gguf").write_bytes(b"GGUF but not really")
    names = {"OUT": tmp_path / "out", "GPT2": gpt2_dir, "BROKEN": broken_dir, "FILE": tmp_path / "file",
             "GGUF": tmp_path / "bad.gguf"}
    args = [str(names.get(a.split("/")[0], a)) + ("/sub" if a.endswith("/sub") else "") for a in args]
    started = time.monotonic()
    try:
        code = main(args)
    except SystemExit as exc:  # argparse's usage errors
        code = exc.code
    stderr = capsys.readouterr().err
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], stderr
    assert "[tpserve] rank" not in stderr and not (tmp_path / "out").exists()  # nothing traced or written
    assert time.monotonic() - started < 20  # checks only (a trace would take longer)


@pytest.mark.parametrize("args, message", [
    (["trace", "--tp-degree", "2", "--batch-size", "0", "--output", "OUT"], "--batch-size must be >= 1"),
    ([], "required: {trace,archive,build,models}"),
])
def test_misuse_on_the_command_line_is_one_line_and_exit_2(args, message, tmp_path):
    result = _cli(*[str(tmp_path / "out") if a == "OUT" else a for a in args], check=False)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("error: ") and message in result.stderr and not (tmp_path / "out").exists()


def test_a_failure_of_the_work_is_one_line_and_exit_1(tmp_path):
    (tmp_path / "ckpt").mkdir()
    for name in ("config.json", "tokenizer.json"):
        (tmp_path / "ckpt" / name).write_bytes((MINILM_DIR / name).read_bytes())
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"garbage, not a safetensors file")
    result = _cli("trace", "--tp-degree", "2", "--model", str(tmp_path / "ckpt"), "--output", str(tmp_path / "o"),
                  check=False)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if not line.startswith("[tpserve]")]
    assert len(errors) == 1 and "not a safetensors file" in errors[0], result.stderr


def test_help_is_fast_and_shows_defaults():
    started = time.monotonic()
    result = _cli("build", "--help")
    assert time.monotonic() - started < 1.5  # no torch import for --help
    text = " ".join(result.stdout.split())
    assert "(>= 1: TorchServe reads 0 as 100) (default: 1)" in text and "(default: model_store)" in text
    assert "default: 1 for embeddings, 8 for classification / rerank, 4 for generation" in text
    assert "up to max_seq_length" in text


def test_serving_settings_are_archive_flags(built, tmp_path):
    """TorchServe's and the handler's settings are set when archiving (no unzipping a .mar), checked first."""
    flags = ["--serve-batch-size", "16", "--max-batch-delay", "7", "--workers", "2", "--response-timeout", "30",
             "--too-long", "reject", "--max-inputs-per-request", "8", "--threads-per-rank", "1"]
    result = subprocess.run([sys.executable, "-m", "tracer", "archive", "--shards", str(built / "minilm.shards"),
                             "--model-name", "m2", "--export-path", str(tmp_path), *flags], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    with zipfile.ZipFile(tmp_path / "m2.mar") as mar:
        config = yaml.safe_load(mar.read("model-config.yaml"))
    assert (config["batchSize"], config["maxBatchDelay"], config["minWorkers"], config["maxWorkers"],
            config["responseTimeout"]) == (16, 7, 2, 2, 30)
    assert config["handler"]["too_long"] == "reject" and config["handler"]["max_inputs_per_request"] == 8
    assert config["handler"]["threads_per_rank"] == 1
    bad = subprocess.run([sys.executable, "-m", "tracer", "archive", "--shards", str(built / "minilm.shards"),
                          "--model-name", "m3", "--export-path", str(tmp_path), "--too-long", "drop"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--too-long" in bad.stderr
    bad = subprocess.run([sys.executable, "-m", "tracer", "archive", "--shards", str(built / "minilm.shards"),
                          "--model-name", "m4", "--export-path", str(tmp_path), "--continuous-batching"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr == "error: --continuous-batching is for generation models\n"
    bad = subprocess.run([sys.executable, "-m", "tracer", "archive", "--shards", str(built / "minilm.shards"),
                          "--model-name", "m5", "--export-path", str(tmp_path), "--async-worker"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr == "error: --async-worker is for generation models\n"
