"""DP-ZOPO's data-free pruning masks (Liu et al., NDSS 2025): which parameters ZO trains.

The score never touches the training data or the secret generator, so a mask is public
post-processing and costs no ε. Published method (``src/prune.py`` of their code):

1. linearise: θ ← |θ| for every parameter of the model (SynFlow's trick);
2. objective f(θ) = sum of the model's outputs on one all-ones input (token id 1, length 1);
3. two-point ZO estimates along Q directions: c1_q at θ, then c2_q at θ' = θ + λ ĝ1 with
   ĝ1 = Σ_q c1_q z_q / Q (a step along the estimated gradient);
4. Hessian-gradient product Hg ≈ (g2 − g1)/λ; score_i = |θ_i|·Hg_i; restore the signs;
5. keep the fraction of trainable parameters with the *smallest* |score| (their ``kthvalue``).

Ours differs deliberately, in four ways. The second estimate reuses the first one's directions
(common random numbers), so Hg = Σ_q (c2_q − c1_q)/(Qλ)·z_q estimates the Hessian along ĝ1
instead of being swamped by the difference of two independent d-dimensional estimates; with
Q = 1 the ranking is then |θ_i z_i| alone, so use Q ≥ 4 (default 4; the probes cost 2Q(Q+1)
direction values per parameter, 40 at Q = 4). Hg is a combination of Q regenerable directions,
so scores are computed chunk by chunk with the fused kernel and never stored. And the
threshold is an exact radix select over the fp32 bit patterns of |score| (three passes over
regenerated chunks, 2 × 65536 counters), with ties broken by parameter index, so exactly
``round(f·N)`` parameters are kept and nothing bigger than a chunk exists.

Finally, the probes never write θ (``PerturbedView``) and the signs are kept as one packed bit
per parameter and restored bit for bit, so computing a mask leaves every weight exactly as it was
(their code perturbs in place and drifts).
Strategies: ``static`` one mask before training; ``dynamic`` a fresh mask at each stage on the
current weights; ``incremental`` the kept set grows to ``f·(s+1)`` of the parameters at stage
``s``, keeping every earlier member. Rank multipliers (published ``pruning_mode=rank``, 1.2 for
the smallest |score| down to 0.8) are approximated by ``rank_bins`` bins: each bin is its own
one-bit mask with its multiplier, so they cost ``rank_bins`` bits per parameter and
``rank_bins`` kernel sweeps per pass; the plain mask is one bit and no extra sweep.
"""

from __future__ import annotations

import hashlib
import inspect
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .. import ops
from ..core import stream
from ..core.errors import ConfigError
from ..core.flat import FlatParams

STRATEGIES = ("static", "dynamic", "incremental")
DEFAULT_KEEP_FRACTION = 0.01
DEFAULT_QUERIES = 4
DEFAULT_PROBE_EPS = 1e-3
RANK_UPPER, RANK_LOWER = 1.2, 0.8  # published multipliers: smallest |score| first
CHUNK = 1 << 20  # elements per score chunk (a multiple of 8: packed masks stay byte-aligned)
INPUT_TOKEN = 1  # the all-ones input of the published code
SENTINEL = (1 << 32) - 1  # key of elements that can't be selected (already kept, NaN score)
_DIGIT = 1 << 16


