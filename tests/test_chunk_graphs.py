"""The graphs that start past position 0 and attend the cached positions before them, and what they
enable: prefix caching (tracer/engine/prefix_cache.py: a prompt that begins with tokens a free cache row
still holds prefills only the rest), long prompts in chunks (also between the steps of a running batch),
and prompt-lookup decoding (drafts verified in one call). Every answer equals Hugging Face's greedy
one on the whole prompt. Small random Llama; the served paths are in test_generation_serving.py."""

import json

import pytest
import torch

from tracer.builder.decoder_checkpoint import trace_decoder
from tracer.engine.generator import Generator, SamplingParams
from tracer.engine.prefix_cache import PrefixCache
from tracer.engine.running_batch import RunningBatch


@pytest.fixture(scope="module")
def random_llama(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, eos_token_id=None,
        bos_token_id=None, pad_token_id=None)).eval()
    directory = tmp_path_factory.mktemp("llama")
    model.save_pretrained(directory)
    return directory, model


def _hf_greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module", params=[1, 2])
def generator(random_llama, tmp_path_factory, request):
    directory, _ = random_llama
    out = tmp_path_factory.mktemp(f"tp{request.param}")
    # chunk graphs of 16 and 32 tokens (context 160), a 96-token prompt graph that attends its own length
    trace_decoder(directory, json.loads((directory / "config.json").read_text()), request.param, out,
                  prefill=[16, 32, 96], max_context=160, batch_size=2)
    g = Generator(out)
    yield g
    g.close()


def test_chunk_graphs_are_recorded_and_attend_the_whole_row(generator):
    info = generator.model.manifest.model
    assert info["prefill_contexts"] == [160, 160, 160] and generator.chunk_lengths == [16, 32, 96]
    assert info["verify_tokens"] == [8] and generator.verify_tokens == 8


def _turns(generator, hf, prompts, new_tokens=12):
    """Each prompt = the previous prompt, its answer and a few more tokens, as a chat's turns."""
    results = []
    for prompt in prompts:
        completion = generator.generate([prompt], SamplingParams(max_new_tokens=new_tokens))[0]
        assert completion.token_ids == _hf_greedy(hf, prompt, new_tokens)
        results.append(completion)
    return results


def test_a_chats_next_turn_prefills_only_what_is_new_and_answers_as_hugging_face(generator, random_llama):
    _, hf = random_llama
    generator.prefix.clear()
    first = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26, 43, 38, 32, 79, 50, 28, 84, 19]
    a = generator.generate([first], SamplingParams(max_new_tokens=12))[0]
    assert a.cached_tokens == 0 and a.token_ids == _hf_greedy(hf, first, 12)
    second = first + a.token_ids + [7, 1, 8, 2, 8, 1, 8, 2, 8]  # 41 tokens, 31 of them held: one chunk of 10
    b = generator.generate([second], SamplingParams(max_new_tokens=12))[0]
    assert b.cached_tokens == len(first) + 11  # the last answer token was never fed back
    assert b.token_ids == _hf_greedy(hf, second, 12)
    third = second + b.token_ids + list(range(100, 150))  # 50 new + 1: chunks of 32 and 19
    c = generator.generate([third], SamplingParams(max_new_tokens=12))[0]
    assert c.cached_tokens == len(second) + 11 and c.token_ids == _hf_greedy(hf, third, 12)
    same = generator.generate([third], SamplingParams(max_new_tokens=12))[0]  # asked again: 1 token prefilled
    assert same.cached_tokens == len(third) - 1 and same.token_ids == c.token_ids


def test_without_prefix_caching_the_tokens_are_the_same(generator):
    generator.prefix.clear()
    prompts = [[9, 8, 7, 6, 5, 4, 3, 2, 1] * 3, [9, 8, 7, 6, 5, 4, 3, 2, 1] * 3 + [11, 12, 13]]
    cached = [generator.generate([p], SamplingParams(max_new_tokens=8))[0] for p in prompts]
    assert cached[1].cached_tokens == 27
    generator.prefix.enabled = False
    try:
        generator.prefix.clear()
        plain = [generator.generate([p], SamplingParams(max_new_tokens=8))[0] for p in prompts]
    finally:
        generator.prefix.enabled = True
    assert [c.cached_tokens for c in plain] == [0, 0]
    assert [c.token_ids for c in cached] == [c.token_ids for c in plain]


def test_a_long_prompt_after_a_cached_prefix_goes_in_chunks(generator, random_llama):
    """130 new tokens after a 10-token prefix: chunks of 96, 32, then one token through a step."""
    _, hf = random_llama
    generator.prefix.clear()
    head = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    generator.generate([head], SamplingParams(max_new_tokens=1))
    prompt = head[:10] + [(i * 7) % 250 for i in range(129)]
    completion = generator.generate([prompt], SamplingParams(max_new_tokens=10))[0]
    assert completion.cached_tokens == 10
    assert completion.token_ids == _hf_greedy(hf, prompt, 10)


