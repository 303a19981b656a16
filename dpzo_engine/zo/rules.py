"""From per-example directional derivatives D [B, K] to the released update vector.

One rule per method, all explicit (the trainer only calls ``rule(D)``):

* MeZO (non-private): g_k = mean_x D[x, k] / K (the K-direction SPSA average).
* DPZero: K = 1, per-example scalar clipped to [-C, C], Gaussian noise of std σC.
* DP-AggZO: a_x = D[x, :] / K clipped jointly in L2 to C, noise σC per coordinate.
* DP-AggZO per-direction (ablation): each a_x[k] clipped to [-C, C]; sensitivity C·√K,
  so the mechanism's noise is σC·√K.
Private rules divide the noisy sum by the expected batch size q·n, never the realised one.

Each rule comes in two halves, so that a step can be spread over ranks (``zo.parallel``):
``clip(D)`` sums over the examples a rank holds (fp64, summable across ranks), ``release``
turns the whole batch's sums into the released vector (the noise: only where the secret
generator is, rank 0). ``rule(D)`` is both on one rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import ops
from ..privacy import GaussianMechanism, PrivacyError


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
    batch_size: int = 0  # realised examples in the step (private: a local diagnostic)

    @classmethod
    def of(cls, grad: torch.Tensor, clipped: ops.ClipResult) -> Released:
        """``grad`` with the diagnostics of the clipped sums it came from."""
        return cls(
            grad=grad,
            fraction_clipped=clipped.fraction_clipped,
            relative_clip_error=clipped.relative_clip_error,
            nonfinite_rows=int(clipped.num_nonfinite),
            batch_size=clipped.batch_size,
        )


class MeZORule:
    """Non-private average of K two-point estimates over the batch (rows with a NaN or inf dropped)."""

    def clip(self, D: torch.Tensor) -> ops.ClipResult:
        """Column sums of the finite rows (nothing is clipped); the counts say how many rows were dropped."""
        finite = torch.isfinite(D).all(dim=1)
        sums = D[finite].double().sum(dim=0)
        none = torch.zeros((), dtype=torch.int64)
        return ops.ClipResult(sums, sums, none, (~finite).sum().cpu(), D.shape[0])

    def release(self, clipped: ops.ClipResult) -> Released:
        """g = mean over the finite rows / K (zero for a batch without one)."""
        K = clipped.sums.numel()
        rows = clipped.batch_size - int(clipped.num_nonfinite)
        grad = clipped.sums / rows / K if rows else torch.zeros_like(clipped.sums)
        return Released.of(grad, clipped)

    def __call__(self, D: torch.Tensor) -> Released:
        return self.release(self.clip(D))


class PrivateRule:
    """Clip per example (jointly or per direction), sum, add secret noise, divide by q·n.

    A rank that holds no secret generator (scale-out: every rank but 0) gets ``replica``: the
    same clipping, and a ``release`` that refuses.
    """

    def __init__(self, mechanism: GaussianMechanism | None, expected_batch_size: float, backend: str = "auto"):
        self.mechanism = mechanism
        self.expected_batch_size = expected_batch_size
        self.backend = backend
        if mechanism is not None:
            self.clip_bound, self.clip_mode = mechanism.clip, mechanism.clip_mode

    @classmethod
    def replica(cls, clip: float, clip_mode: str, backend: str = "auto") -> PrivateRule:
        """The clipping half only: for ranks that receive the release from rank 0."""
        rule = cls(None, float("nan"), backend)
        rule.clip_bound, rule.clip_mode = clip, clip_mode
        return rule

    def clip(self, D: torch.Tensor) -> ops.ClipResult:
        """Per-example clip of D/K and fp64 column sums over the rows given (any rank, its examples)."""
        return ops.clip_aggregate(D, self.clip_bound, scale=1.0 / D.shape[1], mode=self.clip_mode, backend=self.backend)

    def release(self, clipped: ops.ClipResult) -> Released:
        """The whole batch's clipped sums + secret noise, divided by q·n: the step's one release."""
        if self.mechanism is None:
            raise PrivacyError("this rank holds no secret generator: only rank 0 releases")
        noisy = self.mechanism.privatize(clipped.sums)
        return Released.of(noisy / self.expected_batch_size, clipped)

    def __call__(self, D: torch.Tensor) -> Released:
        return self.release(self.clip(D))
