"""The direction stream as @triton.jit helpers (docs/design.md section 2; spec: ``dpzo_engine.core.stream``).

Everything works on *quads*: one Philox4x32-10 call at int64 counter ``q`` yields the four
stream elements ``4q .. 4q+3``.  Kernels compute per-quad vectors of length BLOCK/4 and
``interleave4`` them into element order once, so the Box-Muller work is done once per quad.

* Philox is ``tl.randint4x(seed, q)`` with an int64 ``q``: key = (seed lo, seed hi),
  counter = (q lo, q hi, 0, 0), exactly ``dpzo_engine.core.stream.philox4x32_10``.
* Box-Muller is stream version 2's exact fp32 transform (``dpzo_engine.core.gaussian``),
  written as explicit fp32 operations in the reference's order: ``+ - *`` on fp32 tensors,
  ``tl.div_rn`` and ``tl.sqrt_rn`` (correctly rounded; plain ``/`` and ``tl.sqrt`` are
  approximate on GPU), sign flips as bit operations, and no FMA: every kernel launches with
  ``enable_fp_fusion=False`` (LLVM does not contract and ptxas runs with ``--fmad=false``).
  No intermediate is ever subnormal, so flush-to-zero cannot change a result.  The
  interpreter runs the same operations in numpy float32, so a compiled GPU kernel, the
  interpreter, the C++ kernels and the PyTorch reference give the same bits.
* Rademacher and rounding bits are pure integer work.
"""

import triton
import triton.language as tl

# stream v2 constants: exact fp32 values, the same as dpzo_engine.core.gaussian (sources cited there)
UNIFORM_SCALE = tl.constexpr(float.fromhex("0x1.fffffep-32"))
MIN_U = tl.constexpr(float.fromhex("0x1.ad7f2ap-24"))
SPLIT_12 = tl.constexpr(4097.0)
SPLIT_18 = tl.constexpr(262145.0)
TAIL_CUTOFF = tl.constexpr(2.0**-12)
LN2_HI = tl.constexpr(float.fromhex("0x1.62e3p-1"))
LN2_LO = tl.constexpr(float.fromhex("0x1.2fefa2p-17"))
LG1 = tl.constexpr(float.fromhex("0x1.555554p-1"))
LG2 = tl.constexpr(float.fromhex("0x1.999c26p-2"))
LG3 = tl.constexpr(float.fromhex("0x1.23d3dcp-2"))
LG4 = tl.constexpr(float.fromhex("0x1.f13c4cp-3"))
K1A = tl.constexpr(float.fromhex("0x1.921f8p-1"))
K1B = tl.constexpr(float.fromhex("0x1.aa21fap-20"))
K1F = tl.constexpr(float.fromhex("0x1.921fb6p-1"))
K3A = tl.constexpr(float.fromhex("-0x1.48p-4"))
K3B = tl.constexpr(float.fromhex("-0x1.5de72ep-11"))
K3F = tl.constexpr(float.fromhex("-0x1.4abbcep-4"))
K5 = tl.constexpr(float.fromhex("0x1.466bbep-9"))
K7 = tl.constexpr(float.fromhex("-0x1.32cc14p-15"))
K9 = tl.constexpr(float.fromhex("0x1.4c32e2p-22"))
C2A = tl.constexpr(float.fromhex("-0x1.3bep-2"))
C2B = tl.constexpr(float.fromhex("0x1.866c84p-15"))
C2F = tl.constexpr(float.fromhex("-0x1.3bd3ccp-2"))
C4 = tl.constexpr(float.fromhex("0x1.03c1f0p-6"))
C6 = tl.constexpr(float.fromhex("-0x1.55d3c0p-12"))
C8 = tl.constexpr(float.fromhex("0x1.e1eb4ap-19"))
C10 = tl.constexpr(float.fromhex("-0x1.a19370p-26"))


def split64(value: int) -> tuple[int, int]:
    """(hi, lo) signed int32 halves of a 64-bit value, for passing it to a kernel.

    Two int32 arguments always get the same Triton type whatever the value, so a new seed
    or offset never triggers a recompile (a Python int is typed i32 or i64 by its value),
    and they sidestep the interpreter's mishandling of ints in [2**31, 2**32).
    """
    value &= (1 << 64) - 1
    hi, lo = value >> 32, value & 0xFFFFFFFF
    return hi - (1 << 32) if hi >= (1 << 31) else hi, lo - (1 << 32) if lo >= (1 << 31) else lo


@triton.jit
def join64(hi, lo):
    """int64 from the int32 halves made by ``split64``."""
    return (hi.to(tl.int64) << 32) | lo.to(tl.uint32, bitcast=True).to(tl.int64)


