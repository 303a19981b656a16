"""Run the frozen bottom of a model once per step, not 2K times.

A ZO step evaluates the same batch 2K (or K+1) times under different perturbations of the
trainable parameters. Transformer blocks below the first trainable one (with frozen
embeddings) see the same input in every one of those forwards, so their output is the same:
computing it once and replaying it is exact, not an approximation. With ``--trainable head``
or ``last:N`` this makes a forward cost only the top of the network, so many directions fit
in a CPU budget.

Rule (``frozen_prefix_length``): blocks ``0 .. j-1`` of the transformer layer stack are
cached when no embedding parameter is trainable and block ``j`` is the first block holding
a trainable parameter (``j`` = all blocks when only the head and final norms train). Inside
``cached_prefix`` the first forward runs normally and keeps block ``j-1``'s output (one
activation tensor); later forwards get it back from every cached block without computing.
"""

from __future__ import annotations

from contextlib import contextmanager

from torch import nn

from .loading import ModelError, _layer_stack, parameter_groups


def _blocks(model: nn.Module) -> list[nn.Module]:
    name, _ = _layer_stack(model)
    return list(model.get_submodule(name))


def frozen_prefix_length(model: nn.Module) -> int:
    """How many leading transformer blocks can be cached for a step (0: caching is not safe)."""
    try:
        groups = parameter_groups(model)
    except ModelError:  # no layer stack: nothing to cache
        return 0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if trainable & groups["embeddings"]:
        return 0
    blocks = sorted((g for g in groups if g.startswith("layer.")), key=lambda g: int(g.split(".")[1]))
    for i, g in enumerate(blocks):
        if trainable & groups[g]:
            return i
    return len(blocks)


@contextmanager
def cached_prefix(model: nn.Module, length: int):
    """Within the block, forwards after the first reuse the output of blocks ``0 .. length-1``.

    The caller guarantees that every forward inside sees the same batch (one ZO step).
    """
    if length <= 0:
        yield
        return
    blocks = _blocks(model)[:length]
    cached: list = []

    def memoized(block: nn.Module, keep: bool):
        def forward(*args, **kwargs):
            if cached:
                return cached[0]
            out = type(block).forward(block, *args, **kwargs)
            if keep:
                cached.append(out)
            return out

        return forward

    for i, block in enumerate(blocks):
        block.forward = memoized(block, keep=i == length - 1)  # instance attribute shadows the method
    try:
        yield
    finally:
        for block in blocks:
            del block.forward
