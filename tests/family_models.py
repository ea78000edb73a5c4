"""Tiny random-weight checkpoints of every encoder family, written the way people publish them: a Hugging
Face model with its tokenizer, a sentence-transformers folder made by sentence-transformers itself, a
*ForSequenceClassification cross-encoder. The references the tests compare with are the libraries' own
(SentenceTransformer.encode, CrossEncoder.predict / rank, the Hugging Face model's logits)."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

WORDS = ("the of and to in is it that was for on are with as be at by this had not but from or have an they which "
         "one you were all we when there can more if out so said what up its about into than them only other new "
         "some could time these two may then do first any my now such like our over man me even most made after "
         "also did many before must through back years where much your way well down should because each just "
         "query passage document search relevant paris france capital river city").split()
LETTERS = "abcdefghijklmnopqrstuvwxyz"

# special tokens per tokenizer style, in id order, and the post-processor templates (single, pair)
STYLES = {
    "bert": (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], "[CLS] $A [SEP]", "[CLS] $A [SEP] $B:1 [SEP]:1"),
    "roberta": (["<s>", "<pad>", "</s>", "<unk>", "<mask>"], "<s> $A </s>", "<s> $A </s> </s> $B </s>"),
    "decoder": (["<|endoftext|>", "<unk>"], "$A <|endoftext|>", "$A <|endoftext|> $B <|endoftext|>"),
}


def tokenizer(style: str, lowercase: bool = True):
    """A WordPiece tokenizer of WORDS with the family's special tokens and templates (a transformers fast
    tokenizer, saved as tokenizer.json)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials, single, pair = STYLES[style]
    words = list(dict.fromkeys(WORDS + [w.capitalize() for w in WORDS] * (not lowercase)))
    pieces = [*LETTERS, *LETTERS.upper(), *(f"##{c}" for c in LETTERS + LETTERS.upper())]
    vocab = {t: i for i, t in enumerate([*specials, *pieces, *words, *".,?!'"])}
    unk = "[UNK]" if style == "bert" else "<unk>"
    tok = Tokenizer(models.WordPiece(vocab, unk_token=unk))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    ids = {t: vocab[t] for t in specials}
    tok.post_processor = processors.TemplateProcessing(single=single, pair=pair,
                                                       special_tokens=[(t, i) for t, i in ids.items()])
    names = {"bert": dict(unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
                          mask_token="[MASK]"),
             "roberta": dict(unk_token="<unk>", pad_token="<pad>", cls_token="<s>", sep_token="</s>", bos_token="<s>",
                             eos_token="</s>", mask_token="<mask>"),
             "decoder": dict(unk_token="<unk>", pad_token="<|endoftext|>", eos_token="<|endoftext|>")}[style]
    inputs = ["input_ids", "token_type_ids", "attention_mask"] if style == "bert" else ["input_ids", "attention_mask"]
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=512, model_input_names=inputs, **names)
    if style == "decoder":
        fast.padding_side = "left"
    return fast


def _hf_config(family: str, vocab: int, heads: int = 4, labels: int | None = None):
    import transformers as t

    common = dict(vocab_size=vocab)
    if labels is not None:
        common["num_labels"] = labels
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=heads, intermediate_size=48)
    if family == "bert":
        return t.BertConfig(**common, **small, max_position_embeddings=128, pad_token_id=0)
    if family == "distilbert":
        return t.DistilBertConfig(**common, dim=32, n_layers=2, n_heads=heads, hidden_dim=48,
                                  max_position_embeddings=128, pad_token_id=0)
    if family in ("roberta", "xlm-roberta", "camembert"):
        cls = {"roberta": t.RobertaConfig, "xlm-roberta": t.XLMRobertaConfig, "camembert": t.CamembertConfig}[family]
        return cls(**common, **small, max_position_embeddings=130, type_vocab_size=1, pad_token_id=1, bos_token_id=0,
                   eos_token_id=2)
    if family == "mpnet":
        return t.MPNetConfig(**common, **small, max_position_embeddings=514, pad_token_id=1, bos_token_id=0,
                             eos_token_id=2)
    if family == "modernbert":
        return t.ModernBertConfig(**common, hidden_size=32, num_hidden_layers=4, num_attention_heads=heads,
                                  intermediate_size=48, max_position_embeddings=512, local_attention=8, pad_token_id=0,
                                  bos_token_id=2, eos_token_id=3, cls_token_id=2, sep_token_id=3,
                                  classifier_pooling="mean")
    decoder = dict(**common, **small, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0,
                   eos_token_id=0, bos_token_id=0, tie_word_embeddings=False)
    if family == "llama":
        return t.LlamaConfig(**decoder)
    if family == "mistral":
        return t.MistralConfig(**decoder, sliding_window=8)
    if family == "qwen2":
        return t.Qwen2Config(**decoder)
    if family == "qwen3":
        return t.Qwen3Config(**decoder, head_dim=16)
    raise ValueError(family)