@triton.jit
def philox4(seed, q):
    """Four uint32 words of Philox4x32-10(key = int64 ``seed``, counter = (q lo, q hi, 0, 0))."""
    return tl.randint4x(seed, q.to(tl.int64))


@triton.jit
def uniform(w):
    """uint32 -> [0, 1): int32 view, bitwise NOT if negative, fp32, times the fp32 scale."""
    x = w.to(tl.int32, bitcast=True)
    x = tl.where(x < 0, ~x, x)
    return x.to(tl.float32) * UNIFORM_SCALE


@triton.jit
def neg(x):
    """-x as a sign flip (-0.0 for +0.0, as torch and C++ negate), whatever Triton lowers ``-x`` to."""
    return (x.to(tl.int32, bitcast=True) ^ -2147483648).to(tl.float32, bitcast=True)


@triton.jit
def split(x, splitter: tl.constexpr):
    """Veltkamp's split: (hi, lo) with x = hi + lo exactly."""
    t = x * splitter
    hi = t - (t - x)
    return hi, x - hi


@triton.jit
def fast_two_sum(a, b):
    """(s, e), s = fl(a + b), a + b = s + e exactly (|a| >= |b| or a == 0)."""
    s = a + b
    return s, b - (s - a)


@triton.jit
def ln_pair(a):
    """ln a as hi + lo for fp32 a in [1e-7, 1) (fdlibm's reduction and polynomial, big terms exact)."""
    ix = a.to(tl.int32, bitcast=True) + (0x3F800000 - 0x3F3504F3)
    dk = ((ix >> 23) - 127).to(tl.float32)
    m = ((ix & 0x7FFFFF) + 0x3F3504F3).to(tl.float32, bitcast=True)
    f = m - 1.0
    f_h, f_l = split(f, SPLIT_12)
    h1 = (f_h * f_h) * 0.5
    h2 = f_h * f_l + (f_l * f_l) * 0.5
    s = tl.div_rn(f, f + 2.0)
    z = s * s
    w = z * z
    big_r = z * (LG1 + w * LG3) + w * (LG2 + w * LG4)
    q = s * ((h1 + h2) + big_r)
    s1, e1 = fast_two_sum(f, neg(h1))
    s2, e2 = fast_two_sum(dk * LN2_HI, s1)
    lo = (((q - h2) + dk * LN2_LO) + e1) + e2
    return fast_two_sum(s2, lo)


@triton.jit
def radius_pair(u_a):
    """sqrt(-2 ln max(u_a, 1e-7)) as hi + lo (one Newton step with Dekker's exact square)."""
    l_h, l_l = ln_pair(tl.maximum(u_a, MIN_U))
    big_h = l_h * -2.0
    big_l = l_l * -2.0
    r_h = tl.sqrt_rn(big_h)
    p = r_h * r_h
    r1, r2 = split(r_h, SPLIT_12)
    err = ((r1 * r1 - p) + (r1 * r2) * 2.0) + r2 * r2
    resid = ((big_h - p) - err) + big_l
    return r_h, tl.div_rn(resid, r_h + r_h)


@triton.jit
def sincos_pairs(u):
    """(quadrant, sin_h, sin_l, cos_h, cos_l) of pi s / 4 where 2 pi u = quadrant pi / 2 + pi s / 4 (SLEEF)."""
    v = u * 4.0
    n = v.to(tl.int32)
    frac = v - n.to(tl.float32)
    up = frac > 0.5
    n = tl.where(up, n + 1, n)
    s = tl.where(up, frac - 1.0, frac) * 2.0
    s_h, s_l = split(s, SPLIT_18)
    ss = s * s
    sh2 = s_h * s_h
    sh3 = sh2 * s_h

    big, e = fast_two_sum(s_h * K1A, sh3 * K3A)
    d3 = s_l * ((ss + s * s_h) + sh2)
    st = tl.where(tl.abs(s) < TAIL_CUTOFF, 0.0, s)
    sst = st * st
    tail = (sst * sst) * (st * (K5 + sst * (K7 + sst * K9)))
    lo = (((sh3 * K3B + d3 * K3F) + tail) + (s_h * K1B + s_l * K1F)) + e
    sin_h, sin_l = fast_two_sum(big, lo)

    big, e = fast_two_sum(tl.full(s.shape, 1.0, tl.float32), sh2 * C2A)
    tail = (ss * ss) * (C4 + ss * (C6 + ss * (C8 + ss * C10)))
    lo = (tail + (sh2 * C2B + (s_l * (s + s_h)) * C2F)) + e
    cos_h, cos_l = fast_two_sum(big, lo)
    return n & 3, sin_h, sin_l, cos_h, cos_l


@triton.jit
def times(r_h, r_l, x_h, x_l):
    return r_h * x_h + (r_h * x_l + r_l * x_h)


