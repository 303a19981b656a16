"""Exact samplers: the released noise is exactly what the privacy analysis assumes.

Floating-point samplers are not: ``S + σ·randn()`` computed in doubles has a support and
low-order bits that depend on ``S``, which lets an observer tell neighbouring datasets apart
with certainty (Mironov, CCS 2012; Jin et al., IEEE S&P 2022 for the DP libraries of the day).
Everything here uses random bits and integer / rational arithmetic only:

* ``bernoulli_mask`` — each example kept with probability exactly q (q is a double, so a dyadic
  rational: compare a uniform 64-bit integer with q·2^64, and resolve the rare tie with more bits).
* ``gaussian_on_grid`` — the Gaussian mechanism followed by rounding: ``round((S + τX)/γ)`` with
  X ~ N(0, 1) drawn exactly by Karney's algorithm (Karney, "Sampling exactly from the normal
  distribution", ACM TOMS 2016) and the rounding decided exactly, drawing more bits of X only
  when the grid point is not yet determined. The output is a deterministic function (rounding to
  the public grid γ) of the exact Gaussian mechanism's output, i.e. post-processing: the PRV
  accounting of the continuous Gaussian with sensitivity Δ holds unchanged, and no sensitivity
  changes (the rounding comes after the noise).
* ``discrete_laplace`` — Lap_Z(1/ε), P(y) ∝ exp(−ε|y|) on the integers (Canonne, Kamath, Steinke,
  "The discrete Gaussian for differential privacy", NeurIPS 2020, Algorithms 1 and 2): a count of
  sensitivity 1 plus this noise is exactly ε-DP (its privacy loss is ±ε, randomized response's).

Timing is not constant: a rejection sampler's running time depends on the noise it draws (Jin et
al. 2022). Here it is microseconds inside a training step of forward passes that take seconds,
and no timing is released; the guarantee does not cover an observer timing the process.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from .randomness import SecretStream

DIGIT_BITS = 32  # a lazily drawn uniform deviate is refined 32 bits at a time


# --------------------------------------------------------------------------- Bernoulli(q) for many examples
def bernoulli_mask(stream: SecretStream, n: int, p: float) -> np.ndarray:
    """``n`` independent Bernoulli(p) draws, each exactly p (p a double in [0, 1])."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"probability must be in [0, 1], got {p}")
    if p == 1.0:
        return np.ones(n, dtype=bool)
    num, den = p.as_integer_ratio()  # den is a power of two
    threshold = (num << 64) // den  # floor(p·2^64) < 2^64
    rest = Fraction(num << 64, den) - threshold  # p·2^64 − threshold, in [0, 1)
    u = stream.uint64(n)
    keep = u < np.uint64(threshold)
    if rest:  # U == threshold (probability 2^-64 each): compare the next bits of U with those of p
        for i in np.flatnonzero(u == np.uint64(threshold)):
            keep[i] = _uniform_below(stream, rest)
    return keep


def _uniform_below(stream: SecretStream, p: Fraction) -> bool:
    """True with probability p ∈ [0, 1) exactly: bits of a uniform deviate against p's binary expansion."""
    while True:
        p *= 1 << 64
        word = int(p)
        p -= word
        u = int(stream.uint64(1)[0])
        if u != word:
            return u < word
        if p == 0:
            return False  # U == p exactly in every bit so far and p ends: U ≥ p


# --------------------------------------------------------------------------- Karney's exact normal
class URand:
    """A uniform deviate in [0, 1) whose base-2^32 digits are drawn only when a comparison needs them."""

    __slots__ = ("digits", "stream")

    def __init__(self, stream: SecretStream):
        self.stream = stream
        self.digits: list[int] = []

    def digit(self, i: int) -> int:
        while len(self.digits) <= i:
            self.digits.append(self.stream.u32())
        return self.digits[i]

    def less_than(self, other: URand) -> bool:
        i = 0
        while True:
            a, b = self.digit(i), other.digit(i)
            if a != b:
                return a < b
            i += 1

    def interval(self) -> tuple[Fraction, Fraction]:
        """[lo, hi): where the deviate lies given the digits drawn so far."""
        j = len(self.digits)
        num = 0
        for d in self.digits:
            num = (num << DIGIT_BITS) | d
        scale = 1 << (DIGIT_BITS * j)
        return Fraction(num, scale), Fraction(num + 1, scale)


def _exp_half(stream: SecretStream) -> bool:
    """True with probability exp(−1/2): von Neumann's rule on a run 1/2 > U1 > U2 > … (even length: true)."""
    p = URand(stream)
    if p.digit(0) >> (DIGIT_BITS - 1):
        return True  # U1 ≥ 1/2: the run is empty
    while True:
        q = URand(stream)
        if not q.less_than(p):
            return False
        p = URand(stream)
        if not p.less_than(q):
            return True


def _choose(stream: SecretStream, k: int) -> int:
    """1 with probability 2k/(2k+2), 0 with 1/(2k+2) (then the test is V < x), −1 with 1/(2k+2)."""
    v = stream.below(2 * k + 2)
    return 1 if v < 2 * k else (0 if v == 2 * k else -1)


