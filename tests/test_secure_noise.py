"""The secret generator (SHAKE-256 keyed from OS entropy) and the exact samplers, against independent references.

References: scipy's normal CDF for Karney's sampler and for the grid-rounded Gaussian mechanism,
the closed-form pmf of the discrete Laplace, binomial counts for Poisson sampling. Statistical
checks use fixed keys (deterministic) and stated bounds: a chi-square or KS p-value above 1e-4,
or 5 standard errors, which a correct sampler fails with probability below 1e-4 for a random key.
"""

import math
import os
import pickle
import stat
from fractions import Fraction

import numpy as np
import pytest
import torch
from scipy import stats

from dpzo_engine.privacy import GaussianMechanism, PrivacyError, SecretGenerator, exact
from dpzo_engine.privacy.randomness import SecretStream

KEY = bytes(range(32))


def stream(tag: str, i: int = 0, key: bytes = KEY) -> SecretStream:
    return SecretGenerator(key).stream(tag, i)


# --------------------------------------------------------------------------- the generator
def test_addresses_give_independent_streams_and_the_key_decides():
    a, b = stream("gauss", 0).read(64), stream("gauss", 1).read(64)
    assert a != b and stream("poisson", 0).read(64) != a
    assert stream("gauss", 0).read(64) == a  # a pure function of (key, address)
    assert stream("gauss", 0, key=bytes(32)).read(64) != a
    s = stream("x")
    assert s.read(10) + s.read(1000) == stream("x").read(1010)  # reading in pieces = reading at once


def test_below_is_uniform_and_exact():
    s = stream("below")
    draws = np.array([s.below(6) for _ in range(12000)])
    assert set(draws.tolist()) == set(range(6))
    assert stats.chisquare(np.bincount(draws, minlength=6)).pvalue > 1e-4
    huge = 3**80  # not a power of two: rejection keeps it exact
    assert all(0 <= s.below(huge) < huge for _ in range(100))


def test_fresh_keys_come_from_os_entropy_and_never_show():
    a, b = SecretGenerator.from_os_entropy(), SecretGenerator.from_os_entropy()
    assert a.key != b.key and len(a.key) == 32 and not a.reproducible
    assert a.key.hex() not in repr(a)
    with pytest.raises(TypeError, match="not picklable"):
        pickle.dumps(a)
    with pytest.raises(TypeError):
        torch.save({"g": a}, "/dev/null")


def test_debug_seed_keys_are_reproducible_and_flagged():
    with pytest.warns(UserWarning, match="NOT differentially private"):
        a = SecretGenerator.from_debug_seed(7)
    with pytest.warns(UserWarning):
        b = SecretGenerator.from_debug_seed(7)
    assert a.key == b.key and a.reproducible and "NOT private" in repr(a)


def test_key_file_is_created_with_mode_600_from_the_start(tmp_path, monkeypatch):
    """No window: the file is opened with O_EXCL and mode 0o600, never created wider and narrowed later."""
    opened = []
    real_open = os.open

    def spy(path, flags, mode=0o777, *args, **kwargs):
        opened.append((str(path), flags, mode))
        return real_open(path, flags, mode, *args, **kwargs)

    monkeypatch.setattr(os, "open", spy)
    monkeypatch.setattr(os, "chmod", lambda *a, **k: pytest.fail("the key file must not need a chmod"))
    old_umask = os.umask(0)  # even with a permissive umask
    try:
        g = SecretGenerator.from_os_entropy()
        g.save(tmp_path / "secret.key")
        g.save(tmp_path / "secret.key")  # saving again replaces it the same way
    finally:
        os.umask(old_umask)
    assert opened and all(m == 0o600 and f & os.O_EXCL and f & os.O_CREAT for _, f, m in opened)
    assert stat.S_IMODE((tmp_path / "secret.key").stat().st_mode) == 0o600
    assert SecretGenerator.load(tmp_path / "secret.key").key == g.key
    (tmp_path / "bad.key").write_text("hello\n")
    with pytest.raises(PrivacyError, match="not a secret key file"):
        SecretGenerator.load(tmp_path / "bad.key")


# --------------------------------------------------------------------------- Poisson: Bernoulli(q) exactly
@pytest.mark.parametrize("q", [0.5, 0.3, 1e-3, 0.999])
def test_bernoulli_mask_rate(q):
    n = 200_000
    keep = exact.bernoulli_mask(stream("bern", int(q * 1e6)), n, q)
    assert keep.dtype == bool and keep.shape == (n,)
    assert abs(int(keep.sum()) - q * n) <= 5 * math.sqrt(n * q * (1 - q))


def test_bernoulli_mask_edges_and_the_exact_tie_rule():
    assert exact.bernoulli_mask(stream("e"), 7, 1.0).all() and not exact.bernoulli_mask(stream("e"), 7, 0.0).any()

    class Scripted:
        """A stream whose 64-bit words are given: to drive the rare path U == floor(q·2^64)."""

        def __init__(self, words):
            self.words = list(words)

        def uint64(self, n):
            out, self.words = self.words[:n], self.words[n:]
            return np.array(out, dtype=np.uint64)

    q = 1e-5  # below 2^-12 a double has bits beyond 2^-64: q·2^64 has a fractional part
    num, den = q.as_integer_ratio()
    hi = (num << 64) // den
    rest = Fraction(num << 64, den) - hi
    assert 0 < rest < 1
    next_word = int(rest * (1 << 64))  # the next 64 bits of q's expansion
    assert list(exact.bernoulli_mask(Scripted([hi - 1, hi + 1]), 2, q)) == [True, False]
    assert list(exact.bernoulli_mask(Scripted([hi, next_word - 1]), 1, q)) == [True]  # tie, then below
    assert list(exact.bernoulli_mask(Scripted([hi, next_word + 1]), 1, q)) == [False]


