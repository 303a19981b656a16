"""How far bf16 weights drift through a step's perturb/restore passes, ours against MeZO's.

Every pass over a bf16 buffer rounds, and λz is only a few bf16 ulps, so perturbing and then
restoring does not give the starting weights back exactly. MeZO applies +λz, −2λz, +λz per
direction: 3K roundings. Our engine fuses "restore direction k, perturb along k+1" into one
pass and ends with the restore inside the update pass: 2K + 1 roundings. This module measures
both on the same weights and directions, through the engine's real pass sequence
(``ZOEngine.estimate`` then ``finish`` with a zero update). The test bounds the result; the
kernel benchmark prints it.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..core import stream
from ..core.flat import FlatParams
from .engine import ZOEngine


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """Spacing of bf16 numbers at |x| (fp32), the unit drift is measured in."""
    exponent = torch.floor(torch.log2(x.abs().clamp_min(2.0**-126)))
    return torch.pow(2.0, exponent - 7)


def bf16_drift(
    numel: int = 20_000,
    directions: int = 16,
    zo_eps: float = 1e-3,
    backend: str = "auto",
    seed: int = 1,
    device: torch.device | str = "cpu",
) -> dict:
    """Mean |θ_after − θ_before| in bf16 ulps after one step's passes with no update.

    Weights ~ N(0, 0.02²) (a transformer's scale), Gaussian directions of step 0 of master seed 0.
    """
    weights = torch.randn(numel, generator=torch.Generator().manual_seed(seed)) * 0.02
    theta0 = weights.to(device=device, dtype=torch.bfloat16)
    ulp = bf16_ulp(theta0.float())
    seeds = stream.step_seeds(0, 0, directions)

    holder = nn.Module()
    holder.theta = nn.Parameter(theta0.clone())
    engine = ZOEngine(FlatParams(holder), backend=backend, difference="central")
    engine.estimate(None, seeds, zo_eps)  # the passes of a step, without forwards
    engine.finish(seeds, zo_eps, [0.0] * directions)  # restore inside the (here empty) update pass
    ours = holder.theta.detach()

    mezo = theta0.clone()
    for s in seeds:  # MeZO: +λz, −2λz, +λz, one rounding each
        for c in (zo_eps, -2.0 * zo_eps, zo_eps):
            ops.apply_directions(mezo, torch.tensor([s]), torch.tensor([c]), backend=engine.backend)

    def mean_ulps(x: torch.Tensor) -> float:
        return float(((x.float() - theta0.float()).abs() / ulp).mean())

    return {
        "backend": engine.backend,
        "numel": numel,
        "directions": directions,
        "zo_eps": zo_eps,
        "fused_passes": engine.counter.passes,
        "mezo_passes": 3 * directions,
        "fused_mean_ulps": mean_ulps(ours),
        "mezo_mean_ulps": mean_ulps(mezo),
    }
