"""From per-example directional derivatives D [B, K] to the released update vector.

One rule per method, all explicit (the trainer only calls ``rule(D)``):

* MeZO (non-private): g_k = mean_x D[x, k] / K (the K-direction SPSA average).
* DPZero: K = 1, per-example scalar clipped to [-C, C], Gaussian noise of std σC.
* DP-AggZO: a_x = D[x, :] / K clipped jointly in L2 to C, noise σC per coordinate.
* DP-AggZO per-direction (ablation): each a_x[k] clipped to [-C, C]; sensitivity C·√K,
  so the mechanism's noise is σC·√K.
Private rules divide the noisy sum by the expected batch size q·n, never the realised one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import ops
from ..privacy import GaussianMechanism


@dataclass
class Released:
    """What a step releases (the K-vector g) plus diagnostics that stay private-safe.

    Diagnostics computed from the batch (clipped fraction, clipping error, loss) are
    NOT differentially private: they are logged locally for monitoring and kept out of
    the ledger, which holds only released values.
    """

    grad: torch.Tensor  # fp64 [K], the (noisy) coefficient vector g
    fraction_clipped: float = 0.0
    relative_clip_error: float = 0.0
    nonfinite_rows: int = 0


class MeZORule:
    """Non-private average of K two-point estimates over the batch."""

    def __call__(self, D: torch.Tensor) -> Released:
        finite = torch.isfinite(D).all(dim=1)
        D = D[finite].double()
        K = D.shape[1]
        grad = D.mean(dim=0) / K if D.shape[0] else torch.zeros(K, dtype=torch.float64, device=D.device)
        return Released(grad=grad, nonfinite_rows=int((~finite).sum()))


class PrivateRule:
    """Clip per example (jointly or per direction), sum, add secret noise, divide by q·n."""

    def __init__(self, mechanism: GaussianMechanism, expected_batch_size: float, backend: str = "auto"):
        self.mechanism = mechanism
        self.expected_batch_size = expected_batch_size
        self.backend = backend

    def __call__(self, D: torch.Tensor) -> Released:
        K = D.shape[1]
        result = ops.clip_aggregate(
            D, self.mechanism.clip, scale=1.0 / K, mode=self.mechanism.clip_mode, backend=self.backend
        )
        noisy = self.mechanism.privatize(result.sums)
        return Released(
            grad=noisy / self.expected_batch_size,
            fraction_clipped=result.fraction_clipped,
            relative_clip_error=result.relative_clip_error,
            nonfinite_rows=int(result.num_nonfinite),
        )
