"""``python -m dpzo_engine.replay RUN_DIR``: rebuild the fine-tuned weights from the ledger.

The ledger holds only public values (seeds, λ, the released coefficients), and the pass
sequence of a step does not depend on the batch, so replaying the same passes on the
base model reproduces training: bit for bit on the same backend (exactly on CPU fp32).
No data is needed, and no forward pass except DP-ZOPO's data-free mask probes (one all-ones
token), which replay recomputes on the replayed weights and checks against the ledger.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from .core import stream
from .core.errors import ConfigError, UserError, report
from .run.config import FIRST_ORDER_METHODS, TrainConfig
from .run.integrity import verify_config
from .run.run_dir import RunDir, check_model_sums, read_jsonl
from .run.session import Built, build_model, fingerprint, save_model
from .zo.engine import ZOEngine
from .zo.stagewise import build_stagewise
from .zo.step import check_stage_event, replay_step


def replay(run_dir: str | Path, backend: str | None = None) -> tuple[Built, int]:
    """The run's model (``Built``: model, tokenizer, flat buffer, adapter) with the ledger's updates
    applied to the base model, and the number of steps replayed."""
    run = RunDir(run_dir)
    if not run.config_path.exists():
        raise ConfigError(f"{run.path} holds no run (no config.json)")
    cfg = TrainConfig(**verify_config(run))
    if cfg.method in FIRST_ORDER_METHODS:
        raise ConfigError(f"{run.path} is a --method {cfg.method} run: only zeroth-order runs replay from their seeds")
    header, steps = run.ledger()
    stream.check_version(header.get("stream_version"), str(run.ledger_path))
    num_labels = int(header.get("num_labels", 2))
    built = build_model(cfg, num_labels, header.get("head", "sequence-classification"))
    flat = built.flat
    if fingerprint(flat) != header["initial_sha256"]:
        raise ConfigError("the base model differs from the one this run started from (initial_sha256 mismatch)")
    engine = ZOEngine(flat, header["direction_kind"], backend or header["backend"], header["difference"])
    stages = build_stagewise(cfg.stage_options(), built.model, flat, engine)
    events = {r["step"]: r for r in read_jsonl(run.ledger_path) if r.get("type") == "stage"}
    for row in steps:
        event = replay_step(engine, stages, row, header["rounding"])
        if event is not None:  # a recomputed data-free mask must match the ledger's
            check_stage_event(event, events.get(row["step"]))
    return built, len(steps)


def compare_with_saved(ours: dict[str, torch.Tensor], model_dir: Path) -> tuple[int, int]:
    """(#tensors differing, #tensors compared) between the replayed tensors (``Built.saved_state``: the
    adapter's with ``--peft``, as ``save_pretrained`` names them) and a saved safetensors dir."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{model_dir} has no safetensors files to compare with")
    saved: dict[str, torch.Tensor] = {}
    for f in files:
        saved.update(load_file(f))
    common = [k for k in saved if k in ours]
    if not common:
        raise ConfigError(f"{model_dir} holds none of the replayed model's tensors (another model or adapter?)")
    differing = sum(not same_bits(ours[k].cpu(), saved[k]) for k in common)
    return differing, len(common)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit, so two NaNs with the same payload are equal (``torch.equal`` says NaN != NaN)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dpzo_engine.replay", description=__doc__.splitlines()[0])
    p.add_argument("run_dir", help="output directory of a training run")
    p.add_argument("--out", help="save the replayed model here (save_pretrained)")
    p.add_argument("--backend", help="kernel backend to replay with [the run's own]")
    p.add_argument("--verify", action="store_true", help="compare with RUN_DIR/model bit for bit")
    args = p.parse_args(argv)
    try:
        built, n = replay(args.run_dir, args.backend)
        if args.out:  # the adapter alone for --peft runs, as training saved it
            if built.adapter is not None:
                built.adapter.save(Path(args.out), built.tokenizer)
            else:
                save_model(built.model, built.tokenizer, Path(args.out))
        result = {"run_dir": args.run_dir, "steps_replayed": n, "saved_to": args.out}
        if args.verify:
            model_dir = RunDir(args.run_dir).model_dir
            check_model_sums(model_dir)  # a damaged file is named, not reported as a differing tensor
            differing, compared = compare_with_saved(built.saved_state(), model_dir)
            result.update(tensors_compared=compared, tensors_differing=differing, identical=differing == 0)
        print(json.dumps(result))
        return 0 if result.get("identical", True) else 1
    except UserError as exc:
        return report(exc)


if __name__ == "__main__":
    sys.exit(main())