def _exp_accept(stream: SecretStream, x: URand, k: int) -> bool:
    """True with probability exp(−x(x + 2k)/(2k + 2)): the longest run x > U1 > … > Un with every
    V_i < (x + 2k)/(2k + 2) has probability (x·r)^n/n! of length ≥ n, so an even length has e^{−x·r}."""
    n, prev = 0, x
    while True:
        u = URand(stream)
        if not u.less_than(prev):
            break
        c = _choose(stream, k)
        if c < 0 or (c == 0 and not URand(stream).less_than(x)):
            break
        n, prev = n + 1, u
    return n % 2 == 0


def standard_normal(stream: SecretStream) -> tuple[int, int, URand]:
    """X ~ N(0, 1) exactly, as (sign, k, x) with X = sign·(k + x) and x a lazily refinable deviate.

    Karney 2016, algorithm N: k ≥ 0 with probability ∝ exp(−k/2), kept with probability
    exp(−k(k−1)/2) (so ∝ exp(−k²/2)); x uniform, kept with probability exp(−x(x+2k)/2)
    (k+1 tests of exp(−x(x+2k)/(2k+2))); the joint density is ∝ exp(−(k+x)²/2).
    """
    while True:
        k = 0
        while _exp_half(stream):
            k += 1
        if not all(_exp_half(stream) for _ in range(k * (k - 1))):
            continue
        x = URand(stream)
        if all(_exp_accept(stream, x, k) for _ in range(k + 1)):
            return (-1 if stream.bit() else 1), k, x


def gaussian_on_grid(stream: SecretStream, center: Fraction, std: Fraction, grid_exp: int) -> int:
    """j = round((center + std·X) / 2^grid_exp) for X ~ N(0, 1) exactly (ties have probability 0).

    ``center`` and ``std`` are dyadic rationals (doubles are). The digits of X are refined until
    both ends of the interval X lies in round to the same j; integer arithmetic throughout.
    """
    cn, ce = _dyadic(center)
    sn, se = _dyadic(std)
    sign, k, x = standard_normal(stream)
    x.digit(0)
    while True:
        bits = DIGIT_BITS * len(x.digits)
        lo = k << bits
        for i, d in enumerate(x.digits):
            lo += d << (bits - DIGIT_BITS * (i + 1))
        ends = (lo, lo + 1) if sign > 0 else (-lo - 1, -lo)  # X in [ends[0], ends[1]] / 2^bits
        e = max(ce, se + bits)  # center + std·X = (cn·2^(e−ce) + sn·X·2^(e−se−bits)) / 2^e
        ja, jb = (_round_shift((cn << (e - ce)) + ((sn * n) << (e - se - bits)), e + grid_exp) for n in ends)
        if ja == jb:
            return ja
        x.digit(len(x.digits))


def _dyadic(value: Fraction) -> tuple[int, int]:
    """(n, e) with value = n / 2^e; refuses a denominator that is not a power of two."""
    den = value.denominator
    if den & (den - 1):
        raise ValueError(f"{value} is not a dyadic rational (doubles are)")
    return value.numerator, den.bit_length() - 1


def _round_shift(num: int, shift: int) -> int:
    """floor(num / 2^shift + 1/2), with shifts only (floor also for negative num)."""
    if shift <= 0:
        return num << -shift
    return (num + (1 << (shift - 1))) >> shift


def grid_exponent(std: Fraction, bits_below: int = 32) -> int:
    """e of the public grid γ = 2^e = 2^(⌊log2 std⌋ − bits_below): fine next to the noise, a function of
    σ·Δ only (never of the data). Released sums are multiples of γ, exact as doubles while below
    2^(53 − bits_below)·std in magnitude (beyond, the conversion to a double is one more rounding of a
    released value: post-processing)."""
    if std <= 0:
        raise ValueError("the noise std must be > 0")
    exponent = std.numerator.bit_length() - std.denominator.bit_length()  # ⌊log2 std⌋ or one above
    if Fraction(2) ** exponent > std:
        exponent -= 1
    return exponent - bits_below


def sqrt_upper(n: int, bits: int = 64) -> Fraction:
    """A dyadic rational ≥ √n, within 2^-bits of it (a sensitivity C·√K is never rounded down)."""
    scaled = math.isqrt(n << (2 * bits))
    if scaled * scaled < n << (2 * bits):
        scaled += 1
    return Fraction(scaled, 1 << bits)


# --------------------------------------------------------------------------- discrete Laplace (CKS 2020)
def bernoulli_exp(stream: SecretStream, gamma: Fraction) -> bool:
    """True with probability exp(−γ), γ ≥ 0 rational (CKS Algorithm 1; γ > 1 as a product of exp(−1)s)."""
    while gamma > 1:
        if not bernoulli_exp(stream, Fraction(1)):
            return False
        gamma -= 1
    k = 1
    while stream.below(gamma.denominator * k) < gamma.numerator:  # Bernoulli(γ/k)
        k += 1
    return k % 2 == 1


def discrete_laplace(stream: SecretStream, scale: Fraction) -> int:
    """Y with P(Y = y) ∝ exp(−|y|/scale) on the integers (CKS Algorithm 2, scale = t/s)."""
    t, s = scale.numerator, scale.denominator
    while True:
        u = stream.below(t)
        if not bernoulli_exp(stream, Fraction(u, t)):
            continue
        v = 0
        while bernoulli_exp(stream, Fraction(1)):
            v += 1
        y = (u + t * v) // s
        negative = stream.bit()
        if negative and y == 0:
            continue
        return -y if negative else y
