"""Turning a template and examples into token ids, piece by piece.

Each literal and each field of a template is tokenized on its own and the ids concatenated: the
slot ({mask} / {answer}) then has a known position, and truncation shortens only the example's
fields (longest first), never the template, the label word or the answer. This gives the same ids
as tokenizing the rendered string, because templates split at word boundaries and a placeholder's
leading spaces are tokenized with it (``data/prompts.py``), with one care: a piece that does not
open the prompt is tokenized after a context (a newline, or else a special token such as </s>)
whose ids are then dropped, not alone. SentencePiece tokenizers (Llama-2, Mistral: Metaspace) put
a "▁" before the start of every text they are given, which inside a prompt (after a quote, a
newline or a word) would be a spurious extra token. Byte-level BPE (RoBERTa, OPT, GPT-2,
SmolLM2) and WordPiece (BERT) give the same ids either way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..data import Example
from ..data.prompts import Segment, apply_modifiers, parse_template
from .base import HeadError

NEWLINE = "\n"  # the first context tried: its own token(s) in BPE, SentencePiece and WordPiece vocabularies


def special_framing(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a single text ([CLS] ... [SEP], <s> ... </s>,
    OPT's leading </s>, or nothing)."""
    probe = "hello world"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start], full[start + len(plain) :]
    raise HeadError(f"{type(tokenizer).__name__}: cannot tell its special tokens apart from the text")


def fit_lengths(lengths: Sequence[int], budget: int) -> list[int]:
    """Truncated lengths with sum <= budget, shortening the longest first (HF's "longest_first")."""
    if sum(lengths) <= budget:
        return list(lengths)
    lo, hi = 0, max(lengths)  # the largest cap c with sum(min(l, c)) <= budget
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if sum(min(n, mid) for n in lengths) <= budget:
            lo = mid
        else:
            hi = mid - 1
    out = [min(n, lo) for n in lengths]
    spare = budget - sum(out)
    for i, n in enumerate(lengths):  # hand the remainder out one token each, in template order
        if spare and n > lo:
            out[i] += 1
            spare -= 1
    return out


@dataclass
class EncodedPrompt:
    """Token ids of one example: ``before`` the slot and ``after`` it (framing tokens included)."""

    before: list[int]
    after: list[int]


class PromptEncoder:
    """Tokenizes one template for many examples; ``slot`` is its {mask} / {answer} segment."""

    def __init__(self, template: str, tokenizer: Any, *, closing_special: bool = True):
        self.template = template
        self.tokenizer = tokenizer
        segments = parse_template(template)
        i = next(k for k, s in enumerate(segments) if s.kind == "slot")
        self.before, self.slot, self.after = segments[:i], segments[i], segments[i + 1 :]
        self.prefix, suffix = special_framing(tokenizer)
        self.suffix = suffix if closing_special else []
        self._initial = segments[0]  # the one piece tokenized alone, as at the start of a text
        special = next((t for t in (tokenizer.eos_token, tokenizer.sep_token, tokenizer.unk_token) if t), None)
        # a vocabulary may merge "\n" with what follows ("\nA"); a special token never merges
        self._contexts = [(c, self._plain([c])[0]) for c in (NEWLINE, special) if c]
        self._literal_ids = {
            s.value: self.tokens([s.value], initial=s is self._initial)[0] for s in segments if s.kind == "literal"
        }

    def _plain(self, texts: Sequence[str]) -> list[list[int]]:
        return self.tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []

    def tokens(self, texts: Sequence[str], initial: bool = False) -> list[list[int]]:
        """Ids of ``texts`` as they tokenize inside a prompt (``initial``: at its start)."""
        if initial or not texts:
            return self._plain(texts)
        out: list[list[int] | None] = [None] * len(texts)
        for context, context_ids in self._contexts:
            todo = [i for i, ids in enumerate(out) if ids is None]
            n = len(context_ids)
            for i, ids in zip(todo, self._plain([context + texts[i] for i in todo])):
                if ids[:n] == context_ids:  # the context tokenized on its own: what follows is the piece's
                    out[i] = ids[n:]
        return [self._plain([t])[0] if ids is None else ids for t, ids in zip(texts, out)]

    def encode(self, examples: Sequence[Example], max_length: int, reserve: Sequence[int]) -> list[EncodedPrompt]:
        """``reserve[i]``: tokens example i needs at the slot (1 for a mask, a label word, an answer)."""
        field_segments = [s for s in (*self.before, *self.after) if s.kind == "field"]
        columns = [  # one field of every example per call, tokenized as where it stands in the template
            self.tokens([self._field(s, e) for e in examples], initial=s is self._initial) for s in field_segments
        ]
        fixed = (
            len(self.prefix)
            + len(self.suffix)
            + sum(len(self._literal_ids[s.value]) for s in (*self.before, *self.after) if s.kind == "literal")
        )
        out = []
        for i, extra in enumerate(reserve):
            field_ids = [column[i] for column in columns]
            budget = max_length - fixed - extra
            if budget < 0:
                raise HeadError(
                    f"--max-length {max_length} is too short for the template {self.template!r}: it needs "
                    f"{fixed + extra} tokens before any of the example's text"
                )
            kept = fit_lengths([len(f) for f in field_ids], budget)
            parts = iter(f[:n] for f, n in zip(field_ids, kept))
            before = self.prefix + self._join(self.before, parts)
            after = self._join(self.after, parts) + self.suffix
            out.append(EncodedPrompt(before, after))
        return out

    def _join(self, segments: Sequence[Segment], fields) -> list[int]:
        ids: list[int] = []
        for s in segments:
            ids += self._literal_ids[s.value] if s.kind == "literal" else next(fields)
        return ids

    def _field(self, segment: Segment, example: Example) -> str:
        value = getattr(example, segment.value)
        if value is None:
            if segment.value == "title":
                return ""
            raise HeadError(f"template {self.template!r} needs {{{segment.value}}}, which this task's examples lack")
        text = apply_modifiers(value, segment.modifiers)
        return segment.lead + text if text else ""
