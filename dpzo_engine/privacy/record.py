"""privacy.json: the guarantee a trained model carries, in one machine-readable record.

It states what the accountant proved and about what: the unit of privacy (one training example,
add/remove adjacency), (ε, δ) with the accountant's bounds, the mechanism's parameters (σ, q, T,
K, C and the sensitivity), how the randomness was made, and what the guarantee does not cover
(the hyperparameter search, the evaluation data, the base model's pretraining data, and the
dataset size unless it was kept private). The sha256 of the ledger ties the record to the
releases it accounts for.
"""

from __future__ import annotations

from pathlib import Path

from ..core.files import sha256_file
from .plan import PrivacyPlan

RECORD_FORMAT = "dpzo-engine privacy record v1"
UNIT = "one training example (add/remove-one adjacency: neighbouring datasets differ by one example)"
ACCOUNTANT = (
    "PRV accountant (Gopi, Lee, Wutschitz 2021; prv_accountant) upper bound for Poisson-subsampled Gaussian "
    "releases composed T times, with the noisy count (pure epsilon_c-DP) composed once; RDP as a cross-check"
)


def privacy_record(
    plan: PrivacyPlan,
    *,
    method: str,
    mechanism: dict,
    dataset_size: int | None,
    ledger_path: Path | None = None,
) -> dict:
    """The record of a run whose releases are all made (``plan.releases`` of them).

    ``mechanism``: the per-step release (K, C, clip mode, the noise as ``GaussianMechanism.describe``
    gives it; for DP-AdamW the gradient's dimension and Opacus' mode). ``dataset_size``: n when it
    is public, None when it was kept private (the released count is then the public figure)."""
    spent = plan.spent()
    record = {
        "format": RECORD_FORMAT,
        "private": plan.guaranteed,
        "privacy": plan.status(),
        "method": method,
        "unit_of_privacy": UNIT,
        "epsilon": spent.epsilon if spent is not None else None,
        "delta": plan.delta if plan.guaranteed else None,
        "epsilon_target": plan.epsilon_target if plan.guaranteed else None,
        "accountant": _accountant(spent) if spent is not None else None,
        "noise_multiplier": plan.noise_multiplier,
        "sample_rate": plan.sample_rate,
        "sample_rate_source": plan.sample_rate_source,
        "steps": plan.releases,
        **mechanism,
        "released_count": plan.released_count,
        "count_epsilon": plan.count_epsilon if plan.released_count is not None else None,
        "dataset_size": dataset_size,
        "dataset_size_public": dataset_size is not None,
        "covered": [
            "every update released during training (the ledger) and the final weights, which are post-processing "
            "of those releases",
            *(["the dataset size (released as a noisy count)"] if plan.released_count is not None else []),
        ],
        "not_covered": [
            "the hyperparameter search (settings chosen by trying runs on the same data are not accounted)",
            "the evaluation data (test and dev scores are computed on them without noise)",
            "the base model's pretraining data",
            "metrics.jsonl and the printed losses (computed from the private batches, for the person training)",
            *(["the dataset size n (public: the sampling rate is batch size / n)"] if dataset_size is not None else []),
            "an observer timing the training process",
        ],
        "ledger_sha256": sha256_file(ledger_path) if ledger_path is not None and Path(ledger_path).exists() else None,
    }
    if not plan.guaranteed:
        record["covered"] = []
    return record


def _accountant(spent) -> dict:
    return {
        "name": spent.accountant,
        "description": ACCOUNTANT,
        "epsilon_lower": spent.eps_lower,
        "epsilon_estimate": spent.eps_estimate,
        "epsilon_upper": spent.eps_upper,
        "epsilon_rdp": spent.eps_rdp,
        "epsilon_error": spent.eps_error,
        "prv_failed": spent.prv_failed,
    }
