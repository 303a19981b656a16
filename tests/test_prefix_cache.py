"""The frozen-prefix cache is exact: cached and uncached ZO estimates agree bit for bit."""

from __future__ import annotations

import pytest
import torch

from dpzo_engine.core import stream
from dpzo_engine.core.flat import FlatParams
from dpzo_engine.heads import SequenceClassificationHead
from dpzo_engine.models.loading import build_random_model, random_batch, select_trainable
from dpzo_engine.models.prefix_cache import cached_prefix, frozen_prefix_length
from dpzo_engine.zo.engine import ZOEngine

ARCHS = ["bert", "roberta", "opt", "llama"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(("spec", "expected"), [("head", 2), ("last:1", 1), ("all", 0), ("embeddings", 0)])
def test_prefix_length_follows_the_first_trainable_block(arch, spec, expected):
    model = build_random_model(arch, "tiny", seed=0)  # tiny configs have 2 blocks
    select_trainable(model, spec)
    assert frozen_prefix_length(model) == expected


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("spec", ["head", "last:1"])
def test_cached_estimates_equal_uncached(arch, spec):
    """D from a cached step equals D from an uncached step on the same starting weights."""
    head = SequenceClassificationHead()

    def run(cache: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model = build_random_model(arch, "tiny", seed=0)
        select_trainable(model, spec)
        flat = FlatParams(model)
        engine = ZOEngine(flat, backend="reference")
        batch = random_batch(model, 5, 10, seed=3)
        seeds = stream.step_seeds(7, 0, 3)
        length = frozen_prefix_length(model) if cache else 0
        with torch.no_grad(), cached_prefix(model, length):
            D = engine.estimate(lambda: head.per_example_loss(model, batch), seeds, 1e-2)
            engine.finish(seeds, 1e-2, [0.1, -0.2, 0.3])
        return D, flat.buffers

    D_cached, buf_cached = run(True)
    D_plain, buf_plain = run(False)
    assert torch.equal(D_cached, D_plain)
    assert all(torch.equal(a, b) for a, b in zip(buf_cached, buf_plain))


def test_cache_is_dropped_when_the_block_ends():
    model = build_random_model("bert", "tiny", seed=0)
    select_trainable(model, "head")
    head = SequenceClassificationHead()
    with torch.no_grad():
        with cached_prefix(model, frozen_prefix_length(model)):
            head.per_example_loss(model, random_batch(model, 3, 8, seed=1))
        other = random_batch(model, 3, 8, seed=2)  # a new batch after the step sees its own activations
        with cached_prefix(model, frozen_prefix_length(model)):
            inside = head.per_example_loss(model, other)
        assert torch.equal(inside, head.per_example_loss(model, other))
    assert all("forward" not in vars(m) for m in model.modules())
