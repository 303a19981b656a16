"""C++ CPU kernels against the PyTorch reference (docs/design.md section 4).

Tolerances: ``directions`` and ``apply_directions`` are **bit-exact** (atol = rtol = 0,
compared as integer bit patterns; NaN compared as NaN), for both rounding modes, since the
rounding stream is exact too, and on **every instruction-set build this CPU can run**
(scalar, AVX2, AVX-512: each comparison runs all of them against one reference result).
``clip_aggregate`` sums in a different order, so its fp64 sums match within rtol 1e-12 of
the summed magnitudes; counts are exact.

The first test of a fresh checkout compiles the extension (~1 minute, cached afterwards).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys

import pytest
import torch

from dpzo_engine import ops
from dpzo_engine.core import gaussian, stream
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


ISAS = cpu_backend.available_isas() if _UNAVAILABLE is None else []


@contextlib.contextmanager
def forced_isa(name: str):
    cpu_backend.set_isa(name)
    try:
        yield
    finally:
        cpu_backend.set_isa("auto")


def run_both(buf: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """(C++ result, reference result); asserts first that every ISA build gives the same bits."""
    ref = ops.apply_directions(buf.clone(), backend="reference", **kwargs)
    results = []
    for isa in ISAS:
        with forced_isa(isa):
            results.append(ops.apply_directions(buf.clone(), backend="cpu", **kwargs))
    for other in results[1:]:
        assert_bit_equal(other, results[0])
    return results[-1], ref


def cpu_directions(seed: int, offset: int, count: int, kind: str) -> torch.Tensor:
    """The C++ directions, checked equal across every ISA build."""
    results = []
    for isa in ISAS:
        with forced_isa(isa):
            results.append(ops.directions(seed, offset, count, kind, backend="cpu"))
    for other in results[1:]:
        assert_bit_equal(other, results[0])
    return results[-1]


# ---------------------------------------------------------------------------- directions
@pytest.mark.parametrize("kind", stream.KINDS)
@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("size", SIZES)
def test_directions_bit_exact(kind, offset, size):
    for seed in SEEDS:
        assert_bit_equal(
            cpu_directions(seed, offset, size, kind), ops.directions(seed, offset, size, kind, backend="reference")
        )


@pytest.mark.parametrize("kind", stream.KINDS)
def test_directions_at_top_of_stream(kind):
    offset = (1 << 63) - 300  # offset + count == 2**63 is the last allowed slice
    assert_bit_equal(cpu_directions(7, offset, 300, kind), ops.directions(7, offset, 300, kind, backend="reference"))


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


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_directions_into_a_preallocated_tensor(backend):
    out = torch.full((4099,), float("nan"))
    assert ops.directions(9, 2**32 - 3, 4099, backend=backend, out=out) is out
    assert_bit_equal(out, ops.directions(9, 2**32 - 3, 4099, backend="reference"))
    with pytest.raises(ValueError, match="out must be"):
        ops.directions(9, 0, 10, backend=backend, out=torch.empty(11))
    with pytest.raises(ValueError, match="out must be"):
        ops.directions(9, 0, 10, backend=backend, out=torch.empty(10, dtype=torch.float64))


def test_empty_directions():
    assert ops.directions(1, 5, 0, backend="cpu").numel() == 0


# ---------------------------------------------------------------------------- the Gaussian transform
def hard_and_random_uniforms(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    from test_gaussian import hard_uniforms, random_uniforms

    u_a, u_b = hard_uniforms()
    return torch.cat([u_a, random_uniforms(n, seed=5)]), torch.cat([u_b, random_uniforms(n, seed=6)])


def assert_transform_matches_reference(u_a: torch.Tensor, u_b: torch.Tensor, flush: bool = False) -> None:
    ref_c, ref_s = gaussian.box_muller(u_a, u_b)
    for isa in ISAS:
        with forced_isa(isa):
            zc, zs = cpu_backend.load()._box_muller(u_a, u_b, flush)
        assert_bit_equal(zc, ref_c)
        assert_bit_equal(zs, ref_s)


def test_transform_bit_exact_on_every_isa():
    """The hook feeds chosen uniforms (quadrant boundaries, the clamp, powers of two) to each build."""
    assert_transform_matches_reference(*hard_and_random_uniforms(1 << 18))


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.uname().machine != "x86_64", reason="x86 MXCSR")
def test_transform_unchanged_when_subnormals_flush_to_zero():
    """With FTZ + DAZ set (what a GPU's .ftz does) every build returns the same bits: no intermediate is subnormal."""
    assert_transform_matches_reference(*hard_and_random_uniforms(1 << 18), flush=True)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("DPZO_EXHAUSTIVE") != "1", reason="set DPZO_EXHAUSTIVE=1 (~10 min on 2 cores)")
