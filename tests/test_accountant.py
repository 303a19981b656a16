"""The accountant: PRV upper bound (reported) and RDP (cross-check) against Opacus and prv-accountant.

Stated tolerances: our RDP equals Opacus' RDP and prv-accountant's RDP to 1e-6 (same
orders, same conversion); our PRV bounds equal Opacus' PRV upper bound to 0.01 + 0.5% (both
use prv-accountant's method with ε-error 0.01 at ε >= 1; grids differ slightly).
"""

import json
import math
import subprocess
import sys
import warnings

import numpy as np
import pytest
from prv_accountant import PoissonSubsampledGaussianMechanism, PRVAccountant
from prv_accountant.other_accountants import RDP
from prv_accountant.privacy_random_variables import PureDPMechanism

from dpzo_engine.privacy import (
    AccountingWarning,
    CountMechanism,
    PrivacyAccountant,
    PrivacyError,
    calibrate_noise,
    epsilon_spent,
)
from dpzo_engine.privacy import __main__ as cli
from dpzo_engine.privacy import accountant as acc_module

DELTA = 1e-5
CONFIGS = [(1.0, 0.01, 1000), (0.8, 0.0416, 300), (2.0, 0.05, 150), (0.6, 0.1, 50), (1.1, 1.0, 3)]


def opacus_epsilons(sigma, q, steps, delta=DELTA):
    accountants = pytest.importorskip("opacus.accountants")
    rdp, prv = accountants.RDPAccountant(), accountants.PRVAccountant()
    rdp.history = [(sigma, q, steps)]
    prv.history = [(sigma, q, steps)]
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # log(1 - q) at q = 1 inside Opacus
        return rdp.get_epsilon(delta), prv.get_epsilon(delta)


# --------------------------------------------------------------------------- reference values
def test_reference_example_from_engineering_notes():
    spent = epsilon_spent(1.0, 0.01, 1000, DELTA)
    assert (spent.eps_lower, spent.eps_estimate, spent.eps_upper) == pytest.approx((1.8181, 1.8282, 1.8384), abs=2e-3)
    assert spent.epsilon == spent.eps_upper
    assert spent.eps_rdp == pytest.approx(2.1014, abs=1e-4)
    assert spent.accountant == "prv" and not spent.prv_failed and spent.eps_error == pytest.approx(0.01)


@pytest.mark.parametrize("sigma, q, steps", CONFIGS)
def test_matches_opacus_rdp_and_prv(sigma, q, steps):
    rdp, prv = opacus_epsilons(sigma, q, steps)
    spent = epsilon_spent(sigma, q, steps, DELTA)
    assert spent.eps_rdp == pytest.approx(rdp, abs=1e-6)
    assert abs(spent.eps_upper - prv) <= 0.01 + 0.005 * prv
    assert spent.eps_lower <= spent.eps_estimate <= spent.eps_upper
    assert spent.eps_upper <= spent.eps_rdp  # PRV is tighter than RDP for the subsampled Gaussian


@pytest.mark.parametrize("sigma, q, steps", CONFIGS)
def test_rdp_matches_prv_accountant_rdp(sigma, q, steps):
    prv = PoissonSubsampledGaussianMechanism(sampling_probability=q, noise_multiplier=sigma)
    expected = float(RDP([prv]).compute_epsilon(DELTA, [steps])[2])
    assert epsilon_spent(sigma, q, steps, DELTA).eps_rdp == pytest.approx(expected, abs=1e-6)


def test_small_epsilon_keeps_a_relative_error():
    spent = epsilon_spent(8.0, 0.01, 1000, DELTA)  # ε ≈ 0.08: the default error shrinks to ~1% of ε
    assert spent.eps_error < 0.002
    assert spent.eps_upper <= spent.eps_rdp
    assert spent.eps_upper - spent.eps_lower <= 0.03 * spent.eps_upper


