"""Differential privacy for DP-ZO, explicit and Opacus-like: nothing here is hidden in the trainer.

One private step (DESIGN section 5/6)::

    g = secret_generator()                                 # OS entropy, never logged
    sampler = PoissonSampler(n, q, g)                      # true Poisson sampling
    sigma = calibrate_noise(epsilon, delta, q, T)          # PRV upper bound <= epsilon
    mech = GaussianMechanism(sigma, C, K, "joint", g)      # sensitivity C (C*sqrt(K) per direction)
    acc = PrivacyAccountant(sigma, q, delta, max_steps=T)
    for t in range(T):
        idx = sampler.sample()                             # may be empty
        res = ops.clip_aggregate(D[idx], C, 1 / K)         # clipped fp64 column sums
        g_t = mech.normalize(mech.privatize(res.sums), q * n)  # expected batch size, not len(idx)
        acc.step()
    acc.spent()                                            # PrivacySpent(eps_upper, eps_rdp, ...)

The generator state (``get_secret_state``) is needed to resume and is SECRET: with it the
noise can be recomputed. Hyperparameter search on private data is not accounted.
"""

from .accountant import (
    DEFAULT_EPS_ERROR,
    AccountingWarning,
    PrivacyAccountant,
    PrivacySpent,
    calibrate_noise,
    epsilon_spent,
)
from .mechanism import (
    DEFAULT_COUNT_SHARE,
    GaussianMechanism,
    NotPrivateWarning,
    PrivacyError,
    count_epsilon,
    expected_batch_size,
    get_secret_state,
    laplace_count,
    secret_device_generator,
    secret_generator,
    set_secret_state,
)
from .plan import PrivacyPlan, StepCounter
from .sampler import PoissonSampler

__all__ = [
    "DEFAULT_COUNT_SHARE",
    "DEFAULT_EPS_ERROR",
    "AccountingWarning",
    "GaussianMechanism",
    "NotPrivateWarning",
    "PoissonSampler",
    "PrivacyAccountant",
    "PrivacyError",
    "PrivacyPlan",
    "PrivacySpent",
    "StepCounter",
    "calibrate_noise",
    "count_epsilon",
    "epsilon_spent",
    "expected_batch_size",
    "get_secret_state",
    "laplace_count",
    "secret_device_generator",
    "secret_generator",
    "set_secret_state",
]
