"""Secret randomness, the Gaussian mechanism on the clipped K-vector, the Laplace count.

Why a separate generator: direction seeds are public (they are logged so the run can be
replayed), so noise drawn from a generator re-seeded with them could be recomputed and
subtracted. Poisson sampling and every DP noise draw here come from ``secret_generator``,
seeded from OS entropy and never logged. Its state is needed to resume a run; whoever
saves it must treat that file as a secret (anyone holding it can recompute the noise).

Limits, stated once: torch's CPU generator (mt19937, 64-bit seed) is not a cryptographic
PRNG, and floating-point Gaussian/Laplace samplers have the known low-order-bit issues
(Mironov 2012). Neither the raw noise nor the generator output is ever released, only
noisy sums; this matches what Opacus does by default (without its ``secure_mode``).
"""

from __future__ import annotations

import math
import os
import warnings

import torch

from ..core.errors import UserError

CLIP_MODES = ("joint", "per_direction")
DEFAULT_COUNT_SHARE = 0.05  # share of ε spent on the Laplace count when n is private (DP-AggZO paper)


class PrivacyError(UserError, ValueError):
    """Invalid privacy parameters; the message is one line, the trainer prints it as is."""


class NotPrivateWarning(UserWarning):
    """The run's sampling and noise are reproducible: its outputs are NOT differentially private."""


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
def secret_generator(debug_seed: int | None = None) -> torch.Generator:
    """CPU generator for Poisson sampling and DP noise, seeded from OS entropy.

    The seed is never returned or logged. ``debug_seed`` makes the run reproducible for
    debugging only: anyone who knows it can recompute the noise, so the run is NOT
    private, and a ``NotPrivateWarning`` says so.
    """
    return _secret(torch.device("cpu"), debug_seed, "Poisson sampling and DP noise are", lambda s: s)


def secret_device_generator(device: torch.device | str, debug_seed: int | None = None) -> torch.Generator:
    """A secret generator on ``device``, for noise drawn where the noised values live.

    Why: d-dimensional noise (DP-AdamW's gradient noise, drawn by Opacus with the
    parameters' device) needs a generator of that device; a CUDA generator cannot
    draw for CPU tensors and vice versa. Same rules as ``secret_generator``: seeded
    from OS entropy and never returned or logged; ``debug_seed`` makes the noise
    reproducible and the run NOT private (warned). On the CPU this is simply
    ``secret_generator``.
    """
    device = torch.device(device)
    if device.type == "cpu":
        return secret_generator(debug_seed)
    apart = lambda s: s * 0x9E3779B97F4A7C15 + 1  # noqa: E731  (a debug stream apart from the CPU one)
    return _secret(device, debug_seed, f"the {device.type} noise is", apart)


def _secret(device: torch.device, debug_seed: int | None, what: str, debug_stream) -> torch.Generator:
    g = torch.Generator(device=device)
    if debug_seed is None:
        g.manual_seed(int.from_bytes(os.urandom(8), "little"))
        return g
    if isinstance(debug_seed, bool) or not isinstance(debug_seed, int):
        raise PrivacyError(f"debug seed must be an int, got {debug_seed!r}")
    warnings.warn(
        f"DEBUG noise seed {debug_seed} set: {what} reproducible by anyone who knows it, "
        "so this run is NOT differentially private",
        NotPrivateWarning,
        stacklevel=3,
    )
    g.manual_seed(debug_stream(debug_seed) % (1 << 64))
    return g


def get_secret_state(generator: torch.Generator) -> torch.Tensor:
    """The generator's state, to resume a run. SECRET: store it apart from public outputs, mode 600."""
    return generator.get_state().clone()


def set_secret_state(generator: torch.Generator, state: torch.Tensor) -> torch.Generator:
    """Restore a state saved by ``get_secret_state`` (the continued run draws what the original would have)."""
    if not isinstance(state, torch.Tensor) or state.dtype != torch.uint8:
        raise PrivacyError("secret generator state must be the uint8 tensor saved by get_secret_state")
    generator.set_state(state.cpu())
    return generator


