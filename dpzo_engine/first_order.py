"""First-order baselines: DP-AdamW (Opacus per-example clipping) and non-private AdamW.

Why they live in this engine: the case for DP zeroth-order training is that DP first-order
fine-tuning needs far more memory for the same utility. Both baselines therefore run from the
same trainer (``--method dp-adamw | adamw``), on the same tasks, heads, Poisson sampler and
privacy module as the ZO methods, so a comparison differs only in the optimiser.

DP-AdamW step (Abadi et al. 2016 with AdamW; DESIGN section 6 rules)::

    batch = PoissonSampler(n, q, secret).sample()     # our sampler; may be empty
    g_x   = grad of the per-example loss ℓ(θ; x)       # Opacus: norms, or per-sample gradients
    S     = Σ_x g_x · min(1, C / ||g_x||)              # per-example L2 clip of the whole gradient
    g̃     = (S + N(0, σ²C² I_d)) / (q·ñ)               # noise from a secret generator on θ's device
    θ     ← AdamW(θ, g̃)                                # σ from calibrate_noise, ε from PrivacyAccountant

Opacus does the per-example part only; sampling, σ and accounting are ours. Its modes:

* ``ghost`` (``GradSampleHooksFastGradientClipping``, ghost clipping): per-example gradient norms
  from activations and output gradients without materialising per-sample gradients (Linear,
  Embedding; LayerNorm by small per-sample gradients), then a second backward of Σ_x c_x ℓ_x.
  Memory close to non-private training. Not possible with parameters tied across modules
  (Opacus raises), e.g. a causal LM whose ``lm_head`` is its input embedding.
* ``fast`` (the same hooks, ``use_ghost_clipping=False``): per-sample gradients one layer at a
  time, reduced to norms and freed; handles tied parameters (their per-sample gradients from
  both uses are summed before the norm). Costs one layer's B × |θ_layer| at a time.
* ``hooks`` (``GradSampleHooks`` + ``DPOptimizer``, Opacus' classic mode): every layer's
  per-sample gradients at once (B × |θ|); use ``physical_batch_size`` to bound it.

``auto`` takes ``ghost`` unless trainable parameters are tied, then ``fast``. Opacus only sees
module calls with per-example rows: ``OpacusCompat`` rewrites the Hugging Face call patterns
that break this (exactly), and ``ParameterUseAudit`` refuses a run whose head uses a trainable
parameter outside its module (its per-example gradient would escape clipping). Empty Poisson
batches release noise only. Clipping in bf16/fp16 is done at C·(1 − 2⁻⁶), a margin for a few
roundings of the half-precision norms (2⁻⁸ relative each) before they could push an example's
contribution above C; the noise std stays σ·C. Half-precision parameters train with fp32 master weights and moments
(``MasterWeightAdamW``): a bf16 AdamW would drop every update below half an ulp. Models train
in ``train()`` mode (dropout as configured), as first-order fine-tuning does.

Limits: Opacus draws the noise in the parameters' dtype without its ``secure_mode`` (the same
floating-point caveats as ``privacy/mechanism.py``); resume and replay are ZO features.
"""

from __future__ import annotations

import math
import sys
import time
import types
import warnings
from collections import defaultdict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from tqdm import tqdm

from . import privacy
from .config import OPACUS_MODES, TrainConfig
from .errors import UserError
from .heads import Batch, LossHead
from .methods import Released
from .run_dir import RunDir
from .session import Session
from .zo import PassCounter

HALF_PRECISION = (torch.float16, torch.bfloat16)
HALF_PRECISION_CLIP_MARGIN = 2.0**-6  # relative: covers a few bf16 roundings (2^-8 each) of the norms


class TrainingDiverged(UserError):
    """A per-example loss became NaN or infinite; its gradient cannot be clipped meaningfully."""


class OpacusModeError(UserError):
    """The requested Opacus mode cannot handle this model."""


# ----------------------------------------------------------------------------- model checks


def tied_parameters(model: nn.Module) -> list[list[str]]:
    """Trainable parameters held by more than one module, as lists of their qualified names."""
    owners: dict[int, list[str]] = defaultdict(list)
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if p.requires_grad:
                owners[id(p)].append(f"{module_name}.{name}" if module_name else name)
    return [names for names in owners.values() if len(names) > 1]


