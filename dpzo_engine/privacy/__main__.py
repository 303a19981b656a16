"""``python -m dpzo_engine.privacy``: ε for a noise multiplier, or σ for a target ε, as one JSON line.

    python -m dpzo_engine.privacy epsilon --sigma 1 --sample-rate 0.01 --steps 1000 --delta 1e-5
    python -m dpzo_engine.privacy calibrate --epsilon 2 --sample-rate 0.01 --steps 1000 --delta 1e-5

Bad input prints one ``error:`` line on stderr and exits with code 2 (no traceback).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings

from ..core.errors import report
from .accountant import calibrate_noise, epsilon_spent
from .mechanism import PrivacyError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse would print the usage too)
        raise PrivacyError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m dpzo_engine.privacy", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    e = sub.add_parser("epsilon", help="epsilon spent by T subsampled-Gaussian steps (PRV upper bound, RDP check)")
    e.add_argument("--sigma", type=float, required=True, help="noise multiplier (noise std / L2 sensitivity)")
    e.add_argument(
        "--count-epsilon", type=float, default=0.0, help="epsilon of the noisy count (discrete Laplace, pure DP) [0]"
    )
    c = sub.add_parser("calibrate", help="smallest noise multiplier whose PRV upper bound meets the target epsilon")
    c.add_argument("--epsilon", type=float, required=True, help="target epsilon")
    c.add_argument(
        "--count-share", type=float, default=0.0, help="share of epsilon for the noisy count (discrete Laplace) [0]"
    )
    for q in (e, c):
        q.add_argument("--sample-rate", type=float, required=True, help="Poisson sampling rate q")
        q.add_argument("--steps", type=int, required=True, help="number of steps T")
        q.add_argument("--delta", type=float, required=True, help="delta")
        q.add_argument("--eps-error", type=float, default=None, help="PRV epsilon error [min(0.01, 1%% of epsilon)]")
        q.add_argument("--num-examples", type=int, default=None, help="dataset size n (warns if delta >= 1/n)")
    return p


def _json(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


def run(argv: list[str] | None = None) -> dict:
    args = _parser().parse_args(argv)
    if args.command == "epsilon":
        if args.sigma == 0:
            raise PrivacyError("--sigma must be > 0 (sigma = 0 adds no noise: epsilon is infinite)")
        spent = epsilon_spent(
            args.sigma, args.sample_rate, args.steps, args.delta, args.eps_error, args.count_epsilon, args.num_examples
        )
        return {k: _json(v) for k, v in spent.to_dict().items()}
    t0 = time.perf_counter()
    sigma = calibrate_noise(
        args.epsilon, args.delta, args.sample_rate, args.steps, args.count_share, args.eps_error,
        num_examples=args.num_examples,
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    count_eps = args.count_share * args.epsilon
    spent = epsilon_spent(sigma, args.sample_rate, args.steps, args.delta, args.eps_error, count_eps)
    return {
        "sigma": sigma,
        "epsilon_target": args.epsilon,
        "eps_upper": spent.eps_upper,
        "eps_estimate": spent.eps_estimate,
        "eps_rdp": spent.eps_rdp,
        "delta": args.delta,
        "sample_rate": args.sample_rate,
        "steps": args.steps,
        "count_share": args.count_share,
        "count_epsilon": count_eps,
        "accountant": spent.accountant,
        "prv_failed": spent.prv_failed,
        "seconds": round(seconds, 3),
    }


def main(argv: list[str] | None = None) -> int:
    with warnings.catch_warnings():
        warnings.showwarning = lambda message, *args, **kwargs: print(f"warning: {message}", file=sys.stderr)
        try:
            result = run(argv)
        except PrivacyError as exc:
            return report(exc)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
