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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from ..core.errors import UserError

FIELDS = ("text", "text_pair", "title")
SLOTS = ("mask", "answer")
MODIFIERS = ("nopunct", "lowerfirst", "question")
_PLACEHOLDER = re.compile(r"\{(\w+)((?:\|\w+)*)\}")


class TemplateError(ValueError):
    """A template with unknown placeholders, or without exactly one slot (a programming error)."""


class PromptError(UserError):
    """A user's ``--template`` or ``--label-words`` that cannot serve the task's labels."""


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


# ----------------------------------------------------------------------------- the user's prompt

LabelWords = str | Sequence[str] | Mapping[str, str]


def parse_label_words(value: LabelWords) -> list[str] | dict[str, str]:
    """``"terrible,great"`` (in label order) or ``"negative=terrible,positive=great"`` (by label name);
    a list or a mapping from a config file is taken as it is."""
    if isinstance(value, Mapping):
        return {str(k).strip(): str(v).strip() for k, v in value.items()}
    items = [x.strip() for x in value.split(",")] if isinstance(value, str) else [str(x).strip() for x in value]
    if not items or any(not x for x in items):
        raise PromptError(f"--label-words needs one non-empty word per label, comma-separated; got {value!r}")
    if all("=" in x for x in items):
        pairs = [tuple(p.strip() for p in x.split("=", 1)) for x in items]
        if any(not k or not v for k, v in pairs):
            raise PromptError(f"--label-words: each entry is label=word; got {value!r}")
        return dict(pairs)
    if any("=" in x for x in items):
        raise PromptError(f"--label-words: give all entries as label=word, or none; got {value!r}")
    return items


def label_order(words: list[str] | dict[str, str]) -> tuple[str, ...] | None:
    """The class order that label=word entries fix (None for a plain list: the data's order)."""
    return tuple(words) if isinstance(words, dict) else None


def check_template(template: str) -> list[Segment]:
    """The segments of a user's classification template, or one ``PromptError`` line."""
    try:
        segments = parse_template(template)
    except TemplateError as exc:
        raise PromptError(f"--template: {exc}") from None
    if not any(s.kind == "slot" and s.value == "mask" for s in segments):
        raise PromptError(f"--template needs {{mask}} where the label word goes; got {template!r}")
    if any(s.value == "title" for s in segments):
        raise PromptError("--template: {title} is only for generation tasks; use {text} and {text_pair}")
    if not any(s.value == "text" for s in segments if s.kind == "field"):
        raise PromptError(f"--template must place the example's text with {{text}}; got {template!r}")
    return segments


def custom_prompt(
    base: Prompt | None,
    label_names: Sequence[str],
    *,
    template: str | None = None,
    label_words: list[str] | dict[str, str] | None = None,
    is_pair: bool = False,
) -> Prompt:
    """The task's prompt with the user's template and / or label words in place of its own.

    Without label words, the base prompt's words stay when their number fits, else the label
    names serve as words (when they are words, not numbers). The causal-LM template is derived
    from the user's template ("... It was {mask}." scores "... It was" + word)."""
    if base is not None and base.is_generation:
        raise PromptError("a generation task's prompt cannot be replaced (--template / --label-words)")
    if template is not None:
        segments = check_template(template)
        if not is_pair and any(s.value == "text_pair" for s in segments):
            raise PromptError("--template uses {text_pair} but the data has no second text (--text-pair-column)")
    elif base is None or base.template is None:
        raise PromptError("--label-words needs --template (the task has no prompt of its own)")
    names = list(label_names)
    if label_words is None:
        if base is not None and len(base.label_words) == len(names):
            words = list(base.label_words)
        elif any(n.lstrip("-").isdigit() for n in names):
            raise PromptError(f"--template needs --label-words: the labels ({', '.join(names)}) are not words")
        else:
            words = names
    elif isinstance(label_words, dict):
        lower = {n.lower(): n for n in names}
        unknown = [k for k in label_words if k.lower() not in lower]
        if unknown:
            raise PromptError(f"--label-words names label '{unknown[0]}', which the data does not have "
                              f"(labels: {', '.join(names)})")  # fmt: skip
        given = {lower[k.lower()]: v for k, v in label_words.items()}
        missing = [n for n in names if n not in given]
        if missing:
            raise PromptError(f"--label-words gives no word for label '{missing[0]}'")
        words = [given[n] for n in names]
    else:
        if len(label_words) != len(names):
            raise PromptError(
                f"--label-words has {len(label_words)} words for {len(names)} labels "
                f"({', '.join(names)}, in this order)"
            )
        words = list(label_words)
    if template is None:
        assert base is not None
        return Prompt(base.template, tuple(words), base.causal_template)
    return Prompt(template, tuple(words))