def choose_opacus_mode(model: nn.Module, requested: str = "auto") -> tuple[str, str]:
    """(mode, why): ghost clipping where the model allows, per-layer per-sample gradients otherwise."""
    if requested not in OPACUS_MODES:
        raise OpacusModeError(f"unknown Opacus mode {requested!r}; expected one of {', '.join(OPACUS_MODES)}")
    tied = tied_parameters(model)
    tied_text = "; ".join(" = ".join(names) for names in tied)
    if requested == "ghost" and tied:
        raise OpacusModeError(f"ghost clipping cannot handle tied trainable parameters ({tied_text}); use fast")
    if requested != "auto":
        return requested, "requested"
    if tied:
        return "fast", (
            f"trainable parameters are tied ({tied_text}), which Opacus ghost clipping does not support: "
            "per-sample gradients one layer at a time (fast gradient clipping)"
        )
    return "ghost", "no tied trainable parameters: ghost clipping (no per-sample gradients for Linear/Embedding)"


# ----------------------------------------------------------------------------- HF models for Opacus


class TokenRowsLinear(nn.Linear):
    """An ``nn.Linear`` fed the tokens of B examples as rows ([B·T, H]); same forward. Its Opacus
    samplers fold the rows back to [B, T, H] so norms and per-sample gradients are per example."""


class TokenRowsLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` counterpart of ``TokenRowsLinear``."""


def _per_example(sampler):
    def fold(layer: nn.Module, activations: list[torch.Tensor], backprops: torch.Tensor) -> dict:
        b = layer.examples_in_batch
        acts = [a.reshape(b, -1, *a.shape[1:]) for a in activations]
        return sampler(layer, acts, backprops.reshape(b, -1, *backprops.shape[1:]))

    return fold


def _register_opt_samplers(positions_cls: type) -> None:
    """Opacus samplers for the OPT adapters: idempotent, by Opacus' own registration functions."""
    from opacus.grad_sample import (
        compute_embedding_grad_sample,
        compute_layer_norm_grad_sample,
        compute_linear_grad_sample,
        register_grad_sampler,
        register_norm_sampler,
    )
    from opacus.grad_sample.embedding import compute_embedding_norm_sample
    from opacus.grad_sample.linear import compute_linear_norm_sample

    register_grad_sampler(positions_cls)(compute_embedding_grad_sample)
    register_norm_sampler(positions_cls)(compute_embedding_norm_sample)
    register_grad_sampler(TokenRowsLinear)(_per_example(compute_linear_grad_sample))
    register_norm_sampler(TokenRowsLinear)(_per_example(compute_linear_norm_sample))
    register_grad_sampler(TokenRowsLayerNorm)(_per_example(compute_layer_norm_grad_sample))


def _opt_position_ids(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """OPT calls its learned positions as (mask, past_length, position_ids=...); make it a lookup of ids."""
    names = ("attention_mask", "past_key_values_length", "position_ids")
    given = dict(zip(names, args)) | kwargs
    ids = given.get("position_ids")
    if ids is None:  # what OPTLearnedPositionalEmbedding.forward computes
        mask = given["attention_mask"]
        ids = (torch.cumsum(mask, dim=1) * mask - 1).long()[:, int(given.get("past_key_values_length") or 0) :]
    return ((ids + module.offset).contiguous(),), {}


def _record_examples(layer: nn.Module, args: tuple, kwargs: dict) -> None:
    """Before an OPT decoder layer runs: tell its token-row modules how many examples the rows hold."""
    hidden = args[0] if args else kwargs["hidden_states"]
    for child in layer.children():
        if isinstance(child, TokenRowsLinear | TokenRowsLayerNorm):
            child.examples_in_batch = hidden.shape[0]
            child.max_batch_len = hidden.shape[0]  # Opacus sizes its per-sample buffers by this


def _contiguous_ids(module: nn.Module, args: tuple) -> tuple | None:
    """Opacus' embedding norm sampler views the ids flat: give it contiguous ones (same lookup)."""
    if args and torch.is_tensor(args[0]) and not args[0].is_contiguous():
        return (args[0].contiguous(), *args[1:])
    return None


def _bert_ids(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """BERT looks up positions (and default token types) as one [1, T] row broadcast over the batch,
    so Opacus would see a batch of one. Pass BERT's own defaults expanded to [B, T] (same numbers)."""
    names = ("input_ids", "token_type_ids", "position_ids", "inputs_embeds", "past_key_values_length")
    given = dict(zip(names, args)) | kwargs
    ref = given["input_ids"] if given.get("input_ids") is not None else given["inputs_embeds"][..., 0]
    b, t = ref.shape
    past = int(given.get("past_key_values_length") or 0)
    if given.get("position_ids") is None:
        given["position_ids"] = module.position_ids[:, past : past + t].expand(b, t).contiguous()
    if given.get("token_type_ids") is None and hasattr(module, "token_type_ids"):
        given["token_type_ids"] = torch.gather(module.token_type_ids.expand(b, -1), 1, given["position_ids"])
    return (), given


def _restore_class(module: nn.Module, cls: type) -> None:
    module.__class__ = cls
    for attr in ("examples_in_batch", "max_batch_len"):
        vars(module).pop(attr, None)


class OpacusCompat:
    """Exact rewrites of how some HF models call their layers, so that Opacus sees one row per example.

    * OPT's learned positional embedding is called with (mask, past length as an int, ids): Opacus
      records positional inputs and calls ``.detach()`` on each, which fails on the int. It
      becomes a plain ``Embedding.forward(ids + offset)`` (the same lookup).
    * OPT's decoder layer flattens [B, T, H] to [B·T, H] before its feed-forward block, so Opacus
      would clip per *token*. Those modules get subclasses (same forward) whose samplers fold the
      rows back to [B, T, H].
    * BERT broadcasts one [1, T] row of position (and token-type) ids over the batch; the ids are
      expanded to [B, T] before the lookup. Embedding ids are made contiguous.

    * RoBERTa's and BERT's MLM heads register the decoder's bias a second time on themselves. A
      module with its own trainable parameter but no per-sample rule is one Opacus does not look
      inside, so its children (dense, norm, decoder) would get no hooks; such aliases are
      unregistered from the parent while Opacus is attached (the child still owns and trains them).

    ``remove()`` restores the original classes, calls and registrations. Other modules are left alone.
    """

    def __init__(self, model: nn.Module):
        self._restore: list = []
        for module in list(model.modules()):
            self._unregister_aliases(module)
        from transformers.models.bert.modeling_bert import BertEmbeddings
        from transformers.models.opt.modeling_opt import OPTDecoderLayer, OPTLearnedPositionalEmbedding

        for module in list(model.modules()):
            if type(module) is OPTLearnedPositionalEmbedding:
                handle = module.register_forward_pre_hook(_opt_position_ids, with_kwargs=True)
                module.forward = types.MethodType(nn.Embedding.forward, module)  # instance attribute
                self._restore.append(lambda m=module, h=handle: (h.remove(), delattr(m, "forward")))
            elif type(module) is OPTDecoderLayer:
                self._restore.append(module.register_forward_pre_hook(_record_examples, with_kwargs=True).remove)
                rows = [module.fc1, module.fc2] + ([module.final_layer_norm] if module.do_layer_norm_before else [])
                for child in rows:
                    cls = type(child)
                    if cls is nn.Linear:
                        child.__class__ = TokenRowsLinear
                    elif cls is nn.LayerNorm:
                        child.__class__ = TokenRowsLayerNorm
                    else:
                        continue
                    self._restore.append(lambda c=child, k=cls: _restore_class(c, k))
            elif type(module) is BertEmbeddings:
                self._restore.append(module.register_forward_pre_hook(_bert_ids, with_kwargs=True).remove)
            elif type(module) is nn.Embedding:
                self._restore.append(module.register_forward_pre_hook(_contiguous_ids).remove)
        _register_opt_samplers(OPTLearnedPositionalEmbedding)

    def _unregister_aliases(self, module: nn.Module) -> None:
        """Drop ``module``'s own registrations of parameters that one of its children also owns."""
        owned_below = {id(p) for child in module.children() for p in child.parameters()}
        aliases = [name for name, p in module._parameters.items() if p is not None and id(p) in owned_below]
        if not aliases:
            return
        original = dict(module._parameters)  # registration order, restored as it was
        for name in aliases:
            del module._parameters[name]
            vars(module)[name] = original[name]  # attribute access keeps working

        def restore(m=module, params=original, names=aliases) -> None:
            for name in names:
                vars(m).pop(name, None)
            m._parameters.clear()
            m._parameters.update(params)

        self._restore.append(restore)

    def remove(self) -> None:
        while self._restore:
            self._restore.pop()()


class ParameterUseAudit(TorchFunctionMode):
    """Records trainable parameters used by a torch operation outside their own module's forward.

    Why: Opacus sees a parameter's per-example gradient only through hooks on the module that
    owns it. A head that applies, say, ``lm_head.weight`` with ``F.linear`` (or ``index_select``
    of some rows) adds a gradient that no hook sees, so clipping would bound the wrong norm and
    the privacy guarantee would not hold. One audited forward per run finds such uses.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.owners: dict[int, set[int]] = defaultdict(set)
        self.names: dict[int, str] = {}
        for module_name, module in model.named_modules():
            for name, p in module.named_parameters(recurse=False):
                if p.requires_grad:
                    self.owners[id(p)].add(id(module))
                    self.names.setdefault(id(p), f"{module_name}.{name}" if module_name else name)
        self.stack: list[int] = []
        self.escaped: dict[str, str] = {}  # parameter name -> first op that used it outside its module

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not torch.is_grad_enabled():
            return out
        leaves = torch.utils._pytree.tree_leaves
        if not any(isinstance(o, torch.Tensor) and o.requires_grad for o in leaves(out)):
            return out  # metadata (.device, .shape), detach, ...: no gradient can flow through it
        inside = self.stack[-1] if self.stack else None
        for leaf in leaves((args, kwargs)):
            owners = self.owners.get(id(leaf)) if isinstance(leaf, torch.Tensor) else None
            if owners is not None and inside not in owners:
                self.escaped.setdefault(self.names[id(leaf)], getattr(func, "__name__", str(func)))
        return out

    def __enter__(self):
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

        def enter(module: nn.Module, args: tuple) -> None:
            self.stack.append(id(module))

        def leave(module: nn.Module, args: tuple, output) -> None:  # returns None: the output stays
            self.stack.pop()

        self._hooks = [register_module_forward_pre_hook(enter), register_module_forward_hook(leave)]
        return super().__enter__()

    def __exit__(self, *exc):
        for hook in self._hooks:
            hook.remove()
        return super().__exit__(*exc)


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
        """Attach Opacus' per-example machinery; noise N(0, σ²C²) per coordinate from ``generator``
        (a secret generator on the parameters' device), the noisy sum divided by ``expected_batch_size``."""
        from opacus.grad_sample import GradSampleHooks, GradSampleHooksFastGradientClipping
        from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping

        device = self.params[0].device
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


# ----------------------------------------------------------------------------- trainer integration


class FirstOrderSession(Session):
    """``Session`` with a ``FirstOrderTrainer`` in place of the ZO engine: same task, model, head,
    Poisson sampler, σ calibration, accountant, output directory, evaluation and model saving."""

    def _metrics_row(self, row: dict) -> dict:
        row["backward_passes"] = row.pop("passes", self.engine.counter.passes)
        row.pop("relative_clip_error", None)  # needs the unclipped gradient sum, which Opacus does not keep
        return row

    def _build_engine(self) -> FirstOrderTrainer:
        cfg = self.cfg
        return FirstOrderTrainer(
            self.model,
            self.head,
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            mode=cfg.opacus_mode,
            physical_batch_size=cfg.physical_batch_size,
        )

    def _build_rule(self) -> None:
        if self.cfg.private:
            device = self.engine.params[0].device
            generator = (
                self.generator if device.type == "cpu" else privacy.secret_device_generator(device, self.cfg.noise_seed)
            )
            self.engine.make_private(
                noise_multiplier=self.sigma,
                clip=self.cfg.clip,
                expected_batch_size=self.sample_rate * self.n_hat,
                generator=generator,
            )
        return None

    def _ledger_header(self) -> dict:
        header = super()._ledger_header()
        for key in ("direction_kind", "difference", "rounding", "cached_blocks"):
            header.pop(key, None)
        header["backend"] = self.engine.backend
        header["first_order"] = self.engine.describe()
        return header

    def save_checkpoint(self, run: RunDir, step: int) -> None:
        raise UserError(f"--method {self.cfg.method} keeps no checkpoints")

    def finalize(self, run: RunDir, elapsed: float) -> dict:
        self.model.eval()
        summary = super().finalize(run, elapsed)
        summary["backward_passes"] = summary.pop("passes", self.engine.counter.passes)
        summary["first_order"] = self.engine.describe()
        run.write_summary(summary)
        return summary


def train(cfg: TrainConfig, run: RunDir, s: FirstOrderSession) -> dict:
    """The DP-AdamW / AdamW loop: sample, step, account, log (the ZO loop's bookkeeping)."""
    bar = tqdm(range(cfg.steps), total=cfg.steps, desc=cfg.method, unit="step")
    t0 = time.time()
    nan = float("nan")
    try:
        for step in bar:
            idx = s.sampler.sample()  # Poisson, from the secret generator
            stats = s.engine.step(s.batch(idx))
            s.accountant.step()
            eps = s.accountant.epsilon() if cfg.private else None
            run.log_ledger({"type": "step", "step": step + 1, "lr": cfg.lr, "epsilon": eps})
            diagnostics = Released(torch.zeros(0), fraction_clipped=stats.fraction_clipped, relative_clip_error=nan)
            s.loss_meter.update(stats.loss, diagnostics)
            done = step + 1
            if done % cfg.log_every == 0 or done == cfg.steps:
                s.log_progress(run, bar, done, eps, time.time() - t0)
            if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps:
                run.log_metrics({"step": done, "split": "dev", **s.evaluate("dev")})
    finally:
        bar.close()
    elapsed = time.time() - t0
    s.engine.close()
    print(f"{cfg.method}: {s.engine.mode_reason}", file=sys.stderr)
    return s.finalize(run, elapsed)
