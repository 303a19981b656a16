"""Fused per-example clipping and aggregation of D [B, K] (docs/design.md section 4).

Two deterministic kernels, no float atomics (the sums feed the DP mechanism, so they should
not depend on scheduling):
1. one program per block of rows: a = fp32(D * scale), a non-finite flag per row, the row's
   fp64 sum of squares (joint) or its "any |a| > C" flag (per_direction), and the fp64 clip
   factor min(1, C / ||a||).  Squares of fp32 values cannot overflow or underflow in fp64,
   so the plain fp64 sum of squares is as robust as a scaled norm here.
2. one program per block of columns, looping over all rows in a fixed order: fp64 column
   sums of clip(a) and of a, over finite rows only.
"""

import torch
import triton
import triton.language as tl

FLT_MAX = tl.constexpr(3.4028234663852886e38)


@triton.jit
def _scaled_tile(d_ptr, rows, cols, B, K, scale):
    """a = fp32(D * scale) on a [BR, BK] tile, its in-bounds mask and its finite mask."""
    inb = (rows[:, None] < B) & (cols[None, :] < K)
    v = tl.load(d_ptr + rows[:, None] * K + cols[None, :], mask=inb, other=0.0)
    a = v * scale
    return a, inb, tl.abs(a) <= FLT_MAX  # NaN compares false


@triton.jit
def _row_stats_kernel(
    d_ptr,
    clip_ptr,  # fp64[1]: C (Triton scalar float arguments are fp32)
    factor_ptr,  # out fp64[B]: per-row clip factor (joint) or 1
    finite_ptr,  # out int32[B]: 1 if every entry of the row is finite
    over_ptr,  # out int32[B]: 1 if the (finite) row was clipped
    B,
    K,
    scale,
    PER_DIRECTION: tl.constexpr,
    BR: tl.constexpr,
    BK: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    clip = tl.load(clip_ptr)
    sumsq = tl.zeros([BR], dtype=tl.float64)
    bad = tl.zeros([BR], dtype=tl.int32)
    over = tl.zeros([BR], dtype=tl.int32)
    for k0 in range(0, K, BK):
        cols = k0 + tl.arange(0, BK)
        a, inb, fin = _scaled_tile(d_ptr, rows, cols, B, K, scale)
        bad = tl.maximum(bad, tl.max(tl.where(inb & ~fin, 1, 0), axis=1))
        a64 = tl.where(fin, a, 0.0).to(tl.float64)
        if PER_DIRECTION:
            over = tl.maximum(over, tl.max(tl.where(tl.abs(a64) > clip, 1, 0), axis=1))
        else:
            sumsq += tl.sum(a64 * a64, axis=1)
    finite = bad == 0
    if PER_DIRECTION:
        is_over = finite & (over != 0)
        factor = tl.full([BR], 1.0, dtype=tl.float64)
    else:
        norm = tl.sqrt(sumsq)  # fp64: PTX has only the correctly rounded sqrt.rn.f64
        is_over = finite & (norm > clip)
        factor = tl.where(is_over, clip / tl.where(is_over, norm, 1.0), 1.0)
    rmask = rows < B
    tl.store(factor_ptr + rows, factor, mask=rmask)
    tl.store(finite_ptr + rows, finite.to(tl.int32), mask=rmask)
    tl.store(over_ptr + rows, is_over.to(tl.int32), mask=rmask)


@triton.jit
def _column_sums_kernel(
    d_ptr,
    clip_ptr,
    factor_ptr,
    finite_ptr,
    sums_ptr,  # out fp64[K]: sum over finite rows of clip(a)
    raw_ptr,  # out fp64[K]: sum over finite rows of a
    B,
    K,
    scale,
    PER_DIRECTION: tl.constexpr,
    BR: tl.constexpr,
    BK: tl.constexpr,
):
    cols = tl.program_id(0).to(tl.int64) * BK + tl.arange(0, BK)
    clip = tl.load(clip_ptr)
    acc = tl.zeros([BK], dtype=tl.float64)
    raw = tl.zeros([BK], dtype=tl.float64)
    for r0 in range(0, B, BR):
        rows = r0 + tl.arange(0, BR).to(tl.int64)
        a, inb, _ = _scaled_tile(d_ptr, rows, cols, B, K, scale)
        keep = tl.load(finite_ptr + rows, mask=rows < B, other=0) != 0
        a64 = tl.where(inb & keep[:, None], a, 0.0).to(tl.float64)
        raw += tl.sum(a64, axis=0)
        if PER_DIRECTION:
            clipped = tl.minimum(tl.maximum(a64, -clip), clip)
        else:
            f = tl.load(factor_ptr + rows, mask=rows < B, other=1.0)
            clipped = a64 * f[:, None]
        acc += tl.sum(clipped, axis=0)
    cmask = cols < K
    tl.store(sums_ptr + cols, acc, mask=cmask)
    tl.store(raw_ptr + cols, raw, mask=cmask)


def clip_aggregate(
    D: torch.Tensor, clip: float, scale: float, mode: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(clipped sums fp64[K], raw sums fp64[K], #clipped int64[], #non-finite int64[]).

    ``D`` is a contiguous fp32 [B, K] tensor with B >= 1; no host synchronisation.
    """
    B, K = D.shape
    dev = D.device
    per_direction = mode == "per_direction"
    clip_t = torch.full((1,), clip, dtype=torch.float64, device=dev)  # a fill kernel, not a copy
    factor = torch.empty(B, dtype=torch.float64, device=dev)
    finite = torch.empty(B, dtype=torch.int32, device=dev)
    over = torch.empty(B, dtype=torch.int32, device=dev)
    sums = torch.empty(K, dtype=torch.float64, device=dev)
    raw = torch.empty(K, dtype=torch.float64, device=dev)
    # Tiles of at most 2048 entries (fp32 + fp64 copies stay in registers at 4 warps).
    bk = min(triton.next_power_of_2(K), 64)
    br = min(2048 // bk, 256, triton.next_power_of_2(B))
    _row_stats_kernel[(triton.cdiv(B, br),)](
        D,
        clip_t,
        factor,
        finite,
        over,
        B,
        K,
        scale,
        PER_DIRECTION=per_direction,
        BR=br,
        BK=bk,
        enable_fp_fusion=False,
    )
    bk = min(triton.next_power_of_2(K), 32)
    br = min(2048 // bk, 256, triton.next_power_of_2(B))
    _column_sums_kernel[(triton.cdiv(K, bk),)](
        D,
        clip_t,
        factor,
        finite,
        sums,
        raw,
        B,
        K,
        scale,
        PER_DIRECTION=per_direction,
        BR=br,
        BK=bk,
        enable_fp_fusion=False,
    )
    num_clipped = over.sum(dtype=torch.int64)
    num_nonfinite = (finite == 0).sum()
    return sums, raw, num_clipped, num_nonfinite
