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
    generation) over ``examples``, plus ``n``. An empty list gives NaN metrics."""
    sums, n = metric_sums(model, head, examples, tokenizer, batch_size, max_length, progress=progress)
    return {**{name: (total / n if n else math.nan) for name, total in sums.items()}, "n": n}


def metric_sums(
    model: nn.Module,
    head: LossHead,
    examples: Sequence[Example],
    tokenizer: Any,
    batch_size: int = 64,
    max_length: int = 128,
    part: tuple[int, int] = (0, 1),
    progress: str | None = None,
) -> tuple[dict[str, float], int]:
    """Sums of each of ``head.metric_names`` over ``examples`` and how many were evaluated.

    ``part = (i, m)`` evaluates only the i-th of m interleaved parts (scale-out: each rank one part,
    the sums then added), so every part gets examples of every length. Examples are batched by
    length (metrics do not depend on batch composition, so this only saves padding). ``progress``
    names a progress bar on stderr (examples done, rate, ETA): an evaluation of a large model or a
    generation task takes minutes; None shows none.
    """
    index, parts = part
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].text) + len(examples[i].text_pair or ""))
    order = order[index::parts]
    sums = dict.fromkeys(head.metric_names, 0.0)
    if not order:
        return sums, 0
    was_training = model.training
    model.eval()
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
    return sums, len(order)
