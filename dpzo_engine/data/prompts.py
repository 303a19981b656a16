"""Prompt templates and verbalizers of the papers (LM-BFF for masked LMs, MeZO for causal LMs).

A template is text with placeholders: ``{text}``, ``{text_pair}``, ``{title}`` (fields of the
example, optionally with modifiers: ``{text|nopunct}`` drops a final punctuation mark,
``{text_pair|lowerfirst}`` lowercases the first letter, ``{text_pair|question}`` capitalises
and ends with "?") and one slot: ``{mask}`` (where a label word goes) or ``{answer}``
(generation tasks). Templates are written as LM-BFF / MeZO render them; spaces right before a
placeholder belong to the placeholder (byte-level BPE tokenizers attach a word's leading space
to the word, so " great" is one token and "was" + " " + "great" would not be).
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from typing import Literal

FIELDS = ("text", "text_pair", "title")
SLOTS = ("mask", "answer")
MODIFIERS = ("nopunct", "lowerfirst", "question")
_PLACEHOLDER = re.compile(r"\{(\w+)((?:\|\w+)*)\}")


class TemplateError(ValueError):
    """A template with unknown placeholders, or without exactly one slot (a programming error)."""


@dataclass(frozen=True)
class Segment:
    """One piece of a parsed template, in order."""

    kind: Literal["literal", "field", "slot"]
    value: str  # the literal text, or the field / slot name
    lead: str = ""  # spaces taken from the end of the preceding literal
    modifiers: tuple[str, ...] = ()


def parse_template(template: str) -> list[Segment]:
    """Segments of ``template``; the spaces before each placeholder move into its ``lead``."""
    segments: list[Segment] = []
    pos = 0
    for m in _PLACEHOLDER.finditer(template):
        literal = template[pos : m.start()]
        stripped = literal.rstrip(" ")
        if stripped:
            segments.append(Segment("literal", stripped))
        name, mods = m.group(1), tuple(x for x in m.group(2).split("|") if x)
        if name not in FIELDS + SLOTS:
            raise TemplateError(f"unknown placeholder {{{name}}} in template {template!r}")
        if bad := [x for x in mods if x not in MODIFIERS]:
            raise TemplateError(f"unknown modifier {bad[0]!r} in template {template!r}")
        kind: Literal["field", "slot"] = "slot" if name in SLOTS else "field"
        segments.append(Segment(kind, name, literal[len(stripped) :], mods))
        pos = m.end()
    if template[pos:]:
        segments.append(Segment("literal", template[pos:]))
    slots = [s for s in segments if s.kind == "slot"]
    if len(slots) != 1:
        raise TemplateError(f"template {template!r} needs exactly one {{mask}} or {{answer}}, found {len(slots)}")
    return segments


def apply_modifiers(value: str, modifiers: tuple[str, ...]) -> str:
    value = value.strip()
    for mod in modifiers:
        if mod == "nopunct" and value and value[-1] in string.punctuation:
            value = value[:-1]  # LM-BFF's *sent-_0*
        elif mod == "lowerfirst" and value:
            value = value[0].lower() + value[1:]  # LM-BFF's *sentl_1*
        elif mod == "question" and value:
            value = value[0].upper() + value[1:] + ("" if value.endswith("?") else "?")  # MeZO's BoolQ
    return value


@dataclass(frozen=True)
class Prompt:
    """How prompt heads see a task.

    ``template``: the masked-LM template (LM-BFF) with ``{mask}``, or a generation template with
    ``{answer}`` (its text after ``{answer}`` ends the target and stops decoding).
    ``causal_template``: the causal-LM template (MeZO), ending in ``{mask}``; when None it is
    derived from ``template`` if only punctuation follows ``{mask}`` there ("It was {mask}." →
    "It was {mask}"). ``label_words[i]`` verbalizes class i.
    """

    template: str | None
    label_words: tuple[str, ...] = ()
    causal_template: str | None = None

    def __post_init__(self) -> None:
        for t in (self.template, self.causal_template):
            if t is not None:
                parse_template(t)
        causal = self.causal()
        if causal is not None and parse_template(causal)[-1].kind != "slot":
            raise TemplateError(f"causal template {causal!r} must end with {{mask}}")

    @property
    def is_generation(self) -> bool:
        return self.template is not None and "{answer}" in self.template

    def causal(self) -> str | None:
        """The template a causal-LM head scores label words with (None: the task has none)."""
        if self.causal_template is not None or self.template is None or self.is_generation:
            return self.causal_template
        head, _, tail = self.template.partition("{mask}")
        return head + "{mask}" if not tail.strip(string.punctuation + " ") else None


# LM-BFF templates (Gao et al. 2021, their exact renderings) with MeZO's causal-LM variants.
SENTIMENT2 = Prompt("{text} It was {mask}.", ("terrible", "great"))
SENTIMENT3 = Prompt("{text} It was {mask}.", ("terrible", "okay", "great"))
SENTIMENT5 = Prompt("{text} It was {mask}.", ("terrible", "bad", "okay", "good", "great"))
_NLI_MLM = "{text|nopunct}? {mask}, {text_pair|lowerfirst}"
_CB_CAUSAL = 'Suppose {text} Can we infer that "{text_pair}"? Yes, No, or Maybe?\n{mask}'
NLI3 = Prompt(_NLI_MLM, ("Yes", "Maybe", "No"), _CB_CAUSAL)  # entailment / neutral / contradiction
RTE = Prompt(_NLI_MLM, ("Yes", "No"), '{text}\nDoes this mean that "{text_pair}" is true? Yes or No?\n{mask}')
CB = Prompt(_NLI_MLM, ("Yes", "No", "Maybe"), _CB_CAUSAL)  # SuperGLUE order: entailment / contradiction / neutral
BOOLQ = Prompt(None, ("No", "Yes"), "{text} {text_pair|question}\n{mask}")  # false / true
TREC = Prompt("{mask}: {text}", ("Description", "Entity", "Expression", "Human", "Location", "Number"))
TOPIC = Prompt("{text} This is about {mask}.", ("business", "entertainment", "politics", "sports", "technology"))
SQUAD = Prompt("Title: {title}\nContext: {text}\nQuestion: {text_pair}\nAnswer: {answer}\n")