def test_a_running_batch_reuses_rows_and_counts_the_tokens(generator, random_llama):
    _, hf = random_llama
    generator.prefix.clear()
    before = (generator.prefix.prompt_tokens, generator.prefix.cached_tokens)
    batch = RunningBatch(generator)
    prompt = [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57]
    batch.join("a", prompt, SamplingParams(max_new_tokens=6))
    while batch.rows["a"].finish is None:
        batch.step(["a"])
    answer = batch.completion("a").token_ids
    batch.leave("a")
    follow = prompt + answer + [60, 61]
    row = batch.join("b", follow, SamplingParams(max_new_tokens=6))
    assert row.start == len(prompt) + 5
    while row.finish is None:
        batch.step(["b"])
    assert batch.completion("b").token_ids == _hf_greedy(hf, follow, 6)
    batch.leave("b")
    assert generator.prefix.prompt_tokens - before[0] == len(prompt) + len(follow)
    assert generator.prefix.cached_tokens - before[1] == len(prompt) + 5


def test_rows_are_chosen_by_conversation_then_least_recently_used():
    cache = PrefixCache(3)
    rows = [cache.acquire([i] * 10)[0] for i in range(3)]
    for row, i in zip(rows, range(3), strict=True):
        cache.release(row, [i] * 10)  # rows hold 0..., 1..., 2... (0 the least recently used)
    row, reused = cache.acquire([1] * 10 + [5])  # row 1's conversation goes on
    assert (row, reused) == (rows[1], 10)
    cache.release(row, [1] * 12)
    row, reused = cache.acquire([0, 0, 0, 9])  # shares 3 of row 0's 10 tokens: not its conversation
    assert row == rows[0] and reused == 3  # but row 0 is the least recently used anyway: its 3 are reused
    cache.release(row, [0, 0, 0, 9])
    row, reused = cache.acquire([2, 2, 7])  # shares 2 of 10 with row 2 (least recently used now): LRU row 2
    assert row == rows[2] and reused == 2
    row, reused = cache.acquire([1, 1])  # 2 of row 1's 12: not its conversation; row 1 is the older free one
    assert row == rows[1] and reused == 1  # a prompt's last token is always prefilled
    assert cache.acquire([4])[0] == rows[0]
    with pytest.raises(LookupError):
        cache.acquire([1])
    assert (cache.prompt_tokens, cache.cached_tokens) == (30 + 11 + 4 + 3 + 2 + 1, 10 + 3 + 2 + 1)


def test_a_long_prompt_joins_in_pieces_while_the_running_rows_go_on(generator, random_llama):
    """RunningBatch(chunk=16): a 90-token prompt joining a running request is prefilled 16 tokens a step;
    the running request gets a token at every one of those steps, and both answer as Hugging Face."""
    _, hf = random_llama
    generator.prefix.clear()
    batch = RunningBatch(generator, chunk=16)
    short, long = [5, 6, 7, 8, 9, 10], [(i * 11) % 251 for i in range(90)]
    batch.join("a", short, SamplingParams(max_new_tokens=20))
    batch.step(["a"])
    batch.join("b", long, SamplingParams(max_new_tokens=6))  # its first piece now, then one per step
    pieces = 1
    while batch.prefilling("b"):
        before = len(batch.rows["a"].generated)
        batch.step(["a", "b"])
        assert len(batch.rows["a"].generated) == before + 1  # not stalled by b's prefill
        pieces += 1
    assert pieces == 6 and len(batch.rows["b"].generated) == 1  # 90 tokens: 16 x 5 + 10, first token with the last
    while any(row.finish is None for row in batch.rows.values()):
        batch.step(list(batch.rows))
    assert batch.completion("a").token_ids == _hf_greedy(hf, short, 20)
    assert batch.completion("b").token_ids == _hf_greedy(hf, long, 6)
    batch.leave("a")
    batch.leave("b")


def test_prompt_lookup_verifies_drafts_and_answers_as_plain_decoding(generator, random_llama):
    """Asked to go on with a text that repeats itself, a greedy row drafts the tokens that followed its last
    3 tokens earlier and verifies them in one call: the answer is Hugging Face's greedy one, token for
    token, with fewer model calls; sampled rows never draft."""
    _, hf = random_llama
    generator.prefix.clear()
    passage = [(i * 37) % 200 + 20 for i in range(24)]
    prompt = passage + [9, 9] + passage[:6]  # the passage again: what follows its start is known
    stats = dict(generator.lookup_stats)
    looked = generator.generate([prompt], SamplingParams(max_new_tokens=40, prompt_lookup=True))[0]
    assert looked.token_ids == _hf_greedy(hf, prompt, 40)
    calls = generator.lookup_stats["calls"] - stats["calls"]
    accepted = generator.lookup_stats["accepted"] - stats["accepted"]
    assert calls > 0 and accepted > 0
    plain = generator.generate([prompt], SamplingParams(max_new_tokens=40, prompt_lookup=False))[0]
    assert plain.token_ids == looked.token_ids
    batch = RunningBatch(generator)  # and in a running batch, next to a sampled row (which never drafts)
    batch.join("a", prompt, SamplingParams(max_new_tokens=40, prompt_lookup=True))
    batch.join("b", prompt, SamplingParams(max_new_tokens=10, temperature=0.8, seed=1, prompt_lookup=True))
    before = generator.lookup_stats["calls"]
    while any(row.finish is None for row in batch.rows.values()):
        batch.step(list(batch.rows))
    assert batch.completion("a").token_ids == looked.token_ids and generator.lookup_stats["calls"] > before
    sampled = batch.completion("b").token_ids
    batch.leave("a")
    batch.leave("b")
    assert sampled == generator.generate([prompt], SamplingParams(max_new_tokens=10, temperature=0.8,
                                                                  seed=1))[0].token_ids
