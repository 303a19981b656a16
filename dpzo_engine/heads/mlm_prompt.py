"""Prompt-based fine-tuning of masked LMs (LM-BFF, as MeZO, DPZero and DP-AggZO run RoBERTa).

The example is rendered into the task's template ("<S1> It was <mask>."); the class scores are
the MLM logits of the label words (" great", " terrible") at the mask position, and the loss is
the cross-entropy over those scores. Label words carry a leading space as in LM-BFF and must be
single tokens. Only the mask position's hidden state goes through the MLM head, and only the
label words' rows of its vocabulary projection are used.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..data import Example, Prompt
from .base import Batch, ClassificationHead, HeadError, check_nonempty, labels_tensor, right_pad
from .lm import final_hidden, mlm_transform, output_embedding, vocab_logits
from .prompting import PromptEncoder


def label_token_ids(tokenizer: Any, words: Sequence[str]) -> list[int]:
    """One vocabulary id per label word, tokenized with a leading space (LM-BFF's convention)."""
    ids = []
    for word in words:
        pieces = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
        if len(pieces) != 1:
            raise HeadError(f"label word '{word}' is {len(pieces)} tokens for this tokenizer; the MLM head needs one")
        ids.append(pieces[0])
    if len(set(ids)) != len(ids):
        raise HeadError(f"label words {list(words)} do not map to distinct tokens")
    return ids


class MaskedLMPromptHead(ClassificationHead):
    """Cross-entropy over the label words' logits at the mask (``AutoModelForMaskedLM``)."""

    name = "mlm-prompt"

    def __init__(self, prompt: Prompt, pad_to_multiple_of: int | None = None):
        if prompt.template is None or "{mask}" not in prompt.template:
            raise HeadError("this task has no masked-LM template; use --head causal-prompt or sequence-classification")
        self.prompt = prompt
        self.pad_to_multiple_of = pad_to_multiple_of
        self._cache: tuple[Any, PromptEncoder, torch.Tensor] | None = None

    def _encoder(self, tokenizer: Any) -> PromptEncoder:
        if self._cache is None or self._cache[0] is not tokenizer:
            if tokenizer.mask_token_id is None:
                raise HeadError(f"{type(tokenizer).__name__} has no mask token; the MLM prompt head needs one")
            assert self.prompt.template is not None
            encoder = PromptEncoder(self.prompt.template, tokenizer)
            words = torch.tensor(label_token_ids(tokenizer, self.prompt.label_words), dtype=torch.long)
            self._cache = (tokenizer, encoder, words)
        return self._cache[1]

    @property
    def label_token_ids(self) -> torch.Tensor:
        """Vocabulary ids of the label words (known once a batch has been collated)."""
        if self._cache is None:
            raise RuntimeError("collate a batch first: the label words' ids come from the tokenizer")
        return self._cache[2]

    def collate(self, examples: Sequence[Example], tokenizer: Any, max_length: int) -> Batch:
        check_nonempty(examples)
        encoded = self._encoder(tokenizer).encode(examples, max_length, [1] * len(examples))
        rows = [[*e.before, tokenizer.mask_token_id, *e.after] for e in encoded]
        input_ids, attention_mask = right_pad(rows, tokenizer.pad_token_id, self.pad_to_multiple_of)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "mask_positions": torch.tensor([len(e.before) for e in encoded], dtype=torch.long),
            "labels": labels_tensor(examples),
        }

    def read_positions(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return batch["mask_positions"].unsqueeze(1)

    def class_scores(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        hidden = final_hidden(model, batch)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        at_mask = mlm_transform(model)(hidden[rows, batch["mask_positions"]])
        return vocab_logits(output_embedding(model), at_mask, self.label_token_ids.to(hidden.device))
