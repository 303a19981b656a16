"""C++ CPU kernels against the PyTorch reference (DESIGN section 4).

Tolerances: ``directions`` and ``apply_directions`` are **bit-exact** (atol = rtol = 0,
compared as integer bit patterns; NaN compared as NaN), for both rounding modes, since the
rounding stream is exact too.  ``clip_aggregate`` sums in a different order, so its fp64
sums match within rtol 1e-12 of the summed magnitudes; counts are exact.

The first test of a fresh checkout compiles the extension (~40 s, cached afterwards).
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch

from dpzo_engine import ops
from dpzo_engine.core import stream
from dpzo_engine.ops import BackendUnavailable

try:
    from dpzo_engine.ops import cpu_backend

    cpu_backend.ensure_available()
    _UNAVAILABLE = None
except BackendUnavailable as exc:  # no compiler here: skip, the reference still runs everywhere
    _UNAVAILABLE = str(exc)

pytestmark = pytest.mark.skipif(_UNAVAILABLE is not None, reason=_UNAVAILABLE or "")

SIZES = [1, 127, 4099, 100_003]
OFFSETS = [0, 2**32 - 5, 2**33 + 12345, 6_700_000_000]
SEEDS = [0, -1, -123456, 2**63 + 5, 2**64 - 1]
CLIP_RTOL = 1e-12  # fp64 sums in another order


def bits(x: torch.Tensor) -> torch.Tensor:
    """Integer view for bit-exact comparison."""
    return x.view(torch.int16 if x.dtype == torch.bfloat16 else torch.int32)


def assert_bit_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    nan_a, nan_e = torch.isnan(actual), torch.isnan(expected)
    assert torch.equal(nan_a, nan_e), "NaN positions differ"
    diff = (bits(actual) != bits(expected)) & ~nan_a  # NaN payloads may differ between paths
    if diff.any():
        i = int(diff.nonzero()[0])
        pytest.fail(
            f"{int(diff.sum())} of {actual.numel()} elements differ; first at {i}: {actual[i]} vs {expected[i]}"
        )


def seeds_tensor(seeds: list[int]) -> torch.Tensor:
    return torch.tensor([stream.to_int64(s) for s in seeds], dtype=torch.int64)


def run_both(buf: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    ref = ops.apply_directions(buf.clone(), backend="reference", **kwargs)
    cpu = ops.apply_directions(buf.clone(), backend="cpu", **kwargs)
    return cpu, ref


# ---------------------------------------------------------------------------- directions
@pytest.mark.parametrize("kind", stream.KINDS)
@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("size", SIZES)
def test_directions_bit_exact(kind, offset, size):
    for seed in SEEDS:
        assert_bit_equal(
            ops.directions(seed, offset, size, kind, backend="cpu"),
            ops.directions(seed, offset, size, kind, backend="reference"),
        )


@pytest.mark.parametrize("kind", stream.KINDS)
def test_directions_at_top_of_stream(kind):
    offset = (1 << 63) - 300  # offset + count == 2**63 is the last allowed slice
    assert_bit_equal(
        ops.directions(7, offset, 300, kind, backend="cpu"), ops.directions(7, offset, 300, kind, backend="reference")
    )


@pytest.mark.parametrize("kind", stream.KINDS)
def test_directions_do_not_depend_on_thread_count(kind):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.directions(3, 11, 50_001, kind, backend="cpu")
        torch.set_num_threads(max(2, before))
        many = ops.directions(3, 11, 50_001, kind, backend="cpu")
    finally:
        torch.set_num_threads(before)
    assert torch.equal(bits(one), bits(many))


def test_empty_directions():
    assert ops.directions(1, 5, 0, backend="cpu").numel() == 0


# ---------------------------------------------------------------------------- ln / sin / cos
TRANSCENDENTALS = {0: torch.log, 1: torch.sin, 2: torch.cos}
LN_DOMAIN = (1e-7, 0.99999994)  # a = max(u, 1e-7) <= 1 - 2**-24
TRIG_DOMAIN = (0.0, 6.2831854820251465)  # t = u * fp32(2 pi) <= fp32(2 pi)


def float_range(lo: float, hi: float, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """Every fp32 in [lo, hi] (bit patterns are ordered for positive floats), or a slice of them."""
    b_lo = int(torch.tensor(lo, dtype=torch.float32).view(torch.int32))
    b_hi = int(torch.tensor(hi, dtype=torch.float32).view(torch.int32))
    stop = b_hi + 1 if stop is None else min(b_lo + stop, b_hi + 1)
    x = torch.arange(b_lo + start, max(stop, b_lo + start), dtype=torch.int64).to(torch.int32).view(torch.float32)
    return x[(x >= lo) & (x <= hi)] if lo > 0 else x


def transcendental_args(op: int, n: int) -> torch.Tensor:
    """Random arguments plus the hard ones: domain ends and fp32 neighbours of multiples of pi/2."""
    gen = torch.Generator().manual_seed(op)
    lo, hi = LN_DOMAIN if op == 0 else TRIG_DOMAIN
    x = torch.rand(n, generator=gen) * (hi - lo) + lo
    if op == 0:
        x = torch.cat([x, torch.exp(-torch.rand(n, generator=gen) * 16.1), torch.tensor([1e-7, 0.99999994, 0.5])])
        return x.clamp(1e-7, 0.99999994)
    near = torch.tensor([k * torch.pi / 2 for k in range(5)], dtype=torch.float64).float()
    steps = torch.arange(-64, 65, dtype=torch.int32)
    hard = (near.view(torch.int32)[:, None] + steps[None, :]).view(-1).view(torch.float32)
    x = torch.cat([x, hard, torch.tensor([0.0, 1e-30, 2.9e-9, TRIG_DOMAIN[1]])])
    return x[(x >= TRIG_DOMAIN[0]) & (x <= TRIG_DOMAIN[1])]  # drops the NaN patterns below 0


@pytest.mark.parametrize("op", [0, 1, 2], ids=["ln", "sin", "cos"])
def test_vectorised_transcendentals_are_correctly_rounded(op):
    """fp32(f(double x)): the SIMD polynomials (with their rounding guard) == glibc == torch fp64, bit for bit."""
    ext = cpu_backend.load()
    x = transcendental_args(op, 1 << 18)
    fast = ext._transcendental(x, op, True)
    assert_bit_equal(fast, ext._transcendental(x, op, False))
    assert_bit_equal(fast, TRANSCENDENTALS[op](x.double()).float())


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("DPZO_EXHAUSTIVE") != "1", reason="set DPZO_EXHAUSTIVE=1 (~2 min on 2 cores)")
@pytest.mark.parametrize("op", [0, 1, 2], ids=["ln", "sin", "cos"])
def test_transcendentals_exhaustive(op):
    """Every fp32 argument the stream can produce (2e8 for ln, 1.1e9 for sin/cos)."""
    ext = cpu_backend.load()
    lo, hi = LN_DOMAIN if op == 0 else TRIG_DOMAIN
    chunk = 1 << 24
    for start in itertools.count(0, chunk):
        x = float_range(lo, hi, start, start + chunk)
        if x.numel() == 0:
            break
        fast = ext._transcendental(x, op, True)
        assert torch.equal(bits(fast), bits(ext._transcendental(x, op, False)))
        assert torch.equal(bits(fast), bits(TRANSCENDENTALS[op](x.double()).float()))


# ---------------------------------------------------------------------------- apply_directions
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", stream.KINDS)
@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("size", SIZES)
def test_apply_single_direction_bit_exact(dtype, kind, offset, size):
    gen = torch.Generator().manual_seed(size + offset % 1000)
    buf = torch.randn(size, generator=gen).to(dtype)
    for seed in SEEDS:
        cpu, ref = run_both(buf, seeds=seeds_tensor([seed]), coefs=torch.tensor([1e-2]), kind=kind, offset=offset)
        assert_bit_equal(cpu, ref)


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", stream.KINDS)
@pytest.mark.parametrize(
    ("J", "size"),
    [(1, 4099), (2, 4099), (2, 100_003), (65, 127), (65, 2100)],  # J=65 small: the reference is J times slower
)
def test_apply_many_directions_bit_exact(rounding, dtype, kind, J, size):
    gen = torch.Generator().manual_seed(J * 1000 + size)
    buf = (torch.randn(size, generator=gen) * 3).to(dtype)
    seeds = seeds_tensor([*SEEDS, *range(1000, 1000 + J)][:J])
    coefs = torch.randn(J, generator=gen) * 1e-3  # small: stochastic rounding then matters
    for offset in (0, 2**33 + 12345):
        cpu, ref = run_both(
            buf, seeds=seeds, coefs=coefs, kind=kind, offset=offset, rounding=rounding, rounding_seed=-(2**40) + 7
        )
        assert_bit_equal(cpu, ref)


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("size", [1, 127, 4099])
def test_apply_with_mask_bit_exact(rounding, dtype, size):
    gen = torch.Generator().manual_seed(size)
    buf = torch.randn(size, generator=gen).to(dtype)
    keep = torch.rand(size, generator=gen) < 0.4
    mask = ops.pack_mask(keep)
    for kind in stream.KINDS:
        kwargs = dict(seeds=seeds_tensor([5, -1]), coefs=torch.tensor([0.5, -0.25]), kind=kind, offset=2**32 - 5)
        cpu, ref = run_both(buf, mask=mask, rounding=rounding, rounding_seed=9, **kwargs)
        assert_bit_equal(cpu, ref)
        assert torch.equal(bits(cpu[~keep]), bits(buf[~keep]))  # cleared elements untouched
        assert not torch.equal(bits(cpu[keep]), bits(buf[keep])) or not keep.any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_apply_special_values(dtype, rounding):
    """Non-finite inputs pass through (nearest), huge sums overflow to inf like the reference."""
    vals = [0.0, -0.0, float("nan"), float("inf"), -float("inf"), 3.3895e38, -3.3895e38, 1e-40, 1.0, -2.5]
    buf = torch.tensor(vals * 13, dtype=torch.float32).to(dtype)
    for coef in (1e-3, 1e38, 0.0):
        cpu, ref = run_both(
            buf, seeds=seeds_tensor([11]), coefs=torch.tensor([coef]), kind="gaussian", rounding=rounding
        )
        assert_bit_equal(cpu, ref)


def test_stochastic_rounding_is_unbiased_for_tiny_updates():
    """Updates below half a bf16 ulp survive on average (they vanish with nearest)."""
    n = 200_000
    buf = torch.ones(n, dtype=torch.bfloat16)
    coef = 2.0**-10  # a quarter of the bf16 ulp at 1.0 (2**-7) for |z| ~ 1
    seeds, coefs = seeds_tensor([4]), torch.tensor([coef])
    near = ops.apply_directions(buf.clone(), seeds, coefs, "rademacher", backend="cpu")
    assert torch.equal(near, buf)
    sr = ops.apply_directions(buf.clone(), seeds, coefs, "rademacher", rounding="stochastic", backend="cpu")
    z = ops.directions(4, 0, n, "rademacher", backend="cpu")
    mean_step = (sr.float() - 1.0).mean().item()
    expected = coef * z.mean().item()
    assert abs(mean_step - expected) < 5 * 2**-7 / n**0.5


def test_apply_does_not_depend_on_thread_count():
    buf = torch.randn(30_011).to(torch.bfloat16)
    kwargs = dict(seeds=seeds_tensor([1, 2, 3]), coefs=torch.tensor([1e-3, 2e-3, -1e-3]), kind="gaussian")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.apply_directions(buf.clone(), offset=77, rounding="stochastic", backend="cpu", **kwargs)
        torch.set_num_threads(max(2, before))
        many = ops.apply_directions(buf.clone(), offset=77, rounding="stochastic", backend="cpu", **kwargs)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(bits(one), bits(many))


def test_apply_on_buffer_views_keeps_storage():
    """In place on a slice of a bigger buffer: neighbours untouched, same result as alone."""
    big = torch.randn(10_000)
    view = big[1000:5099]
    expected = ops.apply_directions(
        view.clone(), seeds_tensor([8]), torch.tensor([1.0]), offset=1000, backend="reference"
    )
    before = big.clone()
    out = ops.apply_directions(view, seeds_tensor([8]), torch.tensor([1.0]), offset=1000, backend="cpu")
    assert out.data_ptr() == view.data_ptr()
    assert torch.equal(big[:1000], before[:1000]) and torch.equal(big[5099:], before[5099:])
    assert_bit_equal(view, expected)


# ---------------------------------------------------------------------------- clip_aggregate
def assert_clip_close(D: torch.Tensor, clip: float, scale: float, mode: str) -> None:
    cpu = ops.clip_aggregate(D, clip, scale, mode, backend="cpu")
    ref = ops.clip_aggregate(D, clip, scale, mode, backend="reference")
    assert cpu.sums.dtype == torch.float64 and cpu.raw_sums.dtype == torch.float64
    assert cpu.num_clipped.dtype == torch.int64 and cpu.num_clipped.dim() == 0
    assert int(cpu.num_clipped) == int(ref.num_clipped)
    assert int(cpu.num_nonfinite) == int(ref.num_nonfinite)
    a = (D.float() * torch.tensor(scale, dtype=torch.float32)).double().abs()
    a = torch.where(torch.isfinite(a), a, torch.zeros_like(a))
    atol = CLIP_RTOL * float(a.sum(dim=0).max()) if a.numel() else 0.0  # cancellation: scale by the magnitudes
    torch.testing.assert_close(cpu.raw_sums, ref.raw_sums, rtol=CLIP_RTOL, atol=atol)
    torch.testing.assert_close(cpu.sums, ref.sums, rtol=CLIP_RTOL, atol=atol)


@pytest.mark.parametrize("mode", ["joint", "per_direction"])
@pytest.mark.parametrize(("B", "K"), [(1, 1), (7, 1), (64, 16), (1000, 65), (3, 300)])
@pytest.mark.parametrize("scale", [1.0, 1 / 16])
def test_clip_aggregate_matches_reference(mode, B, K, scale):
    gen = torch.Generator().manual_seed(B * 100 + K)
    D = torch.randn(B, K, generator=gen) * torch.logspace(-3, 2, B)[:, None]
    assert_clip_close(D, clip=1.5, scale=scale, mode=mode)


@pytest.mark.parametrize("mode", ["joint", "per_direction"])
def test_clip_aggregate_nonfinite_and_huge_rows(mode):
    D = torch.randn(12, 5)
    D[1, 2] = float("nan")
    D[4, 0] = float("inf")
    D[5] = -float("inf")
    D[7] = 1e30  # finite: its norm (in fp64) is huge and it gets clipped
    D[8, 3] = 3e38  # finite in fp32, but times scale 2 it overflows to inf: dropped
    D[9] = 0.0
    for scale in (1.0, 2.0):
        assert_clip_close(D, clip=1.0, scale=scale, mode=mode)
    res = ops.clip_aggregate(D, 1.0, 2.0, mode, backend="cpu")
    assert int(res.num_nonfinite) == 4
    assert torch.isfinite(res.sums).all()
    bound = 1.0 if mode == "joint" else 5**0.5
    assert float(torch.linalg.vector_norm(res.sums)) <= (12 - 4) * bound + 1e-9


def test_clip_aggregate_all_rows_bad_and_empty():
    D = torch.full((4, 3), float("nan"))
    res = ops.clip_aggregate(D, 1.0, backend="cpu")
    assert int(res.num_nonfinite) == 4 and torch.equal(res.sums, torch.zeros(3, dtype=torch.float64))
    empty = ops.clip_aggregate(torch.zeros(0, 3), 1.0, backend="cpu")
    assert empty.batch_size == 0 and torch.equal(empty.sums, torch.zeros(3, dtype=torch.float64))
    assert_clip_close(torch.zeros(5, 0), clip=1.0, scale=1.0, mode="joint")


# ---------------------------------------------------------------------------- availability
def test_missing_compiler_gives_one_line_reason(monkeypatch):
    monkeypatch.setattr(cpu_backend, "_module", None)
    monkeypatch.setattr(cpu_backend, "_error", None)
    monkeypatch.setattr(cpu_backend, "_find_compiler", lambda: None)
    with pytest.raises(BackendUnavailable, match=r"^C\+\+ CPU kernels unavailable: no C\+\+ compiler") as info:
        cpu_backend.ensure_available()
    assert "\n" not in str(info.value)
    with pytest.raises(BackendUnavailable, match="no C\\+\\+ compiler"):  # remembered, not retried
        cpu_backend.ensure_available()
