"""Generation families over the one decoder (models/decoder.py): Qwen3 (QK-norm, head_dim of its own),
Mistral (a window shorter than the prompt), Gemma 3 (sliding and global layers with their own rotary
bases, four norms, GeGLU, one KV head; tp 3 pads its heads), Phi-3 (fused projections, partial rotary,
longrope switching past original_max_position_embeddings). Tiny random weights; greedy tokens equal
Hugging Face generate(do_sample=False) at tp 1 and 2."""

import json

import pytest
import torch

from tracer.builder.decoder_checkpoint import trace_decoder
from tracer.engine.generator import Generator, SamplingParams

PROMPTS = [[5, 17, 33, 2, 9, 40, 41, 7, 7, 100, 3, 12, 60], [42, 8]]  # 13 tokens: past every window here
NEW_TOKENS = 40  # Phi-3's sequences cross its original_max_position_embeddings (24) on the way


def _configs():
    import transformers as t

    common = dict(vocab_size=264, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                  max_position_embeddings=1024, eos_token_id=None, bos_token_id=None, pad_token_id=None)
    rotary = 8  # Phi-3: half of each 16-value head turns
    return {
        "qwen3": t.Qwen3Config(**common, num_hidden_layers=2, num_key_value_heads=2, head_dim=24,
                               tie_word_embeddings=False),
        "mistral": t.MistralConfig(**common, num_hidden_layers=2, num_key_value_heads=2, head_dim=16, sliding_window=6,
                                   tie_word_embeddings=False),
        "gemma3": t.Gemma3TextConfig(**common, num_hidden_layers=3, num_key_value_heads=1, head_dim=16,
                                     sliding_window=8, query_pre_attn_scalar=12,
                                     layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                     rope_parameters={
                                         "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                                         "full_attention": {"rope_type": "default", "rope_theta": 10000.0}},
                                     tie_word_embeddings=True),
        # original_max_position_embeddings at the top level too: Phi3Config's default (4096) replaces the
        # rope_parameters' own otherwise, and the switch would never be crossed
        "phi3": t.Phi3Config(**common, num_hidden_layers=2, num_key_value_heads=2, tie_word_embeddings=False,
                             original_max_position_embeddings=24,
                             rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                              "partial_rotary_factor": 0.5, "original_max_position_embeddings": 24,
                                              "short_factor": [1.0, 1.5, 2.0, 3.0][: rotary // 2],
                                              "long_factor": [2.0, 4.0, 8.0, 16.0][: rotary // 2]}),
    }


def _randomize(model, seed: int) -> None:
    """Weights large enough that every part shows: norms away from 1 (Gemma's from 0: it scales by 1 + w)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                centre = 0.0 if "gemma" in type(model).__name__.lower() else 1.0
                p.copy_(0.2 * torch.randn(p.shape, generator=g) + centre)
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    out = {}
    for name, config in _configs().items():
        model = AutoModelForCausalLM.from_config(config).eval()
        _randomize(model, seed=len(name))
        directory = tmp_path_factory.mktemp(name)
        model.save_pretrained(directory)
        out[name] = (directory, model)
    return out


def _hf_greedy(model, prompt: list[int]) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                             do_sample=False)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("family, tp", [(f, tp) for f in ("qwen3", "mistral", "gemma3", "phi3") for tp in (1, 2)]
                         + [("gemma3", 3)])
def test_greedy_tokens_equal_hugging_face(checkpoints, family, tp, tmp_path):
    directory, hf = checkpoints[family]
    config = json.loads((directory / "config.json").read_text())
    trace_decoder(directory, config, tp, tmp_path / "shards", prefill=[16, 64], max_context=128, batch_size=2)
    generator = Generator(tmp_path / "shards")
    try:
        assert generator.model.manifest.model["architecture"] == type(hf).__name__
        got = generator.generate(PROMPTS, SamplingParams(max_new_tokens=NEW_TOKENS))
        assert [c.token_ids for c in got] == [_hf_greedy(hf, p) for p in PROMPTS]
    finally:
        generator.close()


@pytest.mark.parametrize("family", ["mistral", "gemma3", "phi3"])
def test_long_prompts_through_sdpa_keep_windows_and_switch_rope(checkpoints, family, tmp_path):
    """A prompt past 512 tokens attends through SDPA with the model's masks instead of tpserve's op: the
    windows hold there too, and Phi-3's longrope switches to its long factors for the whole prompt."""
    directory, hf = checkpoints[family]
    config = json.loads((directory / "config.json").read_text())
    trace_decoder(directory, config, 2, tmp_path / "shards", prefill=[16, 1024], max_context=1024, batch_size=2)
    generator = Generator(tmp_path / "shards", prefill_piece=0)  # the whole prompt in one call
    try:
        prompt = [(7 * i + 3) % 250 + 1 for i in range(600)]
        got = generator.generate([prompt], SamplingParams(max_new_tokens=16))[0].token_ids
        with torch.no_grad():
            expected = hf.generate(torch.tensor([prompt]), max_new_tokens=16, min_new_tokens=16, do_sample=False)
        assert got == expected[0, len(prompt):].tolist()
    finally:
        generator.close()


def test_gemma3_4b_layout_serves_its_language_model(tmp_path):
    """Gemma 3 4B and larger are Gemma3ForConditionalGeneration checkpoints: the language model under
    `language_model.`, its config under text_config, a vision tower beside it (not read). A tiny random
    one generates what Hugging Face's generates from text alone."""
    import transformers as t

    text = t.Gemma3TextConfig(vocab_size=264, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                              num_hidden_layers=2, num_key_value_heads=1, head_dim=16, sliding_window=8,
                              max_position_embeddings=512, layer_types=["sliding_attention", "full_attention"])
    vision = t.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                  image_size=28, patch_size=14)
    config = t.Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4,
                            image_token_index=263, boi_token_index=262, eoi_token_index=261)
    hf = t.Gemma3ForConditionalGeneration(config).eval()
    _randomize(hf.model.language_model, seed=9)
    hf.save_pretrained(tmp_path / "gemma3-4b-like")
    directory = tmp_path / "gemma3-4b-like"
    trace_decoder(directory, json.loads((directory / "config.json").read_text()), 2, tmp_path / "shards",
                  prefill=[16, 64], max_context=128, batch_size=2)
    generator = Generator(tmp_path / "shards")
    try:
        got = generator.generate(PROMPTS, SamplingParams(max_new_tokens=NEW_TOKENS))
        with torch.no_grad():
            expected = [hf.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                    do_sample=False)[0, len(p):].tolist() for p in PROMPTS]
        assert [c.token_ids for c in got] == expected
    finally:
        generator.close()


def test_a_longrope_switch_within_the_context_gets_no_chunk_or_verify_graphs(checkpoints, tmp_path):
    """Phi-3's longrope rotates every position of a prompt longer than original_max_position_embeddings
    with its long factors, so a key cached from a shorter sequence is not what the whole prompt computes:
    such a model prefills prompts whole (no prefix caching, chunks or prompt lookup) and still answers as
    Hugging Face across the switch; a family without a switch gets them."""
    directory, hf = checkpoints["phi3"]
    config = json.loads((directory / "config.json").read_text())
    trace_decoder(directory, config, 1, tmp_path / "phi3", prefill=[16, 64], max_context=128, batch_size=2)
    generator = Generator(tmp_path / "phi3")
    try:
        info = generator.model.manifest.model
        assert info["prefill_contexts"] == [16, 64] and info["verify_tokens"] == [] and info["rope_switch"] == 24
        assert not generator.prefix.enabled and generator.prefill_piece == 0 and generator.verify_tokens == 0
        prompt = [(5 * i + 1) % 250 + 1 for i in range(30)]  # past the switch (24)
        first = generator.generate([prompt], SamplingParams(max_new_tokens=8))[0]
        again = generator.generate([prompt + first.token_ids + [3, 4]], SamplingParams(max_new_tokens=8))[0]
        assert again.cached_tokens == 0
        with torch.no_grad():
            expected = hf.generate(torch.tensor([prompt + first.token_ids + [3, 4]]), max_new_tokens=8,
                                   min_new_tokens=8, do_sample=False)
        assert again.token_ids == expected[0, len(prompt) + 10:].tolist()
    finally:
        generator.close()
    llama_dir, _ = checkpoints["qwen3"]
    trace_decoder(llama_dir, json.loads((llama_dir / "config.json").read_text()), 1, tmp_path / "qwen3",
                  prefill=[16, 64], max_context=128, batch_size=2)
    info = json.loads((tmp_path / "qwen3" / "manifest.json").read_text())["model"]
    assert info["prefill_contexts"] == [128, 128] and info["verify_tokens"] == [8]


@pytest.mark.parametrize("family, tp", [("mistral", 1), ("gemma3", 2)])
def test_sliding_layers_keep_a_ring_of_their_last_positions(checkpoints, family, tp, tmp_path):
    """With chunk graphs only (prompt graphs of up to 32 tokens here), a sliding layer's cache is a ring of
    W + 31 positions (and W - 1 mirrored) instead of the row's 256: a 40-token prompt and 150 new tokens
    wrap it several times and still answer as Hugging Face; a later turn reuses the row's prefix when the
    ring still holds the window before it, and prefills from the start when it does not."""
    directory, hf = checkpoints[family]
    config = json.loads((directory / "config.json").read_text())
    trace_decoder(directory, config, tp, tmp_path / "shards", prefill=[16, 32], max_context=256, batch_size=2)
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    window = config["sliding_window"]
    ring = window + 32 - 1
    lengths = {spec["shape"][2] for spec in manifest["runtime_states"].values()}
    assert manifest["model"]["decoder"]["ring_span"] == 32
    assert lengths == ({ring + window - 1} if family == "mistral" else {ring + window - 1, 256})
    generator = Generator(tmp_path / "shards")
    try:
        prompt = [(7 * i + 3) % 250 + 1 for i in range(40)]
        first = generator.generate([prompt], SamplingParams(max_new_tokens=150))[0]
        assert first.token_ids == _hf_greedy_n(hf, prompt, 150)
        # the whole conversation again plus two tokens: the ring holds the window before its end
        turn = prompt + first.token_ids + [5, 6]
        again = generator.generate([turn], SamplingParams(max_new_tokens=8))[0]
        assert again.cached_tokens == len(prompt) + 149 and again.token_ids == _hf_greedy_n(hf, turn, 8)
        # the prompt's first 40 tokens are long gone from the ring: nothing is reused
        edited = prompt + [9, 9]
        third = generator.generate([edited], SamplingParams(max_new_tokens=8))[0]
        assert third.cached_tokens == 0 and third.token_ids == _hf_greedy_n(hf, edited, 8)
    finally:
        generator.close()


def _hf_greedy_n(model, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()
