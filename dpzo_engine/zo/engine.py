"""Zeroth-order estimation over the flat buffer with fused passes (docs/design.md section 5).

Central differences (default), 2K forwards and 2K+1 passes over the parameters:
    +λz1 -> L+ ; -2λz1 -> L- ; (+λz1 +λz2) -> L+ ; -2λz2 -> L- ; ... ; -2λzK -> L-
    last pass (J = K): the update -η Σ_k g_k z_k, with +λ added to zK's coefficient (its restore)
Forward differences, K+1 forwards and K+1 passes:
    L0 at θ ; +λz1 -> L1 ; (-λz1 +λz2) -> L2 ; ... ; last pass: the update, -λ added to zK's

Direction values generated per weight and step (``PassCounter.direction_values``): 4K - 1
central, 3K - 1 forward.  Every direction is entered, (central: flipped,) left and applied;
only the last one's leaving can share its generation with the update, since the other
directions must be left before the next forward and their update coefficients are known only
after the last.  Skipping more regeneration needs z stored: ``cache_bytes`` buys a direction
cache (fp32, 4 bytes per cached weight, the first weights of the flat order first) that keeps
the direction being evaluated, so its flip and its leaving load it instead of generating it:
2K - 1 values per weight and step (central), 2K - 1 (forward).  Same bits either way.

The pass sequence depends only on public values (seeds, λ, the released coefficients),
never on the batch, so a ledger of those values replays training exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import ops
from ..core.flat import FlatParams

DIFFERENCES = ("central", "forward")
MaskEntry = torch.Tensor | None | list[tuple[torch.Tensor, float]]  # per buffer; see ZOEngine.apply


@dataclass
class PassCounter:
    """How much work the steps did: shown in the metrics to make the cost visible."""

    passes: int = 0  # sweeps over the parameters
    forwards: int = 0
    direction_values: int = 0  # direction values generated (each pass: J per element it sweeps)


class ZOEngine:
    """Perturbs, restores and updates a ``FlatParams`` with the fused kernels."""

    def __init__(
        self,
        flat: FlatParams,
        kind: str = "gaussian",
        backend: str = "auto",
        difference: str = "central",
        masks: list[MaskEntry] | None = None,
        cache_bytes: int = 0,
    ):
        if difference not in DIFFERENCES:
            raise ValueError(f"unknown difference {difference!r}; expected one of {DIFFERENCES}")
        self.flat = flat
        self.kind = kind
        self.backend = ops.resolve_backend(backend, flat.device)
        self.difference = difference
        self.masks = masks if masks is not None else [None] * len(flat.buffers)
        self.counter = PassCounter()
        self.last_losses: tuple[float, int] = (0.0, 0)  # (sum, count): finite per-example losses, last step, here
        self._no_forward = True
        self.caches = self._make_caches(cache_bytes)
        self._held: list[int | None] = [None] * len(flat.buffers)  # the seed each cache holds

    def _make_caches(self, cache_bytes: int) -> list[torch.Tensor | None]:
        """Direction caches over the first ``cache_bytes // 4`` weights of the flat order."""
        if cache_bytes < 0:
            raise ValueError(f"cache_bytes must be >= 0, got {cache_bytes}")
        if cache_bytes == 0:
            return [None] * len(self.flat.buffers)
        if self.kind != "gaussian" or self.backend not in ("cpu", "reference"):
            raise ValueError(
                "the direction cache serves Gaussian directions on the C++ CPU backend "
                f"(got {self.kind} directions on the {self.backend} backend)"
            )
        left, caches = cache_bytes // 4, []
        for buf in self.flat.buffers:
            length = min(left, buf.numel())
            left -= length
            caches.append(torch.empty(length, dtype=torch.float32, device=buf.device) if length else None)
        return caches

    @property
    def cache_nbytes(self) -> int:
        return sum(c.numel() * 4 for c in self.caches if c is not None)

    def _cache_for(self, b: int, seeds: list[int]) -> ops.DirectionCache | None:
        """Load the held direction if this pass has it; keep a new one entered by a pass of J <= 2
        (a perturbation: its flip and its leaving come next)."""
        values, held = self.caches[b], self._held[b]
        if values is None:
            return None
        read = seeds.index(held) if held in seeds else None
        write = len(seeds) - 1 if len(seeds) <= 2 and seeds[-1] != held else None  # a new last seed: write > read
        if read is None and write is None:
            return None
        return ops.DirectionCache(values, read=read, write=write)

    def apply(self, seeds: list[int], coefs: list[float], rounding: str = "nearest", rounding_seed: int = 0) -> None:
        """One fused pass over every buffer: θ <- round(θ + Σ_j coefs[j] z_j).

        A buffer's mask entry is None (all elements), a packed mask (``ops.pack_mask``), or
        disjoint (packed mask, multiplier) parts, one kernel sweep each (DP-ZOPO rank bins).
        """
        seeds_t = torch.tensor(seeds, dtype=torch.int64, device=self.flat.device)
        coefs_t = torch.tensor(coefs, dtype=torch.float32, device=self.flat.device)
        sweeps = 1
        for b, ((buf, offset), entry) in enumerate(zip(self.flat, self.masks)):
            parts = entry if isinstance(entry, list | tuple) else [(entry, 1.0)]
            sweeps = max(sweeps, len(parts))
            cache = self._cache_for(b, seeds) if len(parts) == 1 else None  # rank bins: one sweep each, uncached
            self.counter.direction_values += len(seeds) * buf.numel() * len(parts)
            if cache is not None and cache.read is not None:
                self.counter.direction_values -= cache.values.numel()  # loaded, not generated
            if cache is not None and cache.write is not None:
                self._held[b] = None  # until the pass has written it
            for mask, scale in parts:
                ops.apply_directions(
                    buf,
                    seeds_t,
                    coefs_t if scale == 1.0 else coefs_t * scale,
                    self.kind,
                    offset=offset,
                    mask=mask,
                    rounding=rounding,
                    rounding_seed=rounding_seed,
                    backend=self.backend,
                    cache=cache,
                )
            if cache is not None and cache.write is not None:
                self._held[b] = seeds[cache.write]
        self.counter.passes += sweeps

    def estimate(
        self,
        loss_fn: Callable[[], torch.Tensor] | None,
        seeds: list[int],
        zo_eps: float,
        forward_for: range | None = None,
    ) -> torch.Tensor:
        """Per-example directional derivatives D [B, K]; θ is left perturbed along the last
        direction (``finish`` restores it while applying the update).

        ``loss_fn`` returns per-example losses [B] at the current θ; ``None`` means an
        empty batch: the same passes run (the pass sequence must not depend on data),
        no forward does, and D is [0, K]. ``forward_for``: the directions whose forwards run
        here (scale-out: a rank's block); every pass still runs, so θ rounds as on one rank,
        and D has only those columns. With forward differences the base forward counts as
        direction 0's.
        """
        mine = range(len(seeds)) if forward_for is None else forward_for
        seen: list[torch.Tensor] = []

        def losses(k: int) -> torch.Tensor | None:
            if loss_fn is None or k not in mine:
                return None
            self.counter.forwards += 1
            out = loss_fn().detach().to(torch.float32)
            seen.append(out)
            return out

        columns: list[torch.Tensor] = []
        if self.difference == "central":
            prev = None
            for k, s in enumerate(seeds):
                if prev is None:
                    self.apply([s], [zo_eps])
                else:
                    self.apply([prev, s], [zo_eps, zo_eps])  # restore previous and perturb: one pass
                plus = losses(k)
                self.apply([s], [-2.0 * zo_eps])
                minus = losses(k)
                if plus is not None:
                    columns.append((plus - minus) / (2.0 * zo_eps))
                prev = s
        else:
            base = None
            if loss_fn is not None and len(mine):
                base = losses(mine[0])
                if 0 not in mine:  # the base forward is direction 0's: the loss diagnostics count it once
                    seen.pop()
            prev = None
            for k, s in enumerate(seeds):
                if prev is None:
                    self.apply([s], [zo_eps])
                else:
                    self.apply([prev, s], [-zo_eps, zo_eps])
                moved = losses(k)
                if moved is not None:
                    columns.append((moved - base) / zo_eps)
                prev = s
        self.last_losses = self._loss_sum(seen)
        self._no_forward = not seen
        if loss_fn is None or not columns:
            return torch.zeros(0, len(mine), dtype=torch.float32, device=self.flat.device)
        return torch.stack(columns, dim=1)

    @staticmethod
    def _loss_sum(seen: list[torch.Tensor]) -> tuple[float, int]:
        if not seen:
            return 0.0, 0
        all_losses = torch.cat(seen)
        finite = all_losses[torch.isfinite(all_losses)]
        return float(finite.double().sum()), int(finite.numel())

    @property
    def last_loss(self) -> float | None:
        """Mean finite per-example loss over the last step's forwards here (None: no forward ran)."""
        total, count = self.last_losses
        if count == 0:
            return None if self._no_forward else float("nan")
        return total / count

    def finish(
        self,
        seeds: list[int],
        zo_eps: float,
        update_coefs: list[float],
        rounding: str = "nearest",
        rounding_seed: int = 0,
    ) -> None:
        """Restore the last perturbation and apply θ <- θ + Σ_k update_coefs[k] z_k, one pass.

        z_K is both restored and updated: its coefficient is update_coefs[K-1] ± λ (added in fp64,
        rounded once to fp32), so the pass generates K directions, not K + 1.  A direction whose
        fp32 coefficient is 0 is left out: it would add ±0 to a sum that is never -0 (exact).
        """
        restore = zo_eps if self.difference == "central" else -zo_eps
        coefs = [float(c) for c in update_coefs]
        coefs[-1] += restore
        fp32 = torch.tensor(coefs, dtype=torch.float32).tolist()
        kept = [(s, c) for s, c in zip(seeds, fp32) if c != 0.0]
        if kept:
            self.apply([s for s, _ in kept], [c for _, c in kept], rounding=rounding, rounding_seed=rounding_seed)

    def step(
        self,
        loss_fn: Callable[[], torch.Tensor] | None,
        seeds: list[int],
        zo_eps: float,
        coefs_from_D: Callable[[torch.Tensor], list[float]],
        rounding: str = "nearest",
        rounding_seed: int = 0,
    ) -> tuple[torch.Tensor, list[float]]:
        """Estimate, turn D into update coefficients (clip, noise, scale), apply. Returns both."""
        D = self.estimate(loss_fn, seeds, zo_eps)
        coefs = coefs_from_D(D)
        self.finish(seeds, zo_eps, coefs, rounding=rounding, rounding_seed=rounding_seed)
        return D, coefs
