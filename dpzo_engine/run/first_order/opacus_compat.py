"""Opacus compatibility: which clipping mode a model allows, and the exact rewrites of Hugging Face
call patterns that would otherwise make Opacus clip the wrong thing (see ``__init__``)."""

from __future__ import annotations

import types
from collections import defaultdict

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ...core.errors import UserError
from ..config import OPACUS_MODES


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
