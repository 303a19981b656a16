"""Tiny language models and real byte-level BPE tokenizers, built in-process for the head tests.

The tokenizers are trained on a few sentences in a fraction of a second and wrapped like the
papers' models wrap theirs: RoBERTa (<s> … </s>, a <mask> that swallows the space before it),
OPT (a leading </s>, no closing token) and Llama / SmolLM2 (no special tokens, EOS pads). Their
byte-level pre-tokenization (leading spaces glued to words) is what the prompt heads must get
right, which a word-level test tokenizer would not exercise.
"""

from __future__ import annotations

import functools

from dpzo_engine.data import Example
from dpzo_engine.models.loading import build_random_model

CORPUS = [
    "It was great. It was terrible. It was okay. The movie was great fun and the plot was terrible.",
    "Yes, No, or Maybe? Yes or No? Suppose a man walks. Can we infer that the man walks? Yes",
    "Title: Paris\nContext: Paris is the capital of France.\nQuestion: What is the capital?\nAnswer: Paris\n",
    "a dull film , a lovely day ; the cat sat on the mat . premise hypothesis question answer",
]
SPECIALS = {
    "roberta": ["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
    "opt": ["<s>", "<pad>", "</s>", "<unk>"],
    "llama": ["<unk>", "<s>", "</s>"],
}


@functools.cache
def bpe_tokenizer(style: str):
    """A byte-level BPE tokenizer (~600 tokens) with the special-token conventions of ``style``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, min_frequency=1, special_tokens=SPECIALS[style],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator(CORPUS * 20, trainer)
    if style == "roberta":
        tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<s>", eos_token="</s>", cls_token="<s>", sep_token="</s>",
            pad_token="<pad>", unk_token="<unk>", mask_token=AddedToken("<mask>", lstrip=True, special=True),
        )  # fmt: skip
    if style == "opt":
        tok.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 2)])
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
        )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@functools.cache
def sentencepiece_tokenizer():
    """A Llama-2-style SentencePiece BPE (Metaspace "▁", prepended at the start of each text, byte
    fallback, <s> first): the kind that puts a "▁" before every text it is given on its own."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=True)  # pieces within words
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS["llama"], show_progress=False)
    tok.train_from_iterator(CORPUS * 20, trainer)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)  # as Llama's converter
    tok.decoder = decoders.Metaspace(prepend_scheme="first", split=False)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def tiny_lm(arch: str, head: str, seed: int = 0, **overrides):
    """A tiny random model of ``arch`` sized to the BPE tokenizer of the matching style."""
    style = {"roberta": "roberta", "bert": "roberta", "opt": "opt", "llama": "llama"}[arch]
    tok = bpe_tokenizer(style)
    model = build_random_model(arch, "tiny", head=head, seed=seed, vocab_size=len(tok), **overrides)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.config.pad_token_id = tok.pad_token_id
    return model, tok


def sentiment_examples() -> list[Example]:
    texts = [
        "The movie was great fun.",
        "a dull film",
        "It was okay",
        "the plot was terrible and the cat sat on the mat",
    ]
    return [Example(t, i % 2) for i, t in enumerate(texts)]


def nli_examples() -> list[Example]:
    return [
        Example("Suppose a man walks.", 0, "The man walks"),
        Example("the cat sat on the mat .", 2, "A cat sat"),
        Example("a lovely day", 1, "It was terrible"),
    ]


def squad_examples() -> list[Example]:
    return [
        Example("Paris is the capital of France.", -1, "What is the capital?", ("Paris", "paris city"), "Paris"),
        Example("The cat sat on the mat.", -1, "Where did the cat sit?", ("on the mat",), "Cat"),
        Example("It was great fun.", -1, "What was it?", ("great fun",), None),
    ]