def test_transform_bit_exact_on_every_uniform():
    """Every distinct uniform as u_a (radius) and as u_b (angle), against fixed partners, on every build."""
    from test_gaussian import NUM_UNIFORMS, all_uniforms

    chunk = 1 << 22
    partners = torch.tensor([0.0, 0.1, 0.3, 0.7, 0.99999994])
    for start in range(0, NUM_UNIFORMS, chunk):
        u = all_uniforms(start, start + chunk)
        p = partners.repeat(u.numel() // partners.numel() + 1)[: u.numel()]
        assert_transform_matches_reference(u, p, flush=True)
        assert_transform_matches_reference(p, u, flush=True)


# ---------------------------------------------------------------------------- instruction sets
def test_isa_choice_and_override():
    assert ISAS[0] == "scalar" and cpu_backend.isa() == ISAS[-1]  # the best build runs by default
    with pytest.raises(ValueError, match="cannot run"):
        cpu_backend.set_isa("sse9")
    env = {**os.environ, "DPZO_CPU_ISA": "scalar"}
    code = "from dpzo_engine.ops import cpu_backend; print(cpu_backend.isa())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "scalar"


@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs objdump")
def test_no_fused_multiply_add_in_the_build():
    """-ffp-contract=off and plain intrinsics: no FMA instruction anywhere in the extension (AVX-512 has them)."""
    disassembly = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", cpu_backend.load().__file__], capture_output=True, text=True, check=True
    ).stdout
    assert "vaddps" in disassembly or "addss" in disassembly  # sanity: the float code is there
    fma = [line for line in disassembly.splitlines() if "vfmadd" in line or "vfmsub" in line or "vfnm" in line]
    assert not fma, fma[:5]


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


# ---------------------------------------------------------------------------- direction cache
# A DirectionCache trades memory for generation and must never change a bit: every pass below runs with the
# cache and without it (reference), on every ISA build, and the written cache must equal the stream exactly.


def cached_pass(buf, seeds, coefs, values, read, write, isa, **kwargs):
    cache = ops.DirectionCache(values, read=read, write=write)
    with forced_isa(isa):
        return ops.apply_directions(buf, seeds, coefs, "gaussian", backend="cpu", cache=cache, **kwargs)


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("size", [1, 127, 4099, 20_011])
def test_cached_pass_sequence_bit_exact(rounding, dtype, offset, size):
    """The engine's central-difference sequence (enter, flip, leave and enter, update) with a cache over part
    of the buffer, a cache over all of it, and none: the same bits, and the cache holds the stream."""
    gen = torch.Generator().manual_seed(size + offset % 997)
    start = (torch.randn(size, generator=gen) * 2).to(dtype)
    s1, s2 = stream.to_int64(2**63 + 5), -77
    passes = [  # (seeds, coefs, read, write)
        ([s1], [1e-2], None, 0),
        ([s1], [-2e-2], 0, None),
        ([s1, s2], [1e-2, 1e-2], 0, 1),
        ([s2], [-2e-2], 0, None),
        ([s1, s2], [-3e-3, 1e-2 + 4e-3], 1, None),
    ]
    kwargs = dict(offset=offset, rounding=rounding, rounding_seed=12)
    ref = start.clone()
    for seeds, coefs, _, _ in passes:
        ops.apply_directions(ref, seeds_tensor(seeds), torch.tensor(coefs), "gaussian", backend="reference", **kwargs)
    for length in sorted({0, 1, size // 2, size - 1, size} & set(range(size + 1))):
        for isa in ISAS:
            buf, values = start.clone(), torch.full((length,), float("nan"))
            for seeds, coefs, read, write in passes:
                cached_pass(buf, seeds_tensor(seeds), torch.tensor(coefs), values, read, write, isa, **kwargs)
                if write is not None:
                    assert_bit_equal(values, ops.directions(seeds[write], offset, length, backend="reference"))
            assert_bit_equal(buf, ref)


@pytest.mark.parametrize("isa", ISAS)
def test_cache_is_read_where_it_covers_whole_vectors(isa):
    """A cache that lies (zeros) shows where the kernels load instead of generating: inside, away from the
    two ends of the buffer and of the cache; the values there come from the cache alone."""
    n, offset = 10_000, 2**33 + 3
    buf = torch.zeros(n)
    cached_pass(buf, seeds_tensor([9]), torch.tensor([1.0]), torch.zeros(6000), 0, None, isa, offset=offset)
    generated = ops.directions(9, offset, n, backend="reference")
    loaded = buf == 0
    assert loaded[1024:5000].all()  # well inside both: loaded from the (zero) cache
    assert torch.equal(buf[6000:], generated[6000:])  # outside the cache: generated
    assert torch.equal(buf[~loaded], generated[~loaded])


def test_direction_cache_rejects_bad_use():
    buf, seeds, coefs = torch.zeros(100), seeds_tensor([1, 2]), torch.tensor([1.0, 1.0])
    bad = [
        (ops.DirectionCache(torch.zeros(101)), "cpu", "gaussian", "no longer than the buffer"),
        (ops.DirectionCache(torch.zeros(10, dtype=torch.float64)), "cpu", "gaussian", "float32"),
        (ops.DirectionCache(torch.zeros(10), read=2), "cpu", "gaussian", "one of the pass's 2 directions"),
        (ops.DirectionCache(torch.zeros(10), read=1, write=0), "cpu", "gaussian", "after"),
        (ops.DirectionCache(torch.zeros(10), write=0), "cpu", "rademacher", "Gaussian"),
    ]
    for cache, backend, kind, needle in bad:
        with pytest.raises(ValueError, match=needle):
            ops.apply_directions(buf, seeds, coefs, kind, backend=backend, cache=cache)


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
