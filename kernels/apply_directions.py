"""Fused in-place update: buf[i] <- round(buf[i] + sum_j coefs[j] * z_j[offset + i]), one pass.

One program owns BLOCK consecutive elements and loops over the J directions with the
accumulators in registers, so buf is read and written once whatever J is.  Seeds and coefs
are loaded from device tensors inside the loop (no recompile per step, no host sync,
CUDA-graph friendly).  The accumulation is done per quad component (BLOCK/4 lanes each),
so one Philox call and one Box-Muller pair serve four elements per direction; the
components are interleaved into element order once, after the loop.

Arithmetic per element (reference contract): d = 0; d += coefs[j] * z_j in j order;
x = buf + d; one rounding to the buffer dtype.  FP contraction is pinned off
(``enable_fp_fusion=False``: Triton 3.9 defaults it on, 3.10 off), so d + c*z rounds
twice as in the reference and the C++ path; the cost is one extra instruction per
element and direction next to ~40 for the RNG.
"""

import torch
import triton
import triton.language as tl

from .stream import (
    bf16_bits_to_f32,
    direction4,
    f32_to_bf16_bits_rne,
    f32_to_bf16_bits_stochastic,
    interleave4,
    join64,
    rounding_bits4,
    split64,
)

KIND_IDS = {"gaussian": 0, "rademacher": 1}
DEFAULT_BLOCK = 4096
DEFAULT_NUM_WARPS = 8


# ``n`` stays specialised on purpose: Triton's "divisible by 16" key on n is what lets it
# prove the tail mask constant over a vector and emit 16-byte loads/stores (at most a few
# variants per run).  offset, J and the rounding seed change every call: not specialised,
# and the 64-bit ones travel as two int32 halves so their Triton type never changes.
@triton.jit(do_not_specialize=["off_hi", "off_lo", "num_dirs", "rs_hi", "rs_lo"])
def _apply_directions_kernel(
    buf_ptr,  # fp32 buffer, or a bf16 buffer viewed as int16
    mask_ptr,  # uint8 packed mask (bit i & 7 of byte i >> 3), unused unless HAS_MASK
    seeds_ptr,  # int64[J]
    coefs_ptr,  # fp32[J]
    off_hi,  # int32 halves of offset4, the stream index of buf[-SHIFT] (offset rounded down to 4)
    off_lo,
    n,
    num_dirs,
    rs_hi,  # int32 halves of the stochastic-rounding seed
    rs_lo,
    SHIFT: tl.constexpr,  # offset & 3
    KIND: tl.constexpr,
    IS_BF16: tl.constexpr,
    HAS_MASK: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    QB: tl.constexpr = BLOCK // 4
    pid = tl.program_id(0).to(tl.int64)
    q = (join64(off_hi, off_lo) >> 2) + pid * QB + tl.arange(0, QB)  # int64 Philox counters
    i = pid * BLOCK - SHIFT + tl.arange(0, BLOCK)  # buffer indices, int64
    valid = i < n.to(tl.int64)
    if SHIFT != 0:
        valid = valid & (i >= 0)
    if HAS_MASK:
        byte = tl.load(mask_ptr + (i >> 3), mask=valid, other=0)
        valid = valid & (((byte.to(tl.int32) >> (i & 7).to(tl.int32)) & 1) != 0)

    # Issue the load before the RNG work so its latency hides behind it.
    if IS_BF16:
        x = bf16_bits_to_f32(tl.load(buf_ptr + i, mask=valid, other=0))
    else:
        x = tl.load(buf_ptr + i, mask=valid, other=0.0)

    d0 = tl.zeros([QB], dtype=tl.float32)
    d1 = tl.zeros([QB], dtype=tl.float32)
    d2 = tl.zeros([QB], dtype=tl.float32)
    d3 = tl.zeros([QB], dtype=tl.float32)
    for j in range(num_dirs):
        seed = tl.load(seeds_ptr + j)
        c = tl.load(coefs_ptr + j)
        z0, z1, z2, z3 = direction4(seed, q, KIND)
        d0 += c * z0
        d1 += c * z1
        d2 += c * z2
        d3 += c * z3
    x = x + interleave4(d0, d1, d2, d3)

    if IS_BF16:
        if STOCHASTIC:
            r0, r1, r2, r3 = rounding_bits4(join64(rs_hi, rs_lo), q)
            h = f32_to_bf16_bits_stochastic(x, interleave4(r0, r1, r2, r3))
        else:
            h = f32_to_bf16_bits_rne(x)
        tl.store(buf_ptr + i, h.to(tl.uint16).to(tl.int16, bitcast=True), mask=valid)
    else:
        tl.store(buf_ptr + i, x, mask=valid)


def apply_directions(
    buf: torch.Tensor,
    seeds: torch.Tensor,
    coefs: torch.Tensor,
    kind: str,
    offset: int,
    mask: torch.Tensor | None,
    rounding: str,
    rounding_seed: int,
    block: int = DEFAULT_BLOCK,
    num_warps: int = DEFAULT_NUM_WARPS,
) -> torch.Tensor:
    """In place on contiguous 1-D fp32/bf16 ``buf``; seeds int64[J], coefs fp32[J] on its device."""
    n = buf.numel()
    if n == 0:
        return buf
    is_bf16 = buf.dtype == torch.bfloat16
    target = buf.view(torch.int16) if is_bf16 else buf
    shift = offset & 3
    grid = (triton.cdiv(n + shift, block),)
    _apply_directions_kernel[grid](
        target,
        mask if mask is not None else target,  # never read without HAS_MASK
        seeds,
        coefs,
        *split64(offset - shift),
        n,
        seeds.numel(),
        *split64(rounding_seed),
        SHIFT=shift,
        KIND=KIND_IDS[kind],
        IS_BF16=is_bf16,
        HAS_MASK=mask is not None,
        STOCHASTIC=is_bf16 and rounding == "stochastic",
        BLOCK=block,
        num_warps=num_warps,
        enable_fp_fusion=False,
    )
    return buf
