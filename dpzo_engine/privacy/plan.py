"""Everything a private training run needs from this package, made in one call.

``PrivacyPlan.create`` takes the run's secret generator (a fresh key from OS entropy, the key a
resumed run saved, or a debug seed), releases the noisy count if n is private, sets the sampling
rate, calibrates σ for the target (ε, δ) and builds the Poisson sampler and the accountant. The ZO
API (``PrivateZO``), the trainer and the first-order baselines all start from it, so σ, q and the
accounting of a run never depend on the optimiser. Non-private runs get the same sampler with
``noise_multiplier = 0`` and an accountant that only counts steps.

Private n (``count_share`` > 0): nothing public may depend on the true n. The count ñ is released
once (from the key's "count" stream, so the same key gives the same ñ), and the sampling rate is
either the user's or ``batch_size / ñ``; ``sample_rate_source`` says which. A resumed run passes
the ñ and σ its ledger header holds (``released_count``, ``noise_multiplier``): nothing is redrawn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .accountant import PrivacyAccountant, PrivacySpent, calibrate_noise
from .mechanism import laplace_count, secret_generator
from .randomness import PrivacyError, SecretGenerator
from .sampler import PoissonSampler

SOURCE_GIVEN = "given"
SOURCE_PUBLIC_N = "batch_size / n"
SOURCE_NOISY_N = "batch_size / released_count"
LARGE_EPSILON = 10.0  # above it a note says the guarantee rules out little (e^10 ≈ 22,000)
LARGE_SAMPLE_RATE = 0.5  # at or above it a note says subsampling amplifies privacy little


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

    private: bool  # the method adds noise and is accounted (false for MeZO / AdamW)
    num_examples: int  # the true n: private when ``released_count`` is set, never logged then
    sample_rate: float
    noise_multiplier: float
    generator: SecretGenerator | None  # None on the ranks that hold no secret (``replica``)
    sampler: PoissonSampler | None
    accountant: PrivacyAccountant | StepCounter
    released_count: int | None = None  # ñ = max(1, n + discrete Laplace(1/ε_c)) when n is private
    count_epsilon: float = 0.0
    sample_rate_source: str = SOURCE_GIVEN
    epsilon_target: float | None = None
    delta: float | None = None
    notes: list[str] = field(default_factory=list)  # footguns, for the person training (stderr)
    replica_reproducible: bool = False  # a replica's copy of rank 0's ``reproducible`` (``adopt``)

    @classmethod
    def create(
        cls,
        num_examples: int,
        *,
        steps: int,
        sample_rate: float | None = None,
        batch_size: float | None = None,
        epsilon: float | None = None,
        delta: float | None = None,
        count_share: float = 0.0,
        noise_seed: int | None = None,
        update_every: int = 1,
        noise_multiplier: float | None = None,
        generator: SecretGenerator | None = None,
        released_count: int | None = None,
    ) -> PrivacyPlan:
        """``epsilon=None`` plans a non-private run (MeZO, AdamW): same sampler, no noise, no ε.

        Give ``sample_rate`` or ``batch_size`` (q = batch_size / n, or / ñ when n is private).
        With ``count_share`` > 0, n is private: share·ε goes to the noisy count ñ, the Gaussian part
        is calibrated for the rest, and the composed bound is accounted (``calibrate_noise``).
        ``generator``: the run's secret generator (default: a fresh key, or ``noise_seed``'s).
        ``noise_multiplier`` / ``released_count``: values already fixed for this run (a resumed
        run's ledger header, a benchmark's cache); the count is then not drawn again."""
        if (sample_rate is None) == (batch_size is None):
            raise PrivacyError("give a sample rate or a batch size, not both")
        if generator is None:
            generator = secret_generator(noise_seed)
        private = epsilon is not None
        if private and delta is None:
            raise PrivacyError("a private run needs delta")
        count_epsilon = count_share * epsilon if private else 0.0
        if count_epsilon > 0 and released_count is None:
            released_count = laplace_count(num_examples, count_epsilon, generator)
        elif count_epsilon == 0:
            released_count = None
        if sample_rate is not None:
            q, source = float(sample_rate), SOURCE_GIVEN
        elif released_count is not None:
            q, source = min(1.0, batch_size / released_count), SOURCE_NOISY_N
        else:
            q, source = batch_size / num_examples, SOURCE_PUBLIC_N
        sampler = PoissonSampler(num_examples, q, generator)
        if not private:
            plan = cls(False, num_examples, q, 0.0, generator, sampler, StepCounter(), sample_rate_source=source)
            plan.notes = plan_notes(plan, batch_size)
            return plan
        sigma = noise_multiplier
        if sigma is None:
            sigma = calibrate_noise(epsilon, delta, q, steps, count_share=count_share)
        accountant = PrivacyAccountant(
            sigma, q, delta, max_steps=steps, laplace_epsilon=count_epsilon, update_every=update_every
        )
        plan = cls(
            True, num_examples, q, sigma, generator, sampler, accountant, released_count, count_epsilon, source,
            epsilon, delta,
        )  # fmt: skip
        plan.notes = plan_notes(plan, batch_size)
        return plan

    @property
    def reproducible(self) -> bool:
        """A debug noise seed: the noise can be recomputed, so the run is NOT private (on a replica:
        as rank 0's facts say)."""
        return self.generator.reproducible if self.generator is not None else self.replica_reproducible

    @property
    def guaranteed(self) -> bool:
        """The run's outputs carry its (ε, δ): a private method with secret randomness."""
        return self.private and not self.reproducible

    @property
    def normalizer(self) -> float:
        """q·n, or q·ñ when n is private: what the noisy sum is divided by (never the realised batch size)."""
        n = self.released_count if self.released_count is not None else self.num_examples
        return self.sample_rate * n

    @classmethod
    def replica(cls, private: bool, num_examples: int, sample_rate: float) -> PrivacyPlan:
        """The plan of a rank that holds no secret (scale-out: every rank but 0). It cannot sample,
        add noise or report ε: rank 0 does those and broadcasts the batch and the release. Rank 0's
        public facts (σ, q, ñ) are copied in with ``adopt``."""
        return cls(private, num_examples, sample_rate, math.nan, None, None, StepCounter())

    def adopt(self, facts: dict) -> None:
        """Take rank 0's public facts (``public_facts``): a replica's plan then describes the same run."""
        self.noise_multiplier, self.sample_rate = facts["noise_multiplier"], facts["sample_rate"]
        self.sample_rate_source, self.released_count = facts["sample_rate_source"], facts["released_count"]
        self.replica_reproducible = self.private and not facts["private"]

    @property
    def releases(self) -> int:
        """Releases made so far (the accountant's count); also the next sampling/noise address."""
        return self.accountant.steps

    def seek(self, releases: int) -> None:
        """Continue after ``releases`` releases (a resumed run: the count its ledger holds)."""
        if releases < self.accountant.steps:
            raise PrivacyError(f"cannot go back from {self.accountant.steps} releases to {releases}")
        self.accountant.step(releases - self.accountant.steps)
        if self.sampler is not None:
            self.sampler.seek(releases)

    def epsilon(self) -> float | None:
        """ε spent so far; None when the run is not private (a non-private method, or a debug seed)."""
        return self.accountant.epsilon() if self.guaranteed else None

    def spent(self) -> PrivacySpent | None:
        return self.accountant.spent() if self.guaranteed else None

    def status(self) -> str:
        """One phrase for files and people: what this run's privacy is."""
        if not self.private:
            return "not private: the method adds no noise"
        if self.reproducible:
            return "not private: debug --noise-seed (anyone who knows the seed can recompute the noise)"
        return "differentially private"

    def public_facts(self) -> dict:
        """What the ledger header, summary and privacy.json say about sampling and accounting (public)."""
        return {
            "private": self.guaranteed,
            "privacy": self.status(),
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "sample_rate_source": self.sample_rate_source,
            "expected_batch_size": self.normalizer,
            "released_count": self.released_count,
            "count_epsilon": self.count_epsilon if self.released_count is not None else None,
            "sampling": "Poisson, each example with probability exactly q (64-bit uniforms from the CSPRNG)",
        }

    def state_dict(self) -> dict:
        """Public state (the step count, the released count): safe to store with the model."""
        return {"accountant": self.accountant.state_dict(), "released_count": self.released_count}

    def load_state_dict(self, state: dict) -> None:
        self.accountant.load_state_dict(state["accountant"])
        if state["released_count"] != self.released_count:
            raise PrivacyError("the checkpoint's released count differs from this run's: a different run")
        if self.sampler is not None:
            self.sampler.seek(self.accountant.steps)

    def secret_state(self) -> dict:
        """SECRET: the key of the sampling and noise generator. Store it apart, mode 600. A debug
        seed's key says so, and stays "not private" when it is loaded again."""
        return {"key": self.generator.key, "reproducible": self.generator.reproducible}

    def load_secret_state(self, state: dict) -> None:
        self.generator = SecretGenerator(state["key"], reproducible=bool(state.get("reproducible", False)))
        self.sampler.generator = self.generator


def plan_notes(plan: PrivacyPlan, batch_size: float | None) -> list[str]:
    """Settings that weaken or void the guarantee, each a sentence for stderr (``note: ...``)."""
    notes = []
    q, n = plan.sample_rate, plan.num_examples
    if plan.private and q >= LARGE_SAMPLE_RATE:
        notes.append(
            f"the sampling rate q = {q:.3g} is 0.5 or more: subsampling then amplifies privacy little, "
            "so the noise must carry nearly all of it; lower --batch-size or --sample-rate"
        )
    if plan.sample_rate_source == SOURCE_NOISY_N and batch_size is not None and batch_size > plan.released_count:
        notes.append(f"--batch-size {batch_size} exceeds the released count {plan.released_count}: q is capped at 1")
    if plan.private and plan.delta is not None and plan.delta >= 1.0 / n:
        notes.append(
            f"delta = {plan.delta:g} is 1/n or more (n = {n}): a mechanism that publishes one whole example "
            "satisfies it, so the guarantee says little; use delta well below 1/n (e.g. 1e-5)"
        )
    if plan.private and plan.epsilon_target is not None and plan.epsilon_target > LARGE_EPSILON:
        notes.append(
            f"epsilon = {plan.epsilon_target:g} bounds an attacker's odds ratio by e^epsilon = "
            f"{math.exp(min(plan.epsilon_target, 700)):.3g}: such a guarantee rules out little"
        )
    if q * n < 1:
        notes.append(f"the expected batch size q*n = {q * n:.3g} is below one example: most steps train on nothing")
    return notes
