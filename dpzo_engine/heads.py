"""Loss heads: examples → batches → one per-example loss vector from one batched forward.

DP needs a loss per example (``reduction='none'``) that does not depend on the other members of
the batch (padding is masked out), and ZO needs it from a plain forward. Heads never switch
gradients off themselves: ZO callers wrap them in ``torch.no_grad``, DP-AdamW backpropagates
through them. Classification heads share one method, ``class_scores`` ([B, C] logits), from
which loss and prediction follow; the prompt heads to come (masked-LM verbalizer, causal-LM
candidate log-likelihood) only have to provide ``collate`` and ``class_scores``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .data import Example

Batch = dict[str, torch.Tensor]
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


def model_inputs(batch: Batch) -> dict[str, torch.Tensor]:
    """The keys of ``batch`` that go to the model's forward (labels and head extras stay out)."""
    return {k: v for k, v in batch.items() if k in MODEL_INPUTS}


def move_batch(batch: Batch, device: torch.device | str) -> Batch:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


class LossHead(ABC):
    """How a task turns a model's forward into per-example losses and predictions."""

    name: str = ""

    @abstractmethod
    def collate(self, examples: Sequence[Example], tokenizer: Any, max_length: int) -> Batch:
        """Tokenize, truncate to ``max_length`` and right-pad; ``labels`` holds the class indices."""

    @abstractmethod
    def per_example_loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """fp32 loss of each example, shape [B], from one batched forward."""

    @abstractmethod
    def predict(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Predicted class of each example, int64 shape [B]."""

    def loss_and_predict(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Both at once (evaluation); heads that can share the forward override this."""
        return self.per_example_loss(model, batch), self.predict(model, batch)


class ClassificationHead(LossHead):
    """Cross-entropy over per-class scores; subclasses say how to score the classes."""

    @abstractmethod
    def class_scores(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """fp32 score of every class, shape [B, C]."""

    def per_example_loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(self.class_scores(model, batch), batch["labels"], reduction="none")

    def predict(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return self.class_scores(model, batch).argmax(dim=-1)

    def loss_and_predict(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.class_scores(model, batch)
        return F.cross_entropy(scores, batch["labels"], reduction="none"), scores.argmax(dim=-1)


class SequenceClassificationHead(ClassificationHead):
    """``AutoModelForSequenceClassification`` logits. Right padding with the pad id in the
    padded positions: encoders mask it out, and decoder classifiers (OPT, Llama) read the
    logits at each row's last non-pad token, so no row sees another row's length."""

    name = "sequence-classification"

    def __init__(self, pad_to_multiple_of: int | None = None):
        self.pad_to_multiple_of = pad_to_multiple_of  # 8 helps tensor cores on GPU

    def collate(self, examples: Sequence[Example], tokenizer: Any, max_length: int) -> Batch:
        if not examples:
            raise ValueError("cannot collate an empty batch (the trainer skips empty Poisson batches)")
        texts = [e.text for e in examples]
        pairs = [e.text_pair for e in examples]
        has_pair = [p is not None for p in pairs]
        if any(has_pair) and not all(has_pair):
            raise ValueError("a batch mixes single texts and text pairs")
        enc = tokenizer(
            texts,
            pairs if all(has_pair) else None,
            padding=True,
            truncation=True,
            max_length=max_length,
            pad_to_multiple_of=self.pad_to_multiple_of,
            padding_side="right",
            return_tensors="pt",
        )
        batch = {k: v for k, v in enc.items() if k in MODEL_INPUTS}
        batch["labels"] = torch.tensor([e.label for e in examples], dtype=torch.long)
        return batch

    def class_scores(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return model(**model_inputs(batch)).logits.float()


HEAD_CLASSES: dict[str, type[LossHead]] = {SequenceClassificationHead.name: SequenceClassificationHead}


def get_head(name: str = "sequence-classification", **kwargs: Any) -> LossHead:
    if name not in HEAD_CLASSES:
        raise ValueError(f"unknown loss head '{name}' (available: {', '.join(HEAD_CLASSES)})")
    return HEAD_CLASSES[name](**kwargs)


def evaluate(
    model: nn.Module,
    head: LossHead,
    examples: Sequence[Example],
    tokenizer: Any,
    batch_size: int = 64,
    max_length: int = 128,
) -> dict[str, float | int]:
    """Accuracy and mean loss over ``examples`` in eval mode, without gradients.

    Examples are batched by length (losses do not depend on batch composition, so this only
    saves padding). ``n`` is the number of examples; an empty list gives NaN metrics.
    """
    if not examples:
        return {"accuracy": math.nan, "loss": math.nan, "n": 0}
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].text) + len(examples[i].text_pair or ""))
    loss_sum, correct = 0.0, 0
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                chunk = [examples[i] for i in order[start : start + batch_size]]
                batch = move_batch(head.collate(chunk, tokenizer, max_length), device)
                losses, preds = head.loss_and_predict(model, batch)
                loss_sum += losses.double().sum().item()
                correct += (preds == batch["labels"]).sum().item()
    finally:
        model.train(was_training)
    n = len(examples)
    return {"accuracy": correct / n, "loss": loss_sum / n, "n": n}
