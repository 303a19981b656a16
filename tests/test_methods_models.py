"""Every method for a few steps on tiny random-init BERT, RoBERTa, OPT and Llama models."""

from __future__ import annotations

import math

import pytest
import torch

from dpzo_engine.core import stream
from dpzo_engine.core.flat import FlatParams
from dpzo_engine.heads import SequenceClassificationHead
from dpzo_engine.models.loading import build_random_model, random_batch
from dpzo_engine.privacy import GaussianMechanism, SecretGenerator
from dpzo_engine.zo.engine import ZOEngine
from dpzo_engine.zo.rules import MeZORule, PrivateRule

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only add contention


def make_rule(method: str, k: int):
    gen = SecretGenerator(bytes(32))  # a fixed test key
    if method == "mezo":
        return MeZORule()
    mode = "per_direction" if method == "dp-aggzo-perdir" else "joint"
    return PrivateRule(GaussianMechanism(1.0, 1.0, k, mode, generator=gen), expected_batch_size=4.0)


@pytest.mark.parametrize("arch", ["bert", "roberta", "opt", "llama"])
@pytest.mark.parametrize(
    ("method", "k", "difference"),
    [("mezo", 2, "central"), ("dpzero", 1, "central"), ("dp-aggzo", 3, "forward"), ("dp-aggzo-perdir", 2, "central")],
)
def test_methods_run_on_tiny_models(arch, method, k, difference):
    model = build_random_model(arch, "tiny", num_labels=2, seed=0)
    flat = FlatParams(model)
    before = flat.clone_buffers()
    engine = ZOEngine(flat, backend="auto", difference=difference)
    head = SequenceClassificationHead()
    batch = random_batch(model, 4, 12, seed=1)
    rule = make_rule(method, k)
    with torch.no_grad():
        for t in range(3):
            seeds = stream.step_seeds(0, t, k)
            D = engine.estimate(lambda: head.per_example_loss(model, batch), seeds, 1e-3)
            released = rule(D)
            assert D.shape == (4, k) and torch.isfinite(D).all()
            assert released.grad.shape == (k,) and torch.isfinite(released.grad).all()
            engine.finish(seeds, 1e-3, (-1e-3 * released.grad).float().tolist())
        assert math.isfinite(head.per_example_loss(model, batch).mean().item())
    assert any(not torch.equal(a, b) for a, b in zip(before, flat.buffers))
    forwards = {"central": 2 * k, "forward": k + 1}[difference]
    assert engine.counter.forwards == 3 * forwards
