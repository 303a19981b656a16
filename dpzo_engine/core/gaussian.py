"""Stream version 2's Gaussian transform: Box-Muller in exact fp32 arithmetic (the spec).

Every backend (this PyTorch reference, the C++ kernels, Triton) performs the same IEEE-754
binary32 operations in the same order: each ``+ - * /`` and ``sqrt`` is one correctly rounded
fp32 operation (round to nearest even), there is **no fused multiply-add anywhere**, no
reassociation, and no intermediate is ever subnormal (so flush-to-zero changes nothing).
Here ``/`` and ``sqrt`` go through fp64 and round once, which is the correctly rounded fp32
result (see ``sqrt_rn``).  So the three backends give the same bits, and a model trained on
a GPU replays bit for bit on a CPU.  ``docs/stream.md`` states the transform in words; this
file is the normative code.

From two uniforms ``u_a, u_b`` (fp32, in [0, 1)) a pair of normals is

    a = max(u_a, 1e-7);  r = sqrt(-2 ln a);  (r cos 2π u_b,  r sin 2π u_b)

evaluated to about 0.1 ulp in unevaluated hi + lo pairs of fp32 values, and rounded once
at the end: every output is within 1 ulp of the correctly rounded value (2 ulp is the
guaranteed bound; ``tests/test_gaussian.py`` measures it exhaustively per factor).

Methods and sources:

* ln: the reduction and the polynomial of fdlibm's ``e_logf.c`` (Sun Microsystems 1993,
  as in FreeBSD msun; coefficients Lg1..Lg4 with |error| < 2**-34.24): a = 2**k m with
  m in [√2/2, √2), f = m - 1 exact, ln a = k ln2 + f - f²/2 + s (f²/2 + R(s²)),
  s = f / (2 + f).  Here f²/2 is split exactly with Veltkamp's splitting and Dekker's
  product, and the big terms are added with Fast2Sum, so ln a comes out as a hi + lo pair
  (T. J. Dekker, "A floating-point technique for extending the available precision",
  Numer. Math. 18, 1971).
* sqrt: r_hi = sqrt(L_hi) correctly rounded, and r_lo = (L - r_hi²) / (2 r_hi) with r_hi²
  exact by Dekker's product (one Newton step on the pair).
* sin/cos(2π u): an exact reduction on u itself (4u = n + s/2 with integer n, s in
  (-1, 1], all exact), then sin(πs/4), cos(πs/4) by the polynomials of SLEEF's
  ``sinpif_u05`` / ``cospif_u05`` kernels (N. Shibata and F. Petrogalli, "SLEEF: A Portable
  Vectorized Library of C Standard Mathematical Functions", IEEE TPDS 31(6), 2020), with
  s split into a 6-bit head so the two leading terms are exact products.
"""

from __future__ import annotations

import torch

F32 = torch.float32

UNIFORM_SCALE = float.fromhex("0x1.fffffep-32")  # fp32(4.6566127342e-10), tl.rand's scale
MIN_U = float.fromhex("0x1.ad7f2ap-24")  # fp32(1e-7): the radius uniform is clamped here
SPLIT_12 = 4097.0  # Veltkamp: x * (2**12 + 1) splits a 24-bit x into 12 + 12 bits
SPLIT_18 = 262145.0  # x * (2**18 + 1): a 6-bit head and an 18-bit tail
TAIL_CUTOFF = 2.0**-12  # below it sin's s**5 term is < 2**-48 relative (and would underflow): dropped

# ln (fdlibm e_logf.c)
LN2_HI = float.fromhex("0x1.62e3p-1")  # 0x3f317180, 17 bits: k * LN2_HI is exact for |k| < 128
LN2_LO = float.fromhex("0x1.2fefa2p-17")  # 0x3717f7d1
LG1 = float.fromhex("0x1.555554p-1")  # 0xaaaaaa.0p-24
LG2 = float.fromhex("0x1.999c26p-2")  # 0xccce13.0p-25
LG3 = float.fromhex("0x1.23d3dcp-2")  # 0x91e9ee.0p-25
LG4 = float.fromhex("0x1.f13c4cp-3")  # 0xf89e26.0p-26
SQRT_HALF_BITS = 0x3F3504F3  # fp32 bits of √2/2: the reduction of a to m in [√2/2, √2)