def test_monotone_in_steps_and_sigma():
    eps_t = [epsilon_spent(1.0, 0.02, t, DELTA).eps_upper for t in (1, 10, 100, 400)]
    assert eps_t == sorted(eps_t) and eps_t[0] < eps_t[-1]
    eps_s = [epsilon_spent(s, 0.02, 100, DELTA).eps_upper for s in (0.7, 1.0, 2.0, 4.0)]
    assert eps_s == sorted(eps_s, reverse=True)


def test_trivial_cases():
    assert epsilon_spent(1.0, 0.01, 0, DELTA).epsilon == 0.0
    assert epsilon_spent(math.inf, 0.01, 100, DELTA).epsilon == 0.0
    zero = epsilon_spent(0.0, 0.01, 100, DELTA)
    assert zero.epsilon == math.inf and zero.eps_rdp == math.inf and zero.accountant == "exact"
    assert epsilon_spent(1.0, 0.01, 0, DELTA, laplace_epsilon=0.1).epsilon == pytest.approx(0.1)
    assert epsilon_spent(math.inf, 0.01, 10, DELTA, laplace_epsilon=0.1).epsilon == pytest.approx(0.1)


# --------------------------------------------------------------------------- failures are never silent
def test_discretisation_failure_is_retried_with_a_coarser_grid():
    # prv_accountant issue #36: this setting raises "Discrete mean differs from continuous mean"
    # at eps_error 0.01; the retry at 0.02 succeeds and stays a valid upper bound.
    with pytest.raises(RuntimeError, match="Discrete mean"):
        from prv_accountant.dpsgd import DPSGDAccountant

        DPSGDAccountant(0.5, 0.1, 10, eps_error=0.01, delta_error=DELTA / 1000)
    spent = epsilon_spent(0.5, 0.1, 10, DELTA, eps_error=0.01)
    assert spent.accountant == "prv" and spent.eps_error > 0.01
    coarse = DPSGDAccountant(0.5, 0.1, 10, eps_error=0.1, delta_error=DELTA / 1000).compute_epsilon(DELTA, 10)
    assert coarse[0] <= spent.eps_estimate <= coarse[2]
    assert spent.eps_upper <= spent.eps_rdp


def test_total_prv_failure_falls_back_to_rdp_with_a_warning(monkeypatch):
    class Broken:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("Discrete mean differs from continuous mean significantly.")

    monkeypatch.setattr(acc_module, "PRVAccountant", Broken)
    with pytest.warns(AccountingWarning, match="RDP"):
        spent = epsilon_spent(0.9, 0.03, 77, DELTA)
    assert spent.prv_failed and spent.accountant == "rdp"
    assert spent.epsilon == spent.eps_upper == spent.eps_rdp > 0


def test_an_inconsistent_prv_result_is_not_reported(monkeypatch):
    """A PRV 'bound' below what RDP allows for the lower bound means broken numerics: fall back."""
    real = acc_module.PRVAccountant

    class TooSmall(real):
        def compute_epsilon(self, delta, num_self_compositions):
            lo, est, up = super().compute_epsilon(delta, num_self_compositions)
            return lo + 10, est + 10, up + 10  # lower bound above the RDP upper bound: impossible

    monkeypatch.setattr(acc_module, "PRVAccountant", TooSmall)
    with pytest.warns(AccountingWarning):
        spent = epsilon_spent(1.0, 0.01, 333, DELTA)
    assert spent.prv_failed and spent.epsilon == spent.eps_rdp


# --------------------------------------------------------------------------- noisy count composition
def _discrete_laplace_pair(eps: float) -> tuple[np.ndarray, np.ndarray]:
    """log-pmfs of n + DLap(ε) at neighbouring counts n = 0 and n = 1 over a window leaving < e^-80 out."""
    span = math.ceil(80 / eps)
    ys = np.arange(-span, span + 1)
    log_norm = np.log((1 - np.exp(-eps)) / (1 + np.exp(-eps)))
    return log_norm - eps * np.abs(ys), log_norm - eps * np.abs(ys - 1)


