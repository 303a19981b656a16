"""Triton kernels against the PyTorch reference (docs/design.md sections 2 and 4).

Runs on CPU tensors under TRITON_INTERPRET=1 (set by conftest.py when there is no CUDA)
and on CUDA tensors when a GPU is present: the same cases, device-parametrised.  Sizes are
small because the interpreter executes every program in Python (the whole file takes
about a minute on 2 CPU cores).

Tolerances (the contract, docs/design.md sections 2 and 4, stream version 2):
* directions (Gaussian and Rademacher) and the Gaussian transform on chosen uniforms:
  **bit-exact** (stream v2 is exact fp32 arithmetic, FMA-free, identical on every backend);
* apply_directions, fp32 and bf16 buffers, nearest and stochastic rounding, with and
  without masks: **bit-exact** (the J-term sum has one fixed order everywhere);
* clip_aggregate: counts exact, sums within 1e-9 relative to the column's sum of |terms|.

On a GPU the compiled kernels must give these bits too (the ``gpu`` variants); without one,
``test_compiled_kernels_round_like_the_interpreter`` compiles them for sm_90 and checks that
the PTX holds only correctly rounded fp32 operations (no FMA, no approximate or
flush-to-zero instruction), which is what makes the interpreter's numpy results the GPU's.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

pytest.importorskip("triton")

from dpzo_engine import ops
from dpzo_engine.core import stream

# The interpreter runs on numpy, which warns where IEEE arithmetic overflows to inf on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
HAS_CUDA = torch.cuda.is_available()

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRET, reason="CPU tensors need TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")]),
]
SEEDS = [0, -1, 2**63 + 5]  # 2**63 + 5 is stored as int64 -2**63 + 5 (stream.to_int64)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """The reference's int64 Philox on ~1e5 elements crosses torch's parallel grain; on a
    loaded 2-core machine the OpenMP workers then contend (measured 3 s instead of 0.05 s
    per 1e5 Gaussians).  The interpreter is single-threaded numpy anyway."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _seeds_tensor(seeds: list[int], device: str) -> torch.Tensor:
    return torch.tensor([stream.to_int64(s) for s in seeds], dtype=torch.int64, device=device)


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int16 if x.element_size() == 2 else torch.int32)


# ---------------------------------------------------------------------------- directions
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(
    "offset,count",
    [(0, 1), (3, 127), (2**32 - 5, 4099), (2**40 + 2, 100003), (2**63 - 130, 127)],
    ids=["0+1", "3+127", "2^32-5+4099", "2^40+2+100003", "2^63-130+127"],
)
def test_directions_match_reference(device: str, kind: str, seed: int, offset: int, count: int) -> None:
    got = ops.directions(seed, offset, count, kind, backend="triton", device=device)
    ref = ops.directions(seed, offset, count, kind, backend="reference", device=device)
    assert got.dtype == torch.float32 and got.shape == (count,)
    assert torch.equal(_bits(got), _bits(ref))


