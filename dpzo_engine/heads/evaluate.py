"""Evaluation: the head's metrics averaged over a split, in eval mode, without gradients."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from ..data import Example
from .base import LossHead


def evaluate(
    model: nn.Module,
    head: LossHead,
    examples: Sequence[Example],
    tokenizer: Any,
    batch_size: int = 64,
    max_length: int = 128,
    progress: str | None = None,
) -> dict[str, float | int]:
    """Mean of each of ``head.metric_names`` (accuracy and loss; F1, exact match and loss for
    generation) over ``examples``, plus ``n``. An empty list gives NaN metrics.

    Examples are batched by length (metrics do not depend on batch composition, so this only
    saves padding). ``progress`` names a progress bar on stderr (examples done, rate, ETA): an
    evaluation of a large model or a generation task takes minutes; None shows none.
    """
    if not examples:
        return {**dict.fromkeys(head.metric_names, math.nan), "n": 0}
    was_training = model.training
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].text) + len(examples[i].text_pair or ""))
    sums = dict.fromkeys(head.metric_names, 0.0)
    # leave=None: the bar stays when it is the only one, and vanishes when nested under the training bar
    bar = tqdm(total=len(order), desc=progress, unit="ex", leave=None, disable=progress is None)
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                chunk = [examples[i] for i in order[start : start + batch_size]]
                values = head.example_metrics(model, chunk, tokenizer, max_length)
                for name in sums:
                    sums[name] += values[name].double().sum().item()
                bar.update(len(chunk))
    finally:
        bar.close()
        model.train(was_training)
    n = len(examples)
    return {**{name: total / n for name, total in sums.items()}, "n": n}
