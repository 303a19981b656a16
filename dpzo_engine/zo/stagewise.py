"""What DP-ZOSO and DP-ZOPO attach to DP-AggZO's private rule: a stage schedule, a data-free
mask (DP-ZOPO), and an optional proximal pull towards the stage's starting point.

A method is a clipping rule (``zo.rules.PrivateRule``, joint by default) plus a schedule plus an
optional mask policy. The trainer asks ``Stagewise`` for (lr, λ) each step, calls
``enter_stage`` at stage boundaries and ``after_update`` after each update; replay drives the
same object from the ledger. Everything here is a function of public values (the master seed,
the config, the weights, which replay reproduces), so none of it costs privacy.

Proximal term (``--prox ρ``): each update is followed by the proximal map of
(ρ/2)·||θ − θ_s||², θ ← (θ + ηρ·θ_s)/(1 + ηρ) (proximal SGD), with θ_s the stage's start.
Needing θ_s is unavoidable for exactness: θ − θ_s is a sum of every update of the stage, so
without θ_s one would regenerate t·K directions at step t of a stage (quadratic work over a
stage). So θ_s is stored, only for the trained coordinates: with DP-ZOPO that is the masked
ones, packed in mask order (keep fraction × trainable × bytes per element: 1% of the trainable
copy by default); with DP-ZOSO (every trainable parameter) it is a full copy of the trainable
parameters, which the memory report states. ρ = 0 (the default) stores nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core import stream
from ..core.flat import FlatParams
from ..ops.reference import round_to
from .engine import ZOEngine
from .pruning import CHUNK, Mask, MaskPolicy, mask_extra_bytes, scoring_transient_bytes, unpack_bits
from .schedules import StageSchedule


class ProximalAnchor:
    """θ_s for the trained coordinates, and the pull θ ← θ + w·(θ_s − θ), w = ηρ/(1 + ηρ)."""

    def __init__(self, flat: FlatParams, rho: float, rounding: str, master_seed: int, chunk: int = CHUNK):
        self.flat, self.rho, self.rounding, self.master_seed, self.chunk = flat, rho, rounding, master_seed, chunk
        self.anchor: list[torch.Tensor] = []
        self.mask: Mask | None = None

    def _chunks(self, b: int):
        """(start, view of the buffer, indices of trained elements in it or None for all)."""
        buf = self.flat.buffers[b]
        for start in range(0, buf.numel(), self.chunk):
            view = buf[start : start + self.chunk]
            if self.mask is None:
                yield start, view, None
            else:
                idx = unpack_bits(self.mask.packed[b], start, view.numel()).nonzero().squeeze(1)
                yield start, view, idx

    def reset(self, mask: Mask | None) -> None:
        """Take θ_s: the current values of the trained coordinates (compact, in mask order)."""
        self.mask = mask
        self.anchor = []
        for b, buf in enumerate(self.flat.buffers):
            if mask is None:
                self.anchor.append(buf.detach().clone())
            else:
                parts = [view[idx] for _, view, idx in self._chunks(b)]
                self.anchor.append(torch.cat(parts) if parts else buf.new_empty(0))

    def pull(self, step: int, lr: float) -> None:
        """One extra pass over the trained coordinates (and θ_s), fp32 arithmetic, one rounding."""
        w = torch.tensor(lr * self.rho / (1.0 + lr * self.rho), dtype=torch.float32)
        seed = stream.derive_seed(self.master_seed, stream.DOMAIN_PROXIMAL, step)
        for b, (buf, offset) in enumerate(self.flat):
            pos = 0
            anchor = self.anchor[b]
            for start, view, idx in self._chunks(b):
                x = (view if idx is None else view[idx]).to(torch.float32)
                n = x.numel()
                if n == 0:
                    continue
                a = anchor[pos : pos + n].to(torch.float32)
                pos += n
                new = x + w.to(x.device) * (a - x)
                bits = None
                if self.rounding == "stochastic" and buf.dtype != torch.float32:
                    local = torch.arange(n, device=x.device) if idx is None else idx
                    bits = stream.rounding_bits(seed, local + (offset + start))
                new = round_to(new, buf.dtype, self.rounding, bits)
                if idx is None:
                    view.copy_(new)
                else:
                    view[idx] = new  # index_put_ into the buffer itself, not into a gathered copy

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() for a in self.anchor)

    def expected_nbytes(self, masks: MaskPolicy | None) -> int:
        """θ_s's size before it is taken: every trainable element, or the first stage's mask."""
        if masks is None:
            return self.flat.nbytes
        width = max(b.element_size() for b in self.flat.buffers)
        return masks.target(0) * width

    def state_dict(self) -> dict:
        return {"anchor": [a.cpu() for a in self.anchor]}

    def load_state_dict(self, state: dict, mask: Mask | None) -> None:
        self.mask = mask
        self.anchor = [a.to(self.flat.device) for a in state["anchor"]]


class Stagewise:
    """Schedule + optional mask policy + optional proximal anchor, behind three calls."""

    def __init__(
        self,
        schedule: StageSchedule,
        engine: ZOEngine,
        *,
        active: bool = True,
        masks: MaskPolicy | None = None,
        prox: ProximalAnchor | None = None,
    ):
        self.schedule, self.engine, self.active, self.masks, self.prox = schedule, engine, active, masks, prox
        self.stage: int | None = None

    def at(self, step: int) -> tuple[float, float]:
        """(learning rate, λ) of 0-based ``step``."""
        return self.schedule.at(step)

    def boundary(self, step: int) -> bool:
        """Does a stage start at ``step`` (for methods with stages; constant schedules have none)?"""
        return self.active and self.schedule.is_stage_start(step)

    def enter_stage(self, step: int) -> dict:
        """New mask (data-free) and new anchor; returns the public ledger row of the event."""
        s = self.schedule.stage_of(step)
        lr, zo_eps = self.schedule.at(step)
        row: dict = {"type": "stage", "step": step + 1, "stage": s, "start": step}
        row.update(length=self.schedule.stage_length(s), lr=lr, zo_eps=zo_eps)
        if self.masks is not None:
            row["mask"] = self.masks.update(s)
            self.engine.masks = self.masks.mask.engine_masks()
        if self.prox is not None:
            self.prox.reset(self.masks.mask if self.masks is not None else None)
            row["prox"] = {"rho": self.prox.rho, "anchor_bytes": self.prox.nbytes}
        self.stage = s
        return row

    def after_update(self, step: int, lr: float) -> None:
        """Proximal pull towards the stage's start (no-op without ``--prox``)."""
        if self.prox is not None:
            self.prox.pull(step, lr)

    # ------------------------------------------------------------------ reporting
    def header(self) -> dict:
        """Public facts for the ledger header (empty for methods without stages)."""
        if not self.active:
            return {}
        out: dict = {"stages": self.schedule.describe(), "prox": self.prox.rho if self.prox is not None else 0.0}
        if self.masks is not None:
            m = self.masks
            out["mask"] = {"strategy": m.strategy, "keep_fraction": m.keep_fraction, "queries": m.queries}
            out["mask"].update(probe_eps=m.probe_eps, rank_bins=m.rank_bins, largest=m.largest)
        return out

    def memory(self) -> dict:
        """Extra bytes beyond the model: held for the run, and held while a mask is computed."""
        out = {"mask_bytes": 0, "anchor_bytes": 0, "scoring_transient_bytes": 0}
        if self.masks is not None:
            out["mask_bytes"] = mask_extra_bytes(self.engine.flat, self.masks.rank_bins)
            out["scoring_transient_bytes"] = scoring_transient_bytes(self.masks.model, self.masks.chunk)
        if self.prox is not None:
            out["anchor_bytes"] = self.prox.nbytes if self.prox.anchor else self.prox.expected_nbytes(self.masks)
        return out

    def summary(self) -> dict:
        if not self.active:
            return {}
        out = {"stages": self.schedule.describe(), "extra_memory": self.memory()}
        if self.masks is not None and self.masks.mask is not None:
            out["mask_fraction"] = self.masks.mask.kept / self.masks.mask.numel
        return out

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {
            "stage": self.stage,
            "masks": self.masks.state_dict() if self.masks is not None else None,
            "prox": self.prox.state_dict() if self.prox is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        self.stage = state["stage"]
        if self.masks is not None:
            self.masks.load_state_dict(state["masks"])
            if self.masks.mask is not None:
                self.engine.masks = self.masks.mask.engine_masks()
        if self.prox is not None and state["prox"] is not None:
            self.prox.load_state_dict(state["prox"], self.masks.mask if self.masks is not None else None)


@dataclass(frozen=True)
class StageOptions:
    """What a method attaches to the private rule, as plain values (the CLI's config maps onto these).

    ``stages=None`` is a constant (lr, λ) schedule with no attachments: DP-AggZO, DPZero, MeZO.
    """

    steps: int
    lr: float
    zo_eps: float
    seed: int = 0  # the public master seed: the mask's probe directions derive from it
    kind: str = "gaussian"
    rounding: str = "nearest"
    stages: int | None = None
    lr_decay: float = 0.5
    zo_scale_start: float | None = None  # None: zo_eps
    zo_scale_end: float | None = None  # None: zo_scale_start
    prox: float = 0.0
    mask: bool = False  # DP-ZOPO's data-free mask
    keep_fraction: float = 0.01
    mask_strategy: str = "static"
    prune_queries: int = 4
    rank_bins: int = 0


def build_stagewise(opts: StageOptions, model: torch.nn.Module, flat: FlatParams, engine: ZOEngine) -> Stagewise:
    """The attachments ``opts`` asks for; without stages, a constant one-stage schedule."""
    if opts.stages is None:
        return Stagewise(StageSchedule(opts.steps, 1, opts.lr, opts.zo_eps), engine, active=False)
    start = opts.zo_eps if opts.zo_scale_start is None else opts.zo_scale_start
    end = start if opts.zo_scale_end is None else opts.zo_scale_end
    schedule = StageSchedule(opts.steps, opts.stages, opts.lr, start, end, opts.lr_decay)
    masks = None
    if opts.mask:
        masks = MaskPolicy(
            model,
            flat,
            master_seed=opts.seed,
            keep_fraction=opts.keep_fraction,
            strategy=opts.mask_strategy,
            queries=opts.prune_queries,
            rank_bins=opts.rank_bins,
            kind=opts.kind,
            backend=engine.backend,
        )
    prox = ProximalAnchor(flat, opts.prox, opts.rounding, opts.seed) if opts.prox > 0 else None
    return Stagewise(schedule, engine, masks=masks, prox=prox)
