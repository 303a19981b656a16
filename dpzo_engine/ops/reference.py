"""PyTorch reference of the three kernel contracts (docs/design.md section 4).

Slow and obviously correct: the C++ kernels must match ``directions`` and
``apply_directions`` bit for bit, the Triton kernels within the stated tolerances.
Works on any device; arguments are assumed validated by ``dpzo_engine.ops``.

Exact arithmetic of ``apply_directions`` (the contract every backend follows):
    d = 0 (fp32);  for j in 0..J-1:  d = d + fp32(coefs[j] * z_j[g])   (no fused multiply-add)
    x = fp32(buf[i]) + d;  buf[i] = round(x)   where g = offset + i
Masked-out elements (bit i of the packed mask clear) are left untouched.
"""

from __future__ import annotations

import torch

from ..core import stream

CHUNK = 1 << 20  # elements per slice: bounds the reference's temporaries


def directions(seed: int, offset: int, count: int, kind: str, device=None) -> torch.Tensor:
    return stream.reference_directions(seed, offset, count, kind, device=device)


def unpack_mask(mask: torch.Tensor, start: int, count: int) -> torch.Tensor:
    """Booleans of elements start .. start+count-1 from a packed uint8 mask (LSB first)."""
    i = torch.arange(start, start + count, dtype=torch.int64, device=mask.device)
    byte = mask[i >> 3].to(torch.int64)
    return ((byte >> (i & 7)) & 1).bool()


def round_to(x: torch.Tensor, dtype: torch.dtype, rounding: str, bits: torch.Tensor | None) -> torch.Tensor:
    """Round fp32 ``x`` to ``dtype``: nearest-even, or stochastic with 16 random bits (bf16)."""
    if dtype == torch.float32 or rounding == "nearest":
        return x.to(dtype)
    # bf16 stochastic rounding: add random bits below the kept 16 and truncate.
    u = x.view(torch.int32).to(torch.int64) & stream.MASK32
    rounded = ((u + bits) >> 16) << 16
    rounded = torch.where(torch.isfinite(x), rounded, u)  # inf/NaN pass through unchanged
    as_i32 = torch.where(rounded >= (1 << 31), rounded - (1 << 32), rounded).to(torch.int32)
    return as_i32.view(torch.float32).to(torch.bfloat16)  # exact: low 16 bits are zero


def apply_directions(
    buf: torch.Tensor,
    seeds: torch.Tensor,
    coefs: torch.Tensor,
    kind: str,
    offset: int,
    mask: torch.Tensor | None,
    rounding: str,
    rounding_seed: int,
    cache=None,  # ops.DirectionCache: reads are ignored (the spec generates), writes are honoured
) -> torch.Tensor:
    seed_list = [int(s) for s in seeds.tolist()]
    coef_list = coefs.to(torch.float32).cpu()
    n = buf.numel()
    write = None if cache is None else cache.write
    for start in range(0, n, CHUNK):
        count = min(CHUNK, n - start)
        g = torch.arange(count, dtype=torch.int64, device=buf.device) + (offset + start)
        d = torch.zeros(count, dtype=torch.float32, device=buf.device)
        for j, (seed, c) in enumerate(zip(seed_list, coef_list)):
            z = stream.stream_at(seed, g, kind)
            if j == write and start < cache.values.numel():
                kept = cache.values[start : start + count]
                kept.copy_(z[: kept.numel()])
            d = d + c.to(buf.device) * z
        x = buf[start : start + count].to(torch.float32) + d
        bits = stream.rounding_bits(rounding_seed, g) if rounding == "stochastic" else None
        new = round_to(x, buf.dtype, rounding, bits)
        if mask is not None:
            new = torch.where(unpack_mask(mask, start, count), new, buf[start : start + count])
        buf[start : start + count] = new
    return buf


def clip_aggregate(
    D: torch.Tensor, clip: float, scale: float, mode: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(clipped column sums fp64[K], unclipped sums fp64[K], #clipped, #non-finite rows).

    Rows are a = fp32(D * scale); a row with any non-finite entry contributes nothing
    (counted in #non-finite), so one NaN loss cannot break the sensitivity bound.
    joint: a * min(1, C/||a||_2) with the norm in fp64; per_direction: clamp to [-C, C].
    """
    a = (D.to(torch.float32) * torch.tensor(scale, dtype=torch.float32, device=D.device)).double()
    finite = torch.isfinite(a).all(dim=1)
    a = torch.where(finite[:, None], a, torch.zeros_like(a))
    if mode == "joint":
        norm = torch.linalg.vector_norm(a, dim=1)
        over = norm > clip
        factor = torch.where(over, clip / torch.where(over, norm, torch.ones_like(norm)), torch.ones_like(norm))
        clipped = a * factor[:, None]
    else:
        over = (a.abs() > clip).any(dim=1)
        clipped = a.clamp(-clip, clip)
    num_clipped = over.sum()
    num_nonfinite = (~finite).sum()
    return clipped.sum(dim=0), a.sum(dim=0), num_clipped, num_nonfinite
