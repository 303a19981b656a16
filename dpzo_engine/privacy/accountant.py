"""Privacy accounting: ε spent by T Poisson-subsampled Gaussian releases (+ an optional Laplace count).

What we report is the **PRV upper bound** (Gopi, Lee, Wutschitz 2021; ``prv_accountant``),
the same number as Opacus' ``PRVAccountant``. RDP (Mironov et al. 2019, the Balle et al.
2020 conversion, Opacus' orders) is computed alongside as a cross-check and is the
fallback when the PRV discretisation fails (prv_accountant issue #36, "Discrete mean
differs from continuous mean"): we first retry with a coarser ε-grid (doubling
``eps_error``, still a valid upper bound), then fall back to RDP with a warning and
``prv_failed=True`` in the result. A PRV result whose *lower* bound exceeds the RDP bound
is numerically broken and is treated the same way, so a too-small ε is never reported.

The PRV ε-error defaults to 1% of ε (integer-order RDP estimate), capped at Opacus' 0.01,
so small targets stay reachable; grids above 2^19 points are coarsened (valid, looser).
The grid is a deterministic function of (σ, q, δ, ε_c, T), so ``calibrate_noise``, ``epsilon_spent``
and a ``PrivacyAccountant`` with ``max_steps=T`` report the same number at T.

Per step the released K-vector is one Gaussian mechanism with noise multiplier σ relative
to its L2 sensitivity (C joint, C√K per-direction), so K does not enter the accounting.
Adjacency is add/remove one example, with the dominating pair used by Opacus and
prv_accountant for Poisson subsampling.

The noisy count (ñ = n + a discrete Laplace of parameter ε_c, pure ε_c-DP; the ``laplace_epsilon``
arguments) is composed with the Gaussian part by **heterogeneous PRV composition** (the count's
privacy loss, composed once, with the subsampled Gaussian composed T times). A discrete Laplace
on a count of sensitivity 1 has the privacy loss ±ε_c of randomized response, so its PRV is
``CountMechanism`` (prv_accountant's pure-DP PRV, with the exact Rényi divergence of that pair:
the library's ``(α−1)ε/α`` is not that divergence, and falls below it for ε ≳ 1, which would make
the RDP cross-check and fallback unsafe). Calibration
gives the Gaussian part (1 − share)·ε and the count share·ε (basic composition, as in DP-AggZO),
and then checks the composed PRV bound, which is tighter than that sum.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import asdict, dataclass

import numpy as np
from prv_accountant import PoissonSubsampledGaussianMechanism, PRVAccountant
from prv_accountant.other_accountants import RDP
from prv_accountant.privacy_random_variables import PureDPMechanism

from .mechanism import PrivacyError

DEFAULT_EPS_ERROR = 0.01  # PRV ε-error (Opacus' default), used as min(0.01, 1% of ε); delta_error is δ/1000
MAX_DOMAIN_POINTS = 1 << 19  # beyond this the ε-grid is coarsened: a valid, looser bound, bounded time
PRV_RETRIES = 4  # coarsenings (×2 each) tried after a PRV failure before falling back to RDP
SIGMA_RANGE = (1e-3, 1e6)  # calibration search range
_INT_ORDERS = [float(a) for a in range(2, 65)]  # cheap RDP for bracketing (integer orders: exact sums)


class CountMechanism(PureDPMechanism):
    """The noisy count's PRV: a discrete Laplace count has privacy loss exactly ±ε (randomized response).

    ``rdp`` is the exact Rényi divergence of that pair, D_α = log(p^α (1−p)^(1−α) + (1−p)^α p^(1−α))/(α−1)
    with p = e^ε/(1 + e^ε) (prv_accountant's pure-DP ``rdp``, (α−1)ε/α, is not it: below it for ε ≳ 1).
    """

    def rdp(self, alpha):
        a = np.asarray(alpha, dtype=np.float64)
        log_p = -np.log1p(np.exp(-self.eps))  # log(e^ε / (1 + e^ε))
        log_q = -self.eps + log_p  # log(1 / (1 + e^ε))
        return np.logaddexp(a * log_p + (1 - a) * log_q, a * log_q + (1 - a) * log_p) / (a - 1)


class AccountingWarning(RuntimeWarning):
    """The PRV accountant failed and the (looser, valid) RDP bound is reported instead."""


@dataclass(frozen=True)
class PrivacySpent:
    """(ε, δ) spent after ``steps`` releases. ``epsilon`` is the number to report (= ``eps_upper``)."""

    epsilon: float
    delta: float
    eps_lower: float
    eps_estimate: float
    eps_upper: float
    eps_rdp: float
    steps: int
    noise_multiplier: float
    sample_rate: float
    laplace_epsilon: float = 0.0
    eps_error: float = DEFAULT_EPS_ERROR  # PRV ε-error of the grid used (0 for RDP/exact results)
    accountant: str = "prv"  # "prv"; "rdp" when PRV failed; "exact" for the trivial cases (T = 0, σ = 0 or ∞)
    prv_failed: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- validation
def _number(name: str, value) -> float:
    if isinstance(value, bool):
        raise PrivacyError(f"{name} must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise PrivacyError(f"{name} must be a number, got {value!r}") from None


def check_epsilon(epsilon: float, name: str = "epsilon") -> float:
    eps = _number(name, epsilon)
    if not (math.isfinite(eps) and eps > 0):
        raise PrivacyError(f"{name} must be a finite number > 0, got {epsilon}")
    return eps


def check_delta(delta: float, num_examples: int | None = None) -> float:
    """0 < δ < 1; warns when δ ≥ 1/n (such a δ allows releasing one example outright)."""
    d = _number("delta", delta)
    if not (0 < d < 1):
        raise PrivacyError(f"delta must be in (0, 1), got {delta}")
    if num_examples is not None and num_examples > 0 and d >= 1.0 / num_examples:
        warnings.warn(
            f"delta={d:g} >= 1/n = {1.0 / num_examples:g}: a mechanism leaking one whole example "
            "satisfies this delta; use delta << 1/n (e.g. 1e-5)",
            UserWarning,
            stacklevel=3,
        )
    return d


def check_sample_rate(sample_rate: float) -> float:
    q = _number("sample rate", sample_rate)
    if not (math.isfinite(q) and 0 < q <= 1):
        raise PrivacyError(f"sample rate must be in (0, 1], got {sample_rate}")
    return q


def check_steps(steps: int, minimum: int = 1) -> int:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < minimum:
        raise PrivacyError(f"steps must be an int >= {minimum}, got {steps!r}")
    return int(steps)


def check_noise_multiplier(noise_multiplier: float, allow_zero: bool = False) -> float:
    s = _number("noise multiplier", noise_multiplier)
    if math.isnan(s) or s < 0 or (s == 0 and not allow_zero):
        raise PrivacyError(f"noise multiplier must be > 0, got {noise_multiplier}")
    return s


def _check_error(eps_error: float | None) -> float | None:
    """PRV ε-error: None = auto (1% of ε, at most 0.01)."""
    return None if eps_error is None else check_epsilon(eps_error, "eps_error")


def _check_laplace(laplace_epsilon: float) -> float:
    e = _number("count epsilon", laplace_epsilon)
    if not (math.isfinite(e) and e >= 0):
        raise PrivacyError(f"count epsilon must be a finite number >= 0, got {laplace_epsilon}")
    return e


# --------------------------------------------------------------------------- the PRV/RDP model
class _Quiet:
    """Silence prv_accountant's overflow/eps_max chatter: failures surface as exceptions we handle."""

    def __enter__(self):
        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.simplefilter("ignore", UserWarning)
        self._np = np.errstate(all="ignore")
        self._np.__enter__()
        return self

    def __exit__(self, *exc):
        self._np.__exit__(*exc)
        self._w.__exit__(*exc)
        return False


class _Inconsistent(ArithmeticError):
    pass


class _Model:
    """σ, q, δ (+ ε_c) with one PRVAccountant sized for ``max_steps``, queried at any t ≤ max_steps.

    ``check_rdp=False`` skips the full RDP cross-check (the calibration search uses it:
    fractional-order RDP costs more than a coarse PRV query).
    """

    def __init__(
        self,
        sigma: float,
        q: float,
        delta: float,
        laplace_epsilon: float,
        max_steps: int,
        eps_error: float | None,
        check_rdp: bool = True,
        max_points: int = MAX_DOMAIN_POINTS,
    ):
        self.sigma, self.q, self.delta, self.lap = sigma, q, delta, laplace_epsilon
        self.max_steps = max(1, max_steps)
        self.check_rdp = check_rdp
        self.max_points = max_points
        self._acc: PRVAccountant | None = None
        self._requested_error = eps_error
        self._acc_error: float | None = None  # the grid's ε-error, fixed by plan()
        self._failed = False
        self._warned = False
        self._rdp: dict[str, RDP] = {}

    def _prvs(self) -> list:
        prvs = [PoissonSubsampledGaussianMechanism(sampling_probability=self.q, noise_multiplier=self.sigma)]
        if self.lap > 0:
            prvs.append(CountMechanism(self.lap))
        return prvs

    def _counts(self, t: int) -> list[int]:
        return [t, 1] if self.lap > 0 else [t]

    def _rdp_acc(self, kind: str) -> RDP:
        """RDP over all our PRVs; 'full' = Opacus' orders (reported), 'int' = integer orders (domain sizing)."""
        if kind not in self._rdp:
            self._rdp[kind] = RDP(prvs=self._prvs(), orders=None if kind == "full" else _INT_ORDERS)
        return self._rdp[kind]

    def _rdp_eps(self, kind: str, delta: float, counts: list[int]) -> float:
        return float(self._rdp_acc(kind).compute_epsilon(delta, counts)[2])

    def rdp(self, t: int) -> float:
        gauss = self._rdp_eps("full", self.delta, [t, 0] if self.lap > 0 else [t])
        if self.lap == 0:
            return gauss
        return min(self._rdp_eps("full", self.delta, [t, 1]), gauss + self.lap)  # both are valid bounds

    def _domain_length(self, counts: list[int], eps_error: float, delta_error: float) -> float:
        """prv_accountant's safe domain (remark 5.6 of Gopi et al.) from integer-order RDP.

        Fewer orders give a larger (safe) bound at a fraction of the cost of fractional orders.
        """
        length = self._rdp_eps("int", delta_error / 4, counts)
        for i in range(len(counts)):
            single = [int(i == j) for j in range(len(counts))]
            length = max(length, self._rdp_eps("int", delta_error / 8 / sum(counts), single))
        return max(length, eps_error) + 3

    def plan(self) -> tuple[float, float]:
        """(ε-error, domain half-width) of the PRV grid.

        The ε-error is the requested one, or by default 1% of the (integer-order RDP) ε
        capped at 0.01, so small targets stay reachable; it is then coarsened until the grid
        has at most MAX_DOMAIN_POINTS points. Deterministic in (σ, q, δ, ε_c, max_steps), so
        the calibration and the trainer's accountant use the same grid.
        """
        counts = self._counts(self.max_steps)
        delta_error = self.delta / 1000
        eps_error = self._acc_error or self._requested_error
        if eps_error is None:
            eps_error = DEFAULT_EPS_ERROR * min(1.0, max(0.01, self._rdp_eps("int", self.delta, counts)))
        length = self._domain_length(counts, eps_error, delta_error)
        mesh = eps_error / math.sqrt(sum(counts) / 2 * math.log(12 / delta_error))
        points = 2 * length / mesh
        if points > self.max_points:  # huge ε or T: a coarser grid keeps the time bounded
            eps_error *= points / self.max_points
            length = self._domain_length(counts, eps_error, delta_error)
        return eps_error, length

    def _build(self) -> None:
        self._acc_error, length = self.plan()
        self._acc = PRVAccountant(
            prvs=self._prvs(),
            max_self_compositions=self._counts(self.max_steps),
            eps_error=self._acc_error,
            delta_error=self.delta / 1000,
            eps_max=length,
        )

    def query(self, t: int) -> PrivacySpent:
        common = {"delta": self.delta, "steps": t, "noise_multiplier": self.sigma, "sample_rate": self.q}
        common["laplace_epsilon"] = self.lap
        with _Quiet():
            eps_rdp = self.rdp(t) if self.check_rdp else math.nan
            for _ in range(PRV_RETRIES + 1):
                if self._failed:
                    break
                try:
                    if self._acc is None:
                        self._build()
                    lo, est, up = (float(x) for x in self._acc.compute_epsilon(self.delta, self._counts(t)))
                    if not (math.isfinite(lo) and math.isfinite(up)) or lo > eps_rdp + 1e-9 * max(1.0, eps_rdp):
                        raise _Inconsistent(f"PRV bounds ({lo}, {up}) inconsistent with RDP {eps_rdp}")
                    lo, est, up = max(lo, 0.0), min(max(est, 0.0), up), max(up, 0.0)
                    return PrivacySpent(up, eps_lower=lo, eps_estimate=est, eps_upper=up, eps_rdp=eps_rdp,
                                        eps_error=self._acc_error, **common)  # fmt: skip
                except (RuntimeError, ValueError, ArithmeticError, AssertionError):
                    self._acc = None
                    self._acc_error = 2 * (self._acc_error or self.plan()[0])
            self._failed = True  # keep falling back for this model: no repeated slow retries
            if math.isnan(eps_rdp):
                eps_rdp = self.rdp(t)
        if not self._warned:  # once per model: a per-step accountant would repeat it at every log step
            self._warned = True
            warnings.warn(
                f"PRV accountant failed for sigma={self.sigma}, q={self.q}, T={t}, delta={self.delta}; "
                f"reporting the RDP bound epsilon={eps_rdp:.4f} instead (looser, still valid)",
                AccountingWarning,
                stacklevel=3,
            )
        return PrivacySpent(eps_rdp, eps_lower=0.0, eps_estimate=eps_rdp, eps_upper=eps_rdp, eps_rdp=eps_rdp,
                            eps_error=0.0, accountant="rdp", prv_failed=True, **common)  # fmt: skip


def _exact(sigma: float, q: float, steps: int, delta: float, lap: float) -> PrivacySpent | None:
    """The cases with a closed form: nothing released yet, no noise, or infinite noise."""
    if steps == 0 or math.isinf(sigma):
        eps = lap  # only the pure ε_c-DP count (if any) has been released
    elif sigma == 0:
        eps = math.inf  # noiseless sums of sampled examples: no finite ε at δ < q
    else:
        return None
    return PrivacySpent(
        eps, delta, eps, eps, eps, eps, steps, sigma, q, lap, eps_error=0.0, accountant="exact", prv_failed=False
    )


# --------------------------------------------------------------------------- public functions
def epsilon_spent(
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    eps_error: float | None = None,
    laplace_epsilon: float = 0.0,
    num_examples: int | None = None,
) -> PrivacySpent:
    """ε spent (PRV upper bound, RDP cross-check) by ``steps`` subsampled-Gaussian releases (+ a Laplace count).

    σ = ∞ spends nothing (ε = ε_c); σ = 0 is not private (ε = ∞); ``steps = 0`` gives ε_c.
    """
    sigma = check_noise_multiplier(noise_multiplier, allow_zero=True)
    q = check_sample_rate(sample_rate)
    steps = check_steps(steps, minimum=0)
    delta = check_delta(delta, num_examples)
    eps_error = _check_error(eps_error)
    lap = _check_laplace(laplace_epsilon)
    return _epsilon_spent(sigma, q, steps, delta, eps_error, lap)


@functools.lru_cache(maxsize=512)
def _epsilon_spent(
    sigma: float, q: float, steps: int, delta: float, eps_error: float | None, lap: float
) -> PrivacySpent:
    exact = _exact(sigma, q, steps, delta, lap)
    if exact is not None:
        return exact
    return _Model(sigma, q, delta, lap, steps, eps_error).query(steps)


def calibrate_noise(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    count_share: float = 0.0,
    eps_error: float | None = None,
    rtol: float = 1e-3,
    num_examples: int | None = None,
) -> float:
    """Smallest σ (to relative ``rtol``) whose PRV upper bound after ``steps`` is ≤ the target ε.

    With ``count_share`` s > 0 the Gaussian part is calibrated for (1 − s)·ε and the count
    gets s·ε; the composed bound is then checked against ε. Results are cached.
    """
    eps = check_epsilon(target_epsilon, "target epsilon")
    delta = check_delta(delta, num_examples)
    q = check_sample_rate(sample_rate)
    steps = check_steps(steps)
    share = _number("count share", count_share)
    if not (0 <= share < 1):
        raise PrivacyError(f"count share must be in [0, 1), got {count_share}")
    eps_error = _check_error(eps_error)
    rtol = _number("rtol", rtol)
    if not (0 < rtol < 0.5):
        raise PrivacyError(f"rtol must be in (0, 0.5), got {rtol}")
    return _calibrate(eps, delta, q, steps, share, eps_error, rtol)


def _upper(sigma: float, q: float, steps: int, delta: float, eps_error: float | None, lap: float = 0.0) -> float:
    """Reported ε (PRV upper bound, RDP-checked) for the final verification."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AccountingWarning)  # the RDP fallback is a valid (looser) bound
        return _epsilon_spent(sigma, q, steps, delta, eps_error, lap).eps_upper


def _coarse_upper(sigma: float, q: float, steps: int, delta: float, eps_error: float | None) -> float:
    """Predicted reported upper bound, from a 5x coarser (~5x cheaper) PRV grid.

    The coarse grid's upper bound minus its own ε-error is the δ−δ_err quantile, which
    the fine grid reproduces to ~1e-4; the fine check after the search makes it exact.
    """
    fine = _Model(sigma, q, delta, 0.0, steps, eps_error)
    with _Quiet():
        fine_error = fine.plan()[0]
    coarse = _Model(sigma, q, delta, 0.0, steps, 5 * fine_error, check_rdp=False, max_points=MAX_DOMAIN_POINTS // 5)
    coarse._rdp = fine._rdp  # same PRVs: reuse the RDP tables
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AccountingWarning)
        spent = coarse.query(steps)
    return spent.eps_upper - spent.eps_error + fine_error if spent.accountant == "prv" else spent.eps_upper


def _start_sigma(target: float, delta: float, q: float, steps: int) -> float:
    """A starting σ: integer-order RDP (over-estimates the PRV σ), or for targets RDP cannot
    reach with orders <= 64 (ε below ~log(1/δ)/63), the CLT/GDP value σ = q√T/μ."""

    def rdp(s: float) -> float:
        with _Quiet():
            prv = PoissonSubsampledGaussianMechanism(sampling_probability=q, noise_multiplier=s)
            return float(RDP([prv], orders=_INT_ORDERS).compute_epsilon(delta, [steps])[2])

    if rdp(SIGMA_RANGE[1]) > target:
        return q * math.sqrt(steps) / _gdp_mu(target, delta)
    lo, hi = 0.5, 1.0
    while rdp(hi) > target and hi < SIGMA_RANGE[1]:
        lo, hi = hi, hi * 2
    while rdp(lo) <= target and lo > SIGMA_RANGE[0]:
        lo, hi = lo / 2, lo
    for _ in range(8):  # ~0.3% on σ: only a starting point
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if rdp(mid) <= target else (mid, hi)
    return hi


def _gdp_mu(epsilon: float, delta: float) -> float:
    """μ of the μ-GDP mechanism that is exactly (ε, δ)-DP (Dong, Roth, Su 2019), by bisection."""

    def phi(x: float) -> float:
        return 0.5 * math.erfc(-x / math.sqrt(2))

    def gdp_delta(mu: float) -> float:
        return phi(-epsilon / mu + mu / 2) - math.exp(epsilon) * phi(-epsilon / mu - mu / 2)

    lo, hi = 1e-6, 50.0
    for _ in range(100):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if gdp_delta(mid) < delta else (lo, mid)
    return lo


def _solve(f, aim: float, start: float, tol: float) -> float:
    """σ with aim·(1 − tol) ≤ f(σ) ≤ aim for a decreasing f (Illinois on log σ vs log f), or the bracket end."""
    smin, smax = SIGMA_RANGE
    x = min(max(start, smin), smax)
    y = f(x)
    # bracket; ε falls roughly like 1/σ, so a far-off start jumps by the ratio rather than crawling
    if y > aim:
        lo, y_lo, hi = x, y, min(x * max(1.25, 1.1 * y / aim), smax)
        while (y_hi := f(hi)) > aim:
            if hi >= smax:
                raise PrivacyError(
                    f"no noise multiplier <= {smax:g} reaches epsilon={aim:g}; raise epsilon or lower q or T"
                )
            lo, y_lo, hi = hi, y_hi, min(hi * max(1.25, 1.1 * y_hi / aim), smax)
    else:
        hi, y_hi, lo = x, y, max(x * min(1 / 1.1, 0.9 * y / aim), smin)
        while (y_lo := f(lo)) <= aim:
            if lo <= smin:
                return lo  # so loose a target that the smallest σ searched meets it
            hi, y_hi, lo = lo, y_lo, max(lo * min(1 / 1.1, 0.9 * y_lo / aim), smin)
    x_lo, x_hi = math.log(lo), math.log(hi)
    g_lo, g_hi = math.log(y_lo / aim), math.log(max(y_hi, 1e-300) / aim)
    side = 0
    while g_hi < math.log1p(-tol) and x_hi - x_lo > 1e-9:
        x = (x_lo * g_hi - x_hi * g_lo) / (g_hi - g_lo)
        width = x_hi - x_lo
        x = min(max(x, x_lo + 0.02 * width), x_hi - 0.02 * width)
        g = math.log(max(f(math.exp(x)), 1e-300) / aim)
        if g > 0:
            x_lo, g_lo = x, g
            g_hi = g_hi / 2 if side == -1 else g_hi
            side = -1
        else:
            x_hi, g_hi = x, g
            g_lo = g_lo / 2 if side == 1 else g_lo
            side = 1
    return math.exp(x_hi)


@functools.lru_cache(maxsize=128)
def _calibrate(
    eps: float, delta: float, q: float, steps: int, share: float, eps_error: float | None, rtol: float
) -> float:
    lap = share * eps
    target = eps - lap
    # 1) search on the coarse-grid prediction, aiming at the middle of [target·(1 − rtol), target]
    coarse = functools.partial(_coarse_upper, q=q, steps=steps, delta=delta, eps_error=eps_error)
    sigma = _solve(coarse, target * (1 - rtol / 2), _start_sigma(target, delta, q, steps), rtol / 2)
    # 2) the reported (fine, RDP-checked) bound must meet the target: nudge σ up until it does
    while (upper := _upper(sigma, q, steps, delta, eps_error)) > target:
        sigma *= 1 + max(rtol / 2, 1.5 * (upper / target - 1))
    while lap > 0 and _upper(sigma, q, steps, delta, eps_error, lap) > eps:  # composed bound: practically never
        sigma *= 1 + rtol / 2
    return sigma


# --------------------------------------------------------------------------- per-step accountant
class PrivacyAccountant:
    """ε spent so far by a training run: ``step()`` after each release, ``spent()`` when logging.

    One PRV accountant is built for ``max_steps`` (the planned T) and queried at the current
    count; results are cached per count. A query costs one FFT over the PRV grid (~0.1 s at
    σ≈1, q=0.01, T=1000; ~0.3 s with a Laplace count), so call ``spent()`` at log steps.
    ``epsilon()`` may be called every step: with ``update_every = k`` it returns the bound at
    the next multiple of k (or at ``max_steps``), a valid upper bound since ε grows with t,
    for T/k queries per run. Going past ``max_steps`` rebuilds for a larger horizon.
    """

    def __init__(
        self,
        noise_multiplier: float,
        sample_rate: float,
        delta: float,
        max_steps: int | None = None,
        laplace_epsilon: float = 0.0,
        eps_error: float | None = None,
        num_examples: int | None = None,
        update_every: int = 1,
    ) -> None:
        self.noise_multiplier = check_noise_multiplier(noise_multiplier)
        self.sample_rate = check_sample_rate(sample_rate)
        self.delta = check_delta(delta, num_examples)
        self.max_steps = check_steps(max_steps) if max_steps is not None else None
        self.laplace_epsilon = _check_laplace(laplace_epsilon)
        self.eps_error = _check_error(eps_error)
        self.update_every = check_steps(update_every)
        self._steps = 0
        self._model: _Model | None = None
        self._cache: dict[int, PrivacySpent] = {}

    @property
    def steps(self) -> int:
        return self._steps

    def step(self, n: int = 1) -> None:
        """Record ``n`` more releases (one per training step, empty batches included)."""
        self._steps += check_steps(n, minimum=0)

    def spent(self, steps: int | None = None) -> PrivacySpent:
        """Privacy spent after ``steps`` releases (default: so far)."""
        t = self._steps if steps is None else check_steps(steps, minimum=0)
        if t not in self._cache:
            exact = _exact(self.noise_multiplier, self.sample_rate, t, self.delta, self.laplace_epsilon)
            self._cache[t] = exact if exact is not None else self._model_for(t).query(t)
        return self._cache[t]

    def epsilon(self) -> float:
        """An upper bound on ε spent so far: ``spent().epsilon``, or with ``update_every`` > 1 the
        bound at the next multiple of it (never past ``max_steps``): cheap to call every step."""
        t, k = self._steps, self.update_every
        if k > 1 and t % k:
            t_next = -(-t // k) * k
            t = min(t_next, self.max_steps) if self.max_steps is not None and t <= self.max_steps else t_next
        return self.spent(t).epsilon

    def _model_for(self, t: int) -> _Model:
        if self._model is None or t > self._model.max_steps:
            horizon = max(t, self.max_steps or 0, 2 * self._model.max_steps if self._model is not None else 0)
            self._model = _Model(
                self.noise_multiplier, self.sample_rate, self.delta, self.laplace_epsilon, horizon, self.eps_error
            )
        return self._model

    def state_dict(self) -> dict:
        return {
            "steps": self._steps,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "delta": self.delta,
            "laplace_epsilon": self.laplace_epsilon,
            "max_steps": self.max_steps,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume the step count; refuses a checkpoint accounted with other parameters."""
        for key in ("noise_multiplier", "sample_rate", "delta", "laplace_epsilon"):
            if key in state and not math.isclose(float(state[key]), getattr(self, key), rel_tol=1e-12, abs_tol=0.0):
                raise PrivacyError(
                    f"checkpoint was accounted with {key}={state[key]}, but this run has {getattr(self, key)}"
                )
        self._steps = check_steps(state["steps"], minimum=0)

    def __repr__(self) -> str:
        return (
            f"PrivacyAccountant(noise_multiplier={self.noise_multiplier}, sample_rate={self.sample_rate}, "
            f"delta={self.delta}, laplace_epsilon={self.laplace_epsilon}, steps={self._steps})"
        )