# sin(π s / 4) = s K1 + s³ K3 + s⁵ (K5 + s² (K7 + s² K9))   (SLEEF sinpif_u05)
# K1 = 0.78539818525314331055 - 2.1857338617566484855e-08 and
# K3 = -0.080745510756969451904 - 1.3373665339076936258e-09 (SLEEF's double-float pairs),
# re-split as an 18-bit (K1A) or 6-bit (K3A) head times which a 6-bit s head is exact.
K1A = float.fromhex("0x1.921f8p-1")
K1B = float.fromhex("0x1.aa21fap-20")  # fp32(K1 - K1A)
K1F = float.fromhex("0x1.921fb6p-1")  # fp32(K1)
K3A = float.fromhex("-0x1.48p-4")
K3B = float.fromhex("-0x1.5de72ep-11")  # fp32(K3 - K3A)
K3F = float.fromhex("-0x1.4abbcep-4")  # fp32(K3)
K5 = float.fromhex("0x1.466bbep-9")  # 0.2490393585e-2
K7 = float.fromhex("-0x1.32cc14p-15")  # -0.3657307388e-4
K9 = float.fromhex("0x1.4c32e2p-22")  # 0.3093842054e-6

# cos(π s / 4) = 1 + s² C2 + s⁴ (C4 + s² (C6 + s² (C8 + s² C10)))   (SLEEF cospif_u05)
# C2 = -0.30842512845993041992 - 9.0728339030733922277e-09 (12-bit head C2A),
# C4 = 0.015854343771934509277 + 4.4940051354032242811e-10.
C2A = float.fromhex("-0x1.3bep-2")
C2B = float.fromhex("0x1.866c84p-15")  # fp32(C2 - C2A)
C2F = float.fromhex("-0x1.3bd3ccp-2")  # fp32(C2)
C4 = float.fromhex("0x1.03c1f0p-6")
C6 = float.fromhex("-0x1.55d3c0p-12")  # -0.3259917721e-3
C8 = float.fromhex("0x1.e1eb4ap-19")  # 0.3590577080e-5
C10 = float.fromhex("-0x1.a19370p-26")  # -0.2430611801e-7


def sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded fp32 square root.

    Not ``torch.sqrt`` on fp32: its vectorised CPU kernel is off by one ulp on ~16% of random
    inputs (torch 2.13, AVX-512 build).  fp32(sqrt(fp64 x)) is the correctly rounded fp32 root:
    double rounding is innocuous for sqrt because 53 >= 2 * 24 + 2 (and it stays so if the fp64
    root were one fp64 ulp off, since the root of an fp32 value never comes within 2**-49 of an
    fp32 rounding boundary).
    """
    return torch.sqrt(x.double()).float()


def div_rn(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Correctly rounded fp32 a / b, by the same innocuous double rounding (independent of torch's fp32 kernel)."""
    return (a.double() / b.double()).float()