@pytest.mark.parametrize("eps", [0.05, 0.3, 1.0, 3.0])
def test_count_mechanism_is_exactly_the_discrete_laplace(eps):
    """The count's PRV and RDP against the discrete Laplace computed by brute force (independent of both)."""
    log_p, log_q = _discrete_laplace_pair(eps)
    for alpha in (1.5, 2.0, 5.0, 32.0):
        brute = np.logaddexp.reduce(alpha * log_p + (1 - alpha) * log_q) / (alpha - 1)
        assert CountMechanism(eps).rdp(alpha) == pytest.approx(brute, rel=1e-9)
    if eps >= 1:  # the library's (α−1)ε/α is not this pair's divergence, and here it is below it (unsafe)
        assert CountMechanism(eps).rdp(2.0) > PureDPMechanism(eps).rdp(2.0)
    acc = PRVAccountant(prvs=[CountMechanism(eps)], max_self_compositions=[1], eps_error=1e-3, delta_error=1e-9)
    for e in (0.0, eps / 2):
        hockey = float(np.maximum(np.exp(log_p) - np.exp(e + log_q), 0).sum())
        lower, _, upper = acc.compute_delta(e, [1])
        assert lower - 1e-6 <= hockey <= upper + 1e-6


@pytest.mark.parametrize("eps_count", [0.05, 0.3, 1.0])
def test_count_composes_by_prv(eps_count):
    """Heterogeneous PRV composition: at least the Gaussian part, at most basic composition."""
    gauss = epsilon_spent(1.0, 0.01, 1000, DELTA)
    both = epsilon_spent(1.0, 0.01, 1000, DELTA, laplace_epsilon=eps_count)
    assert both.laplace_epsilon == eps_count
    assert gauss.eps_lower < both.eps_upper
    assert both.eps_upper <= gauss.eps_upper + eps_count + 1e-6
    assert both.eps_rdp <= gauss.eps_rdp + eps_count + 1e-12
    prvs = [PoissonSubsampledGaussianMechanism(sampling_probability=0.01, noise_multiplier=1.0)]
    prvs.append(CountMechanism(eps_count))
    assert both.eps_rdp == pytest.approx(min(RDP(prvs).compute_epsilon(DELTA, [1000, 1])[2], gauss.eps_rdp + eps_count))
    if eps_count >= 0.3:
        assert both.eps_upper < gauss.eps_upper + eps_count - 0.005  # tighter than basic composition


# --------------------------------------------------------------------------- calibration
@pytest.mark.parametrize("target, q, steps", [(2.0, 0.01, 1000), (0.5, 0.0416, 500), (6.0, 0.0416, 200)])
def test_calibration_round_trip(target, q, steps):
    sigma = calibrate_noise(target, DELTA, q, steps)
    spent = epsilon_spent(sigma, q, steps, DELTA)
    assert 0.99 * target <= spent.eps_upper <= target
    assert spent.accountant == "prv"
    assert epsilon_spent(sigma * 0.99, q, steps, DELTA).eps_upper > target  # not much more noise than needed


def test_calibration_agrees_with_opacus_prv():
    # Opacus 1.6 get_noise_multiplier(accountant="prv", epsilon_tolerance=0.01) gave 1.4258 for these values
    assert calibrate_noise(1.0, DELTA, 0.01, 1000) == pytest.approx(1.4258, abs=0.01)


def test_calibration_is_cached():
    """A second calibration with the same values is a cache hit (the trainer and the benchmarks rely on it);
    checked by the cache's counters, not by timing."""
    acc_module._calibrate.cache_clear()
    acc_module._epsilon_spent.cache_clear()
    sigma = calibrate_noise(3.0, DELTA, 0.01, 1000)
    misses = acc_module._calibrate.cache_info().misses
    assert calibrate_noise(3.0, DELTA, 0.01, 1000) == sigma
    info = acc_module._calibrate.cache_info()
    assert info.hits == 1 and info.misses == misses