@triton.jit
def box_muller(u_a, u_b):
    """(r cos 2 pi u_b, r sin 2 pi u_b), r = sqrt(-2 ln max(u_a, 1e-7)): stream v2's exact fp32 transform."""
    r_h, r_l = radius_pair(u_a)
    quadrant, sin_h, sin_l, cos_h, cos_l = sincos_pairs(u_b)
    odd = (quadrant & 1) == 1
    zc = times(r_h, r_l, tl.where(odd, sin_h, cos_h), tl.where(odd, sin_l, cos_l))
    zs = times(r_h, r_l, tl.where(odd, cos_h, sin_h), tl.where(odd, cos_l, sin_l))
    zc = tl.where(((quadrant + 1) & 2) != 0, neg(zc), zc)
    zs = tl.where((quadrant & 2) != 0, neg(zs), zs)
    return zc, zs


@triton.jit
def gaussian4(seed, q):
    """The four normals (n0, n1, n2, n3) of quad ``q``: stream elements 4q .. 4q+3."""
    w0, w1, w2, w3 = philox4(seed, q)
    n0, n1 = box_muller(uniform(w0), uniform(w1))
    n2, n3 = box_muller(uniform(w2), uniform(w3))
    return n0, n1, n2, n3


@triton.jit
def rademacher_bits4(seed, q):
    """Sign bits (uint32 0/1; 1 means +1) of stream elements 4q .. 4q+3.

    Element g uses bit g & 127 of the 128 bits of Philox(seed, g >> 7): for quad q that is
    word (q >> 3) & 3 of Philox(seed, q >> 5), bits 4 (q & 7) .. 4 (q & 7) + 3.
    """
    q = q.to(tl.int64)
    w0, w1, w2, w3 = philox4(seed, q >> 5)
    sel = (q >> 3) & 3
    w = tl.where(sel == 0, w0, tl.where(sel == 1, w1, tl.where(sel == 2, w2, w3)))
    w = w >> ((q & 7) * 4).to(tl.uint32)
    return w & 1, (w >> 1) & 1, (w >> 2) & 1, (w >> 3) & 1


@triton.jit
def rounding_bits4(seed, q):
    """16 stochastic-rounding bits (uint32) of elements 4q .. 4q+3: low half of word g & 3."""
    w0, w1, w2, w3 = philox4(seed, q)
    return w0 & 0xFFFF, w1 & 0xFFFF, w2 & 0xFFFF, w3 & 0xFFFF


@triton.jit
def interleave4(a0, a1, a2, a3):
    """Element order from per-quad components: [a0[0], a1[0], a2[0], a3[0], a0[1], ...]."""
    return tl.interleave(tl.interleave(a0, a2), tl.interleave(a1, a3))


@triton.jit
def bf16_bits_to_f32(h):
    """fp32 value of bf16 bit patterns held in int16 (exact: the low 16 bits are zero)."""
    return (h.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)


@triton.jit
def f32_to_bf16_bits_rne(x):
    """bf16 bits (uint32 < 2**16) of fp32 ``x`` rounded to nearest even; NaN stays a quiet NaN.

    Integer arithmetic on purpose: the interpreter's fp32->bf16 cast truncates, and this
    way GPU and interpreter give the same bits as torch's ``.to(torch.bfloat16)``.
    """
    u = x.to(tl.uint32, bitcast=True)
    rne = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    is_nan = (u & 0x7FFFFFFF) > 0x7F800000
    return tl.where(is_nan, (u >> 16) | 0x40, rne)


@triton.jit
def f32_to_bf16_bits_stochastic(x, bits):
    """bf16 bits of fp32 ``x`` rounded stochastically: add 16 random bits, truncate.

    Unbiased: rounds up with probability (dropped fraction) / 2**16.  Non-finite values
    take the nearest path (inf stays inf, NaN stays NaN), as in the reference.
    """
    u = x.to(tl.uint32, bitcast=True)
    finite = (u & 0x7F800000) != 0x7F800000
    return tl.where(finite, (u + bits) >> 16, f32_to_bf16_bits_rne(x))


KIND_GAUSSIAN = tl.constexpr(0)
KIND_RADEMACHER = tl.constexpr(1)


@triton.jit
def direction4(seed, q, KIND: tl.constexpr):
    """The four fp32 direction values of quad ``q`` for ``KIND`` (0 Gaussian, 1 Rademacher)."""
    if KIND == 0:
        z0, z1, z2, z3 = gaussian4(seed, q)
    else:
        b0, b1, b2, b3 = rademacher_bits4(seed, q)
        z0 = b0.to(tl.float32) * 2.0 - 1.0
        z1 = b1.to(tl.float32) * 2.0 - 1.0
        z2 = b2.to(tl.float32) * 2.0 - 1.0
        z3 = b3.to(tl.float32) * 2.0 - 1.0
    return z0, z1, z2, z3
