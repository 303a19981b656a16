"""The direction stream as @triton.jit helpers (DESIGN section 2; spec: ``dpzo_engine.core.stream``).

Everything works on *quads*: one Philox4x32-10 call at int64 counter ``q`` yields the four
stream elements ``4q .. 4q+3``.  Kernels compute per-quad vectors of length BLOCK/4 and
``interleave4`` them into element order once, so the Box-Muller work is done once per quad.

* Philox is ``tl.randint4x(seed, q)`` with an int64 ``q``: key = (seed lo, seed hi),
  counter = (q lo, q hi, 0, 0), exactly ``dpzo_engine.core.stream.philox4x32_10``.
* Box-Muller uses Triton's fp32 ``log``/``sqrt``/``cos``/``sin`` (libdevice on GPU, numpy
  float32 under the interpreter): a few ulp from the correctly rounded reference, well
  inside the contract's absolute 1e-5.
* Rademacher and rounding bits are pure integer work, so they match the reference exactly.
"""

import triton
import triton.language as tl

UNIFORM_SCALE = tl.constexpr(4.6566127342e-10)  # fp32 constant of tl.rand
BOX_MULLER_MIN_U = tl.constexpr(1.0e-7)
TWO_PI = tl.constexpr(6.283185307179586)  # becomes fp32(2*pi) in the fp32 multiply


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
def box_muller(u_a, u_b):
    """(r cos t, r sin t) with a = max(u_a, 1e-7), r = sqrt(-2 ln a), t = fp32(2 pi) * u_b."""
    a = tl.maximum(u_a, BOX_MULLER_MIN_U)
    r = tl.sqrt(-2.0 * tl.log(a))
    t = TWO_PI * u_b
    return r * tl.cos(t), r * tl.sin(t)


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
