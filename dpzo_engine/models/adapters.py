"""LoRA and prefix-tuning adapters built with PEFT, for the ZO engine and DP-AdamW to train.

Why PEFT: the adapter it builds is the one its users already load (``PeftModel.from_pretrained``
on the base model), so a run saves a few hundred kilobytes of adapter instead of the whole model,
in a standard format, and ``merge_and_unload`` turns a LoRA adapter into a plain model.

One adapted model, two views (``Adapter``):

- ``peft_model``, the ``PeftModel``: its trainable parameters are what the flat buffer covers
  (the adapter, plus ``modules_to_save``: whole modules trained and saved beside it, such as a
  fresh classifier), and it is what ``save`` writes.
- ``model``, the transformers model inside it: what the loss heads call. LoRA lives in its layers
  (PEFT replaces the targeted Linear modules in place), so it runs as any model does. Prefix-tuning
  lives outside it: its virtual key/value states are inputs, so a forward pre-hook on the backbone
  passes ``get_prompt(B)`` as past key values and prepends the P virtual positions to the attention
  mask, as PEFT's own forward does (a test checks the two agree bit for bit).

ZO estimates a derivative from L(θ + λz) − L(θ − λz): both must come from the same function, so
LoRA dropout must be 0 (first-order training, which backpropagates one forward, may use it).

The frozen-prefix shortcut (``prefix_cache``) still applies where the adapter leaves the lower
blocks untouched: LoRA on the top blocks only (``layers="last:N"``) lets the blocks below run once
per step. It cannot apply to LoRA on every block, nor to prefix-tuning, whose virtual tokens enter
the attention of every block (``Adapter.cached_blocks`` is then 0).
"""

from __future__ import annotations

import inspect
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .loading import ModelError, _layer_stack, select_trainable
from .prefix_cache import frozen_prefix_length

PEFT_KINDS = ("none", "lora", "prefix")
# PEFT's task type for each loss head: it picks the PeftModel class that from_pretrained rebuilds
# (and SEQ_CLS keeps the classifier trainable and saved). None: a plain PeftModel.
TASK_TYPES = {
    "sequence-classification": "SEQ_CLS",
    "causal-prompt": "CAUSAL_LM",
    "causal-generation": "CAUSAL_LM",
    "mlm-prompt": None,
}
ADAPTER_CONFIG = "adapter_config.json"  # PEFT's: what marks a saved adapter directory
PREFIX_TASK_TYPE = "FEATURE_EXTRACTION"  # prompt learning needs a task type; for heads without one


class AdapterError(ModelError):
    """An adapter that cannot be built on this model (a target module missing, a bad layer spec, ...)."""


@dataclass(frozen=True)
class AdapterOptions:
    """What to build, as plain values (the CLI's ``--peft`` flags map onto these)."""

    kind: str = "lora"  # "lora" or "prefix"
    r: int = 8  # LoRA rank
    alpha: float = 16.0  # LoRA scale alpha / r (MeZO's LoRA: r 8, alpha 16)
    dropout: float = 0.0  # LoRA dropout: must be 0 for ZO (a deterministic function)
    target_modules: tuple[str, ...] | None = None  # None: PEFT's default for the architecture (q and v); re:<regex>
    layers: str = "all"  # LoRA: "all", "last:N", or comma-separated block indices
    num_virtual_tokens: int = 5  # prefix-tuning: P virtual tokens per block (MeZO's prefix: 5)
    trainable: str = "none"  # whole modules trained and saved beside the adapter (``--trainable``)


