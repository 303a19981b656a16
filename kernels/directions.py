"""Materialise stream values: out[i] = z(seed)[offset + i] in fp32 (tests, debugging, small slices).

The hot path never materialises directions (``apply_directions`` regenerates them in
registers); this kernel exists so every backend can be checked element by element.
"""

import torch
import triton
import triton.language as tl

from .stream import box_muller, direction4, interleave4, join64, split64

KIND_IDS = {"gaussian": 0, "rademacher": 1}
DEFAULT_BLOCK = 2048


@triton.jit(do_not_specialize=["seed_hi", "seed_lo", "off_hi", "off_lo"])
def _directions_kernel(
    out_ptr, seed_hi, seed_lo, off_hi, off_lo, count, SHIFT: tl.constexpr, KIND: tl.constexpr, BLOCK: tl.constexpr
):
    """Program p covers stream indices offset4 + p*BLOCK + [0, BLOCK), offset4 = offset - SHIFT."""
    QB: tl.constexpr = BLOCK // 4
    pid = tl.program_id(0).to(tl.int64)
    seed = join64(seed_hi, seed_lo)
    q = (join64(off_hi, off_lo) >> 2) + pid * QB + tl.arange(0, QB)
    z0, z1, z2, z3 = direction4(seed, q, KIND)
    z = interleave4(z0, z1, z2, z3)
    i = pid * BLOCK - SHIFT + tl.arange(0, BLOCK)  # output index
    valid = (i >= 0) & (i < count.to(tl.int64))
    tl.store(out_ptr + i, z, mask=valid)


def directions(
    seed: int, offset: int, count: int, kind: str, device: torch.device, block: int = DEFAULT_BLOCK
) -> torch.Tensor:
    """fp32 stream values at indices offset .. offset+count-1 (``seed`` an int64 value)."""
    out = torch.empty(count, dtype=torch.float32, device=device)
    if count == 0:
        return out
    shift = offset & 3
    grid = (triton.cdiv(count + shift, block),)
    _directions_kernel[grid](
        out,
        *split64(seed),
        *split64(offset - shift),
        count,
        SHIFT=shift,
        KIND=KIND_IDS[kind],
        BLOCK=block,
        enable_fp_fusion=False,
    )
    return out


@triton.jit
def _box_muller_kernel(ua_ptr, ub_ptr, zc_ptr, zs_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = i < n
    zc, zs = box_muller(tl.load(ua_ptr + i, mask=valid, other=0.5), tl.load(ub_ptr + i, mask=valid, other=0.5))
    tl.store(zc_ptr + i, zc, mask=valid)
    tl.store(zs_ptr + i, zs, mask=valid)


def box_muller_values(ua: torch.Tensor, ub: torch.Tensor, block: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Testing hook: the Gaussian transform of given fp32 uniforms in [0, 1), (r cos 2 pi ub, r sin 2 pi ub)."""
    ua, ub = ua.contiguous(), ub.contiguous()
    zc, zs = torch.empty_like(ua), torch.empty_like(ua)
    if ua.numel():
        grid = (triton.cdiv(ua.numel(), block),)
        _box_muller_kernel[grid](ua, ub, zc, zs, ua.numel(), BLOCK=block, enable_fp_fusion=False)
    return zc, zs
