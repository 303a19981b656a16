"""The direction stream: the normative PyTorch reference (docs/design.md section 2).

Every backend (Triton, C++, this file) must give the same random direction for the
same (seed, stream index).  This module is the specification written as code:

* ``philox4x32_10(k0, k1, c0, c1)`` is Triton's ``tl.randint4x`` (Random123
  Philox4x32-10): key = (seed lo32, seed hi32), counter = (q lo32, q hi32, 0, 0).
* Gaussian: element ``g`` of the stream is component ``g & 3`` of the four normals that
  Box-Muller makes from ``Philox(seed, q = g >> 2)`` (Triton's ``randn4x`` layout:
  (w0, w1) give components 0 and 1, (w2, w3) components 2 and 3).  The transform is
  stream version 2's exact fp32 arithmetic (``gaussian.py``), which every backend
  performs identically, so all of them give the same bits.
* Rademacher: element ``g`` is +1 if bit ``g & 127`` of the 128 bits of
  ``Philox(seed, q = g >> 7)`` (words w0..w3, bit 0 first) is set, else -1.
* Seeds are 64-bit: any Python int is taken modulo 2**64 (so -1 and 2**64 - 1 are the
  same seed); in tensors they are stored as int64 two's complement.

uint32 words are held in int64 tensors, and the 32x32-bit products are split into
16-bit halves so nothing relies on signed overflow.
"""

from __future__ import annotations

import torch

from . import gaussian
from .errors import ConfigError

MASK32 = 0xFFFFFFFF
MASK64 = 0xFFFFFFFFFFFFFFFF

PHILOX_M0 = 0xD2511F53  # multiplies counter word 0
PHILOX_M1 = 0xCD9E8D57  # multiplies counter word 2
PHILOX_W0 = 0x9E3779B9  # key schedule (Weyl) increments
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10

# Version of the direction stream, recorded in every ledger: replay refuses another version.
# 1: Box-Muller with correctly rounded ln/sqrt/cos/sin (exact on CPU only).
# 2: Box-Muller in exact fp32 arithmetic (gaussian.py): the same bits on every backend.
STREAM_VERSION = 2

KINDS = ("gaussian", "rademacher")


def check_version(recorded: object, source: str) -> None:
    """Refuse a ledger written with another stream version (one without the field is version 1):
    its directions are not the ones this code generates, so replaying it would build another model."""
    version = 1 if recorded is None else recorded
    if version != STREAM_VERSION:
        raise ConfigError(
            f"{source} was written with direction stream version {version}, but this dpzo-engine generates "
            f"version {STREAM_VERSION}: its directions differ, so the run cannot be replayed or resumed here "
            "(use the dpzo-engine release that wrote it)"
        )


ELEMENTS_PER_COUNTER = {"gaussian": 4, "rademacher": 128}

# Seed derivation domains: separate streams for directions and for stochastic rounding.
DOMAIN_DIRECTION = 1
DOMAIN_ROUNDING = 2
DOMAIN_PRUNING = 3  # DP-ZOPO's data-free score probes: (stage, query) -> direction seed
DOMAIN_PROXIMAL = 4  # DP-ZOSO's proximal pull: step -> stochastic-rounding seed


# ---------------------------------------------------------------------------- seeds
def splitmix64(x: int) -> int:
    """One splitmix64 output for state ``x`` (Steele, Lea & Flood 2014), as a uint64."""
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def derive_seed(master_seed: int, *words: int) -> int:
    """Public 64-bit seed for a tuple of words: h = sm(master); h = sm(h ^ w) per word.

    ``direction_seed`` and ``rounding_seed`` are the two documented uses; the result is
    returned as a signed int64 value so that it fits an int64 tensor unchanged.
    """
    h = splitmix64(master_seed & MASK64)
    for w in words:
        h = splitmix64(h ^ (w & MASK64))
    return to_int64(h)


def direction_seed(master_seed: int, step: int, k: int) -> int:
    """Seed of direction ``k`` at step ``step`` of a run with public ``master_seed``."""
    return derive_seed(master_seed, DOMAIN_DIRECTION, step, k)


def rounding_seed(master_seed: int, step: int) -> int:
    """Seed of the stochastic-rounding stream of the update pass at ``step``."""
    return derive_seed(master_seed, DOMAIN_ROUNDING, step)


def step_seeds(master_seed: int, step: int, num_directions: int) -> list[int]:
    return [direction_seed(master_seed, step, k) for k in range(num_directions)]


def to_int64(seed: int) -> int:
    """Two's-complement int64 value of ``seed`` taken modulo 2**64."""
    seed &= MASK64
    return seed - (1 << 64) if seed >= (1 << 63) else seed


