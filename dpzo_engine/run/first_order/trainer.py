"""One DP-AdamW / AdamW step: optimisers with fp32 master weights, and ``FirstOrderTrainer``, which
Opacus' per-example clipping turns private (``make_private``)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ... import privacy
from ...core.errors import TrainingDiverged, UserError
from ...heads import Batch, LossHead
from ...zo.engine import PassCounter
from .opacus_compat import OpacusCompat, OpacusModeError, ParameterUseAudit, choose_opacus_mode

HALF_PRECISION = (torch.float16, torch.bfloat16)
HALF_PRECISION_CLIP_MARGIN = 2.0**-6  # relative: covers a few bf16 roundings (2^-8 each) of the norms


# ----------------------------------------------------------------------------- optimisers


class MasterWeightAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias correction; torch.optim.AdamW's update) on fp32 master
    copies of half-precision parameters, one tensor at a time (no full-size fp32 gradient copy).

    The model keeps its bf16/fp16 parameters (what Opacus hooks and the forward use); after each
    step they are the master weights rounded to nearest. Costs 12 bytes per parameter.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: float,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ):
        super().__init__(list(params), dict(lr=lr, weight_decay=weight_decay, betas=betas, eps=eps))
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p] = {
                    "step": 0,
                    "master": p.detach().float().clone(),
                    "exp_avg": torch.zeros_like(p, dtype=torch.float32),
                    "exp_avg_sq": torch.zeros_like(p, dtype=torch.float32),
                }

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd, (beta1, beta2), eps = group["lr"], group["weight_decay"], group["betas"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                st["step"] += 1
                t, master, m, v = st["step"], st["master"], st["exp_avg"], st["exp_avg_sq"]
                g = p.grad.float()
                master.mul_(1 - lr * wd)
                m.lerp_(g, 1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                denom = (v.sqrt() / math.sqrt(1 - beta2**t)).add_(eps)
                master.addcdiv_(m, denom, value=-lr / (1 - beta1**t))
                p.copy_(master)
        return loss


def build_optimizer(
    params: list[nn.Parameter], lr: float, weight_decay: float, master_weights: bool | None = None
) -> torch.optim.Optimizer:
    """AdamW; with fp32 master weights for half-precision parameters unless ``master_weights=False``
    (an all-bf16 AdamW, the leanest possible first-order set-up: the memory benchmark's lower bound)."""
    half = any(p.dtype in HALF_PRECISION for p in params)
    if master_weights is None:
        master_weights = half
    if master_weights:
        return MasterWeightAdamW(params, lr, weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


# ----------------------------------------------------------------------------- the step


@contextmanager
def _quiet_backward_hooks() -> Iterator[None]:
    """Opacus' full backward hooks on the first layer fire on output gradients only (token ids need
    none); torch warns about that on every run. It is expected here, so it is not shown."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
        yield


@dataclass
class StepStats:
    """Local diagnostics of one step (computed from the batch: NOT differentially private)."""

    loss: float | None  # mean per-example loss; None for an empty batch
    examples: int
    fraction_clipped: float = 0.0


def split_batch(batch: Batch, size: int | None) -> list[Batch]:
    """Chunks of at most ``size`` examples (all of it when ``size`` is None)."""
    n = len(batch["labels"])
    if size is None or size >= n:
        return [batch]
    return [{k: v[i : i + size] if torch.is_tensor(v) else v for k, v in batch.items()} for i in range(0, n, size)]


class FirstOrderTrainer:
    """One AdamW step per Poisson batch; ``make_private`` turns it into DP-AdamW (Opacus clipping,
    our noise generator, normalisation by q·ñ)."""

    def __init__(
        self,
        model: nn.Module,
        head: LossHead,
        *,
        lr: float,
        weight_decay: float = 0.0,
        mode: str = "auto",
        physical_batch_size: int | None = None,
        master_weights: bool | None = None,
    ):
        self.model = model
        self.head = head
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise UserError("the model has no trainable parameters; nothing to fine-tune")
        self.requested_mode = mode
        self.physical_batch_size = physical_batch_size
        self.optimizer = build_optimizer(self.params, lr, weight_decay, master_weights)
        self.master_weights = isinstance(self.optimizer, MasterWeightAdamW)
        self.counter = PassCounter()  # forwards, and backward passes (in ``passes``)
        self.private = False
        self.mode: str | None = None
        self.mode_reason = "not private: plain autograd, batch-mean loss"
        self._hooks = None
        self._dp = None
        self._adapter: OpacusCompat | None = None
        self._audited = False

    @property
    def backend(self) -> str:
        return f"opacus-{self.mode}" if self.private else "autograd"

    # ------------------------------------------------------------------ privacy
    def make_private(
        self,
        *,
        noise_multiplier: float,
        clip: float,
        expected_batch_size: float,
        generator: torch.Generator,
    ) -> None:
        """Attach Opacus' per-example machinery; noise N(0, σ²C²) per coordinate (Opacus' secure_mode) from
        ``generator`` (a torch generator on the parameters' device, or the run's ``SecretGenerator``, which
        seeds one), the noisy sum divided by ``expected_batch_size``."""
        from opacus.grad_sample import GradSampleHooks, GradSampleHooksFastGradientClipping
        from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping

        device = self.params[0].device
        if isinstance(generator, privacy.SecretGenerator):  # the run's key: a device generator seeded from it
            generator = privacy.secret_device_generator(device, secret=generator)
        if not isinstance(generator, torch.Generator) or generator.device.type != device.type:
            raise privacy.PrivacyError(
                f"DP-AdamW noise needs a secret generator on the parameters' device ({device.type}); "
                "see privacy.secret_device_generator"
            )
        sigma = float(noise_multiplier)
        self.clip = float(clip)
        self.noise_multiplier = sigma
        self.expected_batch_size = float(expected_batch_size)
        half = any(p.dtype in HALF_PRECISION for p in self.params)
        self.clip_threshold = self.clip * (1 - HALF_PRECISION_CLIP_MARGIN) if half else self.clip
        self.mode, self.mode_reason = choose_opacus_mode(self.model, self.requested_mode)
        self._adapter = OpacusCompat(self.model)  # before Opacus looks at the layer types
        # Opacus uses max_grad_norm for the clip and for the noise std (noise_multiplier * max_grad_norm):
        # clip at the (possibly margined) threshold, keep the noise std at σ·C.
        opacus_sigma = sigma * self.clip / self.clip_threshold
        common = dict(
            noise_multiplier=opacus_sigma,
            max_grad_norm=self.clip_threshold,
            expected_batch_size=self.expected_batch_size,
            loss_reduction="mean",  # the optimizer divides the noisy sum by expected_batch_size
            generator=generator,
            secure_mode=True,  # Holohan & Braghin 2021: a sum of Gaussians against floating-point attacks
        )
        try:
            if self.mode == "hooks":
                self._hooks = GradSampleHooks(self.model, loss_reduction="sum", strict=True)
                self._dp = DPOptimizer(self.optimizer, **common)
            else:
                self._hooks = GradSampleHooksFastGradientClipping(
                    self.model,
                    loss_reduction="sum",
                    strict=True,
                    max_grad_norm=self.clip_threshold,
                    use_ghost_clipping=self.mode == "ghost",
                )
                self._dp = DPOptimizerFastGradientClipping(self.optimizer, **common)
        except NotImplementedError as exc:
            self.close()
            raise OpacusModeError(f"Opacus cannot compute per-example gradients here: {exc}") from exc
        self.private = True

    def noise_description(self) -> dict:
        """The gradient noise as drawn (for the ledger header and privacy.json)."""
        return {
            "generator": f"torch {self.params[0].device.type} generator seeded with 64 bits from the run's "
            "SHAKE-256 key (not a cryptographic generator)",
            "gaussian": "Opacus secure_mode: a sum of 4 Gaussian draws scaled by 1/2 (Holohan & Braghin 2021), "
            "N(0, (sigma*C)^2) per coordinate",
            "noise_std": self.noise_multiplier * self.clip,
            "sensitivity": self.clip,
        }

    def describe(self) -> dict:
        """How the step runs, for the ledger header, the summary and benchmark outputs."""
        out = {
            "optimizer": "AdamW" + (" (fp32 master weights and moments)" if self.master_weights else ""),
            "trainable_numel": sum(p.numel() for p in self.params),
            "param_dtype": str(self.params[0].dtype).removeprefix("torch."),
            "physical_batch_size": self.physical_batch_size,
            "private": self.private,
            "opacus_mode": self.mode,
            "opacus_mode_reason": self.mode_reason,
        }
        if self.private:
            out.update(
                clip=self.clip,
                clip_threshold=self.clip_threshold,
                noise_multiplier=self.noise_multiplier,
                noise_std=self.noise_multiplier * self.clip,
                expected_batch_size=self.expected_batch_size,
                functorch_layers=sorted(self._functorch_layers()),
            )
        return out

    def _functorch_layers(self) -> set[str]:
        """Trainable module types without an Opacus grad sampler (Opacus falls back to functorch)."""
        from opacus.grad_sample import GradSampleHooks

        samplers = GradSampleHooks.GRAD_SAMPLERS
        return {
            type(m).__name__
            for m in self.model.modules()
            if any(p.requires_grad for p in m.parameters(recurse=False)) and type(m) not in samplers
        }

    # ------------------------------------------------------------------ steps
    def _losses(self, batch: Batch) -> torch.Tensor:
        self.counter.forwards += 1
        if self.private and not self._audited:
            losses = self._audited_losses(batch)
        else:
            losses = self.head.per_example_loss(self.model, batch)
        if not bool(torch.isfinite(losses).all()):
            raise TrainingDiverged("a per-example loss is NaN or infinite: training diverged; lower --lr")
        return losses

    def _audited_losses(self, batch: Batch) -> torch.Tensor:
        """The first private forward, watched by ``ParameterUseAudit``; refuses unclippable uses."""
        if getattr(self.head, "expands_rows", False):  # known once a batch is collated, as it is here
            self.close()
            raise OpacusModeError(
                f"DP-AdamW cannot clip per example with the {type(self.head).__name__}: a label word spans "
                "several tokens, so each example becomes one row per class; use single-token label words"
            )
        with ParameterUseAudit(self.model) as audit:
            losses = self.head.per_example_loss(self.model, batch)
        self._audited = True
        if audit.escaped:
            used = ", ".join(f"{name} (by {op})" for name, op in sorted(audit.escaped.items())[:3])
            self.close()
            raise OpacusModeError(
                f"DP-AdamW cannot clip per-example gradients here: the {type(self.head).__name__} uses trainable "
                f"parameters outside their modules' forward, where Opacus does not see them: {used}; "
                "use --head sequence-classification or freeze them (--trainable)"
            )
        return losses

    def step(self, batch: Batch | None) -> StepStats:
        """One optimizer step on a Poisson batch (``None``: empty; DP-AdamW then releases noise only)."""
        self.model.train()
        if self.private:
            return self._private_step(batch)
        return self._plain_step(batch)

    def _plain_step(self, batch: Batch | None) -> StepStats:
        if batch is None:  # nothing to learn from: no update
            return StepStats(loss=None, examples=0)
        n = len(batch["labels"])
        total = 0.0
        for chunk in split_batch(batch, self.physical_batch_size):
            losses = self._losses(chunk)
            (losses.sum() / n).backward()
            self.counter.passes += 1
            total += float(losses.detach().sum())
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepStats(loss=total / n, examples=n)

    def _private_step(self, batch: Batch | None) -> StepStats:
        from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping

        dp = self._dp
        if batch is None:
            self._load_empty()
            dp.step()  # noise only, / (q·ñ), AdamW
            dp.zero_grad(set_to_none=True)
            return StepStats(loss=None, examples=0)
        chunks = split_batch(batch, self.physical_batch_size)
        n, total, clipped = len(batch["labels"]), 0.0, 0
        for i, chunk in enumerate(chunks):
            if i < len(chunks) - 1:
                dp.signal_skip_step(do_skip=True)  # clip and accumulate; noise and update after the last chunk
            losses = self._losses(chunk)
            if self.mode == "hooks":
                with _quiet_backward_hooks():
                    losses.sum().backward()
                self.counter.passes += 1
                norms = torch.stack([g.reshape(len(g), -1).norm(2, dim=-1).float() for g in dp.grad_samples], 1)
                norms = norms.norm(2, dim=1)
            else:
                with _quiet_backward_hooks():
                    DPTensorFastGradientClipping(self._hooks, dp, losses, loss_reduction="sum").backward()
                self.counter.passes += 2
                norms = self._hooks.per_sample_gradient_norms
            clipped += int((norms > self.clip_threshold).sum())
            total += float(losses.detach().sum())
            dp.step()
            dp.zero_grad(set_to_none=True)
        return StepStats(loss=total / n, examples=n, fraction_clipped=clipped / n)

    def _load_empty(self) -> None:
        """What an empty batch contributes before noise: zero (Opacus expects the tensors to exist)."""
        for p in self.params:
            if self.mode == "hooks":
                p.grad_sample = p.new_zeros((0, *p.shape))
            else:
                p.grad = torch.zeros_like(p)

    def close(self) -> None:
        """Detach Opacus' hooks and the OPT position adapters (the model is a plain model again)."""
        if self._hooks is not None:
            self._hooks.cleanup()
            self._hooks = None
        if self._adapter is not None:
            self._adapter.remove()
            self._adapter = None
