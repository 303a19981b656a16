"""Poisson sampling from the secret generator (what the subsampled-Gaussian accountant assumes).

Each step includes every example independently with probability exactly q (``exact.bernoulli_mask``:
64-bit uniform integers from the CSPRNG against q·2^64), so batch sizes vary and a batch can be
empty; the trainer must handle an empty index tensor (release pure noise) and normalise by q·n,
not by the realised size. Shuffled fixed-size batches are not covered by the Poisson analysis
(Chua et al., NeurIPS 2024), so there is no such option.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch

from .exact import bernoulli_mask
from .randomness import PrivacyError, SecretGenerator, as_secret_generator


class PoissonSampler:
    """Draws index sets of ``range(num_examples)``, each index kept with probability ``sample_rate``.

    Call ``sample()`` once per step, or iterate (``steps`` batches). Batch ``r`` comes from the
    generator's stream ("poisson", r), ``position`` being the next r: ``seek`` continues a run.
    """

    def __init__(
        self, num_examples: int, sample_rate: float, generator: SecretGenerator, steps: int | None = None
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
        if generator is None:
            raise PrivacyError("PoissonSampler needs the secret generator (see secret_generator())")
        self.num_examples = num_examples
        self.sample_rate = q
        self.generator = as_secret_generator(generator)
        self.steps = steps
        self.position = 0

    @property
    def expected_batch_size(self) -> float:
        return self.sample_rate * self.num_examples

    def seek(self, position: int) -> None:
        """Continue at batch ``position`` (the number of releases already made)."""
        if isinstance(position, bool) or not isinstance(position, int) or position < 0:
            raise PrivacyError(f"position must be an int >= 0, got {position!r}")
        self.position = position

    def sample(self) -> torch.Tensor:
        """One Poisson batch: sorted int64 indices, possibly empty."""
        keep = bernoulli_mask(self.generator.stream("poisson", self.position), self.num_examples, self.sample_rate)
        self.position += 1
        return torch.from_numpy(np.flatnonzero(keep).astype(np.int64))

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