@pytest.mark.parametrize("device", DEVICES)
def test_gaussian_transform_matches_reference(device: str) -> None:
    """Chosen uniforms (quadrant boundaries, the clamp, powers of two) plus random ones, bit for bit."""
    from dpzo_triton.directions import box_muller_values
    from test_gaussian import hard_uniforms, random_uniforms

    from dpzo_engine.core import gaussian

    u_a, u_b = hard_uniforms()
    u_a = torch.cat([u_a, random_uniforms(1 << 14, seed=7)])
    u_b = torch.cat([u_b, random_uniforms(1 << 14, seed=8)])
    ref_c, ref_s = gaussian.box_muller(u_a, u_b)
    zc, zs = box_muller_values(u_a.to(device), u_b.to(device))
    assert torch.equal(_bits(zc.cpu()), _bits(ref_c)) and torch.equal(_bits(zs.cpu()), _bits(ref_s))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_directions_do_not_depend_on_block(device: str, kind: str) -> None:
    """The stream is indexed by element, so the kernel's block size must not show."""
    from dpzo_triton.directions import directions

    a = directions(stream.to_int64(7), 2**35 + 1, 1000, kind, torch.device(device), block=128)
    b = directions(stream.to_int64(7), 2**35 + 1, 1000, kind, torch.device(device), block=4096)
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------- apply_directions
# (n, J, offset, masked, block): 100003 only with J = 1 and J = 65 only on a small size
# to keep interpreter time down; block 1024 makes several programs on 4099 elements.
APPLY_CASES = [
    pytest.param(1, 1, 0, False, 4096, id="n1-J1"),
    pytest.param(127, 65, 2**32 - 3, False, 4096, id="n127-J65-off2^32-3"),
    pytest.param(127, 2, 5, True, 4096, id="n127-J2-mask"),
    pytest.param(4099, 2, 2**40 + 1, True, 1024, id="n4099-J2-off2^40+1-mask"),
    pytest.param(4099, 1, 0, False, 1024, id="n4099-J1"),
    pytest.param(100003, 1, 2**33 + 2, False, 4096, id="n100003-J1-off2^33+2"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("n,J,offset,masked,block", APPLY_CASES)
def test_apply_directions_match_reference(
    device: str, kind: str, dtype: torch.dtype, rounding: str, n: int, J: int, offset: int, masked: bool, block: int
) -> None:
    from dpzo_triton.apply_directions import apply_directions

    g = torch.Generator().manual_seed(n * 1000 + J)
    buf = torch.randn(n, generator=g).to(dtype).to(device)
    extra = torch.randint(-(2**63), 2**63 - 1, (max(J - 3, 0),), generator=g).tolist()
    first = (n + J) % 3  # rotate so single-direction cases also see -1 and 2**63 + 5
    seed_list = (SEEDS[first:] + SEEDS[:first] + extra)[:J]
    seeds = _seeds_tensor(seed_list, device)
    coefs = (torch.randn(J, generator=g) * 0.05).to(device)
    keep = (torch.rand(n, generator=g) < 0.7).to(device)
    mask = ops.pack_mask(keep) if masked else None
    rseed = stream.to_int64(2**63 + 17)

    kw = dict(offset=offset, mask=mask, rounding=rounding, rounding_seed=rseed)
    ref = ops.apply_directions(buf.clone(), seeds, coefs, kind, backend="reference", **kw)
    out = apply_directions(buf.clone(), seeds, coefs, kind, offset, mask, rounding, rseed, block=block)

    if masked:  # cleared elements untouched, bit for bit
        assert torch.equal(out[~keep].view(torch.uint8), buf[~keep].view(torch.uint8))
    assert torch.equal(_bits(out), _bits(ref))


@pytest.mark.parametrize("device", DEVICES)
def test_apply_directions_through_dispatcher_with_j_of_several_hundred(device: str) -> None:
    """ops.apply_directions(backend='triton') end to end, J = 300 on a tiny buffer."""
    J = 300
    seeds = _seeds_tensor(list(range(J)), device)
    coefs = torch.linspace(-0.01, 0.01, J, device=device)
    buf = torch.zeros(5, dtype=torch.bfloat16, device=device)
    ref = ops.apply_directions(buf.clone(), seeds, coefs, "rademacher", offset=9, backend="reference")
    out = ops.apply_directions(buf.clone(), seeds, coefs, "rademacher", offset=9, backend="triton")
    assert torch.equal(out.view(torch.int16), ref.view(torch.int16))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_apply_directions_non_finite_and_overflow(device: str, dtype: torch.dtype, rounding: str) -> None:
    """inf/NaN pass through; values at the top of the range may round to inf, as in the reference."""
    big = torch.finfo(dtype).max
    vals = [float("inf"), float("-inf"), float("nan"), big, -big, 0.0, -0.0, 1e-40, 1.0, -3.5]
    buf = torch.tensor(vals * 7, dtype=torch.float32).to(dtype).to(device)
    seeds = _seeds_tensor([1, 2], device)
    coefs = torch.tensor([big / 4 if dtype == torch.bfloat16 else 1e38, 0.25], device=device)
    kw = dict(offset=11, rounding=rounding, rounding_seed=3)
    ref = ops.apply_directions(buf.clone(), seeds, coefs, "rademacher", backend="reference", **kw)
    out = ops.apply_directions(buf.clone(), seeds, coefs, "rademacher", backend="triton", **kw)
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    fin = ~torch.isnan(ref)
    assert torch.equal(out[fin].view(torch.uint8), ref[fin].view(torch.uint8))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_apply_directions_chunking_is_invisible(device: str, kind: str) -> None:
    """Two calls on slices at their offsets == one call on the whole buffer (bit for bit).

    Both the directions and the stochastic-rounding bits are indexed by stream position
    offset + i, so how the engine chunks the flat buffer cannot change the result.
    """
    from dpzo_triton.apply_directions import apply_directions

    n, cut, base = 3000, 1001, 2**34 + 3
    buf = torch.randn(n, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16).to(device)
    seeds = _seeds_tensor([11, 12], device)
    coefs = torch.tensor([0.3, -0.2], device=device)
    whole = apply_directions(buf.clone(), seeds, coefs, kind, base, None, "stochastic", 99)
    parts = buf.clone()
    apply_directions(parts[:cut], seeds, coefs, kind, base, None, "stochastic", 99, block=512)
    apply_directions(parts[cut:], seeds, coefs, kind, base + cut, None, "stochastic", 99, block=256)
    assert torch.equal(whole.view(torch.int16), parts.view(torch.int16))


@pytest.mark.parametrize("device", DEVICES)
def test_stochastic_rounding_is_unbiased(device: str) -> None:
    """An update of 1/8 bf16 ulp vanishes with nearest rounding but survives on average."""
    n = 8192
    c = 2.0**-10  # bf16 ulp at 1.0 is 2**-7
    seeds = _seeds_tensor([5], device)
    coefs = torch.tensor([c], device=device)
    z = ops.directions(5, 0, n, "rademacher", backend="reference", device=device)
    buf = torch.ones(n, dtype=torch.bfloat16, device=device)
    near = ops.apply_directions(buf.clone(), seeds, coefs, "rademacher", backend="triton")
    assert torch.equal(near, buf)
    sr = ops.apply_directions(
        buf.clone(), seeds, coefs, "rademacher", rounding="stochastic", rounding_seed=8, backend="triton"
    )
    got = float((sr.float() - 1.0).mean())
    want = c * float(z.mean())
    # each element moves by a Bernoulli multiple of one ulp: std of the mean <= 2**-7 / sqrt(n)
    assert abs(got - want) <= 5 * 2.0**-7 / math.sqrt(n)


# ---------------------------------------------------------------------------- clip_aggregate
def _clip_inputs(B: int, K: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(B, K, generator=g) * torch.logspace(-3, 3, B)[:, None].float()
    if B >= 8:
        D[1, 0] = float("nan")  # dropped, counted
        D[3, K - 1] = float("inf")  # dropped, counted
        D[4, :] = 3e38  # finite in fp32; its square overflows fp32 but not fp64
        D[5, :] = 1e-30  # squares underflow fp32 but not fp64
        D[6, :] = 0.0
    return D


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["joint", "per_direction"])
@pytest.mark.parametrize("B,K", [(1, 1), (8, 1), (9, 3), (300, 17), (2000, 64), (64, 1024)])
@pytest.mark.parametrize("scale", [1.0, 1 / 3, 2.0])
def test_clip_aggregate_matches_reference(device: str, mode: str, B: int, K: int, scale: float) -> None:
    D = _clip_inputs(B, K, B * K).to(device)
    clip = 1.5
    got = ops.clip_aggregate(D, clip, scale, mode, backend="triton")
    ref = ops.clip_aggregate(D, clip, scale, mode, backend="reference")
    assert got.sums.dtype == torch.float64 and got.sums.shape == (K,)
    assert got.num_clipped.dtype == torch.int64 and got.num_clipped.dim() == 0
    assert got.num_nonfinite.dtype == torch.int64 and got.num_nonfinite.dim() == 0
    assert int(got.num_clipped) == int(ref.num_clipped)
    assert int(got.num_nonfinite) == int(ref.num_nonfinite)
    # scale of each column's terms: bounds the summation-order error whatever the cancellation
    a = (D.float() * torch.tensor(scale, dtype=torch.float32, device=device)).double()
    a = torch.where(torch.isfinite(a).all(dim=1, keepdim=True), a, torch.zeros_like(a))
    mag = a.abs().sum(dim=0)
    assert bool(((got.raw_sums - ref.raw_sums).abs() <= 1e-9 * mag).all())
    clip_mag = torch.minimum(mag, torch.full_like(mag, clip * B))
    assert bool(((got.sums - ref.sums).abs() <= 1e-9 * clip_mag + 1e-300).all())


@pytest.mark.parametrize("device", DEVICES)
def test_clip_aggregate_is_deterministic(device: str) -> None:
    D = _clip_inputs(500, 33, 0).to(device)
    a = ops.clip_aggregate(D, 0.7, 0.5, "joint", backend="triton")
    b = ops.clip_aggregate(D, 0.7, 0.5, "joint", backend="triton")
    assert torch.equal(a.sums, b.sums) and torch.equal(a.raw_sums, b.raw_sums)


# ---------------------------------------------------------------------------- backend plumbing
def test_ensure_available_reports_missing_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from dpzo_engine.ops import triton_backend

    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    with pytest.raises(ops.BackendUnavailable, match="triton is not importable"):
        triton_backend.ensure_available()


@pytest.mark.skipif(not INTERPRET, reason="the check runs under TRITON_INTERPRET=1 only")
def test_interpreter_that_cannot_loop_over_arguments_is_refused_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """Triton 3.6's interpreter with numpy >= 2.4 fails every kernel deep inside (int() of a 1-element array):
    the backend says so in one line.  Here the check itself passes, so its failure is simulated."""
    from dpzo_engine.ops import triton_backend

    assert triton_backend._interpreter_problem() is None  # this environment's Triton runs the kernels
    monkeypatch.setattr(triton_backend, "_interpreter_problem", lambda: "InterpreterError: TypeError(...)")
    with pytest.raises(ops.BackendUnavailable, match=r"interpreter cannot run the kernels with numpy .*Triton >= 3.9"):
        ops.resolve_backend("triton", torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_no_recompile_across_seeds_offsets_and_j() -> None:
    """New seeds, coefs, J, offsets and rounding seeds reuse the compiled kernel."""
    from dpzo_triton.apply_directions import _apply_directions_kernel

    buf = torch.zeros(4096, dtype=torch.bfloat16, device="cuda")
    cache = _apply_directions_kernel.device_caches[torch.cuda.current_device()][0]

    def call(J: int, offset: int, rseed: int) -> None:
        seeds = torch.arange(J, dtype=torch.int64, device="cuda") * 7919 - 2**40
        coefs = torch.full((J,), 1e-3, device="cuda")
        ops.apply_directions(buf, seeds, coefs, offset=offset, rounding="stochastic", rounding_seed=rseed)

    call(1, 0, 1)
    before = len(cache)
    for J, offset, rseed in [(2, 4, -1), (65, 2**32, 2**62), (300, 2**40 + 8, 5), (1, 8, 2**63 + 1)]:
        call(J, offset, rseed)
    assert len(cache) == before


_COMPILE_SCRIPT = r"""
import re

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import dpzo_triton.apply_directions as A
import dpzo_triton.clip_aggregate as C
import dpzo_triton.directions as D


FLOAT_OP = re.compile(r"^\s*(?:@%p\d+\s+)?([a-z]+(?:\.[a-z0-9]+)*)\s", re.M)
INEXACT = ("fma", "mad", "approx", "ftz", "rcp", "rsqrt", "ex2", "lg2", "sin", "cos", "tanh")


def check_rounding(ptx, name):
    # every fp32 operation correctly rounded and unfused, as the interpreter's numpy runs it
    ops = {op for op in FLOAT_OP.findall(ptx) if ".f32" in op}
    bad = sorted(op for op in ops if any(word in op.split(".") or word in op for word in INEXACT))
    bad += sorted(op for op in ops if op.split(".")[0] in ("add", "sub", "mul", "div", "sqrt") and ".rn" not in op)
    assert not bad, f"{name}: {bad}"
    return ops


def compile_for_h100(fn, sig, constexprs, num_warps=4):
    params = [p.name for p in fn.params]
    attrs = {(params.index(k),): [["tt.divisibility", 16]] for k, v in sig.items() if v.startswith("*")}
    full = {**sig, **{k: "constexpr" for k in constexprs}}
    src = ASTSource(fn, full, constexprs, attrs)
    opts = {"num_warps": num_warps, "enable_fp_fusion": False}
    return check_rounding(triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts).asm["ptx"], fn.__name__)


apply_sig = {"buf_ptr": "*i16", "mask_ptr": "*u8", "seeds_ptr": "*i64", "coefs_ptr": "*fp32", "off_hi": "i32",
             "off_lo": "i32", "n": "i64", "num_dirs": "i32", "rs_hi": "i32", "rs_lo": "i32"}
for kind, bf16, mask, sr, shift in [(0, True, True, True, 3), (1, False, False, False, 0)]:
    sig = dict(apply_sig, buf_ptr="*i16" if bf16 else "*fp32")
    cst = {"SHIFT": shift, "KIND": kind, "IS_BF16": bf16, "HAS_MASK": mask, "STOCHASTIC": sr, "BLOCK": 4096}
    compile_for_h100(A._apply_directions_kernel, sig, cst, num_warps=8)
dir_sig = {"out_ptr": "*fp32", "seed_hi": "i32", "seed_lo": "i32", "off_hi": "i32", "off_lo": "i32", "count": "i32"}
ops = compile_for_h100(D._directions_kernel, dir_sig, {"SHIFT": 1, "KIND": 0, "BLOCK": 2048})
assert {"div.rn.f32", "sqrt.rn.f32", "mul.rn.f32", "add.rn.f32"} <= ops, ops  # the Gaussian transform is there
bm_sig = {"ua_ptr": "*fp32", "ub_ptr": "*fp32", "zc_ptr": "*fp32", "zs_ptr": "*fp32", "n": "i32"}
compile_for_h100(D._box_muller_kernel, bm_sig, {"BLOCK": 1024})
common = {"d_ptr": "*fp32", "clip_ptr": "*fp64", "factor_ptr": "*fp64", "finite_ptr": "*i32"}
row_sig = {**common, "over_ptr": "*i32", "B": "i32", "K": "i32", "scale": "fp32"}
col_sig = {**common, "sums_ptr": "*fp64", "raw_ptr": "*fp64", "B": "i32", "K": "i32", "scale": "fp32"}
compile_for_h100(C._row_stats_kernel, row_sig, {"PER_DIRECTION": False, "BR": 32, "BK": 64})
compile_for_h100(C._column_sums_kernel, col_sig, {"PER_DIRECTION": True, "BR": 64, "BK": 32})
print("compiled")
"""


@pytest.mark.skipif(HAS_CUDA, reason="the CUDA tests compile the kernels for real")
def test_compiled_kernels_round_like_the_interpreter() -> None:
    """Compile every kernel for sm_90 in a subprocess without TRITON_INTERPRET (needs no GPU): the
    interpreter accepts code the compiler rejects (e.g. non-constexpr globals), and the PTX must hold
    only correctly rounded, unfused fp32 operations (add/sub/mul/div/sqrt .rn; no fma, approx or ftz),
    so the GPU computes what the interpreter computes.  (Running them on a GPU is the ``gpu`` tests' job.)"""
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "0"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 and "CompilationError" not in proc.stderr:
        pytest.skip(f"cannot compile for sm_90 here: {proc.stderr.strip().splitlines()[-1:]}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "compiled" in proc.stdout
