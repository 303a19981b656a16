"""The Gaussian mechanism on the clipped K-vector and the noisy count, drawn exactly from the secret generator.

Why a separate generator: direction seeds are public (they are logged so the run can be
replayed), so noise drawn from a generator re-seeded with them could be recomputed and
subtracted. Poisson sampling and every DP noise draw here come from the run's
``SecretGenerator`` (``randomness.py``: SHAKE-256 keyed with 256 bits of OS entropy), never
logged. Whoever holds its key can recompute the noise: the key file is a secret (mode 600).

The noise is exact (``exact.py``): the released noisy sum is the exact Gaussian mechanism's
output rounded to a public grid γ (post-processing, so the accounting of the continuous Gaussian
holds as is), and the count is a discrete Laplace (exactly ε_c-DP). No floating-point sampler is
involved, so the low-order bits of a release say nothing about the data (Mironov 2012).
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch

from . import exact
from .randomness import NotPrivateWarning, PrivacyError, SecretGenerator, as_secret_generator

CLIP_MODES = ("joint", "per_direction")
DEFAULT_COUNT_SHARE = 0.05  # share of ε spent on the noisy count when n is private (DP-AggZO paper)

__all__ = ["NotPrivateWarning", "PrivacyError"]  # re-exported: their home is randomness.py


def _finite(name: str, value: float, *, allow_zero: bool = False) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise PrivacyError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise PrivacyError(f"{name} must be a finite number {bound}, got {value}")
    return value


# --------------------------------------------------------------------------- secret randomness
def secret_generator(debug_seed: int | None = None) -> SecretGenerator:
    """The run's secret generator: a fresh 256-bit key from OS entropy, never returned or logged.

    ``debug_seed`` makes the run reproducible for debugging only: anyone who knows it can
    recompute the noise, so the run is NOT private, and a ``NotPrivateWarning`` says so.
    """
    if debug_seed is None:
        return SecretGenerator.from_os_entropy()
    return SecretGenerator.from_debug_seed(debug_seed)


def secret_device_generator(
    device: torch.device | str, debug_seed: int | None = None, *, secret: SecretGenerator | None = None
) -> torch.Generator:
    """A torch generator on ``device`` for d-dimensional noise drawn where the noised values live
    (DP-AdamW's gradient noise, drawn by Opacus), seeded with 64 bits from the secret generator.

    Why torch's: millions of noise values per step cannot come from a Python sampler. The seed
    comes from the run's key (or OS entropy); ``debug_seed`` makes it reproducible and the run NOT
    private (warned). Opacus draws with it in its ``secure_mode`` (see first_order).
    """
    device = torch.device(device)
    if secret is None:
        what = "Poisson sampling and DP noise are" if device.type == "cpu" else f"the {device.type} noise is"
        secret = SecretGenerator.from_debug_seed(debug_seed, what) if debug_seed is not None else secret_generator()
    g = torch.Generator(device=device)
    g.manual_seed(secret.torch_seed(f"device/{device.type}"))
    return g


def get_secret_state(generator: SecretGenerator) -> dict:
    """What resumes the generator: its key. SECRET: store it apart from public outputs, mode 600."""
    return {"key": as_secret_generator(generator).key}


def set_secret_state(generator: SecretGenerator | None, state: dict) -> SecretGenerator:
    """The generator of a saved state (``get_secret_state``): it draws what the original would have."""
    if not isinstance(state, dict) or not isinstance(state.get("key"), bytes):
        raise PrivacyError("a secret state is the dict saved by get_secret_state (its 'key' bytes)")
    return SecretGenerator(state["key"])


# --------------------------------------------------------------------------- Gaussian mechanism
class GaussianMechanism:
    """Adds N(0, (σ·Δ)²) to each of the K clipped column sums, exactly, and rounds to a public grid.

    Δ is the L2 sensitivity under add/remove-one: ``clip`` when each example's K-vector is
    clipped jointly in L2 (DP-AggZO, DPZero with K = 1), ``clip·√K`` when each of the K
    entries is clipped to [-C, C] separately (``per_direction`` ablation; √K is rounded up).
    The accountant only needs σ, because the noise scales with Δ.

    Release ``r`` draws from the generator's stream ("gauss", r): ``position`` is the index of the
    next release (``seek`` sets it on a resume), so a release is never drawn twice for two
    different sums. The output is j·γ, j = round((S + σΔ·X)/γ), X ~ N(0, 1) exactly; γ = ``grid``.
    """

    def __init__(
        self,
        noise_multiplier: float,
        clip: float,
        num_directions: int = 1,
        clip_mode: str = "joint",
        generator: SecretGenerator | None = None,
    ):
        self.noise_multiplier = _finite("noise multiplier", noise_multiplier, allow_zero=True)
        self.clip = _finite("clip", clip)
        if isinstance(num_directions, bool) or not isinstance(num_directions, int) or num_directions < 1:
            raise PrivacyError(f"num_directions must be an int >= 1, got {num_directions!r}")
        if clip_mode not in CLIP_MODES:
            raise PrivacyError(f"unknown clip mode {clip_mode!r}; expected one of {CLIP_MODES}")
        if generator is None:
            raise PrivacyError("GaussianMechanism needs the secret generator (see secret_generator())")
        self.num_directions = num_directions
        self.clip_mode = clip_mode
        self.generator = as_secret_generator(generator)
        self.position = 0
        # exact noise std τ ≥ σ·Δ (a dyadic rational), and the grid exponent it implies
        root_k = Fraction(1) if clip_mode == "joint" else exact.sqrt_upper(num_directions)
        self._std = Fraction(self.noise_multiplier) * Fraction(self.clip) * root_k
        self._grid_exp = exact.grid_exponent(self._std) if self._std > 0 else None

    @property
    def sensitivity(self) -> float:
        """L2 sensitivity of the column sums to adding or removing one example."""
        if self.clip_mode == "joint":
            return self.clip
        return self.clip * math.sqrt(self.num_directions)

    @property
    def noise_std(self) -> float:
        return float(self._std)

    @property
    def grid(self) -> float | None:
        """γ: every noisy sum released is a multiple of it (None without noise)."""
        return None if self._grid_exp is None else math.ldexp(1.0, self._grid_exp)

    def seek(self, position: int) -> None:
        """Continue at release ``position`` (the number of releases already made)."""
        if isinstance(position, bool) or not isinstance(position, int) or position < 0:
            raise PrivacyError(f"position must be an int >= 0, got {position!r}")
        self.position = position

    def privatize(self, sums: torch.Tensor) -> torch.Tensor:
        """Clipped sums fp64[K] -> noisy sums fp64[K] on the same device (release ``position``, then +1).

        Each coordinate is drawn exactly from the address ("gauss", position); the draw does not
        depend on where the sums live.
        """
        if sums.dim() != 1 or sums.numel() != self.num_directions:
            raise PrivacyError(f"expected {self.num_directions} column sums, got shape {tuple(sums.shape)}")
        sums = sums.to(torch.float64)
        if not bool(torch.isfinite(sums).all()):
            raise PrivacyError("clipped sums are not finite; refusing to release them")
        stream = self.generator.stream("gauss", self.position)
        self.position += 1
        if self._grid_exp is None:
            return sums.clone()
        noisy = [
            math.ldexp(float(exact.gaussian_on_grid(stream, Fraction(s), self._std, self._grid_exp)), self._grid_exp)
            for s in sums.tolist()
        ]
        return torch.tensor(noisy, dtype=torch.float64).to(sums.device)

    @staticmethod
    def normalize(noisy_sums: torch.Tensor, expected_batch_size: float) -> torch.Tensor:
        """Divide by the expected batch size q·n (never the realised one, which depends on the data)."""
        return noisy_sums / _finite("expected batch size", expected_batch_size)

    def describe(self) -> dict:
        """The noise as released: for a ledger header and privacy.json."""
        return {
            "generator": "SHAKE-256 keyed with 256 bits of OS entropy"
            if not self.generator.reproducible
            else "SHAKE-256 keyed from a debug seed (reproducible: NOT private)",
            "gaussian": "exact N(0, (sigma*Delta)^2) (Karney 2016) added to the clipped sum, rounded to the grid",
            "grid": self.grid,
            "noise_std": self.noise_std,
            "sensitivity": self.sensitivity,
        }

    def __repr__(self) -> str:
        return (
            f"GaussianMechanism(noise_multiplier={self.noise_multiplier}, clip={self.clip}, "
            f"num_directions={self.num_directions}, clip_mode={self.clip_mode!r}, noise_std={self.noise_std})"
        )


def expected_batch_size(sample_rate: float, num_examples: float) -> float:
    """q·n: the normaliser of the noisy sum under Poisson sampling (n may be a released ñ)."""
    return _finite("sample rate", sample_rate) * _finite("number of examples", num_examples)


# --------------------------------------------------------------------------- noisy count
def laplace_count(num_examples: int, epsilon: float, generator: SecretGenerator) -> int:
    """Release ñ = max(1, n + Y), Y ~ discrete Laplace, P(y) ∝ exp(−ε|y|): exactly ε-DP for a count.

    Used when n itself is private (DP-AggZO spends 5% of ε on it). Drawn from the generator's
    stream ("count", 0): a run draws it once, and the same key gives the same ñ. The clamp is
    post-processing and keeps q·ñ a positive divisor. Accounted as pure ε-DP (its exact privacy loss).
    """
    if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 0:
        raise PrivacyError(f"number of examples must be an int >= 0, got {num_examples!r}")
    epsilon = _finite("count epsilon", epsilon)
    noise = exact.discrete_laplace(as_secret_generator(generator).stream("count"), 1 / Fraction(epsilon))
    return max(1, num_examples + noise)


def count_epsilon(epsilon: float, share: float = DEFAULT_COUNT_SHARE) -> float:
    """The ε spent on the count: share·ε (the Gaussian part is then calibrated for (1 − share)·ε)."""
    epsilon = _finite("epsilon", epsilon)
    share = _finite("count share", share, allow_zero=True)
    if share >= 1:
        raise PrivacyError(f"count share must be in [0, 1), got {share}")
    return share * epsilon