def check_options(options: AdapterOptions, *, zeroth_order: bool = True) -> None:
    """Refuse what cannot work before anything is loaded (one line each)."""
    if options.kind not in PEFT_KINDS[1:]:
        raise AdapterError(f"adapter kind must be lora or prefix, got {options.kind!r}")
    if not (isinstance(options.r, int) and options.r >= 1):
        raise AdapterError(f"--lora-r must be a positive integer, got {options.r!r}")
    if not (isinstance(options.alpha, int | float) and options.alpha > 0):
        raise AdapterError(f"--lora-alpha must be a positive number, got {options.alpha!r}")
    if not (isinstance(options.dropout, int | float) and 0 <= options.dropout < 1):
        raise AdapterError(f"--lora-dropout must be in [0, 1), got {options.dropout!r}")
    if zeroth_order and options.dropout != 0:
        raise AdapterError(
            f"--lora-dropout must be 0 for zeroth-order methods (got {options.dropout:g}): the two losses of a "
            "directional derivative must come from the same deterministic function"
        )
    if not (isinstance(options.num_virtual_tokens, int) and options.num_virtual_tokens >= 1):
        raise AdapterError(f"--num-virtual-tokens must be a positive integer, got {options.num_virtual_tokens!r}")
    if options.target_modules is not None and not all(options.target_modules):
        raise AdapterError("--target-modules holds an empty name")
    if options.layers != "all":
        _parse_layers(options.layers, None)


def _parse_layers(spec: str, n_layers: int | None) -> list[int] | None:
    """Block indices of ``all`` (None), ``last:N`` or ``i,j,...``; checked against ``n_layers`` when known."""
    if spec == "all":
        return None
    try:
        if spec.startswith("last:"):
            n = int(spec[len("last:") :])
            if n < 1 or (n_layers is not None and n > n_layers):
                raise ValueError
            return list(range(n_layers - n, n_layers)) if n_layers is not None else []
        indices = sorted({int(x) for x in spec.split(",")})
    except ValueError:
        bound = f" (the model has {n_layers} blocks)" if n_layers is not None else ""
        raise AdapterError(f"--lora-layers must be all, last:N or block indices i,j,...; got {spec!r}{bound}") from None
    if n_layers is not None and not all(0 <= i < n_layers for i in indices):
        raise AdapterError(f"--lora-layers {spec}: the model has {n_layers} blocks, indices must be 0..{n_layers - 1}")
    return indices


def modules_to_save(model: nn.Module, spec: str) -> list[str]:
    """Names of the modules that ``spec`` (a ``--trainable`` spec, or ``none``) selects, to train and
    save beside the adapter.

    PEFT trains and saves a module with everything inside it, so each module that holds a selected
    parameter must have all its parameters selected (``head``, ``last:N``, ``embeddings`` and most
    regexes do; ``bias`` does not, nor ``head`` on an LM head tied to the input embeddings)."""
    if spec.strip() == "none":
        return []
    if any(term.strip() == "all" for term in spec.split(",")):
        raise AdapterError("--trainable all trains the whole model: drop --peft to fine-tune every weight")
    try:
        chosen = set(select_trainable(model, spec))
    except ModelError as exc:
        if "selects no parameters" in str(exc):
            return []  # e.g. `head` on a causal LM with a tied head: the adapter alone trains
        raise
    params = dict(model.named_parameters())
    chosen_ids = {id(params[n]) for n in chosen}
    owners = sorted({name.rpartition(".")[0] for name in chosen})
    for module in owners:
        inside = model.get_submodule(module).named_parameters(prefix=module, remove_duplicate=False)
        left = next((name for name, p in inside if id(p) not in chosen_ids), None)
        if left is not None:
            raise AdapterError(
                f"--trainable {spec!r} selects part of module {module} ({left} left out); with --peft whole "
                "modules train beside the adapter: use head, last:N, embeddings, a regex over whole modules, or none"
            )
    for p in model.parameters():
        p.requires_grad_(False)  # PEFT marks what trains: the adapter and these modules
    return owners


