"""The zeroth-order estimator and update rules on small problems.

The reference backend, except in the 150-step training loops: they run on ``auto`` (the C++
kernels, bit-identical to the reference and ~100x faster per pass on these tiny buffers).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dpzo_engine import ops
from dpzo_engine.core import stream
from dpzo_engine.core.flat import FlatParams
from dpzo_engine.privacy import GaussianMechanism, SecretGenerator
from dpzo_engine.zo.engine import ZOEngine
from dpzo_engine.zo.rules import MeZORule, PrivateRule


def regression_problem(d: int = 8, n: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g)
    w_true = torch.randn(d, generator=g)
    y = X @ w_true
    model = nn.Linear(d, 1, bias=False)
    nn.init.zeros_(model.weight)

    def per_example_loss() -> torch.Tensor:
        return (model(X).squeeze(1) - y) ** 2

    return model, per_example_loss


@pytest.mark.parametrize(("difference", "forwards", "passes", "values"), [("central", 8, 9, 15), ("forward", 5, 5, 11)])
def test_pass_forward_and_direction_value_counts(difference, forwards, passes, values):
    model, loss = regression_problem()
    engine = ZOEngine(FlatParams(model), backend="reference", difference=difference)
    seeds = stream.step_seeds(0, 0, 4)
    D = engine.estimate(loss, seeds, 1e-3)
    engine.finish(seeds, 1e-3, [0.1, -0.2, 0.3, -0.4])
    assert D.shape == (64, 4)
    assert engine.counter.forwards == forwards  # central 2K, forward K+1
    assert engine.counter.passes == passes  # central 2K+1, forward K+1
    # direction values generated per weight: central 4K - 1, forward 3K - 1 (the last direction's
    # restore and update share one generation in the final pass)
    assert engine.counter.direction_values == values * model.weight.numel()


def test_final_pass_generates_each_direction_once():
    """The restore of z_K and its update coefficient are one term: J = K in the last pass, and a
    direction whose coefficient is 0 is not generated (it would add ±0 to d, which is never -0)."""
    model, _ = regression_problem()
    engine = ZOEngine(FlatParams(model), backend="reference")
    seeds = stream.step_seeds(0, 0, 3)
    engine.finish(seeds, 1e-3, [0.5, 0.0, -0.25])
    assert engine.counter.passes == 1 and engine.counter.direction_values == 2 * model.weight.numel()
    expected = torch.zeros(8)
    ops.apply_directions(
        expected, torch.tensor([seeds[0], seeds[2]]), torch.tensor([0.5, -0.25 + 1e-3]), backend="reference"
    )
    assert torch.equal(model.weight.detach().flatten(), expected)


@pytest.mark.parametrize("difference", ["central", "forward"])
def test_estimate_matches_directional_derivative(difference):
    model, loss = regression_problem()
    flat = FlatParams(model)
    w0 = model.weight.detach().clone()
    engine = ZOEngine(flat, backend="reference", difference=difference)
    seeds = stream.step_seeds(3, 0, 2)
    D = engine.estimate(loss, seeds, 1e-3)
    engine.finish(seeds, 1e-3, [0.0, 0.0])
    assert torch.allclose(model.weight, w0, atol=1e-6)  # restored (fp32 rounding only)
    model.weight.data.copy_(w0)
    model.weight.requires_grad_(True)
    for k, s in enumerate(seeds):
        model.zero_grad()
        losses = loss()
        grads = torch.stack([torch.autograd.grad(li, model.weight, retain_graph=True)[0].flatten() for li in losses])
        z = ops.directions(s, 0, w0.numel())
        exact = grads @ z
        tol = 2e-2 if difference == "central" else 5e-2  # O(λ²) vs O(λ) truncation, fp32 losses
        assert torch.allclose(D[:, k], exact, rtol=tol, atol=tol * exact.abs().mean().item())


def test_empty_batch_runs_the_same_passes():
    model, _ = regression_problem()
    engine = ZOEngine(FlatParams(model), backend="reference")
    seeds = stream.step_seeds(0, 0, 3)
    D = engine.estimate(None, seeds, 1e-3)
    assert D.shape == (0, 3)
    assert engine.counter.passes == 6 and engine.counter.forwards == 0


def run_steps(rule_factory, steps: int, k: int, lr: float, seed: int = 0):
    model, loss = regression_problem()
    engine = ZOEngine(FlatParams(model), backend="auto")
    rule = rule_factory()
    history = []
    for t in range(steps):
        seeds = stream.step_seeds(seed, t, k)
        D = engine.estimate(loss, seeds, 1e-3)
        released = rule(D)
        coefs = (-lr * released.grad).float().tolist()
        engine.finish(seeds, 1e-3, coefs)
        history.append(loss().mean().item())
    return model, history


def test_mezo_loss_falls():
    _, history = run_steps(MeZORule, steps=150, k=4, lr=0.05)
    assert history[-1] < 0.1 * history[0]


def test_dp_aggzo_loss_falls_with_noise():
    def rule():
        gen = SecretGenerator(bytes([1]) * 32)
        return PrivateRule(GaussianMechanism(0.5, 50.0, 4, "joint", generator=gen), expected_batch_size=64)

    _, history = run_steps(rule, steps=150, k=4, lr=0.05)
    assert history[-1] < 0.3 * history[0]


def test_dp_aggzo_k1_equals_dpzero():
    """DP-AggZO with K = 1 is DPZero: same seeds and noise give identical weights."""

    def rule():
        return PrivateRule(GaussianMechanism(1.0, 2.0, 1, "joint", generator=SecretGenerator(bytes([5]) * 32)), 64)

    a, _ = run_steps(rule, steps=20, k=1, lr=0.01)
    b, _ = run_steps(rule, steps=20, k=1, lr=0.01)
    assert torch.equal(a.weight, b.weight)
    # and the clipped K=1 vector is the scalar clip of DPZero
    D = torch.tensor([[3.0], [-0.5], [float("nan")], [-7.0]])
    r = ops.clip_aggregate(D, 2.0, scale=1.0, backend="reference")
    assert r.sums.item() == pytest.approx(2.0 - 0.5 - 2.0)


def test_per_direction_mechanism_has_sqrt_k_sensitivity():
    m = GaussianMechanism(1.0, 2.0, 16, "per_direction", generator=SecretGenerator(bytes(32)))
    assert m.sensitivity == pytest.approx(2.0 * math.sqrt(16))
    j = GaussianMechanism(1.0, 2.0, 16, "joint", generator=SecretGenerator(bytes(32)))
    assert j.sensitivity == pytest.approx(2.0)


# ---------------------------------------------------------------------------- direction cache
def two_buffer_model() -> nn.Module:
    """An fp32 and a bf16 buffer, the second larger than the partial cache below reaches."""
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(40, 30), nn.Linear(30, 300).to(torch.bfloat16))


def steps_with_cache(cache_bytes: int, difference: str, K: int, backend: str, steps: int = 3):
    model = two_buffer_model()
    x = torch.randn(16, 40, generator=torch.Generator().manual_seed(1))

    def loss() -> torch.Tensor:
        h = model[0](x)
        return model[1](h.to(torch.bfloat16)).float().pow(2).mean(dim=1)

    engine = ZOEngine(FlatParams(model), backend=backend, difference=difference, cache_bytes=cache_bytes)
    Ds = []
    for step in range(steps):
        seeds = stream.step_seeds(11, step, K)
        D = engine.estimate(loss, seeds, 1e-2)
        engine.finish(seeds, 1e-2, [1e-3 * (k + 1) * (-1) ** k for k in range(K)], "stochastic", rounding_seed=step)
        Ds.append(D)
    return engine, [b.clone() for b in engine.flat.buffers], torch.stack(Ds)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("difference", ["central", "forward"])
@pytest.mark.parametrize("K", [1, 2, 5])
def test_direction_cache_changes_no_bit(backend, difference, K):
    """Steps with the cache over everything, over part of the first buffer, and without: the same D and θ
    bits; the cache cuts the generated values per weight from 4K - 1 (3K - 1) to 2K - 1."""
    if backend == "cpu":
        pytest.importorskip("dpzo_engine.ops.cpu_backend").ensure_available()
    plain, theta, D = steps_with_cache(0, difference, K, backend)
    weights = sum(b.numel() for b in plain.flat.buffers)
    for cache_bytes in (4 * weights, 4 * 700, 1):
        cached, theta_c, D_c = steps_with_cache(cache_bytes, difference, K, backend)
        assert torch.equal(D_c, D)
        for a, b in zip(theta_c, theta):
            assert torch.equal(a.view(torch.int16 if a.dtype == torch.bfloat16 else torch.int32),
                               b.view(torch.int16 if b.dtype == torch.bfloat16 else torch.int32))  # fmt: skip
        assert cached.cache_nbytes == 4 * min(weights, cache_bytes // 4)
    full = steps_with_cache(4 * weights, difference, K, backend)[0]
    per_weight_step = full.counter.direction_values / (3 * weights)
    assert per_weight_step == 2 * K - 1
    assert plain.counter.direction_values / (3 * weights) == (4 if difference == "central" else 3) * K - 1


def test_direction_cache_refuses_what_it_cannot_serve():
    model = two_buffer_model()
    with pytest.raises(ValueError, match="Gaussian directions on the C\\+\\+ CPU backend"):
        ZOEngine(FlatParams(model), kind="rademacher", backend="reference", cache_bytes=1000)
    with pytest.raises(ValueError, match=">= 0"):
        ZOEngine(FlatParams(model), backend="reference", cache_bytes=-1)


@pytest.mark.parametrize("parts", [False, True])
def test_direction_cache_under_dp_zopo_masks(parts):
    """A packed mask (DP-ZOPO) is applied after the cached values as after generated ones; rank bins (one sweep
    per bin) run uncached. Same θ bits either way."""
    pytest.importorskip("dpzo_engine.ops.cpu_backend").ensure_available()
    results = []
    for cache_bytes in (0, 10**6):
        model = two_buffer_model()
        flat = FlatParams(model)
        gen = torch.Generator().manual_seed(4)
        masks = []
        for buf in flat.buffers:
            keep = torch.rand(buf.numel(), generator=gen) < 0.5
            if parts:
                half = torch.rand(buf.numel(), generator=gen) < 0.5
                masks.append([(ops.pack_mask(keep & half), 1.2), (ops.pack_mask(keep & ~half), 0.8)])
            else:
                masks.append(ops.pack_mask(keep))
        engine = ZOEngine(flat, backend="auto", masks=masks, cache_bytes=cache_bytes)  # C++: loads the cache
        x = torch.randn(4, 40, generator=gen)
        seeds = stream.step_seeds(2, 0, 3)
        D = engine.estimate(lambda m=model, x=x: m[1](m[0](x).to(torch.bfloat16)).float().sum(dim=1), seeds, 1e-2)
        engine.finish(seeds, 1e-2, [1e-3, -2e-3, 3e-3], "stochastic", rounding_seed=1)
        results.append((D, [b.clone() for b in flat.buffers]))
    (D0, theta0), (D1, theta1) = results
    assert torch.equal(D0, D1)
    assert all(torch.equal(a.float(), b.float()) for a, b in zip(theta0, theta1))