# --------------------------------------------------------------------------- Gaussian mechanism
class GaussianMechanism:
    """Adds N(0, (σ·Δ)²) to each of the K clipped column sums, from the secret generator.

    Δ is the L2 sensitivity under add/remove-one: ``clip`` when each example's K-vector is
    clipped jointly in L2 (DP-AggZO, DPZero with K = 1), ``clip·√K`` when each of the K
    entries is clipped to [-C, C] separately (``per_direction`` ablation). The accountant
    only needs σ, because the noise scales with Δ.
    """

    def __init__(
        self,
        noise_multiplier: float,
        clip: float,
        num_directions: int = 1,
        clip_mode: str = "joint",
        generator: torch.Generator | None = None,
    ):
        self.noise_multiplier = _finite("noise multiplier", noise_multiplier, allow_zero=True)
        self.clip = _finite("clip", clip)
        if isinstance(num_directions, bool) or not isinstance(num_directions, int) or num_directions < 1:
            raise PrivacyError(f"num_directions must be an int >= 1, got {num_directions!r}")
        if clip_mode not in CLIP_MODES:
            raise PrivacyError(f"unknown clip mode {clip_mode!r}; expected one of {CLIP_MODES}")
        if generator is None:
            raise PrivacyError("GaussianMechanism needs the secret generator (see secret_generator())")
        if generator.device.type != "cpu":
            raise PrivacyError("the secret generator must be a CPU generator")
        self.num_directions = num_directions
        self.clip_mode = clip_mode
        self.generator = generator

    @property
    def sensitivity(self) -> float:
        """L2 sensitivity of the column sums to adding or removing one example."""
        if self.clip_mode == "joint":
            return self.clip
        return self.clip * math.sqrt(self.num_directions)

    @property
    def noise_std(self) -> float:
        return self.noise_multiplier * self.sensitivity

    def privatize(self, sums: torch.Tensor) -> torch.Tensor:
        """Clipped sums fp64[K] -> noisy sums fp64[K] on the same device.

        Noise is drawn in fp64 on the CPU (the generator's device) and moved, so the draw
        does not depend on where the sums live.
        """
        if sums.dim() != 1 or sums.numel() != self.num_directions:
            raise PrivacyError(f"expected {self.num_directions} column sums, got shape {tuple(sums.shape)}")
        sums = sums.to(torch.float64)
        if not bool(torch.isfinite(sums).all()):
            raise PrivacyError("clipped sums are not finite; refusing to release them")
        noise = torch.randn(self.num_directions, generator=self.generator, dtype=torch.float64)
        return sums + (self.noise_std * noise).to(sums.device)

    @staticmethod
    def normalize(noisy_sums: torch.Tensor, expected_batch_size: float) -> torch.Tensor:
        """Divide by the expected batch size q·n (never the realised one, which depends on the data)."""
        return noisy_sums / _finite("expected batch size", expected_batch_size)

    def __repr__(self) -> str:
        return (
            f"GaussianMechanism(noise_multiplier={self.noise_multiplier}, clip={self.clip}, "
            f"num_directions={self.num_directions}, clip_mode={self.clip_mode!r}, noise_std={self.noise_std})"
        )


def expected_batch_size(sample_rate: float, num_examples: float) -> float:
    """q·n: the normaliser of the noisy sum under Poisson sampling (n may be a released ñ)."""
    return _finite("sample rate", sample_rate) * _finite("number of examples", num_examples)


# --------------------------------------------------------------------------- Laplace count
def laplace_count(num_examples: int, epsilon: float, generator: torch.Generator) -> float:
    """Release ñ = n + Laplace(0, 1/ε) (ε-DP: a count has sensitivity 1), clamped to >= 1.

    Used when n itself is private (DP-AggZO spends 5% of ε on it); the clamp is
    post-processing and keeps q·ñ a positive divisor.
    """
    if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 0:
        raise PrivacyError(f"number of examples must be an int >= 0, got {num_examples!r}")
    epsilon = _finite("count epsilon", epsilon)
    # Laplace(0, b) = b·(E1 − E2) with E = −log U, U in (0, 1]: no log(0) at the edges.
    u = 1.0 - torch.rand(2, generator=generator, dtype=torch.float64)
    noise = (torch.log(u[1]) - torch.log(u[0])).item() / epsilon
    return max(1.0, num_examples + noise)


def count_epsilon(epsilon: float, share: float = DEFAULT_COUNT_SHARE) -> float:
    """The ε spent on the count: share·ε (the Gaussian part is then calibrated for (1 − share)·ε)."""
    epsilon = _finite("epsilon", epsilon)
    share = _finite("count share", share, allow_zero=True)
    if share >= 1:
        raise PrivacyError(f"count share must be in [0, 1), got {share}")
    return share * epsilon