def test_calibration_with_a_count_share():
    target, share = 2.0, 0.05
    plain = calibrate_noise(target, DELTA, 0.01, 1000)
    sigma = calibrate_noise(target, DELTA, 0.01, 1000, count_share=share)
    assert sigma > plain  # the Gaussian part gets (1 - share)·ε
    assert epsilon_spent(sigma, 0.01, 1000, DELTA).eps_upper <= (1 - share) * target
    total = epsilon_spent(sigma, 0.01, 1000, DELTA, laplace_epsilon=share * target)
    assert 0.9 * target <= total.eps_upper <= target


def test_calibration_reaches_tiny_targets():
    sigma = calibrate_noise(0.05, DELTA, 0.01, 100)
    assert 0.9 * 0.05 <= epsilon_spent(sigma, 0.01, 100, DELTA).eps_upper <= 0.05


# --------------------------------------------------------------------------- per-step accountant
def test_accountant_counts_steps_and_matches_epsilon_spent():
    sigma, q, T = 1.2, 0.02, 200
    acc = PrivacyAccountant(sigma, q, DELTA, max_steps=T)
    assert acc.steps == 0 and acc.epsilon() == 0.0
    previous = 0.0
    for _ in range(4):
        acc.step(50)
        eps = acc.epsilon()
        assert eps > previous
        previous = eps
    assert acc.steps == T
    assert acc.spent() == epsilon_spent(sigma, q, T, DELTA)  # same grid: the same number
    assert acc.spent() is acc.spent()  # cached


def test_accountant_update_every_is_a_valid_upper_bound():
    acc = PrivacyAccountant(1.0, 0.02, DELTA, max_steps=95, update_every=10)
    acc.step(23)
    assert acc.epsilon() == acc.spent(30).epsilon >= acc.spent(23).epsilon
    acc.step(70)  # 93: the next multiple (100) is past max_steps, so max_steps is used
    assert acc.epsilon() == acc.spent(95).epsilon
    acc.step(2)
    assert acc.epsilon() == acc.spent().epsilon


def test_accountant_with_laplace_count_and_beyond_max_steps():
    acc = PrivacyAccountant(1.0, 0.01, DELTA, max_steps=10, laplace_epsilon=0.1)
    assert acc.epsilon() == pytest.approx(0.1)  # the count is released before the first step
    acc.step(10)
    at_10 = acc.epsilon()
    acc.step(30)  # past the planned horizon: rebuilt, still increasing
    assert acc.epsilon() > at_10 > 0.1


def test_accountant_state_dict_round_trip():
    acc = PrivacyAccountant(1.0, 0.01, DELTA, max_steps=100)
    acc.step(37)
    state = json.loads(json.dumps(acc.state_dict()))  # plain JSON-able values
    resumed = PrivacyAccountant(1.0, 0.01, DELTA, max_steps=100)
    resumed.load_state_dict(state)
    assert resumed.steps == 37 and resumed.epsilon() == acc.epsilon()
    with pytest.raises(PrivacyError, match="noise_multiplier"):
        PrivacyAccountant(1.1, 0.01, DELTA).load_state_dict(state)


