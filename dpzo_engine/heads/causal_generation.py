"""Generation tasks with causal LMs (MeZO's SQuAD setting).

Training: teacher forcing on the answer. The input is prompt + " answer" + the template's text
after ``{answer}`` (a newline for SQuAD, which teaches the model where an answer ends); the
loss is the mean NLL over those target tokens, from hidden states gathered at the positions that
predict them (full-vocabulary logits there only). Evaluation: greedy decoding from the prompt
until that terminator, EOS or ``max_new_tokens``, then SQuAD F1 and exact match against every
gold answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data import Example, Prompt
from .base import Batch, HeadError, LossHead, check_nonempty, model_device, move_batch, right_pad
from .lm import final_hidden, output_embedding, vocab_logits
from .metrics import best_exact_match, best_f1
from .prompting import PromptEncoder

IGNORE = -100  # padding of target token rows


class CausalGenerationHead(LossHead):
    """Teacher-forced answer NLL for training; greedy decoding, F1 and exact match for evaluation."""

    name = "causal-generation"
    metric_names = ("f1", "exact_match", "loss")
    primary_metric = "f1"

    def __init__(self, prompt: Prompt, max_new_tokens: int = 50, pad_to_multiple_of: int | None = None):
        if not prompt.is_generation or prompt.template is None:
            raise HeadError("this task is not a generation task (no {answer} in its template)")
        head, _, self.stop = prompt.template.partition("{answer}")
        if "{" in self.stop:
            raise HeadError(f"nothing but text may follow {{answer}} in {prompt.template!r}")
        self.template = head + "{answer}"
        self.max_new_tokens = max_new_tokens
        self.pad_to_multiple_of = pad_to_multiple_of
        self._cache: tuple[Any, PromptEncoder, list[int]] | None = None

    def _encoder(self, tokenizer: Any) -> tuple[PromptEncoder, list[int]]:
        """The prompt encoder and the token ids that end a generated answer (EOS, the terminator)."""
        if self._cache is None or self._cache[0] is not tokenizer:
            encoder = PromptEncoder(self.template, tokenizer, closing_special=False)
            stops = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
            terminator = encoder.tokens([self.stop])[0] if self.stop.strip(" ") else []
            if len(terminator) == 1:
                stops.append(terminator[0])
            self._cache = (tokenizer, encoder, stops)
        return self._cache[1], self._cache[2]

    def collate(self, examples: Sequence[Example], tokenizer: Any, max_length: int) -> Batch:
        """Prompt + target, right-padded; ``target_tokens`` [B, T] (padded with -100) starts at
        ``target_starts`` [B]; ``labels`` is -1 (no classes)."""
        check_nonempty(examples)
        if any(not e.answers for e in examples):
            raise HeadError("a generation example has no gold answer")
        encoder, _ = self._encoder(tokenizer)
        targets = encoder.tokens([encoder.slot.lead + e.answers[0] + self.stop for e in examples])
        prompts = [e.before for e in encoder.encode(examples, max_length, [len(t) for t in targets])]
        rows = [p + t for p, t in zip(prompts, targets)]
        input_ids, attention_mask = right_pad(rows, tokenizer.pad_token_id, self.pad_to_multiple_of)
        target_tokens = torch.full((len(targets), max(len(t) for t in targets)), IGNORE, dtype=torch.long)
        for i, t in enumerate(targets):
            target_tokens[i, : len(t)] = torch.tensor(t)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "target_starts": torch.tensor([len(p) for p in prompts], dtype=torch.long),
            "target_tokens": target_tokens,
            "labels": torch.full((len(examples),), -1, dtype=torch.long),
        }

    def read_positions(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The positions that predict the target tokens (padding slots clamped into the row; not read)."""
        tokens = batch["target_tokens"]
        j = torch.arange(tokens.shape[1], device=tokens.device)
        return (batch["target_starts"].unsqueeze(1) - 1 + j).clamp(0, batch["input_ids"].shape[1] - 1)

    def per_example_loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        hidden = final_hidden(model, batch)
        tokens = batch["target_tokens"]
        B, T = tokens.shape
        valid = tokens != IGNORE
        rows = torch.arange(B, device=tokens.device).view(B, 1).expand(B, T)[valid]
        positions = (batch["target_starts"].view(B, 1) - 1 + torch.arange(T, device=tokens.device))[valid]
        logits = vocab_logits(output_embedding(model), hidden[rows, positions])
        nll = F.cross_entropy(logits, tokens[valid], reduction="none")
        sums = torch.zeros(B, dtype=torch.float32, device=tokens.device).index_add_(0, rows, nll)
        return sums / valid.sum(1)

    def generate(self, model: nn.Module, examples: Sequence[Example], tokenizer: Any, max_length: int) -> list[str]:
        """Greedy answers, cut at the terminator. Prompts are left-padded (generation appends on the right)."""
        from transformers import GenerationConfig

        check_nonempty(examples)
        encoder, stops = self._encoder(tokenizer)
        prompts = [e.before for e in encoder.encode(examples, max_length, [0] * len(examples))]
        width = max(len(p) for p in prompts)
        pad = tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], dtype=torch.long)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long)
        config = GenerationConfig(
            max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
            eos_token_id=stops or None, pad_token_id=pad,
        )  # fmt: skip
        device = model_device(model)
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
        texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        cut = self.stop.strip(" ")
        return [(t.split(cut, 1)[0] if cut else t).strip() for t in texts]

    def example_metrics(
        self, model: nn.Module, examples: Sequence[Example], tokenizer: Any, max_length: int
    ) -> dict[str, torch.Tensor]:
        batch = move_batch(self.collate(examples, tokenizer, max_length), model_device(model))
        losses = self.per_example_loss(model, batch)
        answers = self.generate(model, examples, tokenizer, max_length)
        f1 = [best_f1(a, e.answers) for a, e in zip(answers, examples)]
        em = [best_exact_match(a, e.answers) for a, e in zip(answers, examples)]
        return {"f1": torch.tensor(f1), "exact_match": torch.tensor(em), "loss": losses.float().cpu()}