def split(x: torch.Tensor, splitter: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Veltkamp's split: x = hi + lo exactly, hi with (24 - log2(splitter - 1)) bits."""
    t = x * splitter
    hi = t - (t - x)
    return hi, x - hi


def fast_two_sum(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, e) with s = fl(a + b) and a + b = s + e exactly, for |a| >= |b| (or a == 0)."""
    s = a + b
    return s, b - (s - a)


def uniform(words: torch.Tensor) -> torch.Tensor:
    """Triton's uint32 -> [0, 1) map: int32 view, bitwise NOT if negative, to fp32, times fp32 2**-31 (1 - 2**-24)."""
    folded = torch.where(words >= (1 << 31), 0xFFFFFFFF - words, words)
    return folded.to(F32) * UNIFORM_SCALE


def ln_pair(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ln a as hi + lo for fp32 a in [1e-7, 1): fdlibm's log with the large terms kept exact."""
    ix = a.view(torch.int32).to(torch.int64) + (0x3F800000 - SQRT_HALF_BITS)
    dk = ((ix >> 23) - 127).to(F32)  # a = 2**k m
    m = ((ix & 0x7FFFFF) + SQRT_HALF_BITS).to(torch.int32).view(F32)
    f = m - 1.0  # exact (Sterbenz)
    f_h, f_l = split(f, SPLIT_12)
    h1 = (f_h * f_h) * 0.5  # f²/2 = h1 + h2, h1 exact
    h2 = f_h * f_l + (f_l * f_l) * 0.5
    s = div_rn(f, f + 2.0)
    z = s * s
    w = z * z
    big_r = z * (LG1 + w * LG3) + w * (LG2 + w * LG4)
    q = s * ((h1 + h2) + big_r)
    s1, e1 = fast_two_sum(f, -h1)
    s2, e2 = fast_two_sum(dk * LN2_HI, s1)  # k ln2_hi is exact; k = 0 makes it 0
    lo = (((q - h2) + dk * LN2_LO) + e1) + e2
    return fast_two_sum(s2, lo)


def radius_pair(u_a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sqrt(-2 ln max(u_a, 1e-7)) as hi + lo."""
    l_h, l_l = ln_pair(torch.maximum(u_a, torch.tensor(MIN_U, dtype=F32, device=u_a.device)))
    big_h, big_l = l_h * -2.0, l_l * -2.0  # exact
    r_h = sqrt_rn(big_h)
    p = r_h * r_h
    r1, r2 = split(r_h, SPLIT_12)
    err = ((r1 * r1 - p) + (r1 * r2) * 2.0) + r2 * r2  # r_h² = p + err exactly (Dekker)
    resid = ((big_h - p) - err) + big_l
    return r_h, div_rn(resid, r_h + r_h)


def sincos_pairs(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(quadrant n & 3, sin_hi, sin_lo, cos_hi, cos_lo) of π s / 4 where 2π u = n π/2 + π s/4."""
    v = u * 4.0
    n = v.to(torch.int32)  # truncation: v >= 0
    frac = v - n.to(F32)  # exact, in [0, 1)
    up = frac > 0.5
    n = torch.where(up, n + 1, n)
    s = torch.where(up, frac - 1.0, frac) * 2.0  # exact, in (-1, 1]
    s_h, s_l = split(s, SPLIT_18)
    ss = s * s
    sh2 = s_h * s_h  # exact (12 bits)
    sh3 = sh2 * s_h  # exact (18 bits)

    big, e = fast_two_sum(s_h * K1A, sh3 * K3A)  # both products exact
    d3 = s_l * ((ss + s * s_h) + sh2)  # s³ - s_h³
    st = torch.where(s.abs() < TAIL_CUTOFF, torch.zeros_like(s), s)
    sst = st * st
    tail = (sst * sst) * (st * (K5 + sst * (K7 + sst * K9)))
    lo = (((sh3 * K3B + d3 * K3F) + tail) + (s_h * K1B + s_l * K1F)) + e
    sin_h, sin_l = fast_two_sum(big, lo)

    big, e = fast_two_sum(torch.ones_like(s), sh2 * C2A)  # exact product
    tail = (ss * ss) * (C4 + ss * (C6 + ss * (C8 + ss * C10)))
    lo = (tail + (sh2 * C2B + (s_l * (s + s_h)) * C2F)) + e
    cos_h, cos_l = fast_two_sum(big, lo)
    return n & 3, sin_h, sin_l, cos_h, cos_l


def _times(r_h: torch.Tensor, r_l: torch.Tensor, x_h: torch.Tensor, x_l: torch.Tensor) -> torch.Tensor:
    """fl(r x) from two pairs: the hi product plus the cross terms, one final rounding."""
    return r_h * x_h + (r_h * x_l + r_l * x_h)


def box_muller(u_a: torch.Tensor, u_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(r cos 2π u_b, r sin 2π u_b), r = sqrt(-2 ln max(u_a, 1e-7)), in stream v2's exact fp32 arithmetic."""
    r_h, r_l = radius_pair(u_a)
    quadrant, sin_h, sin_l, cos_h, cos_l = sincos_pairs(u_b)
    odd = (quadrant & 1) == 1  # cos(θ + π/2) = -sin θ, sin(θ + π/2) = cos θ
    zc = _times(r_h, r_l, torch.where(odd, sin_h, cos_h), torch.where(odd, sin_l, cos_l))
    zs = _times(r_h, r_l, torch.where(odd, cos_h, sin_h), torch.where(odd, cos_l, sin_l))
    zc = torch.where(((quadrant + 1) & 2) != 0, -zc, zc)  # quadrants 1, 2
    zs = torch.where((quadrant & 2) != 0, -zs, zs)  # quadrants 2, 3
    return zc, zs
