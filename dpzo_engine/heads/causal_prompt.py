"""Prompt classification with causal LMs (MeZO's OPT setting, "train as classification").

The prompt is the task's causal template up to the slot ("<S1> It was"); each class is a
candidate continuation (" terrible", " great"). A class's score is the mean log-likelihood of
its candidate tokens, and the loss is the cross-entropy over the classes' scores.

When every candidate is a single token the prompt is shared, so one forward of the B prompts
serves all classes: the score of class c is then log p(c | prompt) = logit_c − logsumexp(all
logits), and since the normalizer is the same for every class, the cross-entropy over the
candidates' logits alone is identical. Only the last prompt position's hidden state and the
candidates' rows of the LM head are used. Otherwise each example is expanded into one row per
candidate (prompt + candidate) in one batched forward, and full-vocabulary log-probabilities are
computed only at the candidate positions. That path feeds the model B·C rows: per-sample
gradient tools (Opacus, for DP-AdamW) would see C "samples" per example, so ``expands_rows``
says when it is in use. The papers' verbalizers (" terrible"/" great", Yes/No/Maybe) are single
tokens for OPT and SmolLM2.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..data import Example, Prompt
from .base import Batch, ClassificationHead, HeadError, check_nonempty, labels_tensor, right_pad
from .lm import final_hidden, output_embedding, vocab_logits
from .prompting import PromptEncoder


class CausalPromptHead(ClassificationHead):
    """Cross-entropy over the candidates' mean token log-likelihoods (``AutoModelForCausalLM``)."""

    name = "causal-prompt"

    def __init__(self, prompt: Prompt, pad_to_multiple_of: int | None = None):
        template = prompt.causal()
        if template is None or not prompt.label_words:
            raise HeadError("this task has no causal-LM prompt; use --head sequence-classification")
        self.template = template
        self.words = prompt.label_words
        self.pad_to_multiple_of = pad_to_multiple_of
        self._cache: tuple[Any, PromptEncoder, list[list[int]], torch.Tensor] | None = None

    def _encoder(self, tokenizer: Any) -> tuple[PromptEncoder, list[list[int]]]:
        if self._cache is None or self._cache[0] is not tokenizer:
            encoder = PromptEncoder(self.template, tokenizer, closing_special=False)
            candidates = encoder.tokens([encoder.slot.lead + w for w in self.words])
            if any(not c for c in candidates) or len({tuple(c) for c in candidates}) != len(candidates):
                raise HeadError(f"label words {list(self.words)} do not tokenize to distinct non-empty candidates")
            padded = torch.full((len(candidates), max(len(c) for c in candidates)), -1, dtype=torch.long)
            for i, c in enumerate(candidates):
                padded[i, : len(c)] = torch.tensor(c)
            self._cache = (tokenizer, encoder, candidates, padded)
        return self._cache[1], self._cache[2]

    @property
    def expands_rows(self) -> bool:
        """True when some candidate is several tokens: the forward then runs one row per (example, class)."""
        return self.candidates.shape[1] > 1

    @property
    def candidates(self) -> torch.Tensor:
        """Candidate token ids [C, T], right-padded with -1 (known once a batch has been collated)."""
        if self._cache is None:
            raise RuntimeError("collate a batch first: the candidates' ids come from the tokenizer")
        return self._cache[3]

    def collate(self, examples: Sequence[Example], tokenizer: Any, max_length: int) -> Batch:
        """``input_ids`` is [B, L] (prompts) when every candidate is one token, else [B, C, L]
        (prompt + candidate c in row c); ``last_positions`` [B] is each prompt's last position."""
        check_nonempty(examples)
        encoder, candidates = self._encoder(tokenizer)
        longest = max(len(c) for c in candidates)
        prompts = [e.before for e in encoder.encode(examples, max_length, [longest] * len(examples))]
        rows = prompts if longest == 1 else [p + c for p in prompts for c in candidates]
        input_ids, attention_mask = right_pad(rows, tokenizer.pad_token_id, self.pad_to_multiple_of)
        if longest > 1:  # example-major rows: keep every tensor's first dimension per example
            input_ids = input_ids.view(len(prompts), len(candidates), -1)
            attention_mask = attention_mask.view(len(prompts), len(candidates), -1)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "last_positions": torch.tensor([len(p) - 1 for p in prompts], dtype=torch.long),
            "labels": labels_tensor(examples),
        }

    def read_positions(self, model: nn.Module, batch: Batch) -> torch.Tensor | None:
        """The last prompt position when the prompt is shared; candidate rows ([B, C, L]) are left whole."""
        return batch["last_positions"].unsqueeze(1) if batch["input_ids"].dim() == 2 else None

    def class_scores(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        decoder = output_embedding(model)
        ids, last = batch["input_ids"], batch["last_positions"]
        candidates = self.candidates.to(ids.device)
        if ids.dim() == 2:  # single-token candidates: one position, C vocabulary rows
            hidden = final_hidden(model, batch)
            rows = torch.arange(ids.shape[0], device=ids.device)
            return vocab_logits(decoder, hidden[rows, last], candidates[:, 0])
        B, C, L = ids.shape
        flat = {"input_ids": ids.reshape(B * C, L), "attention_mask": batch["attention_mask"].reshape(B * C, L)}
        hidden = final_hidden(model, flat)
        T = candidates.shape[1]
        j = torch.arange(T, device=ids.device)
        valid = (candidates >= 0).expand(B, C, T)
        rows = (torch.arange(B * C, device=ids.device).view(B, C, 1)).expand(B, C, T)[valid]
        positions = (last.view(B, 1, 1) + j.view(1, 1, T)).expand(B, C, T)[valid]  # predicts candidate token j
        tokens = candidates.expand(B, C, T)[valid]
        logp = vocab_logits(decoder, hidden[rows, positions]).log_softmax(-1).gather(1, tokens[:, None]).squeeze(1)
        sums = torch.zeros(B * C, dtype=torch.float32, device=ids.device).index_add_(0, rows, logp)
        lengths = (candidates >= 0).sum(1).to(torch.float32)
        return sums.view(B, C) / lengths  # [B, C] mean log-likelihood
