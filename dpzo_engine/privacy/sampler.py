"""Poisson sampling from the secret generator (what the subsampled-Gaussian accountant assumes).

Each step includes every example independently with probability q, so batch sizes vary
and a batch can be empty; the trainer must handle an empty index tensor (release pure
noise) and normalise by q·n, not by the realised size. Shuffled fixed-size batches are
not covered by the Poisson analysis (Chua et al., NeurIPS 2024), so there is no such option.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from .mechanism import PrivacyError


class PoissonSampler:
    """Draws index sets of ``range(num_examples)``, each index kept with probability ``sample_rate``.

    Call ``sample()`` once per step, or iterate (``steps`` batches). The draw order is
    fixed (one ``torch.rand(n)`` per step), so restoring the generator state resumes the
    exact sequence.
    """

    def __init__(
        self, num_examples: int, sample_rate: float, generator: torch.Generator, steps: int | None = None
    ) -> None:
        if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 1:
            raise PrivacyError(f"number of examples must be an int >= 1, got {num_examples!r}")
        try:
            q = float(sample_rate)
        except (TypeError, ValueError):
            raise PrivacyError(f"sample rate must be a number, got {sample_rate!r}") from None
        if not (math.isfinite(q) and 0 < q <= 1):
            raise PrivacyError(f"sample rate must be in (0, 1], got {sample_rate}")
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 0):
            raise PrivacyError(f"steps must be an int >= 0, got {steps!r}")
        if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
            raise PrivacyError("PoissonSampler needs the secret CPU generator (see secret_generator())")
        self.num_examples = num_examples
        self.sample_rate = q
        self.generator = generator
        self.steps = steps

    @property
    def expected_batch_size(self) -> float:
        return self.sample_rate * self.num_examples

    def sample(self) -> torch.Tensor:
        """One Poisson batch: sorted int64 indices, possibly empty."""
        keep = torch.rand(self.num_examples, generator=self.generator, dtype=torch.float64) < self.sample_rate
        return keep.nonzero().flatten()

    def __iter__(self) -> Iterator[torch.Tensor]:
        if self.steps is None:
            raise PrivacyError("PoissonSampler was built without steps; call sample() per step instead")
        for _ in range(self.steps):
            yield self.sample()

    def __len__(self) -> int:
        if self.steps is None:
            raise TypeError("PoissonSampler without steps has no length")
        return self.steps

    def __repr__(self) -> str:
        return f"PoissonSampler(num_examples={self.num_examples}, sample_rate={self.sample_rate}, steps={self.steps})"