# ----------------------------------------------------------------------------- memory
def mask_extra_bytes(trainable: FlatParams | int | Sequence[int], rank_bins: int = 0) -> int:
    """Bytes a DP-ZOPO mask adds for the whole run: one bit per trainable parameter (rounded up
    to a byte per flat buffer), or ``rank_bins`` bits with rank multipliers.

    ``trainable`` is a ``FlatParams``, a total element count, or the per-buffer counts. This is
    all a mask costs while training; computing one also holds one sign bit per model parameter
    and a few chunk-sized temporaries for a moment (``scoring_transient_bytes``).
    """
    if isinstance(trainable, FlatParams):
        counts = [b.numel() for b in trainable.buffers]
    elif isinstance(trainable, int):
        counts = [trainable]
    else:
        counts = list(trainable)
    return max(1, rank_bins) * sum((n + 7) // 8 for n in counts)


def scoring_transient_bytes(model: nn.Module, chunk: int = CHUNK) -> int:
    """Upper bound of the extra bytes held while a mask is computed (all freed afterwards): the packed
    signs of every parameter, ``PerturbedView``'s perturbed temporaries (at most one per distinct
    trainable tensor shape: for a transformer, the embeddings plus one block), and about ten
    chunk-sized fp32/int64 temporaries of the selection. It does not grow with depth."""
    params = [p for p in model.parameters() if p.is_floating_point()]
    signs = sum((p.numel() + 7) // 8 for p in params)
    shapes = {(p.dtype, p.numel()): p.numel() * p.element_size() for p in params if p.requires_grad}
    return signs + sum(shapes.values()) + 10 * 8 * chunk


# ----------------------------------------------------------------------------- bits
_SHIFTS: dict[torch.device, torch.Tensor] = {}


def _shifts(device: torch.device) -> torch.Tensor:
    if device not in _SHIFTS:
        _SHIFTS[device] = torch.arange(8, dtype=torch.uint8, device=device)
    return _SHIFTS[device]


def pack_bits(keep: torch.Tensor) -> torch.Tensor:
    """``ops.pack_mask``'s format (bit i & 7 of byte i >> 3), fast: numpy's packbits on CPU."""
    keep = keep.reshape(-1).contiguous()
    if keep.device.type == "cpu":
        return torch.from_numpy(np.packbits(keep.bool().numpy(), bitorder="little"))
    b = keep.to(torch.uint8)
    if b.numel() % 8:
        b = torch.cat([b, b.new_zeros(8 - b.numel() % 8)])
    return (b.view(-1, 8) << _shifts(b.device)).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, start: int, count: int) -> torch.Tensor:
    """Booleans of elements start .. start+count-1 of a packed mask; ``start`` is a multiple of 8."""
    if start % 8:
        raise ValueError(f"start must be a multiple of 8, got {start}")
    part = packed[start // 8 : start // 8 + (count + 7) // 8]
    if part.device.type == "cpu":
        return torch.from_numpy(np.unpackbits(part.contiguous().numpy(), count=count, bitorder="little").view(np.bool_))
    return ((part.unsqueeze(1) >> _shifts(part.device)) & 1).view(-1)[:count].bool()


# ----------------------------------------------------------------------------- signs
_INT_VIEW = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _int_view(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``t`` flattened and viewed as signed integers of its width, and the magnitude mask."""
    bits = t.element_size() * 8
    return t.view(-1).view(_INT_VIEW[t.element_size()]), (1 << (bits - 1)) - 1


@contextmanager
def linearized(model: nn.Module, chunk: int = CHUNK) -> Iterator[None]:
    """Inside the block every floating parameter holds |θ|; on exit its signs come back bit for
    bit (signed zeros and NaN payloads included). Signs live in one packed bit per element.

    Works on the integer view of each tensor: clearing and setting the sign bit is exact in any
    float format, where ``abs`` / ``copysign`` may touch NaN payloads.
    """
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    with torch.no_grad():
        for p in model.parameters():
            if not p.is_floating_point() or not p.is_contiguous():
                if p.is_floating_point():
                    raise ValueError("linearized() needs contiguous parameters")
                continue
            v, magnitude = _int_view(p.data)
            packed = torch.zeros((v.numel() + 7) // 8, dtype=torch.uint8, device=v.device)
            for start in range(0, v.numel(), chunk):
                part = v[start : start + chunk]
                packed[start // 8 : start // 8 + (part.numel() + 7) // 8] = pack_bits(part < 0)
                part.bitwise_and_(magnitude)
            saved.append((p, packed))
    try:
        yield
    finally:
        with torch.no_grad():
            for p, packed in saved:
                v, magnitude = _int_view(p.data)
                sign = -magnitude - 1  # the sign bit as a signed integer of this width
                for start in range(0, v.numel(), chunk):
                    part = v[start : start + chunk]
                    negative = unpack_bits(packed, start, part.numel())
                    part.bitwise_and_(magnitude)  # the probes' rounding may have left a sign behind
                    part.bitwise_or_(torch.where(negative, sign, 0).to(part.dtype))


# ----------------------------------------------------------------------------- score
def probe_seed(master_seed: int, stage: int, query: int) -> int:
    """Public seed of score probe ``query`` at ``stage``: never the training directions' seeds."""
    return stream.derive_seed(master_seed, stream.DOMAIN_PRUNING, stage, query)


def data_free_objective(model: nn.Module) -> Callable[[], torch.Tensor]:
    """f(θ): the sum of the model's first output on one all-ones token (fp64, shape [1])."""
    device = next(model.parameters()).device
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or INPUT_TOKEN + 1
    ids = torch.full((1, 1), min(INPUT_TOKEN, vocab - 1), dtype=torch.long, device=device)

    def f() -> torch.Tensor:
        out = model(input_ids=ids)
        logits = out.logits if hasattr(out, "logits") else out[0]
        return logits.double().sum().reshape(1)

    return f


@dataclass(frozen=True)
class HessianGradient:
    """Hg ≈ Σ_q weights[q]·z(seeds[q]): public, data-free, and enough to regenerate any chunk."""

    seeds: tuple[int, ...]
    weights: tuple[float, ...]

    def chunk(self, offset: int, count: int, kind: str, backend: str, device: torch.device) -> torch.Tensor:
        """Hg at global stream indices offset .. offset+count-1 (fp32), one fused pass."""
        out = torch.zeros(count, dtype=torch.float32, device=device)
        seeds = torch.tensor(self.seeds, dtype=torch.int64, device=device)
        coefs = torch.tensor(self.weights, dtype=torch.float32, device=device)
        return ops.apply_directions(out, seeds, coefs, kind, offset=offset, backend=backend)


class PerturbedView:
    """Forwards that see θ + Σ_j c_j z_j without writing to θ: exact, nothing to restore.

    A forward pre-hook on each module that owns trainable parameters points them at a temporary
    ``round(θ + Σ_j c_j z_j)`` (the fused kernel at the parameter's global stream offset, the same
    arithmetic as an in-place pass) and a forward hook points them back. Only one module's
    temporaries exist at a time. Perturbing in place and restoring would leave rounding residue
    of the size of the probe step (hundreds of bf16 ulps on small weights after the θ' shift).
    Parameters must be read inside the forward of a module that owns them (true of Hugging Face
    models; a tied weight is perturbed by each of its owners, identically): ``audit`` refuses a
    model that reads one elsewhere, whose probes would otherwise see it unperturbed.
    """

    def __init__(self, model: nn.Module, flat: FlatParams, kind: str, backend: str):
        offset = {id(p): flat.slots[n].global_offset for n, p in model.named_parameters() if n in flat.slots}
        self.offset, self.kind, self.backend, self.device = offset, kind, backend, flat.device
        self.owners = []
        self.source: dict[int, torch.Tensor] = {}  # each trainable parameter's own storage
        for module in model.modules():
            params = [(name, p) for name, p in module.named_parameters(recurse=False) if id(p) in offset]
            if params:
                self.owners.append((module, params))
                self.source.update((id(p), p.data) for _, p in params)
        self.sweeps = 0  # full sweeps of the direction generator over the trainable parameters
        # CPU: reuse temporaries (big fresh allocations are mmapped and page-faulted on every forward);
        # CUDA's caching allocator already does this.
        self.pool: dict[tuple[torch.dtype, int], list[torch.Tensor]] | None = {} if flat.device.type == "cpu" else None

    def _take(self, p: torch.Tensor) -> torch.Tensor:
        free = self.pool.get((p.dtype, p.numel())) if self.pool is not None else None
        tmp = free.pop() if free else torch.empty(p.numel(), dtype=p.dtype, device=p.device)
        return tmp.copy_(self.source[id(p)].view(-1))

    def _give(self, tmp: torch.Tensor) -> None:
        if self.pool is not None:
            self.pool.setdefault((tmp.dtype, tmp.numel()), []).append(tmp)

    @contextmanager
    def at(self, seeds: Sequence[int], coefs: Sequence[float]) -> Iterator[None]:
        seeds_t = torch.tensor(list(seeds), dtype=torch.int64, device=self.device)
        coefs_t = torch.tensor(list(coefs), dtype=torch.float32, device=self.device)
        saved: dict[int, tuple[nn.Parameter, torch.Tensor]] = {}

        def swap_in(module: nn.Module, params: list) -> None:
            for _, p in params:
                if id(p) in saved:  # re-entrant use of a tied weight: already perturbed
                    continue
                tmp = self._take(p)
                ops.apply_directions(tmp, seeds_t, coefs_t, self.kind, offset=self.offset[id(p)], backend=self.backend)
                saved[id(p)] = (p, p.data)
                p.data = tmp.view_as(p)

        def swap_out(params: list) -> None:
            for _, p in params:
                if id(p) in saved:
                    tmp = p.data
                    p.data = saved.pop(id(p))[1]
                    self._give(tmp.view(-1))

        handles = []
        for module, params in self.owners:
            handles.append(module.register_forward_pre_hook(lambda m, a, params=params: swap_in(m, params)))
            handles.append(module.register_forward_hook(lambda m, a, o, params=params: swap_out(params)))
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            for p, original in saved.values():  # after an exception inside a module
                p.data = original
        self.sweeps += 1

    def audit(self, f: Callable[[], torch.Tensor]) -> None:
        """One forward in which every trainable parameter reads NaN except inside its owners' forwards
        (a stride-0 view: no memory). A finite result means no parameter is read elsewhere."""
        if not math.isfinite(float(f())):
            raise ConfigError("the data-free pruning objective is not finite on this model (try --dtype float32)")
        for _, params in self.owners:
            for _, p in params:
                p.data = torch.full((), float("nan"), dtype=p.dtype, device=p.device).expand(p.shape)
        try:
            with self.at([0], [0.0]):
                value = float(f())
        finally:
            for _, params in self.owners:
                for _, p in params:
                    p.data = self.source[id(p)]
        if not math.isfinite(value):
            raise ConfigError(
                "DP-ZOPO's data-free score needs every trainable parameter read inside its own module's forward, "
                "and this model reads one elsewhere; use --method dp-zoso or freeze that parameter"
            )


def estimate_hessian_gradient(
    model: nn.Module,
    flat: FlatParams,
    seeds: Sequence[int],
    probe_eps: float = DEFAULT_PROBE_EPS,
    kind: str = "gaussian",
    backend: str = "auto",
) -> tuple[HessianGradient, dict]:
    """Steps 3-4 on the (already linearised) model; the parameters are never written.

    c1_q = [f(θ + μz_q) − f(θ − μz_q)]/2μ, θ' = θ + λ Σ_q c1_q z_q / Q (λ = μ as published),
    c2_q the same at θ', all with common directions z_q; Hg = Σ_q (c2_q − c1_q)/(Qλ) z_q.
    Returns Hg and the work done (forwards, sweeps).
    """
    view = PerturbedView(model, flat, kind, ops.resolve_backend(backend, flat.device))
    f = data_free_objective(model)
    with torch.no_grad():
        view.audit(f)
    Q, mu, seeds = len(seeds), probe_eps, [int(s) for s in seeds]

    def central(q: int, base: list[float]) -> float:
        values = []
        for sign in (1.0, -1.0):
            coefs = list(base)
            coefs[q] += sign * mu
            with view.at(seeds, coefs):
                values.append(float(f()))
        return (values[0] - values[1]) / (2 * mu)

    with torch.no_grad():
        c1 = [central(q, [0.0] * Q) for q in range(Q)]
        shift = [probe_eps * c / Q for c in c1]
        c2 = [central(q, shift) for q in range(Q)]
    if not all(math.isfinite(c) for c in c1 + c2):
        raise ConfigError("the data-free pruning objective is not finite on this model (try --dtype float32)")
    weights = tuple((b - a) / (Q * probe_eps) for a, b in zip(c1, c2))
    return HessianGradient(tuple(seeds), weights), {"forwards": 4 * Q + 2, "sweeps": view.sweeps}


def score_chunks(
    flat: FlatParams, hg: HessianGradient, kind: str, backend: str, chunk: int = CHUNK
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(buffer index, start, |θ|·Hg fp32) for consecutive chunks in the flat buffer's order."""
    for b, (buf, offset) in enumerate(flat):
        for start in range(0, buf.numel(), chunk):
            theta = buf[start : start + chunk].to(torch.float32).abs()
            yield b, start, theta * hg.chunk(offset + start, theta.numel(), kind, backend, buf.device)


# ----------------------------------------------------------------------------- exact selection
def score_keys(scores: torch.Tensor, largest: bool = False) -> torch.Tensor:
    """int64 keys whose order is the selection order of |score| (ascending, or descending with
    ``largest``); NaN scores get ``SENTINEL`` and are never selected."""
    bits = scores.abs().view(torch.int32).to(torch.int64)  # non-negative floats: bits order = value order
    nan = bits > 0x7F800000
    keys = (0x7F800000 - bits) if largest else bits
    return torch.where(nan, SENTINEL, keys)


@dataclass(frozen=True)
class Boundary:
    """Rank ``r`` in the total order (key, index): an element lies before it iff its key is below
    ``key``, or equal with fewer than ``ties`` equal keys before it in index order."""

    key: int
    ties: int


def select_boundaries(keys: Callable[[], Iterator[torch.Tensor]], ranks: Sequence[int]) -> list[Boundary]:
    """Exact order statistics of all keys (regenerated by ``keys()`` in index order) at ``ranks``.

    Two-digit radix select: one pass counts the high 16 bits, one pass counts the low 16 bits
    inside the bins that hold a requested rank. Memory: 65536 counters per pass and per rank.
    """
    total = 0
    high = None
    for k in keys():
        h = torch.bincount(k >> 16, minlength=_DIGIT)
        high = h if high is None else high + h
        total += k.numel()
    if high is None:
        return [Boundary(1 << 32, 0) for _ in ranks]
    selectable = total - int(high[SENTINEL >> 16])  # only sentinels reach the top digit
    for r in ranks:
        if not 0 <= r <= selectable:
            raise ValueError(f"rank {r} is outside [0, {selectable}] selectable elements")
    cum_high = torch.cumsum(high, 0).cpu()
    wanted: dict[int, int] = {}  # rank -> high digit (ranks == total select everything)
    for r in ranks:
        if r < total:
            wanted[r] = int(torch.searchsorted(cum_high, r, right=True))
    digits = sorted(set(wanted.values()))
    low = {d: torch.zeros(_DIGIT, dtype=torch.int64) for d in digits}
    if digits:
        for k in keys():
            hi = k >> 16
            for d in digits:
                sel = k[hi == d]
                if sel.numel():
                    low[d] += torch.bincount(sel & 0xFFFF, minlength=_DIGIT).cpu()
    out = []
    for r in ranks:
        if r >= total:
            out.append(Boundary(1 << 32, 0))
            continue
        d = wanted[r]
        below_bin = int(cum_high[d - 1]) if d > 0 else 0
        cum_low = torch.cumsum(low[d], 0)
        lo = int(torch.searchsorted(cum_low, r - below_bin, right=True))
        below_key = below_bin + (int(cum_low[lo - 1]) if lo > 0 else 0)
        out.append(Boundary((d << 16) | lo, r - below_key))
    return out


class Classifier:
    """Streams the class of each element: how many boundaries it does not lie before (0 .. m)."""

    def __init__(self, boundaries: Sequence[Boundary]):
        self.boundaries = list(boundaries)
        self.seen_ties = [0] * len(self.boundaries)

    def __call__(self, k: torch.Tensor) -> torch.Tensor:
        cls = torch.zeros(k.numel(), dtype=torch.int64, device=k.device)
        for j, b in enumerate(self.boundaries):
            eq = k == b.key
            tie_rank = torch.cumsum(eq, 0) - 1 + self.seen_ties[j]
            before = (k < b.key) | (eq & (tie_rank < b.ties))
            self.seen_ties[j] += int(eq.sum())
            cls += (~before).to(torch.int64)
        return cls


# ----------------------------------------------------------------------------- masks
@dataclass
class Mask:
    """A trainable subset of the flat buffer: one packed bit per element and buffer, and with
    rank multipliers ``bins[b]`` disjoint packed masks (union = ``packed[b]``)."""

    packed: list[torch.Tensor]
    kept: int
    numel: int
    bins: list[list[torch.Tensor]] | None = None
    multipliers: tuple[float, ...] = ()

    def engine_masks(self) -> list:
        """What ``ZOEngine.masks`` takes: the packed mask, or (bin mask, multiplier) pairs."""
        if self.bins is None:
            return list(self.packed)
        return [list(zip(parts, self.multipliers)) for parts in self.bins]

    @property
    def nbytes(self) -> int:
        """Bytes held for the run (the union mask is not kept separately when bins exist)."""
        tensors = [t for parts in self.bins for t in parts] if self.bins is not None else self.packed
        return sum(t.numel() for t in tensors)

    def fingerprint(self) -> str:
        """sha256 of the packed bits (and bins, multipliers): the ledger records it, replay checks it."""
        h = hashlib.sha256()
        for t in self.packed:
            h.update(t.cpu().numpy().tobytes())
        if self.bins is not None:
            for parts in self.bins:
                for t in parts:
                    h.update(t.cpu().numpy().tobytes())
            h.update(repr(self.multipliers).encode())
        return h.hexdigest()

    def kept_in(self, b: int, start: int, count: int) -> torch.Tensor:
        return unpack_bits(self.packed[b], start, count)

    def state_dict(self) -> dict:
        return {
            "packed": [t.cpu() for t in self.packed],
            "kept": self.kept,
            "numel": self.numel,
            "bins": None if self.bins is None else [[t.cpu() for t in parts] for parts in self.bins],
            "multipliers": list(self.multipliers),
        }

    @classmethod
    def from_state_dict(cls, state: dict, device: torch.device) -> Mask:
        bins = state["bins"]
        return cls(
            [t.to(device) for t in state["packed"]],
            state["kept"],
            state["numel"],
            None if bins is None else [[t.to(device) for t in parts] for parts in bins],
            tuple(state["multipliers"]),
        )


def rank_multipliers(bins: int, upper: float = RANK_UPPER, lower: float = RANK_LOWER) -> tuple[float, ...]:
    """Multiplier of each bin (bin 0: smallest |score|): the published linear ramp at bin centres."""
    return tuple(upper - (upper - lower) * (b + 0.5) / bins for b in range(bins))


def kept_count(keep_fraction: float, numel: int) -> int:
    return min(numel, max(1, round(keep_fraction * numel)))


def _pack_into(packed: torch.Tensor, start: int, keep: torch.Tensor) -> None:
    packed[start // 8 : start // 8 + (keep.numel() + 7) // 8] = pack_bits(keep)


def build_mask(
    flat: FlatParams,
    key_chunks: Callable[[], Iterator[tuple[int, int, torch.Tensor]]],
    keep: int,
    rank_bins: int = 0,
    previous: Mask | None = None,
) -> Mask:
    """Keep the first ``keep`` elements in key order, ``previous``'s members included (they stay
    and count); with ``rank_bins`` > 1, split the kept set by key order into equal bins.

    ``key_chunks()`` regenerates (buffer, start, keys) in index order; it is called three times
    (five with bins), which is what bounds memory to a chunk.
    """
    already = previous.kept if previous is not None else 0
    if keep < already:
        raise ValueError(f"a mask can only grow: {already} kept, {keep} asked")

    def candidates() -> Iterator[tuple[int, int, torch.Tensor]]:
        for b, start, k in key_chunks():
            if previous is not None:
                k = torch.where(previous.kept_in(b, start, k.numel()), SENTINEL, k)
            yield b, start, k

    (cut,) = select_boundaries(lambda: (k for _, _, k in candidates()), [keep - already])
    packed = [torch.zeros((buf.numel() + 7) // 8, dtype=torch.uint8, device=buf.device) for buf in flat.buffers]
    classify = Classifier([cut])
    for b, start, k in candidates():
        kept = (classify(k) == 0) & (k != SENTINEL)
        if previous is not None:
            kept |= previous.kept_in(b, start, k.numel())
        _pack_into(packed[b], start, kept)
    mask = Mask(packed, keep, flat.numel)
    if rank_bins <= 1:
        return mask

    def members() -> Iterator[tuple[int, int, torch.Tensor]]:
        for b, start, k in key_chunks():
            yield b, start, torch.where(mask.kept_in(b, start, k.numel()), k, SENTINEL)

    cuts = select_boundaries(lambda: (k for _, _, k in members()), [keep * j // rank_bins for j in range(1, rank_bins)])
    classify = Classifier(cuts)
    bins = [[torch.zeros_like(t) for _ in range(rank_bins)] for t in packed]
    for b, start, k in members():
        cls = torch.where(k != SENTINEL, classify(k), rank_bins)
        for j in range(rank_bins):
            _pack_into(bins[b][j], start, cls == j)
    mask.bins = bins
    mask.multipliers = rank_multipliers(rank_bins)
    return mask


def check_options(keep_fraction: float, strategy: str, queries: int, rank_bins: int) -> None:
    """Raise a one-line ``ConfigError`` for a bad mask option (the CLI checks before loading anything)."""
    if isinstance(keep_fraction, bool) or not (isinstance(keep_fraction, int | float) and 0 < keep_fraction <= 1):
        raise ConfigError(f"--keep-fraction must be in (0, 1], got {keep_fraction!r}")
    if strategy not in STRATEGIES:
        raise ConfigError(f"--mask-strategy must be one of {', '.join(STRATEGIES)}; got {strategy!r}")
    if isinstance(queries, bool) or not isinstance(queries, int) or not 1 <= queries <= ops.MAX_DIRECTIONS_PER_PASS:
        raise ConfigError(f"--prune-queries must be an integer in [1, {ops.MAX_DIRECTIONS_PER_PASS}], got {queries!r}")
    if isinstance(rank_bins, bool) or not isinstance(rank_bins, int) or not 0 <= rank_bins <= 16:
        raise ConfigError(f"--rank-bins must be an integer in [0, 16] (0: plain mask), got {rank_bins!r}")


def check_token_model(model: nn.Module) -> None:
    """The data-free score calls ``model(input_ids=...)`` (``data_free_objective``): refuse, when the run is
    made, a model whose forward cannot take token ids (a user's own module through the Python API)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # no introspectable signature: let the first score say what is wrong
        return
    if "input_ids" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    raise ConfigError(
        f"dp-zopo's data-free mask needs a model that takes input_ids (a token model); "
        f"{type(model).__name__}.forward takes ({', '.join(params)}): use dp-zoso or dp-aggzo"
    )


class MaskPolicy:
    """When and how the mask changes: static, dynamic or incremental (module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        flat: FlatParams,
        *,
        master_seed: int,
        keep_fraction: float = DEFAULT_KEEP_FRACTION,
        strategy: str = "static",
        queries: int = DEFAULT_QUERIES,
        probe_eps: float = DEFAULT_PROBE_EPS,
        rank_bins: int = 0,
        largest: bool = False,
        kind: str = "gaussian",
        backend: str = "auto",
        chunk: int = CHUNK,
    ):
        check_options(keep_fraction, strategy, queries, rank_bins)
        check_token_model(model)
        if chunk % 8:
            raise ValueError("chunk must be a multiple of 8")
        self.model, self.flat = model, flat
        self.master_seed = master_seed
        self.keep_fraction, self.strategy = float(keep_fraction), strategy
        self.queries, self.probe_eps = queries, probe_eps
        self.rank_bins, self.largest = rank_bins, largest
        self.kind, self.backend, self.chunk = kind, ops.resolve_backend(backend, flat.device), chunk
        self.mask: Mask | None = None
        self._last: tuple[HessianGradient, dict] | None = None

    def target(self, stage: int) -> int:
        """How many parameters are trained in ``stage``."""
        fraction = self.keep_fraction * (stage + 1) if self.strategy == "incremental" else self.keep_fraction
        return kept_count(min(1.0, fraction), self.flat.numel)

    def recomputes(self, stage: int) -> bool:
        return self.mask is None or self.strategy != "static"

    def update(self, stage: int) -> dict:
        """The mask for ``stage`` on the current weights (θ unperturbed); returns its public record."""
        if not self.recomputes(stage):
            return self.record(stage, recomputed=False)
        seeds = [probe_seed(self.master_seed, stage, q) for q in range(self.queries)]
        with linearized(self.model, self.chunk):
            hg, work = estimate_hessian_gradient(self.model, self.flat, seeds, self.probe_eps, self.kind, self.backend)
        if not any(hg.weights):
            warnings.warn(
                "data-free scores are all zero (the probes saw no curvature); the mask falls back to index order",
                RuntimeWarning,
                stacklevel=2,
            )

        def keys() -> Iterator[tuple[int, int, torch.Tensor]]:
            for b, start, s in score_chunks(self.flat, hg, self.kind, self.backend, self.chunk):
                yield b, start, score_keys(s, self.largest)

        previous = self.mask if self.strategy == "incremental" else None
        self.mask = build_mask(self.flat, keys, self.target(stage), self.rank_bins, previous)
        self._last = (hg, work)
        return self.record(stage, recomputed=True)

    def record(self, stage: int, recomputed: bool) -> dict:
        assert self.mask is not None
        row = {
            "strategy": self.strategy,
            "recomputed": recomputed,
            "kept": self.mask.kept,
            "fraction": self.mask.kept / self.mask.numel,
            "rank_bins": self.rank_bins,
            "bytes": self.mask.nbytes,
            "sha256": self.mask.fingerprint(),
        }
        if recomputed and self._last is not None:
            hg, work = self._last
            row.update(score_seeds=list(hg.seeds), score_weights=list(hg.weights), **work)
        return row

    def state_dict(self) -> dict:
        return {"mask": None if self.mask is None else self.mask.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        m = state["mask"]
        self.mask = None if m is None else Mask.from_state_dict(m, self.flat.device)


__all__ = [
    "STRATEGIES",
    "Boundary",
    "Classifier",
    "HessianGradient",
    "Mask",
    "MaskPolicy",
    "PerturbedView",
    "build_mask",
    "check_options",
    "data_free_objective",
    "estimate_hessian_gradient",
    "kept_count",
    "linearized",
    "mask_extra_bytes",
    "pack_bits",
    "probe_seed",
    "rank_multipliers",
    "score_chunks",
    "score_keys",
    "scoring_transient_bytes",
    "select_boundaries",
    "unpack_bits",
]
