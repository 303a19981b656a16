"""Everything a private training run needs from this package, made in one call.

``PrivacyPlan.create`` seeds the secret generator, releases the Laplace count if n is private,
calibrates σ for the target (ε, δ) and builds the Poisson sampler and the accountant. The ZO API
(``PrivateZO``), the trainer and the first-order baselines all start from it, so σ, q and the
accounting of a run never depend on the optimiser. Non-private runs get the same sampler with
``noise_multiplier = 0`` and an accountant that only counts steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .accountant import PrivacyAccountant, PrivacySpent, calibrate_noise
from .mechanism import PrivacyError, laplace_count, secret_generator
from .sampler import PoissonSampler


class StepCounter:
    """The accountant of a non-private run: counts releases, spends nothing."""

    def __init__(self) -> None:
        self.steps = 0

    def step(self, n: int = 1) -> None:
        self.steps += n

    def epsilon(self) -> None:
        return None

    def spent(self) -> None:
        return None

    def state_dict(self) -> dict:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state["steps"])


@dataclass
class PrivacyPlan:
    """The secret generator, sampler, σ and accountant of one run (see ``create``)."""

    private: bool
    num_examples: int  # the true n: private when ``released_count`` is set, never logged then
    sample_rate: float
    noise_multiplier: float
    generator: torch.Generator
    sampler: PoissonSampler
    accountant: PrivacyAccountant | StepCounter
    released_count: float | None = None  # ñ = n + Lap(1/ε_c) when n is private
    count_epsilon: float = 0.0

    @classmethod
    def create(
        cls,
        num_examples: int,
        *,
        steps: int,
        sample_rate: float,
        epsilon: float | None = None,
        delta: float | None = None,
        count_share: float = 0.0,
        noise_seed: int | None = None,
        update_every: int = 1,
        noise_multiplier: float | None = None,
    ) -> PrivacyPlan:
        """``epsilon=None`` plans a non-private run (MeZO, AdamW): same sampler, no noise, no ε.

        With ``count_share`` > 0, n is private: share·ε goes to a Laplace count ñ, the Gaussian part
        is calibrated for the rest, and the composed bound is accounted (``calibrate_noise``).
        ``noise_multiplier``: a σ already calibrated for exactly these values (a benchmark's cache)."""
        generator = secret_generator(noise_seed)
        sampler = PoissonSampler(num_examples, sample_rate, generator)
        if epsilon is None:
            return cls(False, num_examples, sample_rate, 0.0, generator, sampler, StepCounter())
        if delta is None:
            raise PrivacyError("a private run needs delta")
        count_epsilon = count_share * epsilon
        released = laplace_count(num_examples, count_epsilon, generator) if count_share > 0 else None
        sigma = noise_multiplier
        if sigma is None:
            sigma = calibrate_noise(epsilon, delta, sample_rate, steps, count_share=count_share)
        accountant = PrivacyAccountant(
            sigma, sample_rate, delta, max_steps=steps, laplace_epsilon=count_epsilon, update_every=update_every
        )
        return cls(True, num_examples, sample_rate, sigma, generator, sampler, accountant, released, count_epsilon)

    @property
    def normalizer(self) -> float:
        """q·n, or q·ñ when n is private: what the noisy sum is divided by (never the realised batch size)."""
        n = self.released_count if self.released_count is not None else self.num_examples
        return self.sample_rate * n

    def epsilon(self) -> float | None:
        return self.accountant.epsilon()

    def spent(self) -> PrivacySpent | None:
        return self.accountant.spent()

    def state_dict(self) -> dict:
        """Public state (the step count, the released count): safe to store with the model."""
        return {"accountant": self.accountant.state_dict(), "released_count": self.released_count}

    def load_state_dict(self, state: dict) -> None:
        self.accountant.load_state_dict(state["accountant"])
        self.released_count = state["released_count"]

    def secret_state(self) -> dict:
        """SECRET: the generator state (sampling and noise). Store it apart, mode 600."""
        return {"generator": self.generator.get_state()}

    def load_secret_state(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
