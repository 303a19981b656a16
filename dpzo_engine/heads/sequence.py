"""Sequence classification: the model's own classifier (``AutoModelForSequenceClassification``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..data import Example
from .base import MODEL_INPUTS, Batch, ClassificationHead, check_nonempty, labels_tensor, model_inputs

ENCODER_FIRST_TOKEN = ("bert", "roberta", "xlm-roberta")  # their classifiers read the first token only


class SequenceClassificationHead(ClassificationHead):
    """``AutoModelForSequenceClassification`` logits. Right padding with the pad id in the
    padded positions: encoders mask it out, and decoder classifiers (OPT, Llama) read the
    logits at each row's last non-pad token, so no row sees another row's length."""

    name = "sequence-classification"

    def __init__(self, pad_to_multiple_of: int | None = None):
        self.pad_to_multiple_of = pad_to_multiple_of  # 8 helps tensor cores on GPU

    def collate(self, examples: Sequence[Example], tokenizer: Any, max_length: int) -> Batch:
        check_nonempty(examples)
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
        batch: Batch = {k: v for k, v in enc.items() if k in MODEL_INPUTS}
        batch["labels"] = labels_tensor(examples)
        return batch

    def read_positions(self, model: nn.Module, batch: Batch) -> torch.Tensor | None:
        """Encoders classify from the first token ([CLS], <s>: RoBERTa's head and BERT's pooler read it);
        decoders from each row's last token, found inside the model: left whole."""
        if getattr(model.config, "is_decoder", False) or model.config.model_type not in ENCODER_FIRST_TOKEN:
            return None
        return torch.zeros(batch["input_ids"].shape[0], 1, dtype=torch.long, device=batch["input_ids"].device)

    def class_scores(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return model(**model_inputs(batch)).logits.float()