STYLE_OF = {"bert": "bert", "distilbert": "bert", "modernbert": "bert", "roberta": "roberta",
            "xlm-roberta": "roberta", "camembert": "roberta", "mpnet": "roberta", "llama": "decoder",
            "mistral": "decoder", "qwen2": "decoder", "qwen3": "decoder"}
ENCODER_FAMILIES = ("bert", "distilbert", "roberta", "xlm-roberta", "camembert", "mpnet", "modernbert")
DECODER_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def _randomize(model, seed: int) -> None:
    """Weights large enough that every part of the model shows in its output (init's 0.02 would not)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))


def hf_model(directory: Path, family: str, heads: int = 4, lowercase: bool = True, seed: int = 0) -> Path:
    """A base model (AutoModel) of `family` with its tokenizer in `directory`."""
    from transformers import AutoModel

    tok = tokenizer(STYLE_OF[family], lowercase)
    model = AutoModel.from_config(_hf_config(family, len(tok), heads))
    _randomize(model, seed)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def sentence_model(directory: Path, family: str, pooling="mean", include_prompt: bool = True, dense=(),
                   normalize: bool = True, prompts: dict | None = None, default_prompt_name: str | None = None,
                   max_seq_length: int | None = None, do_lower_case: bool = False, lowercase: bool = True,
                   heads: int = 4, seed: int = 0) -> Path:
    """A sentence-transformers folder saved by sentence-transformers: Transformer, Pooling, Dense modules
    (dense: [(out_features, activation module, use_residual)]), Normalize."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling, Transformer

    base = hf_model(directory.with_name(directory.name + "-base"), family, heads, lowercase, seed)
    transformer = Transformer(str(base), max_seq_length=max_seq_length, do_lower_case=do_lower_case)
    modules = [transformer, Pooling(transformer.get_embedding_dimension(), pooling_mode=pooling,
                                    include_prompt=include_prompt)]
    size = modules[-1].get_embedding_dimension()
    torch.manual_seed(seed + 1)
    for out, activation, residual in dense:
        modules.append(Dense(size, out, activation_function=activation, use_residual=residual))
        size = out
    if normalize:
        modules.append(Normalize())
    SentenceTransformer(modules=modules, prompts=prompts, default_prompt_name=default_prompt_name,
                        device="cpu").save(str(directory))
    return directory


def cross_encoder(directory: Path, family: str, labels: int = 1, heads: int = 4, seed: int = 0,
                  problem_type: str | None = None) -> Path:
    """A *ForSequenceClassification checkpoint with its tokenizer (what CrossEncoder and the Hugging
    Face pipelines load)."""
    from transformers import AutoModelForSequenceClassification

    tok = tokenizer(STYLE_OF[family])
    config = _hf_config(family, len(tok), heads, labels)
    config.id2label = {i: f"label_{chr(97 + i)}" for i in range(labels)}
    config.label2id = {v: k for k, v in config.id2label.items()}
    config.problem_type = problem_type
    model = AutoModelForSequenceClassification.from_config(config)
    _randomize(model, seed)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


@functools.cache
def sentences() -> list[str]:
    """Texts of 1 to ~60 words (some with capitals and punctuation)."""
    g = torch.Generator().manual_seed(5)
    out = []
    for n in (1, 3, 7, 12, 25, 40, 61, 2):
        picks = torch.randint(0, len(WORDS), (n,), generator=g).tolist()
        out.append(" ".join(WORDS[i] for i in picks))
    out[1] = "What is the capital of France?"
    out[3] = "Paris is the Capital city, on a river."
    return out