class PrefixInjector:
    """Prefix-tuning's virtual key/value states on every forward of the transformers model.

    Hooks the backbone (``model.base_model``) and, where a model calls it directly (OPT's causal
    LM calls its decoder), the modules between it and the block stack that take past key values
    and a 2-D attention mask; the outermost one entered injects, the others pass through."""

    def __init__(self, peft_model: nn.Module, model: nn.Module, num_virtual_tokens: int):
        self.peft_model = peft_model
        self.tokens = num_virtual_tokens
        self.owner: nn.Module | None = None
        self.handles: list[Any] = []
        stack, _ = _layer_stack(model)
        backbone = model.base_model
        base_name = next(n for n, m in model.named_modules() if m is backbone)
        names = [base_name] + [
            n for n, _ in model.named_modules() if n.startswith(f"{base_name}.") and stack.startswith(f"{n}.")
        ]
        for name in names:
            module = model.get_submodule(name)
            if {"past_key_values", "attention_mask"} <= set(inspect.signature(module.forward).parameters):
                self.handles.append(module.register_forward_pre_hook(self._inject, with_kwargs=True))
                self.handles.append(module.register_forward_hook(self._leave, always_call=True))
        if not self.handles:
            raise AdapterError(f"{type(model).__name__}: its backbone takes no past key values (prefix-tuning's input)")

    def _inject(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if self.owner is not None:
            return None
        self.owner = module
        bound = inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments
        extra = bound.pop("kwargs", {})
        ref = bound.get("input_ids")
        ref = ref if ref is not None else bound["inputs_embeds"]
        batch = ref.shape[0]
        bound["past_key_values"] = self.peft_model.get_prompt(batch)
        mask = bound.get("attention_mask")
        if mask is not None:  # PEFT's own forward: the P virtual positions come first, always attended
            bound["attention_mask"] = torch.cat([mask.new_ones(batch, self.tokens), mask], dim=1)
        return (), {**bound, **extra}

    def _leave(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self.owner is module:
            self.owner = None

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


class Adapter:
    """A PEFT adapter on a transformers model: its trainable parameters, its forward, its saving."""

    def __init__(self, model: nn.Module, options: AdapterOptions, head: str):
        try:
            import peft
        except ImportError:
            raise AdapterError("--peft needs the peft package: pip install 'peft>=0.21'") from None

        self.options = options
        self.kind = options.kind
        saved = modules_to_save(model, options.trainable)
        stack, n_layers = _layer_stack(model)
        if options.kind == "lora":
            layers = _parse_layers(options.layers, n_layers)
            config = peft.LoraConfig(
                r=options.r,
                lora_alpha=options.alpha,
                lora_dropout=options.dropout,
                target_modules=_targets(options.target_modules),
                layers_to_transform=layers,
                layers_pattern=stack.rpartition(".")[2] if layers is not None else None,
                modules_to_save=saved or None,
                task_type=TASK_TYPES[head],
            )
        else:
            config = peft.PrefixTuningConfig(
                num_virtual_tokens=options.num_virtual_tokens,
                modules_to_save=saved or None,
                task_type=TASK_TYPES[head] or PREFIX_TASK_TYPE,
            )
        try:  # adapter weights in the base model's dtype: one flat buffer, the engine's rounding
            with warnings.catch_warnings():  # PEFT asks transformers a deprecated question; nothing for the user
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
                self.peft_model = peft.get_peft_model(model, config, autocast_adapter_dtype=False)
        except (ValueError, KeyError, TypeError) as exc:
            raise AdapterError(f"PEFT cannot build the {options.kind} adapter: {_first_line(exc)}") from exc
        self.peft_model.eval()
        self.model = self.peft_model.get_base_model()
        self.injector = None
        if self.is_prefix:
            self.injector = PrefixInjector(self.peft_model, self.model, options.num_virtual_tokens)

    @property
    def is_prefix(self) -> bool:
        return self.kind == "prefix"

    def trainable_names(self) -> list[str]:
        return [n for n, p in self.peft_model.named_parameters() if p.requires_grad]

    @property
    def static_inputs(self) -> bool:
        """Whether a step may build the model's attention mask and position ids once (``models.inputs``):
        not with prefix-tuning, whose hook prepends the virtual positions to the 2-D mask the model gets."""
        return not self.is_prefix

    def cached_blocks(self) -> int:
        """Leading blocks a step may run once (``prefix_cache``): 0 for prefix-tuning, whose virtual
        tokens enter every block's attention; below the first adapted block for LoRA."""
        return 0 if self.is_prefix else frozen_prefix_length(self.model)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What ``save`` writes (adapter and modules_to_save), under the saved names."""
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(self.peft_model)

    def save(self, path: str | Path, tokenizer: Any = None) -> None:
        """``save_pretrained``: adapter_config.json + adapter_model.safetensors (+ the tokenizer)."""
        self.peft_model.save_pretrained(str(path), safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(path))

    def merged(self) -> nn.Module:
        """The base model with the LoRA update folded into its weights (and modules_to_save in place):
        a plain transformers model. Consumes the adapter: call it last."""
        if self.is_prefix:
            raise AdapterError("prefix-tuning cannot be merged: its virtual key/values are inputs, not weight deltas")
        return self.peft_model.merge_and_unload()

    def describe(self) -> dict:
        """Public facts for the ledger header and summary."""
        config = self.peft_model.peft_config["default"]
        task_type = getattr(config, "task_type", None)
        out = {"kind": self.kind, "task_type": str(task_type) if task_type else None}
        if self.kind == "lora":
            out.update(
                r=config.r,
                alpha=config.lora_alpha,
                dropout=config.lora_dropout,
                target_modules=sorted(config.target_modules) if config.target_modules else None,
                layers=self.options.layers,
            )
        else:
            out.update(num_virtual_tokens=config.num_virtual_tokens)
        out["modules_to_save"] = sorted(set(config.modules_to_save or []))
        out["cached_blocks"] = self.cached_blocks()
        return out


def build_adapter(model: nn.Module, options: AdapterOptions, head: str, *, zeroth_order: bool = True) -> Adapter:
    """``model`` (a transformers model, frozen or not) wrapped with the adapter ``options`` ask for."""
    check_options(options, zeroth_order=zeroth_order)
    if head not in TASK_TYPES:
        raise AdapterError(f"no adapter for loss head {head!r}")
    return Adapter(model, options, head)


def is_adapter_dir(path: str | Path) -> bool:
    """A directory a ``--peft`` run saved (PEFT's ``adapter_config.json``), not a whole model."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_base_model(path: str | Path) -> str:
    """The base model a saved adapter was trained on: ``base_model_name_or_path`` of its config."""
    config_path = Path(path) / ADAPTER_CONFIG
    try:
        base = json.loads(config_path.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError) as exc:
        raise AdapterError(f"{config_path}: not a readable adapter config ({_first_line(exc)})") from None
    if not base:
        raise AdapterError(f"{config_path} names no base model (base_model_name_or_path)")
    return str(base)


def load_saved_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """``model``, the base loaded as the run loaded it, with the adapter saved at ``path`` (weights in
    the base's dtype, as trained): returns the transformers model the loss heads call. LoRA lives in
    its layers; prefix-tuning's virtual tokens come through ``PrefixInjector``'s hooks, as in training."""
    import peft

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
            peft_model = peft.PeftModel.from_pretrained(model, str(path), autocast_adapter_dtype=False)
    except (ValueError, KeyError, OSError, RuntimeError) as exc:
        raise AdapterError(f"{path}: PEFT cannot load the adapter onto its base model: {_first_line(exc)}") from exc
    peft_model.eval()
    base = peft_model.get_base_model()
    config = peft_model.peft_config["default"]
    if config.is_prompt_learning:  # the hooks hold the PeftModel (its prompt encoder) for the model's life
        PrefixInjector(peft_model, base, config.num_virtual_tokens)
    return base


def split_names(value: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """``--target-modules q_proj,v_proj`` as a tuple of names (None: PEFT's default); ``re:<regex>``
    stays whole (commas included)."""
    if value is None:
        return None
    if isinstance(value, str):
        items = [value] if value.strip().startswith("re:") else value.split(",")
    else:
        items = list(value)
    return tuple(x.strip() for x in items)


def _targets(names: tuple[str, ...] | None) -> list[str] | str | None:
    """PEFT's ``target_modules``: module names matched as suffixes, or one regex matched in full."""
    if names and len(names) == 1 and names[0].startswith("re:"):
        return names[0][len("re:") :]
    return list(names) if names else None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
