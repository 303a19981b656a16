"""A ZO step spread over ranks (docs/design.md section 9): who forwards what, and what ranks exchange.

Why it is cheap: a step's update is a function of public values (seeds, λ, η) and one released
K-vector, so replicas that start equal and run the same fused passes stay bit-equal without
ever exchanging parameters or gradients. Per step they exchange O(B·K) numbers:

    rank 0 draws the Poisson batch (secret)          broadcast the indices       8·(B + 1) bytes
    every rank: the same passes over θ, forwards only for its examples × its directions
    direction group: all_gather D [B_d, K/R]       -> D [B_d, K]                 4·B_d·K
    data group: all_reduce the clipped sums (fp64) -> the whole batch's sums     8·(2K + 3)
    rank 0 adds the noise and divides by q·n       broadcast the released g      8·K
    every rank: the last fused pass (restore + update), rounded identically

Layout: N = P data ranks × R direction ranks, rank = d·R + r. Rank r of a direction group
forwards the contiguous block of directions [r·K/R, (r+1)·K/R); data rank d takes the d-th of P
contiguous, near-equal slices of the sampled indices. On one rank every method returns its
input without calling torch.distributed: the 1-rank run goes through the same calls.

Every rank runs every pass (``passes: "all"`` in the ledger header). A rank that passed over its
own directions only would save 2K(1 − 1/R) passes but round θ differently from the others (and
from the 1-rank run); ``bench/scaling.py`` measures what that mode would save.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..core.errors import ConfigError, UserError
from ..ops import ClipResult

PARALLEL_MODES = ("data", "directions", "2d")
PASS_MODE = "all"  # every rank runs every pass over θ (the only mode shipped: replicas stay bit-equal)
CHECKSUM_CHUNK = 1 << 24  # int16 words per chunk of the replica checksum (bounds its int64 temporaries)
CHECKSUM_MODULUS = 65521  # position weights (i mod 65521) + 1: a swap of two words changes the checksum


class LayoutError(ConfigError):
    """A layout the job cannot run (K not divisible by the direction ranks, a world size the axis cannot use)."""


class ParallelFault(UserError):
    """The job cannot go on (the replicas diverged): every rank raises it; rank 0 prints it; exit code 1."""

    exit_code = 1
    every_rank = False  # printed by rank 0 alone: every rank meets it the same way


class CollectiveFailed(ParallelFault):
    """A collective of this rank failed or timed out (a peer died or hung): each rank that meets it says so."""

    every_rank = True


@dataclass(frozen=True)
class Layout:
    """Where this rank sits: N = data ranks × direction ranks, rank = data index · R + direction index."""

    mode: str | None = None  # None: one rank, no --parallel
    world_size: int = 1
    direction_ranks: int = 1
    rank: int = 0

    @classmethod
    def make(
        cls, mode: str | None, world_size: int, rank: int, num_directions: int, direction_ranks: int | None = None
    ) -> Layout:
        """Check ``--parallel`` / ``--direction-ranks`` against the world size and K; one line on failure."""
        if mode is not None and mode not in PARALLEL_MODES:
            raise LayoutError(f"--parallel must be one of {', '.join(PARALLEL_MODES)}; got {mode!r}")
        if not 0 <= rank < world_size:
            raise LayoutError(f"rank {rank} is outside a world of {world_size} ranks")
        if mode is None:
            if world_size > 1:
                raise LayoutError(
                    f"launched on {world_size} ranks: choose how to split the step with --parallel "
                    "data, directions or 2d"
                )
            if direction_ranks not in (None, 1):
                raise LayoutError("--direction-ranks needs --parallel 2d")
            return cls(None, 1, 1, 0)
        if mode != "2d" and direction_ranks is not None:
            raise LayoutError(f"--direction-ranks applies to --parallel 2d, not --parallel {mode}")
        if mode == "data":
            R = 1
        elif mode == "directions":
            R = world_size
        else:
            if direction_ranks is None:
                raise LayoutError("--parallel 2d needs --direction-ranks R (the ranks that split the K directions)")
            R = direction_ranks
            if isinstance(R, bool) or not isinstance(R, int) or R < 1 or world_size % R:
                raise LayoutError(
                    f"--direction-ranks {R} must be a positive divisor of the world size {world_size} "
                    "(world = data ranks × direction ranks)"
                )
        if num_directions % R:
            what = "ranks" if mode == "directions" else "--direction-ranks"
            raise LayoutError(
                f"K = {num_directions} directions cannot be split evenly over {R} direction {what}; "
                f"choose -K as a multiple of {R}"
            )
        return cls(mode, world_size, R, rank)

    @property
    def data_ranks(self) -> int:
        return self.world_size // self.direction_ranks

    @property
    def data_index(self) -> int:
        return self.rank // self.direction_ranks

    @property
    def direction_index(self) -> int:
        return self.rank % self.direction_ranks

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def directions(self, num_directions: int) -> range:
        """The directions whose forwards this rank runs (a contiguous block, in order)."""
        per = num_directions // self.direction_ranks
        return range(self.direction_index * per, (self.direction_index + 1) * per)

    def share(self, indices: list[int]) -> list[int]:
        """This rank's slice of a step's sampled indices: the d-th of P contiguous near-equal slices."""
        P, d = self.data_ranks, self.data_index
        base, extra = divmod(len(indices), P)
        start = d * base + min(d, extra)
        return indices[start : start + base + (d < extra)]

    def direction_groups(self) -> list[list[int]]:
        """Ranks that share a data slice and split the directions (an all_gather of D each)."""
        R = self.direction_ranks
        return [list(range(d * R, (d + 1) * R)) for d in range(self.data_ranks)]

    def data_groups(self) -> list[list[int]]:
        """Ranks that share a block of directions and split the data (an all_reduce of the sums each)."""
        R = self.direction_ranks
        return [list(range(r, self.world_size, R)) for r in range(R)]

    def describe(self) -> dict:
        """Public facts of the layout for the ledger header, the metrics and the summary."""
        return {
            "parallel": self.mode,
            "world_size": self.world_size,
            "data_ranks": self.data_ranks,
            "direction_ranks": self.direction_ranks,
            "passes": PASS_MODE,
        }


@dataclass
class CommStats:
    """What this rank has spent in collectives (payload bytes; wall time inside the calls, which
    includes waiting for the slowest rank)."""

    calls: int = 0
    bytes: int = 0
    seconds: float = 0.0

    def minus(self, other: CommStats) -> CommStats:
        return CommStats(self.calls - other.calls, self.bytes - other.bytes, self.seconds - other.seconds)


class Comm:
    """The collectives of a layout on the default process group, each counted and timed.

    ``device`` is where collective tensors live (CUDA for NCCL, CPU for gloo). With one rank,
    nothing here calls torch.distributed: every method returns its input.
    """

    def __init__(self, layout: Layout = Layout(), device: torch.device | str = "cpu"):
        self.layout = layout
        self.device = torch.device(device)
        self.stats = CommStats()
        self.step = 0  # the step under way (1-based; 0: set-up), for error messages
        self._direction_group = self._data_group = None
        if layout.world_size > 1:  # every rank creates every group, in the same order
            self._direction_group = _own_group(layout.direction_groups(), layout.rank)
            self._data_group = _own_group(layout.data_groups(), layout.rank)

    @property
    def is_root(self) -> bool:
        return self.layout.is_root

    def close(self) -> None:
        """Drop this object's references to its process groups, so that ``destroy_process_group`` frees
        them now. A group kept alive past it (by a session that a reference cycle holds until the
        interpreter exits) is freed during finalisation, where gloo's threads abort the process."""
        self._direction_group = self._data_group = None

    @property
    def world_size(self) -> int:
        return self.layout.world_size

    # ------------------------------------------------------------------ plumbing
    def _collective(self, what: str, nbytes: int, op: Callable, *args, **kwargs) -> None:
        """``op(*args, **kwargs)``, one collective, counted and timed; a failure (a dead peer, a timeout)
        becomes a ``CollectiveFailed``."""
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)  # queued compute is not collective time
        t0 = time.perf_counter()
        try:
            op(*args, **kwargs)
            if cuda:
                torch.cuda.synchronize(self.device)
        except RuntimeError as exc:  # torch.distributed.DistError and the backends' RuntimeErrors
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            where = f"rank {self.layout.rank}" + (f", step {self.step}" if self.step else ", set-up")
            raise CollectiveFailed(f"{where}: {what} failed (did another rank die or hang?): {first}") from exc
        self.stats.calls += 1
        self.stats.bytes += nbytes
        self.stats.seconds += time.perf_counter() - t0

    def _group_size(self, group) -> int:
        return 1 if group is None else dist.get_world_size(group)

    # ------------------------------------------------------------------ the step's four exchanges
    def batch(self, sampled: torch.Tensor | None) -> list[int]:
        """Rank 0 passes the Poisson batch it drew (sorted indices); every rank gets its share of it."""
        if self.world_size == 1:
            return self.layout.share(sampled.tolist())
        size = torch.zeros(1, dtype=torch.int64, device=self.device)
        if self.is_root:
            size[0] = sampled.numel()
        self._collective("broadcast of the batch size", 8, dist.broadcast, size, src=0)
        n = int(size.item())
        indices = torch.empty(n, dtype=torch.int64, device=self.device)
        if self.is_root:
            indices.copy_(sampled)
        if n:
            self._collective("broadcast of the batch", 8 * n, dist.broadcast, indices, src=0)
        return self.layout.share(indices.tolist())

    def gather_directions(self, D: torch.Tensor) -> torch.Tensor:
        """[B_d, K/R] of my directions -> [B_d, K] of all directions, in direction order."""
        R = self._group_size(self._direction_group)
        if R == 1 or D.shape[0] == 0:  # the group shares one data slice: all or none of it is empty
            return D if R == 1 else D.new_zeros(0, D.shape[1] * R)
        D = D.to(self.device).contiguous()
        parts = [torch.empty_like(D) for _ in range(R)]
        nbytes = D.numel() * D.element_size() * R
        self._collective("all_gather of D", nbytes, dist.all_gather, parts, D, group=self._direction_group)
        return torch.cat(parts, dim=1)

    def sum_over_data(self, clipped: ClipResult) -> ClipResult:
        """The clipped (and raw) K-sums and clipping counts of my examples -> those of the whole batch, in fp64."""
        if self._group_size(self._data_group) == 1:
            return clipped
        K = clipped.sums.numel()
        counts = torch.tensor(
            [float(clipped.num_clipped), float(clipped.num_nonfinite), float(clipped.batch_size)], dtype=torch.float64
        )
        packed = torch.cat([clipped.sums.double().cpu(), clipped.raw_sums.double().cpu(), counts]).to(self.device)
        nbytes = packed.numel() * 8
        self._collective("all_reduce of the clipped sums", nbytes, dist.all_reduce, packed, group=self._data_group)
        packed = packed.to(clipped.sums.device)
        n_clip, n_bad, batch = (round(float(v)) for v in packed[2 * K :])
        as_count = lambda v: torch.tensor(v, dtype=torch.int64)  # noqa: E731
        return ClipResult(packed[:K], packed[K : 2 * K], as_count(n_clip), as_count(n_bad), batch)

    def from_root(self, value: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``value`` (the released K-vector) on every rank; ``like`` gives its shape and dtype."""
        if self.world_size == 1:
            return value
        out = torch.empty_like(like, device=self.device)
        if self.is_root:
            out.copy_(value)
        self._collective("broadcast of the release", out.numel() * out.element_size(), dist.broadcast, out, src=0)
        return out.to(like.device)

    # ------------------------------------------------------------------ whole-job reductions and checks
    def broadcast_(self, tensors: Iterable[torch.Tensor], what: str = "parameters") -> None:
        """Rank 0's values of ``tensors`` (the same shapes on every rank) on every rank, in place."""
        if self.world_size == 1:
            return
        for t in tensors:
            staged = t.detach().to(self.device)
            nbytes = staged.numel() * staged.element_size()
            self._collective(f"broadcast of the {what}", nbytes, dist.broadcast, staged, src=0)
            if staged.data_ptr() != t.data_ptr():
                t.detach().copy_(staged)

    def all_reduce(self, values: torch.Tensor) -> torch.Tensor:
        """Sum over every rank (evaluation counts, loss sums); a copy, on the input's device."""
        if self.world_size == 1:
            return values
        out = values.detach().to(self.device, copy=True).contiguous()
        self._collective("all_reduce", out.numel() * out.element_size(), dist.all_reduce, out)
        return out.to(values.device)

    def stop_signal(self, signum: int | None) -> int | None:
        """The signal that asks the job to stop, if any rank got one (``signum``: this rank's, or None):
        a signal can reach some ranks only, or them at different steps, and every rank must stop at the
        same step boundary. The highest signal number wins (SIGTERM over Ctrl-C)."""
        if self.world_size == 1:
            return signum
        out = torch.tensor([signum or 0], dtype=torch.int32, device=self.device)
        highest = lambda t: dist.all_reduce(t, op=dist.ReduceOp.MAX)  # noqa: E731
        self._collective("all_reduce of the stop signal", 4, highest, out)
        return int(out.item()) or None

    def check_replicas(self, step: int, tensors: Iterable[torch.Tensor], what: str = "trainable parameters") -> None:
        """Compare a checksum of every rank's ``tensors`` with rank 0's; a mismatch stops the job (every
        rank raises the same one-line error, naming the step and the ranks that differ)."""
        if self.world_size == 1:
            return
        mine = replica_checksum(tensors).to(self.device)
        gathered = [torch.empty_like(mine) for _ in range(self.world_size)]
        nbytes = mine.numel() * 8 * self.world_size
        self._collective("all_gather of the replica checksums", nbytes, dist.all_gather, gathered, mine)
        ref = gathered[0]
        bad = [r for r, c in enumerate(gathered) if not torch.equal(c, ref)]
        if bad:
            ranks = ", ".join(map(str, bad))
            raise ParallelFault(
                f"replicas diverged at step {step}: the {what} of rank(s) {ranks} differ from rank 0's "
                "(checksum mismatch)"
            )


def _own_group(groups: list[list[int]], rank: int):
    """Create every group (a collective call on all ranks) and return the one holding ``rank``."""
    mine = None
    for ranks in groups:
        group = dist.new_group(ranks) if len(ranks) > 1 else None
        if rank in ranks:
            mine = group
    return mine


def replica_checksum(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """Two int64 sums over the bits of ``tensors`` read as int16 words w_i: Σ w_i and Σ ((i mod 65521) + 1)·w_i,
    both mod 2^64. Integer sums are exact, so equal bits give equal checksums on any device or thread count;
    the position weights catch moved words. Chunked, so the int64 temporaries stay small."""
    plain = weighted = 0
    position = 0
    device = None
    for t in tensors:
        words = t.detach().contiguous().reshape(-1).view(torch.uint8)
        if words.numel() % 2:
            words = torch.cat([words, words.new_zeros(1)])
        words = words.view(torch.int16)
        device = words.device
        for start in range(0, words.numel(), CHECKSUM_CHUNK):
            w = words[start : start + CHECKSUM_CHUNK].to(torch.int64)
            i = torch.arange(position + start, position + start + w.numel(), dtype=torch.int64, device=device)
            plain += int(w.sum())
            weighted += int((w * (i % CHECKSUM_MODULUS + 1)).sum())  # |w·weight| < 2^31, chunk sum < 2^55
        position += words.numel()
    wrap = lambda v: ((v + (1 << 63)) % (1 << 64)) - (1 << 63)  # noqa: E731  (into int64's range)
    return torch.tensor([wrap(plain), wrap(weighted)], dtype=torch.int64)