def seed_key(seed: int) -> tuple[int, int]:
    """Philox key words (k0, k1) = (seed lo32, seed hi32) of the 64-bit seed."""
    seed &= MASK64
    return seed & MASK32, seed >> 32


# ---------------------------------------------------------------------------- Philox
def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi32, lo32) of the 64-bit product of constant ``a`` and uint32 words ``b``."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    b_hi, b_lo = b >> 16, b & 0xFFFF
    p0 = b_lo * a_lo
    mid = b_lo * a_hi + b_hi * a_lo + (p0 >> 16)
    lo = ((mid & 0xFFFF) << 16) | (p0 & 0xFFFF)
    hi = b_hi * a_hi + (mid >> 16)
    return hi, lo


def philox4x32_10(seed: int, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The four uint32 words (in int64 tensors) of Philox(seed, counter q) for int64 ``q``."""
    k0, k1 = seed_key(seed)
    c0 = q & MASK32
    c1 = (q >> 32) & MASK32  # arithmetic shift, then the two's-complement high word
    c2 = torch.zeros_like(q)
    c3 = torch.zeros_like(q)
    for _ in range(PHILOX_ROUNDS):
        hi0, lo0 = _mulhilo(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + PHILOX_W0) & MASK32
        k1 = (k1 + PHILOX_W1) & MASK32
    return c0, c1, c2, c3


# ---------------------------------------------------------------------------- directions
def _stream_indices(offset: int, count: int, device: torch.device | str | None) -> torch.Tensor:
    if offset < 0 or offset + count > (1 << 63):
        raise ValueError(f"stream indices must lie in [0, 2**63); got offset={offset}, count={count}")
    return torch.arange(count, dtype=torch.int64, device=device) + offset


def gaussian_at(seed: int, g: torch.Tensor) -> torch.Tensor:
    """Gaussian stream values (fp32) at int64 stream indices ``g``."""
    quads, which = torch.unique_consecutive(g >> 2, return_inverse=True)  # one transform per quad
    w0, w1, w2, w3 = philox4x32_10(seed, quads)
    n0, n1 = gaussian.box_muller(gaussian.uniform(w0), gaussian.uniform(w1))
    n2, n3 = gaussian.box_muller(gaussian.uniform(w2), gaussian.uniform(w3))
    n0, n1, n2, n3 = n0[which], n1[which], n2[which], n3[which]
    comp = g & 3
    return torch.where(comp == 0, n0, torch.where(comp == 1, n1, torch.where(comp == 2, n2, n3)))


def rademacher_at(seed: int, g: torch.Tensor) -> torch.Tensor:
    """Rademacher stream values (+-1 in fp32) at int64 stream indices ``g``."""
    groups, which = torch.unique_consecutive(g >> 7, return_inverse=True)  # one Philox call per 128 values
    words = [w[which] for w in philox4x32_10(seed, groups)]
    lane = g & 127
    word_idx = lane >> 5
    w = torch.where(
        word_idx == 0,
        words[0],
        torch.where(word_idx == 1, words[1], torch.where(word_idx == 2, words[2], words[3])),
    )
    bit = (w >> (lane & 31)) & 1
    return bit.to(torch.float32) * 2.0 - 1.0


def stream_at(seed: int, g: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "gaussian":
        return gaussian_at(seed, g)
    if kind == "rademacher":
        return rademacher_at(seed, g)
    raise ValueError(f"unknown direction kind {kind!r}; expected one of {KINDS}")


def reference_directions(seed: int, offset: int, count: int, kind: str = "gaussian", device=None) -> torch.Tensor:
    """Stream values at indices offset .. offset+count-1 (fp32), the reference way."""
    return stream_at(seed, _stream_indices(offset, count, device), kind)


def rounding_bits(seed: int, g: torch.Tensor) -> torch.Tensor:
    """16 random bits per stream index for stochastic rounding: low half of word g & 3
    of Philox(rounding seed, q = g >> 2)."""
    quads, which = torch.unique_consecutive(g >> 2, return_inverse=True)
    w0, w1, w2, w3 = (w[which] for w in philox4x32_10(seed, quads))
    comp = g & 3
    w = torch.where(comp == 0, w0, torch.where(comp == 1, w1, torch.where(comp == 2, w2, w3)))
    return w & 0xFFFF


def expected_gaussian_tail() -> float:
    """Largest |z| the stream can produce: the transform at the radius clamp a = 1e-7 with
    u_b = 0 (cos = 1), about sqrt(-2 ln 1e-7) = 5.678."""
    zc, _ = gaussian.box_muller(torch.tensor([gaussian.MIN_U]), torch.zeros(1))
    return float(zc[0])
