"""Differential privacy for DP-ZO, explicit and Opacus-like: nothing here is hidden in the trainer.

One private step (docs/design.md sections 5 and 6)::

    g = secret_generator()                                 # CSPRNG keyed from OS entropy, never logged
    sampler = PoissonSampler(n, q, g)                      # true Poisson sampling, exactly q
    sigma = calibrate_noise(epsilon, delta, q, T)          # PRV upper bound <= epsilon
    mech = GaussianMechanism(sigma, C, K, "joint", g)      # sensitivity C (C*sqrt(K) per direction)
    acc = PrivacyAccountant(sigma, q, delta, max_steps=T)
    for t in range(T):
        idx = sampler.sample()                             # batch t: may be empty
        res = ops.clip_aggregate(D[idx], C, 1 / K)         # clipped fp64 column sums
        g_t = mech.normalize(mech.privatize(res.sums), q * n)  # exact noise on a grid; / expected batch size
        acc.step()
    acc.spent()                                            # PrivacySpent(eps_upper, eps_rdp, ...)

Draws are addressed by release index (``randomness.py``), so a resumed run ``seek``s to the number
of releases its ledger holds. The key (``get_secret_state``, ``SecretGenerator.save``) is SECRET:
with it the noise can be recomputed. Hyperparameter search on private data is not accounted.
"""

from . import exact
from .accountant import (
    DEFAULT_EPS_ERROR,
    AccountingWarning,
    CountMechanism,
    PrivacyAccountant,
    PrivacySpent,
    calibrate_noise,
    epsilon_spent,
)
from .mechanism import (
    DEFAULT_COUNT_SHARE,
    GaussianMechanism,
    count_epsilon,
    expected_batch_size,
    get_secret_state,
    laplace_count,
    secret_device_generator,
    secret_generator,
    set_secret_state,
)
from .plan import PrivacyPlan, StepCounter
from .randomness import NotPrivateWarning, PrivacyError, SecretGenerator, SecretStream
from .record import privacy_record
from .sampler import PoissonSampler

__all__ = [
    "DEFAULT_COUNT_SHARE",
    "DEFAULT_EPS_ERROR",
    "AccountingWarning",
    "CountMechanism",
    "GaussianMechanism",
    "NotPrivateWarning",
    "PoissonSampler",
    "PrivacyAccountant",
    "PrivacyError",
    "PrivacyPlan",
    "PrivacySpent",
    "SecretGenerator",
    "SecretStream",
    "StepCounter",
    "calibrate_noise",
    "count_epsilon",
    "epsilon_spent",
    "exact",
    "expected_batch_size",
    "get_secret_state",
    "laplace_count",
    "privacy_record",
    "secret_device_generator",
    "secret_generator",
    "set_secret_state",
]
