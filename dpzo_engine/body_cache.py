"""Run a frozen model body once per step when only the task head trains.

A ZO step evaluates the same batch 2K (or K+1) times under different perturbations.
If every trainable parameter lies outside ``model.base_model`` (e.g. only BERT's
``classifier`` or OPT's ``score`` trains), the body's output is identical in all of
them: computing it once and replaying it makes K nearly free, so many directions fit
in a CPU budget.  This is exact (same function, same values), not an approximation.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

from torch import nn


def body_is_frozen(model: nn.Module) -> bool:
    body = getattr(model, "base_model", None)
    if body is None or body is model:
        return False
    return not any(p.requires_grad for p in body.parameters())


@contextmanager
def cached_body(model: nn.Module, enabled: bool = True):
    """Within the block, the first call of ``model.base_model`` runs; later calls (with the
    same batch, which the caller guarantees) return its output again."""
    if not enabled or not body_is_frozen(model):
        yield
        return
    body = model.base_model
    cache: list[Any] = []

    def forward(*args, **kwargs):
        if not cache:
            cache.append(type(body).forward(body, *args, **kwargs))
        return cache[0]

    body.forward = forward  # instance attribute shadows the class method
    try:
        yield
    finally:
        del body.forward