# --------------------------------------------------------------------------- Karney's exact normal
def test_standard_normal_matches_scipy():
    draws = []
    for i in range(6000):
        sign, k, x = exact.standard_normal(stream("normal", i))
        lo, hi = x.interval()
        draws.append(sign * (k + float((lo + hi) / 2)))  # within 2^-32 of the exact value
    assert stats.kstest(draws, "norm").pvalue > 1e-4
    draws = np.array(draws)
    assert abs(draws.mean()) <= 5 / math.sqrt(len(draws))
    assert abs(draws.var() - 1) <= 5 * math.sqrt(2 / len(draws))
    assert (np.abs(draws) > 3).mean() == pytest.approx(2 * stats.norm.sf(3), abs=5 * math.sqrt(0.0027 / 6000))


@pytest.mark.parametrize("center", [0.0, 0.3, -1.7])
def test_gaussian_on_grid_has_the_rounded_gaussian_pmf(center):
    """A coarse grid (γ = std/2) makes the rounding visible: the pmf must be Φ differences around a
    centre that is not on the grid, i.e. the exact mechanism's output rounded, not an approximation."""
    std, grid_exp, n = Fraction(1), -1, 8000
    js = np.array([exact.gaussian_on_grid(stream("grid", i), Fraction(center), std, grid_exp) for i in range(n)])
    values, counts = np.unique(js, return_counts=True)
    gamma = 2.0**grid_exp
    pmf = stats.norm.cdf((values + 0.5) * gamma - center) - stats.norm.cdf((values - 0.5) * gamma - center)
    big = counts >= 20
    expected = pmf[big] / pmf[big].sum() * counts[big].sum()
    assert stats.chisquare(counts[big], expected).pvalue > 1e-4
    assert abs(js.mean() * gamma - center) <= 5 * math.sqrt(1 + gamma**2 / 12) / math.sqrt(n)


def test_grid_and_sqrt_helpers_are_exact():
    for std in (Fraction(1), Fraction(1, 3), Fraction(1024), Fraction(3, 4)):
        e = exact.grid_exponent(std, bits_below=0)
        assert Fraction(2) ** e <= std < Fraction(2) ** (e + 1)
    for n in (1, 2, 16, 4095, 10**12 + 7):
        r = exact.sqrt_upper(n)
        assert r * r >= n and (r - Fraction(1, 1 << 64)) ** 2 < n


def test_the_mechanism_releases_multiples_of_its_grid_with_std_sigma_C():
    sigma, clip, K = 1.3, 0.7, 5000
    mech = GaussianMechanism(sigma, clip, K, "joint", generator=SecretGenerator(KEY))
    sums = torch.linspace(-3, 3, K, dtype=torch.float64)
    noisy = mech.privatize(sums)
    grid = mech.grid
    assert grid == 2.0 ** math.floor(math.log2(sigma * clip) - 32)
    assert all((x / grid).is_integer() for x in noisy.tolist())
    noise = (noisy - sums).numpy()
    target = sigma * clip
    assert abs(noise.std() - target) <= 5 * target / math.sqrt(2 * K)
    assert stats.kstest(noise / target, "norm").pvalue > 1e-4
    per_dir = GaussianMechanism(sigma, clip, 16, "per_direction", generator=SecretGenerator(KEY))
    assert per_dir.noise_std >= sigma * clip * 4.0  # √K rounded up, never down
    assert GaussianMechanism(0.0, 1.0, 2, generator=SecretGenerator(KEY)).privatize(sums[:2]).equal(sums[:2])


# --------------------------------------------------------------------------- discrete Laplace (CKS 2020)
@pytest.mark.parametrize("eps", [0.3, 1.0, 2.5])
def test_discrete_laplace_matches_its_pmf(eps):
    n = 6000
    ys = np.array([exact.discrete_laplace(stream("dlap", i), 1 / Fraction(eps)) for i in range(n)])
    values, counts = np.unique(ys, return_counts=True)
    pmf = (1 - math.exp(-eps)) / (1 + math.exp(-eps)) * np.exp(-eps * np.abs(values))
    big = counts >= 20
    expected = pmf[big] / pmf[big].sum() * counts[big].sum()
    assert stats.chisquare(counts[big], expected).pvalue > 1e-4
    a = math.exp(-eps)
    assert abs(ys.mean()) <= 5 * math.sqrt(2 * a / (1 - a) ** 2 / n)


def test_bernoulli_exp_probability():
    for gamma in (Fraction(1, 3), Fraction(1), Fraction(7, 2)):
        hits = sum(exact.bernoulli_exp(stream("bexp", i), gamma) for i in range(8000))
        p = math.exp(-float(gamma))
        assert abs(hits - 8000 * p) <= 5 * math.sqrt(8000 * p * (1 - p))
