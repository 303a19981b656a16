"""The loss-head contract: examples → a batch → one per-example loss vector from one batched forward.

DP needs a loss per example (``reduction='none'``) that does not depend on the other members of
the batch (padding is masked out), and ZO needs it from a plain forward. Heads never switch
gradients off themselves: ZO callers wrap them in ``torch.no_grad``, DP-AdamW backpropagates
through them. Classification heads share one method, ``class_scores`` ([B, C] logits), from
which loss and prediction follow.

Batch contract: every tensor's first dimension is the example (so a batch can be split into
micro-batches by slicing), and ``labels`` [B] holds class indices (-1 for generation).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import UserError
from ..data import Example
from ..models.inputs import static_inputs

Batch = dict[str, Any]  # tensors, plus non-tensor extras (gold answers) that stay on the host
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


class HeadError(UserError):
    """A head that cannot serve this task, tokenizer or model (missing prompt, multi-token label word, ...)."""


def model_inputs(batch: Batch) -> dict[str, torch.Tensor]:
    """The keys of ``batch`` that go to the model's forward (labels and head extras stay out)."""
    return {k: v for k, v in batch.items() if k in MODEL_INPUTS}


def move_batch(batch: Batch, device: torch.device | str) -> Batch:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


class LossHead(ABC):
    """How a task turns a model's forward into per-example losses and evaluation metrics."""

    name: str = ""
    metric_names: tuple[str, ...] = ("accuracy", "loss")
    primary_metric: str = "accuracy"  # what summaries report (generation heads: F1)

    @abstractmethod
    def collate(self, examples: Sequence[Example], tokenizer: Any, max_length: int) -> Batch:
        """Tokenize, truncate to ``max_length`` and right-pad; ``labels`` holds the class indices."""

    def prepare(self, model: nn.Module, batch: Batch) -> Batch:
        """``batch`` with what all forwards of a step share built once (the model's attention mask and
        position ids: ``models.inputs``). ``per_example_loss`` takes either form and gives the same losses."""
        return static_inputs(model, batch)

    def read_positions(self, model: nn.Module, batch: Batch) -> torch.Tensor | None:
        """Positions [B, P] of the final hidden states the loss reads (None: not known, or all). A ZO step
        computes the last block there only (``models.last_block``)."""
        return None

    @abstractmethod
    def per_example_loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """fp32 loss of each example, shape [B], from one batched forward."""

    @abstractmethod
    def example_metrics(
        self, model: nn.Module, examples: Sequence[Example], tokenizer: Any, max_length: int
    ) -> dict[str, torch.Tensor]:
        """Per-example values [B] of each of ``metric_names`` (``evaluate`` averages them)."""


class ClassificationHead(LossHead):
    """Cross-entropy over per-class scores; subclasses say how to score the classes."""

    @abstractmethod
    def class_scores(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """fp32 score of every class, shape [B, C]."""

    def per_example_loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(self.class_scores(model, batch), batch["labels"], reduction="none")

    def predict(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Predicted class of each example, int64 shape [B]."""
        return self.class_scores(model, batch).argmax(dim=-1)

    def loss_and_predict(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Both from one forward (evaluation)."""
        scores = self.class_scores(model, batch)
        return F.cross_entropy(scores, batch["labels"], reduction="none"), scores.argmax(dim=-1)

    def example_metrics(
        self, model: nn.Module, examples: Sequence[Example], tokenizer: Any, max_length: int
    ) -> dict[str, torch.Tensor]:
        batch = move_batch(self.collate(examples, tokenizer, max_length), model_device(model))
        losses, preds = self.loss_and_predict(model, batch)
        return {"accuracy": (preds == batch["labels"]).float(), "loss": losses.float()}


def count_at_length(
    head: LossHead, examples: Sequence[Example], tokenizer: Any, max_length: int, chunk: int = 256
) -> int:
    """How many examples fill all ``max_length`` tokens once collated: truncated, or exactly that long.

    Tokenizes only (no forward). A count over private data: a local diagnostic, not released."""
    full = 0
    for start in range(0, len(examples), chunk):
        mask = head.collate(examples[start : start + chunk], tokenizer, max_length)["attention_mask"]
        lengths = mask.reshape(mask.shape[0], -1, mask.shape[-1]).sum(-1).amax(-1)  # causal prompt: [B, C, L]
        full += int((lengths >= max_length).sum())
    return full


def labels_tensor(examples: Sequence[Example]) -> torch.Tensor:
    return torch.tensor([e.label for e in examples], dtype=torch.long)


def check_nonempty(examples: Sequence[Example]) -> None:
    if not examples:
        raise ValueError("cannot collate an empty batch (the trainer skips empty Poisson batches)")


def right_pad(rows: Sequence[Sequence[int]], pad_id: int, multiple_of: int | None = None) -> tuple[torch.Tensor, ...]:
    """(input_ids, attention_mask) of token rows, right-padded to the longest (rounded up to ``multiple_of``)."""
    width = max(len(r) for r in rows)
    if multiple_of:
        width = -(-width // multiple_of) * multiple_of
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask
