"""The mechanism side of DP: sensitivity of the clipped sums, noise scale, Poisson sampling, secret RNG.

(The exact samplers and the CSPRNG themselves are tested in test_secure_noise.py.)

Statistical checks use stated bounds (5 standard errors), so a correct implementation
fails them with probability < 1e-6 each; the fixed debug seeds make them deterministic.
"""

import math
import warnings

import pytest
import torch

from dpzo_engine import ops
from dpzo_engine.privacy import (
    GaussianMechanism,
    NotPrivateWarning,
    PoissonSampler,
    PrivacyError,
    SecretGenerator,
    count_epsilon,
    expected_batch_size,
    get_secret_state,
    laplace_count,
    secret_generator,
    set_secret_state,
)


def debug_generator(seed: int) -> SecretGenerator:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotPrivateWarning)
        return secret_generator(seed)


def clipped_sums(D: torch.Tensor, clip: float, mode: str) -> torch.Tensor:
    K = D.shape[1]
    return ops.clip_aggregate(D, clip, scale=1.0 / K, mode=mode, backend="reference").sums


def extra_rows(K: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Rows an adversary might add: ordinary, huge (1e30), tiny, NaN, inf, single spike."""
    rows = [torch.randn(K, generator=gen) * s for s in (0.01, 1.0, 100.0)]
    rows.append(torch.full((K,), 1e30))
    rows.append(torch.full((K,), -1e30) * torch.sign(torch.randn(K, generator=gen)))
    spike = torch.zeros(K)
    spike[0] = 3e38
    rows.append(spike)
    nan = torch.randn(K, generator=gen)
    nan[K // 2] = float("nan")
    rows.append(nan)
    rows.append(torch.full((K,), float("inf")))
    return rows


# --------------------------------------------------------------------------- sensitivity
@pytest.mark.parametrize("K", [1, 4, 64])
@pytest.mark.parametrize("mode", ["joint", "per_direction"])
def test_adding_one_example_moves_the_sum_by_at_most_the_sensitivity(K, mode):
    gen = torch.Generator().manual_seed(K)
    clip = 0.7
    mech = GaussianMechanism(1.0, clip, K, mode, generator=debug_generator(0))
    bound = clip if mode == "joint" else clip * math.sqrt(K)
    assert mech.sensitivity == pytest.approx(bound)
    worst = 0.0
    for B in (0, 1, 7, 33):
        D = torch.randn(B, K, generator=gen) * 50
        if B > 3:
            D[1] = 1e30  # the batch itself may hold huge and NaN rows
            D[2, 0] = float("nan")
        base = clipped_sums(D, clip, mode)
        for row in extra_rows(K, gen):
            moved = clipped_sums(torch.cat([D, row[None]]), clip, mode)
            shift = float(torch.linalg.vector_norm(moved - base))
            assert shift <= bound * (1 + 1e-9), (B, row[:3], shift, bound)
            worst = max(worst, shift)
    # the bound is attained (by a huge row), so per-direction clipping really needs C·sqrt(K)
    assert worst == pytest.approx(bound, rel=1e-6)


def test_removing_one_example_moves_the_sum_by_at_most_C():
    gen = torch.Generator().manual_seed(1)
    D = torch.randn(40, 16, generator=gen) * torch.logspace(-3, 30, 40)[:, None]
    full = clipped_sums(D, 1.0, "joint")
    for i in range(D.shape[0]):
        rest = clipped_sums(torch.cat([D[:i], D[i + 1 :]]), 1.0, "joint")
        assert float(torch.linalg.vector_norm(full - rest)) <= 1.0 + 1e-9


# --------------------------------------------------------------------------- noise
def test_noise_std_matches_sigma_times_C():
    sigma, clip, n = 1.3, 0.7, 20000
    mech = GaussianMechanism(sigma, clip, n, "joint", generator=debug_generator(2))
    noise = mech.privatize(torch.zeros(n, dtype=torch.float64))
    assert noise.dtype == torch.float64
    target = sigma * clip
    # std of the sample std is ~ s / sqrt(2n); the mean's is s / sqrt(n). 5 standard errors each.
    assert abs(float(noise.std()) - target) <= 5 * target / math.sqrt(2 * n)
    assert abs(float(noise.mean())) <= 5 * target / math.sqrt(n)


def test_per_direction_noise_std_is_sigma_C_sqrt_K():
    sigma, clip, K, rounds = 0.8, 2.0, 16, 1500
    mech = GaussianMechanism(sigma, clip, K, "per_direction", generator=debug_generator(3))
    assert mech.noise_std == pytest.approx(sigma * clip * 4.0)
    sums = torch.arange(K, dtype=torch.float64)
    noise = torch.stack([mech.privatize(sums) - sums for _ in range(rounds)]).flatten()
    n = noise.numel()
    assert abs(float(noise.std()) - mech.noise_std) <= 5 * mech.noise_std / math.sqrt(2 * n)


def test_privatize_rejects_bad_sums():
    mech = GaussianMechanism(1.0, 1.0, 3, generator=debug_generator(4))
    with pytest.raises(PrivacyError):
        mech.privatize(torch.zeros(4, dtype=torch.float64))
    with pytest.raises(PrivacyError):
        mech.privatize(torch.tensor([0.0, float("nan"), 1.0], dtype=torch.float64))


def test_normalize_uses_the_expected_batch_size():
    mech = GaussianMechanism(1.0, 1.0, 2, generator=debug_generator(5))
    noisy = torch.tensor([3.0, -6.0], dtype=torch.float64)
    q, n = 0.05, 600
    assert expected_batch_size(q, n) == pytest.approx(30.0)
    assert torch.allclose(mech.normalize(noisy, expected_batch_size(q, n)), noisy / 30.0)
    with pytest.raises(PrivacyError):
        mech.normalize(noisy, 0.0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"noise_multiplier": -1.0},
        {"noise_multiplier": float("nan")},
        {"clip": 0.0},
        {"clip": float("inf")},
        {"num_directions": 0},
        {"clip_mode": "sideways"},
        {"generator": None},
    ],
)
def test_mechanism_validation(kwargs):
    args = {"noise_multiplier": 1.0, "clip": 1.0, "num_directions": 2, "clip_mode": "joint"}
    args["generator"] = debug_generator(6)
    args.update(kwargs)
    with pytest.raises(PrivacyError) as info:
        GaussianMechanism(**args)
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)


# --------------------------------------------------------------------------- Poisson sampling
def test_sampling_rate_matches_q():
    n, q, steps = 20000, 0.03, 20
    sampler = PoissonSampler(n, q, debug_generator(7), steps=steps)
    sizes = []
    for idx in sampler:
        assert idx.dtype == torch.int64 and idx.dim() == 1
        assert bool((idx[1:] > idx[:-1]).all()) and int(idx.min()) >= 0 and int(idx.max()) < n
        sizes.append(idx.numel())
    assert len(sizes) == len(sampler) == steps
    total, trials = sum(sizes), n * steps
    # binomial: 5 standard deviations
    assert abs(total - q * trials) <= 5 * math.sqrt(trials * q * (1 - q))
    assert len(set(sizes)) > 1  # batch sizes vary: Poisson, not fixed-size


def test_every_example_is_sampled_independently():
    n, q, steps = 50, 0.2, 2000
    sampler = PoissonSampler(n, q, debug_generator(8))
    counts = torch.zeros(n)
    for _ in range(steps):
        counts[sampler.sample()] += 1
    sd = math.sqrt(steps * q * (1 - q))
    # each index: 5 sd (Bonferroni over 50 indices still leaves ~3e-5 failure odds)
    assert float((counts - q * steps).abs().max()) <= 5 * sd


def test_empty_batches_occur_and_are_handled():
    n, q, K = 10, 1e-3, 3
    gen = debug_generator(9)
    sampler = PoissonSampler(n, q, gen)
    mech = GaussianMechanism(1.0, 1.0, K, generator=gen)
    D = torch.randn(n, K)
    empties = 0
    for _ in range(50):
        idx = sampler.sample()
        if idx.numel() == 0:
            empties += 1
            assert idx.shape == (0,) and idx.dtype == torch.int64
        res = ops.clip_aggregate(D[idx], 1.0, scale=1.0 / K, backend="reference")
        g = mech.normalize(mech.privatize(res.sums), sampler.expected_batch_size)
        assert g.shape == (K,) and bool(torch.isfinite(g).all())
    assert empties >= 40  # P(empty) = 0.999^10 ≈ 0.99


@pytest.mark.parametrize("n, q", [(0, 0.1), (10, 0.0), (10, 1.5), (10, float("nan")), (2.5, 0.1)])
def test_sampler_validation(n, q):
    with pytest.raises(PrivacyError):
        PoissonSampler(n, q, debug_generator(10))


def test_sampler_without_steps_is_not_iterable():
    sampler = PoissonSampler(5, 1.0, debug_generator(11))
    assert sampler.sample().tolist() == [0, 1, 2, 3, 4]  # q = 1 keeps everyone
    with pytest.raises(PrivacyError):
        iter(sampler).__next__()


# --------------------------------------------------------------------------- secret randomness
def run_step(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One step with fixed PUBLIC inputs (data, seeds): only the secret generator differs."""
    public = torch.Generator().manual_seed(1234)
    D = torch.randn(64, 4, generator=public)
    idx = PoissonSampler(64, 0.5, gen).sample()
    res = ops.clip_aggregate(D[idx], 1.0, scale=0.25, backend="reference")
    return idx, GaussianMechanism(1.0, 1.0, 4, generator=gen).privatize(res.sums)


def test_noise_differs_between_runs_with_the_same_public_seeds():
    (idx_a, noisy_a), (idx_b, noisy_b) = run_step(secret_generator()), run_step(secret_generator())
    assert not torch.equal(noisy_a, noisy_b)
    assert not torch.equal(idx_a, idx_b)  # P(equal) = 2^-64


def test_debug_seed_reproduces_and_warns_loudly():
    with pytest.warns(NotPrivateWarning, match="NOT differentially private"):
        g1 = secret_generator(42)
    with pytest.warns(NotPrivateWarning):
        g2 = secret_generator(42)
    a, b = run_step(g1), run_step(g2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(PrivacyError):
        secret_generator("42")


def test_secret_state_round_trip_resumes_the_same_draws():
    g = secret_generator()
    expected = run_step(g)
    resumed = set_secret_state(None, get_secret_state(g))
    got = run_step(resumed)
    assert torch.equal(expected[0], got[0]) and torch.equal(expected[1], got[1])
    with pytest.raises(PrivacyError):
        set_secret_state(None, {"key": "not bytes"})


def test_draws_are_addressed_by_release_not_consumed():
    """Release r draws at address r: seeking there gives its batch and noise again; r + 1 differs."""
    g = debug_generator(21)
    sampler, mech = PoissonSampler(64, 0.5, g), GaussianMechanism(1.0, 1.0, 4, generator=g)
    zeros = torch.zeros(4, dtype=torch.float64)
    first = [(sampler.sample(), mech.privatize(zeros)) for _ in range(3)]
    sampler.seek(1)
    mech.seek(1)
    again = sampler.sample(), mech.privatize(zeros)
    assert torch.equal(again[0], first[1][0]) and torch.equal(again[1], first[1][1])
    assert not torch.equal(first[1][1], first[2][1])
    assert sampler.position == mech.position == 2


def test_a_torch_generator_still_works_but_is_flagged_not_private():
    """Code that passed a torch.Generator (the old API) gets the exact samplers, keyed from it, with a warning."""
    with pytest.warns(NotPrivateWarning, match="NOT private"):
        mech = GaussianMechanism(1.0, 1.0, 2, generator=torch.Generator().manual_seed(3))
    assert mech.generator.reproducible
    noisy = mech.privatize(torch.zeros(2, dtype=torch.float64))
    assert all(math.ldexp(x, -int(math.log2(mech.grid))).is_integer() for x in noisy.tolist())


def test_noise_does_not_depend_on_the_global_torch_seed():
    g1, g2 = debug_generator(5), debug_generator(5)
    torch.manual_seed(0)
    a = run_step(g1)
    torch.manual_seed(999)
    torch.randn(10)
    b = run_step(g2)
    assert torch.equal(a[1], b[1])


# --------------------------------------------------------------------------- noisy count
def test_laplace_count_is_a_discrete_laplace_with_parameter_epsilon():
    """Draws at many addresses (one per run in training): mean n, E|Y| = 2a/(1 − a²) with a = e^-ε."""
    n, eps, draws = 1000, 0.5, 4000
    values = []
    for i in range(draws):
        g = SecretGenerator((i.to_bytes(4, "little") * 8)[:32])
        values.append(laplace_count(n, eps, g))
    assert all(isinstance(v, int) for v in values)
    values = torch.tensor(values, dtype=torch.float64)
    a = math.exp(-eps)
    var = 2 * a / (1 - a) ** 2
    mad = 2 * a / (1 - a * a)
    assert abs(float(values.mean()) - n) <= 5 * math.sqrt(var / draws)
    assert abs(float((values - n).abs().mean()) - mad) <= 5 * math.sqrt(var / draws)


def test_laplace_count_is_drawn_once_per_key_and_clamped():
    g = debug_generator(13)
    assert len({laplace_count(500, 0.1, g) for _ in range(5)}) == 1  # the same key gives the same count
    assert laplace_count(0, 0.01, g) >= 1


def test_count_epsilon_share_and_validation():
    assert count_epsilon(2.0) == pytest.approx(0.1)  # the paper's 5%
    assert count_epsilon(6.0, 0.1) == pytest.approx(0.6)
    for bad in [(2.0, 1.0), (2.0, -0.1), (0.0, 0.05)]:
        with pytest.raises(PrivacyError):
            count_epsilon(*bad)
    for bad in [(-1, 1.0), (10, 0.0), (10, float("inf"))]:
        with pytest.raises(PrivacyError):
            laplace_count(*bad, debug_generator(14))