# --------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "call",
    [
        lambda: epsilon_spent(-1.0, 0.01, 10, DELTA),
        lambda: epsilon_spent(float("nan"), 0.01, 10, DELTA),
        lambda: epsilon_spent(1.0, 0.0, 10, DELTA),
        lambda: epsilon_spent(1.0, 1.5, 10, DELTA),
        lambda: epsilon_spent(1.0, 0.01, -1, DELTA),
        lambda: epsilon_spent(1.0, 0.01, 2.5, DELTA),
        lambda: epsilon_spent(1.0, 0.01, 10, 0.0),
        lambda: epsilon_spent(1.0, 0.01, 10, 1.0),
        lambda: epsilon_spent(1.0, 0.01, 10, DELTA, eps_error=0.0),
        lambda: epsilon_spent(1.0, 0.01, 10, DELTA, laplace_epsilon=-0.1),
        lambda: calibrate_noise(0.0, DELTA, 0.01, 10),
        lambda: calibrate_noise(math.inf, DELTA, 0.01, 10),
        lambda: calibrate_noise(1.0, DELTA, 0.01, 0),
        lambda: calibrate_noise(1.0, DELTA, 0.01, 10, count_share=1.0),
        lambda: calibrate_noise(1.0, "x", 0.01, 10),
        lambda: PrivacyAccountant(0.0, 0.01, DELTA),
        lambda: PrivacyAccountant(1.0, 0.01, DELTA, max_steps=0),
        lambda: PrivacyAccountant(1.0, 0.01, DELTA).step(-1),
    ],
)
def test_validation_errors_are_one_line_value_errors(call):
    with pytest.raises(ValueError) as info:
        call()
    assert isinstance(info.value, PrivacyError)
    assert str(info.value) and "\n" not in str(info.value)


def test_delta_above_one_over_n_warns():
    with pytest.warns(UserWarning, match="1/n"):
        epsilon_spent(1.0, 0.01, 10, 1e-3, num_examples=5000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        epsilon_spent(1.0, 0.01, 10, 1e-5, num_examples=5000)


# --------------------------------------------------------------------------- CLI
def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "dpzo_engine.privacy", *args], capture_output=True, text=True, timeout=120
    )


def test_cli_epsilon_and_calibrate_print_one_json_object():
    out = run_cli("epsilon", "--sigma", "1", "--sample-rate", "0.01", "--steps", "1000", "--delta", "1e-5")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["eps_upper"] == pytest.approx(1.8384, abs=2e-3) and result["eps_rdp"] == pytest.approx(2.1014, 1e-4)
    assert {"eps_lower", "eps_estimate", "noise_multiplier", "sample_rate", "steps", "delta"} <= result.keys()
    out = run_cli("calibrate", "--epsilon", "2", "--sample-rate", "0.05", "--steps", "100", "--delta", "1e-5")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["eps_upper"] <= 2.0 and result["sigma"] > 0 and result["eps_rdp"] >= result["eps_upper"]


def test_cli_bad_input_is_one_line_exit_2():
    out = run_cli("calibrate", "--epsilon", "-1", "--sample-rate", "0.01", "--steps", "10", "--delta", "1e-5")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith("error:") and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["bogus"],
        ["epsilon", "--sigma", "0", "--sample-rate", "0.01", "--steps", "10", "--delta", "1e-5"],
        ["epsilon", "--sigma", "1", "--sample-rate", "2", "--steps", "10", "--delta", "1e-5"],
        ["epsilon", "--sigma", "abc", "--sample-rate", "0.1", "--steps", "10", "--delta", "1e-5"],
        ["epsilon", "--sigma", "1", "--sample-rate", "0.1", "--steps", "10"],
        ["calibrate", "--epsilon", "1", "--sample-rate", "0.1", "--steps", "10", "--delta", "1"],
        [
            "calibrate",
            "--epsilon",
            "1",
            "--sample-rate",
            "0.1",
            "--steps",
            "10",
            "--delta",
            "1e-5",
            "--count-share",
            "2",
        ],
    ],
)
def test_cli_main_errors(argv, capsys):
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("error:") and captured.err.count("\n") == 1


def test_cli_main_epsilon_with_count(capsys):
    argv = ["epsilon", "--sigma", "1", "--sample-rate", "0.01", "--steps", "1000", "--delta", "1e-5"]
    assert cli.main([*argv, "--count-epsilon", "0.1"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["laplace_epsilon"] == 0.1 and 1.8384 < result["eps_upper"] <= 1.8384 + 0.1
