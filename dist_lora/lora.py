"""Which tensors are the adapter.

LoRA layers come from PEFT (or loralib); this module decides, by the module that owns each parameter, which
tensors form the adapter for a bias mode, and what they are called on disk. Every save and load goes through
:func:`adapter_parameters`, so the selection and the key names live here and nowhere else.

Bias modes follow loralib: ``none`` (LoRA tensors only), ``all`` (plus every bias in the model) and ``lora_only``
(plus the biases of the layers that carry LoRA).
"""

from __future__ import annotations

import logging
import math
import re
import sys
from collections.abc import Iterator
from typing import Any
from unittest import mock

import torch
from torch import nn

from dist_lora.config import BIAS_MODES, LoraConfig
from dist_lora.constants import WRAPPER_PREFIXES

log = logging.getLogger(__name__)


class AdapterError(ValueError):
    """The model's adapter and a checkpoint (or a request) do not fit; the message says how."""


# ---------------------------------------------------------------------------------------------- names


def canonical_name(name: str) -> str:
    """Strip the wrapper prefixes (``module.``, ``_fsdp_wrapped_module.``, ...) that engines add to names."""
    for prefix in WRAPPER_PREFIXES:
        if prefix == "module.":
            while name.startswith(prefix):
                name = name[len(prefix) :]
        else:
            name = name.replace(prefix, "")
    return name


def full_shape(p: torch.Tensor) -> torch.Size:
    """A parameter's logical shape: ZeRO-3 keeps it in ``ds_shape``; a DTensor's ``shape`` is already global."""
    return torch.Size(getattr(p, "ds_shape", p.shape))


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside DDP / DeepSpeedEngine / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


# ---------------------------------------------------------------------------------------------- selection


def _lora_layer_types() -> tuple[tuple[type, str], ...]:
    from peft.tuners.lora import LoraLayer

    kinds: list[tuple[type, str]] = [(LoraLayer, "peft")]
    loralib = sys.modules.get("loralib")  # only a model built with loralib can hold its layers
    if loralib is not None:
        kinds.append((loralib.LoRALayer, "loralib"))
    return tuple(kinds)


def _lora_modules(model: nn.Module) -> Iterator[tuple[str, Any, str]]:
    kinds = _lora_layer_types()
    for name, module in model.named_modules():
        for cls, flavor in kinds:
            if isinstance(module, cls):
                yield canonical_name(name), module, flavor
                break


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _active_adapter(model: nn.Module) -> str:
    name = getattr(unwrap(model), "active_adapter", "default")
    if isinstance(name, (list, tuple)):
        if len(name) != 1:
            raise AdapterError(f"several adapters are active ({name}); activate one with set_adapter() first")
        name = name[0]
    return str(name)


def _auxiliary_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """PEFT's wrappers of modules that train beside LoRA: ``modules_to_save`` copies and trainable token rows."""
    from peft.utils.other import AuxiliaryTrainingWrapper

    for name, module in model.named_modules():
        if isinstance(module, AuxiliaryTrainingWrapper):
            yield canonical_name(name), module


def _peft_key(mod_name: str, rel: str, adapter: str) -> str | None:
    """The on-disk key (``get_peft_model_state_dict``'s) of parameter ``rel`` of PEFT LoRA layer ``mod_name``;
    None for the base layer and for other adapters' tensors."""
    parts = rel.split(".")
    if parts[0] == "base_layer" or len(parts) < 2 or parts[1] != adapter:
        return None
    if parts[0] == "lora_magnitude_vector":  # DoRA: PEFT saves the vector without its ".weight"
        return _join(mod_name, "lora_magnitude_vector")
    return _join(mod_name, ".".join([parts[0], *parts[2:]]))


def _auxiliary_key(mod_name: str, rel: str, adapter: str) -> str | None:
    """The on-disk key of parameter ``rel`` of a PEFT wrapper: a ``modules_to_save`` copy is saved under the
    wrapped module's own names, trainable token rows as ``token_adapter.trainable_tokens_delta``."""
    copy = f"modules_to_save.{adapter}."
    if rel.startswith(copy):
        return _join(mod_name, rel[len(copy) :])
    if rel == f"token_adapter.trainable_tokens_delta.{adapter}":
        return _join(mod_name, "token_adapter.trainable_tokens_delta")
    return None


def adapter_parameters(model: nn.Module, bias: str = "none") -> dict[str, nn.Parameter]:
    """The adapter's parameters for a bias mode, keyed by their checkpoint key (PEFT's names, adapter name removed):
    LoRA A and B, DoRA magnitudes, ``modules_to_save`` copies and trainable token rows, and biases by mode.

    The order is the model's parameter order, so every rank of a job sees the same list. Works on the model in
    any wrapper (DDP, DeepSpeedEngine, FSDP2, torch.compile); under ZeRO-3 the parameters may be empty partitions.
    """
    if bias not in BIAS_MODES:
        raise AdapterError(f"bias must be one of {BIAS_MODES} (got {bias!r})")
    adapter = _active_adapter(model)
    owned: dict[int, str] = {}
    lora_biases: set[int] = set()
    flavors: set[str] = set()
    for mod_name, module, flavor in _lora_modules(model):
        flavors.add(flavor)
        for rel, p in module.named_parameters(recurse=True):
            if flavor == "peft":
                key = _peft_key(mod_name, rel, adapter)
            else:  # loralib: its lora_* tensors, under their own names
                key = _join(mod_name, rel) if rel.startswith("lora_") else None
            if key is not None:
                owned.setdefault(id(p), key)
        base = getattr(module, "base_layer", module) if flavor == "peft" else module
        # the registry itself, not getattr: under ZeRO-3, reading a partitioned parameter as an attribute while a
        # forward runs (the background save thread does) all-gathers it, a collective of this rank alone
        b = base._parameters.get("bias")
        if isinstance(b, nn.Parameter):
            lora_biases.add(id(b))
    if "peft" in flavors:
        for mod_name, module in _auxiliary_modules(model):
            for rel, p in module.named_parameters(recurse=True):
                key = _auxiliary_key(mod_name, rel, adapter)
                if key is not None:
                    owned.setdefault(id(p), key)  # a tied copy (GPT-2's lm_head rows) is saved once
    if not flavors:
        raise AdapterError(
            "the model has no LoRA layers: apply LoRA first (dist_lora.apply_lora or peft.get_peft_model)"
        )
    loralib_rules = flavors == {"loralib"}
    selected: dict[str, nn.Parameter] = {}
    for name, p in model.named_parameters():
        if id(p) in owned:
            selected[owned[id(p)]] = p
            continue
        key = canonical_name(name)
        if bias == "all":
            # loralib matches 'bias' anywhere in the name; PEFT matches a trailing '.bias'
            is_bias = "bias" in key if loralib_rules else key == "bias" or key.endswith(".bias")
            if is_bias:
                selected[key] = p
        elif bias == "lora_only" and id(p) in lora_biases:
            selected[key] = p
    return selected


def adapter_aliases(model: nn.Module) -> dict[str, str]:
    """The adapter's other names for a tensor it saves under one (alias key -> key): a ``modules_to_save`` copy
    that PEFT ties across tied modules (``ensure_weight_tying``: one trained copy for ``embed_tokens`` and
    ``lm_head``). PEFT's files hold it under each name, so a step does too; it trains, gathers and keeps its
    optimizer state once, under the key :func:`adapter_parameters` gives it."""
    adapter = _active_adapter(model)
    saved = {id(p): key for key, p in adapter_parameters(model).items()}
    aliases: dict[str, str] = {}
    for mod_name, module in _auxiliary_modules(model):
        for rel, p in module.named_parameters(recurse=True, remove_duplicate=False):
            key = _auxiliary_key(mod_name, rel, adapter)
            if rel.startswith("modules_to_save.") and key is not None and saved.get(id(p), key) != key:
                aliases[key] = saved[id(p)]
    return aliases


def check_nothing_dropped(model: nn.Module, adapter: dict[str, nn.Parameter], bias: str) -> dict[str, nn.Parameter]:
    """``adapter``, or AdapterError naming every trainable tensor outside it: a checkpoint would silently drop
    it (PEFT's ``modules_to_save`` copies, trainable token rows, a trainable bias the bias mode leaves out)."""
    saved = {id(p) for p in adapter.values()}
    dropped = [canonical_name(n) for n, p in model.named_parameters() if p.requires_grad and id(p) not in saved]
    if dropped:
        shown = ", ".join(dropped[:6]) + (f" and {len(dropped) - 6} more" if len(dropped) > 6 else "")
        raise AdapterError(
            f"{len(dropped)} trainable tensor(s) are not part of the adapter dist_lora saves (LoRA A/B, and biases "
            f"by bias mode {bias!r}, DoRA magnitudes, modules_to_save copies, trainable token rows), so a checkpoint "
            f"would drop them: {shown}. Freeze them (requires_grad=False), or train them through PEFT "
            "(modules_to_save, trainable_token_indices); a trainable bias needs bias='all' or 'lora_only'"
        )
    return adapter


def lora_state_dict(model: nn.Module, bias: str = "none") -> dict[str, torch.Tensor]:
    """loralib's ``lora_state_dict``: the adapter tensors (and biases per mode), detached, by checkpoint key.

    On a loralib model the keys are loralib's; on a PEFT model they are ``get_peft_model_state_dict``'s.
    Single-process view: under ZeRO-3 or FSDP2 use :func:`dist_lora.save_checkpoint`, which gathers shards.
    A tensor PEFT ties across modules is there under each of its names (:func:`adapter_aliases`), as in PEFT's.
    """
    state = {k: p.detach() for k, p in adapter_parameters(model, bias).items()}
    return {**state, **{alias: state[key] for alias, key in adapter_aliases(model).items()}}


def mark_only_lora_as_trainable(model: nn.Module, bias: str = "none") -> None:
    """loralib's ``mark_only_lora_as_trainable``: freeze everything but the adapter and the biases of the mode."""
    keep = {id(p) for p in adapter_parameters(model, bias).values()}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)


def _bias_sets(model: nn.Module) -> dict[str, set[int]]:
    lora = {id(p) for p in adapter_parameters(model, "none").values()}
    return {m: {id(p) for p in adapter_parameters(model, m).values()} - lora for m in ("all", "lora_only")}


def infer_bias_mode(model: nn.Module) -> str:
    """The bias mode the model trains with, read from which biases require grad (PEFT's config breaks ties)."""
    sets = _bias_sets(model)
    trainable = {id(p) for p in model.parameters() if p.requires_grad} & sets["all"]
    peft_config = getattr(unwrap(model), "peft_config", None) or {}
    preferred = getattr(peft_config.get(_active_adapter(model)), "bias", None) if peft_config else None
    for mode in (preferred, "none", "lora_only", "all"):
        if mode in BIAS_MODES and trainable == (set() if mode == "none" else sets[mode]):
            return mode
    raise AdapterError(
        f"{len(trainable)} trainable biases match no bias mode (none: 0, lora_only: {len(sets['lora_only'])}, "
        f"all: {len(sets['all'])}); call mark_only_lora_as_trainable(model, bias=...) first"
    )


def check_bias_mode(model: nn.Module, saved: str) -> None:
    """Raise unless the biases the model trains are exactly the ones a checkpoint saved with ``saved`` holds."""
    sets = _bias_sets(model)
    trainable = {id(p) for p in model.parameters() if p.requires_grad} & sets["all"]
    wanted = set() if saved == "none" else sets[saved]
    if trainable == wanted:
        return
    modes = [m for m, s in (("none", set()), ("lora_only", sets["lora_only"]), ("all", sets["all"])) if s == trainable]
    found = modes[0] if modes else f"a custom set of {len(trainable)} trainable biases"
    raise AdapterError(
        f"bias mode mismatch: the checkpoint was saved with bias={saved!r} but the model trains biases as "
        f"{found!r}; apply LoRA with bias={saved!r} (or mark_only_lora_as_trainable(model, bias={saved!r}))"
    )


# ---------------------------------------------------------------------------------------------- PEFT config


def peft_lora_config(cfg: LoraConfig, base_model_name_or_path: str | None = None, revision: str | None = None) -> Any:
    import copy

    import peft

    cfg = copy.deepcopy(cfg)  # PEFT edits its config's lists in place (ensure_weight_tying renames modules_to_save)
    return peft.LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules if isinstance(cfg.target_modules, str) else list(cfg.target_modules),
        target_parameters=list(cfg.target_parameters) if cfg.target_parameters else None,
        bias=cfg.bias,  # type: ignore[arg-type]  # validated against BIAS_MODES
        use_rslora=cfg.use_rslora,
        use_dora=cfg.use_dora,
        init_lora_weights=cfg.init_lora_weights,  # type: ignore[arg-type]  # validated against LORA_INITS
        rank_pattern=dict(cfg.rank_pattern),
        alpha_pattern=dict(cfg.alpha_pattern),
        layers_to_transform=cfg.layers_to_transform,
        exclude_modules=cfg.exclude_modules,
        modules_to_save=cfg.modules_to_save,
        trainable_token_indices=cfg.trainable_token_indices,
        ensure_weight_tying=cfg.ensure_weight_tying,
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model_name_or_path,
        revision=revision,  # the base's (PEFT's field: AutoPeftModel loads the base at it)
    )


# adapter_config.json's fields that shape, place or scale an adapter's tensors, and the setting that sets each
ADAPTER_SETTINGS = {
    "r": "lora.r",
    "lora_alpha": "lora.alpha",
    "use_rslora": "lora.use_rslora",
    "use_dora": "lora.use_dora",
    "target_modules": "lora.target_modules",
    "target_parameters": "lora.target_parameters",
    "exclude_modules": "lora.exclude_modules",
    "layers_to_transform": "lora.layers_to_transform",
    "rank_pattern": "lora.rank_pattern",
    "alpha_pattern": "lora.alpha_pattern",
    "bias": "lora.bias",
    "modules_to_save": "lora.modules_to_save",
    "trainable_token_indices": "lora.trainable_token_indices",
    "ensure_weight_tying": "lora.ensure_weight_tying",
}


def _comparable(value: Any) -> Any:
    """A config value as PEFT's saved JSON and its live config both mean it: a set or list sorted, empty or false
    as None, ``bias`` none as None."""
    if (
        value is None
        or value is False
        or value == "none"
        or (isinstance(value, (list, tuple, set, dict)) and not value)
    ):
        return None  # (not `value in (None, False)`: 0 == False, and layer 0 is not "none")
    if isinstance(value, (list, tuple, set)):
        return sorted(value, key=str)
    return value


def _override(setting: str, value: Any) -> str:
    """``setting=value`` as a config override on a command line (YAML's flow style; quoted for the shell where it
    must be)."""
    import json
    import shlex

    if isinstance(value, (list, tuple, set)) and all(isinstance(v, (str, int)) for v in value):
        text = "[" + ",".join(str(v) for v in _comparable(value)) + "]"
    elif isinstance(value, (dict, list)):
        text = json.dumps(value)
    else:
        text = "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
    return shlex.quote(f"{setting}={text}")


def adapter_settings(config: Any, saved: dict[str, Any]) -> dict[str, Any]:
    """The settings (``{"lora.r": 4}``) that apply LoRA as ``saved`` (an adapter_config.json's dict) says, where the
    PEFT LoRA config ``config`` differs from it; {} where either is not a PEFT LoRA config."""
    if config is None or "r" not in saved:
        return {}
    layers = saved.get("layers_to_transform")
    if isinstance(layers, int):  # (PEFT's one layer, as dist_lora's list)
        saved = {**saved, "layers_to_transform": [layers]}
    return {
        setting: saved.get(key)
        for key, setting in ADAPTER_SETTINGS.items()
        if _comparable(saved.get(key)) != _comparable(getattr(config, key, None))
    }


def lora_overrides(model: nn.Module, saved: dict[str, Any]) -> list[str]:
    """The config overrides (``lora.r=4``) that apply LoRA as ``saved`` (an adapter_config.json's dict) says, where
    the model's PEFT config differs from it; [] for loralib layers, or where ``saved`` is not a PEFT LoRA config."""
    config = (getattr(unwrap(model), "peft_config", None) or {}).get(_active_adapter(model))
    return [_override(setting, value) for setting, value in adapter_settings(config, saved).items()]


def config_mismatches(model: nn.Module, saved: dict[str, Any], limit: int = 3) -> list[str]:
    """How the model's PEFT LoRA layers would compute the saved adapter otherwise than the layers that trained it.

    A layer's scaling (``lora_alpha / r``, ``/ sqrt(r)`` under ``use_rslora``, per ``alpha_pattern``) and aLoRA's
    invocation tokens come from the adapter config, which no tensor holds: an adapter loaded into layers made with
    another ``lora_alpha`` loads without a wrong key or shape and computes another function. Compared here against
    ``saved`` (the step's adapter_config.json), layer by layer (:func:`lora_scaling`, PEFT's pattern matching); at
    most ``limit`` layers are named. Nothing is compared for loralib layers, or where ``saved`` is not a PEFT LoRA
    config."""
    if "lora_alpha" not in saved:
        return []
    out = []
    adapter = _active_adapter(model)
    differing = []
    for name, module, flavor in _lora_modules(model):
        if flavor != "peft" or adapter not in getattr(module, "scaling", {}):
            continue
        r = module.r[adapter]  # the saved rank: the shapes matched
        scaling, given = lora_scaling(saved, name.removeprefix("base_model.model."), r), module.scaling[adapter]
        if not math.isclose(given, scaling, rel_tol=1e-6):
            differing.append(f"{name}: checkpoint {scaling:g} (r {r}), model {given:g}")
    if differing:
        out.append(
            f"LoRA scaling differs in {len(differing)} layer(s): "
            + "; ".join(differing[:limit])
            + ("; ..." if len(differing) > limit else "")
            + f"; the checkpoint's adapter_config.json has lora_alpha {saved['lora_alpha']}, use_rslora "
            f"{bool(saved.get('use_rslora'))}, alpha_pattern {saved.get('alpha_pattern') or {}}"
        )
    tokens = saved.get("alora_invocation_tokens")
    model_tokens = _peft_config_value(model, adapter, "alora_invocation_tokens")
    if (tokens or None) != (model_tokens or None):
        out.append(f"aLoRA invocation tokens differ: checkpoint {tokens}, model {model_tokens}")
    return out


def lora_scaling(config: dict[str, Any], layer: str, r: int) -> float:
    """PEFT's scaling of one layer of rank ``r`` under an adapter config (adapter_config.json's dict): its alpha
    (``alpha_pattern`` matched against the layer's name in the base model as PEFT matches it) over ``r``, or over
    sqrt(r) with rsLoRA."""
    from peft.utils.other import get_pattern_key

    pattern = config.get("alpha_pattern") or {}
    alpha = float(pattern.get(get_pattern_key(list(pattern), layer), config["lora_alpha"]))
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def _peft_config_value(model: nn.Module, adapter: str, field: str) -> Any:
    config = (getattr(unwrap(model), "peft_config", None) or {}).get(adapter)
    return getattr(config, field, None)


def _collect_token_rows(layer: Any, weight: Any, rows: Any, embed_dim: int) -> torch.Tensor:
    """The rows ``rows`` of a ZeRO-3 partitioned embedding, on every rank (gathered, as PEFT does, then indexed
    where it lives: no CUDA assumed, no broadcast needed)."""
    from peft.utils.integrations import gather_params_ctx

    with gather_params_ctx([weight], modifier_rank=None):
        return weight[rows].clone()


def apply_lora(
    model: nn.Module, cfg: LoraConfig, base_model_name_or_path: str | None = None, revision: str | None = None
) -> nn.Module:
    """Wrap a causal LM in PEFT LoRA from a ``lora:`` config block; only the adapter (and biases per mode) train,
    in one dtype (:func:`one_trainable_dtype`). ``revision``: the hub commit of the base, recorded in
    ``adapter_config.json`` (PEFT's ``revision``)."""
    import peft
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    if not isinstance(cfg, LoraConfig):
        raise TypeError(
            f"apply_lora takes a dist_lora.config.LoraConfig (r, alpha, dropout, target_modules, bias, ...), not "
            f"{type(cfg).__module__}.{type(cfg).__name__}; or apply PEFT's with peft.get_peft_model(model, config): "
            "save_checkpoint and load_checkpoint take that model as well"
        )
    if next(_lora_modules(model), None) is not None:
        raise AdapterError(
            f"{type(model).__name__} already has LoRA layers: apply_lora takes the base model as from_pretrained "
            "returns it (over a model PEFT wrapped, PEFT nests a second wrapper, and every saved key would carry "
            "base_model.model. twice, which no base loads); load a trained adapter into it with load_checkpoint, "
            "or take the base back first with model.unload() (PEFT's)"
        )
    name = base_model_name_or_path or getattr(getattr(model, "config", None), "name_or_path", None)
    past = _token_rows_past_the_table(model, cfg)
    if past:
        raise AdapterError(f"lora.trainable_token_indices: {past}: give ids below each table's size")
    try:
        # PEFT reads the trainable token rows of a ZeRO-3 embedding on CUDA only; this reads them on any device
        with mock.patch.object(TrainableTokensLayer, "_collect_token_weights", _collect_token_rows):
            peft_model = peft.get_peft_model(model, peft_lora_config(cfg, name, revision))
    except ValueError as e:
        raise AdapterError(
            f"{e}\nlinear-like module names in this model include: {_layer_names(model)}{_regex_hint(model, cfg)}"
        ) from e
    unmatched = _unmatched_names(cfg, peft_model)
    if unmatched:
        raise AdapterError(
            f"{'; '.join(unmatched)} (PEFT passes over a name that matches nothing): fix the name or drop it; "
            f"linear-like module names in this model include: {_layer_names(model)}"
        )
    tied = getattr(peft_model.peft_config[peft_model.active_adapter], "target_modules_to_tie", None)
    if tied:
        raise AdapterError(
            f"lora.ensure_weight_tying with LoRA on {sorted(tied)} (tied to the input embedding in this base) makes "
            "PEFT share one tensor's storage between the embedding's LoRA and its transpose, which FSDP2 and ZeRO-3 "
            "shard as two tensors: leave lm_head and the embedding out of lora.target_modules, or train the whole "
            "head once with lora.modules_to_save: [lm_head] and ensure_weight_tying"
        )
    mark_only_lora_as_trainable(peft_model, cfg.bias)
    one_trainable_dtype(peft_model)
    return peft_model


def one_trainable_dtype(model: nn.Module) -> torch.dtype | None:
    """Give the trainable tensors one dtype, as FSDP2's parameter groups and ZeRO's flat groups require (each
    failed with an assertion of its own otherwise). PEFT keeps LoRA's adapters in float32 over a half-precision
    base; the base's own tensors that train (biases by ``lora.bias``, ``modules_to_save`` copies, trainable token
    rows) stay in the base's dtype, which its layers compute in. Where both train, the adapters take the base's
    dtype; returns it (None: nothing changed). Under DeepSpeed's bf16, whose ZeRO-3 base is built in bf16, that is
    DeepSpeed's own layout (bf16 weights, float32 master copies in its optimizer), as at ZeRO-1/2."""
    trained = [p for p in model.parameters() if p.requires_grad]
    dtypes = {p.dtype for p in trained}
    if torch.float32 not in dtypes or len(dtypes) == 1:
        return None
    half = dtypes - {torch.float32}
    if len(half) > 1:
        raise AdapterError(f"the trainable tensors are in {sorted(map(str, dtypes))}: give the base one dtype")
    (dtype,) = half
    for p in trained:
        if p.dtype == torch.float32:
            p.data = p.data.to(dtype)
    return dtype


def _regex_hint(model: nn.Module, cfg: LoraConfig) -> str:
    """Where ``lora.target_modules`` is one string, which PEFT reads as a regex of a module's whole name: how a
    module is named whole, and the list that matches by name (a string is mostly a list's one name, mistyped)."""
    targets = cfg.target_modules
    if not isinstance(targets, str) or targets == "all-linear":
        return ""
    names = [n for n, _ in model.named_modules()]
    whole = next((n for n in names if n.split(".")[-1] == targets), None)  # (the name it meant, whole)
    if whole is None:
        layers = set(_layer_names(model, limit=len(names)))
        whole = next((n for n in names if n.split(".")[-1] in layers), "")
    hint = (
        f"\nlora.target_modules is one string, {targets!r}, which PEFT reads as a regex that must match a module's "
        f"whole name ({whole!r} here)"
    )
    plain = re.fullmatch(r"\w+", targets) is not None
    return hint + (f"; to adapt modules by their names, give a list: lora.target_modules=[{targets}]" if plain else "")


def _layer_names(model: nn.Module, limit: int = 20) -> list[str]:
    """The last name of each linear-like layer (a 2-D weight, no children) of ``model``, sorted, for messages; on a
    model PEFT has wrapped, the base's names (its adapters and copies left out, a wrapped layer by its own name)."""
    names = set()
    for n, m in model.named_modules():
        if getattr(m, "weight", None) is None or m.weight.dim() != 2 or list(m.children()):
            continue
        parts = n.split(".")
        if any(part.startswith("lora_") or part == "modules_to_save" for part in parts):
            continue
        while len(parts) > 1 and parts[-1] in ("base_layer", "original_module"):
            parts.pop()
        names.add(parts[-1])
    return sorted(names)[:limit]


def _token_rows_past_the_table(model: Any, cfg: LoraConfig) -> str | None:
    """The token ids of ``trainable_token_indices`` that a table does not have (PEFT would fail with an
    IndexError), named with the table's size; None when every id is a row."""
    indices = cfg.trainable_token_indices
    if not indices:
        return None
    tables: list[tuple[str, Any, list[int]]]
    if isinstance(indices, dict):
        tables = [(n, m, ids) for n, m in model.named_modules() for key, ids in indices.items() if n.endswith(key)]
    else:
        tables = [("the input embedding", model.get_input_embeddings(), indices)]
    for name, table, ids in tables:
        rows = getattr(table, "num_embeddings", None)
        past = [i for i in ids if rows is not None and not 0 <= i < rows]
        if past:
            return f"ids {past} are past the {rows} rows of {name}"
    return None


def _unmatched_names(cfg: LoraConfig, peft_model: Any) -> list[str]:
    """What of the ``lora:`` block PEFT applied to nothing: entries of ``target_modules`` (a list) it put LoRA on no
    module for, indices of ``layers_to_transform`` it adapted nothing in, keys of ``rank_pattern`` and
    ``alpha_pattern`` that match no adapted module, entries of ``exclude_modules`` that name no module, entries of
    ``modules_to_save`` it copied no module for; each matched as PEFT matches it. PEFT raises only when nothing at
    all matches, so ``[q_proj, v_prj]`` would train q_proj alone and ``modules_to_save: [lm_hed]`` no head,
    silently."""
    from peft.utils import ModulesToSaveWrapper

    problems = []
    targeted = list(getattr(peft_model, "targeted_module_names", []))
    # (a module PEFT adapts through its parameter, such as a MoE router that is no nn.Linear, is listed by it)
    targeted += [n.rsplit(".", 1)[0] for n in getattr(peft_model, "targeted_parameter_names", [])]
    if isinstance(cfg.target_modules, list):
        missing = [t for t in cfg.target_modules if not any(n == t or n.endswith("." + t) for n in targeted)]
        narrowing = {"lora.layers_to_transform": cfg.layers_to_transform, "lora.exclude_modules": cfg.exclude_modules}
        narrowed = " and ".join(name for name, value in narrowing.items() if value)
        if missing:
            within = f" (within {narrowed})" if narrowed else ""
            problems.append(f"lora.target_modules {missing} matched no module{within}")
    if cfg.layers_to_transform:  # an index past the model's layers adapts nothing
        met = {int(part) for n in targeted for part in n.split(".") if part.isdigit()}
        layers = [i for i in cfg.layers_to_transform if i not in met]
        if layers:
            problems.append(f"lora.layers_to_transform {layers} adapted no layer of lora.target_modules")
    for what, pattern in (("lora.rank_pattern", cfg.rank_pattern), ("lora.alpha_pattern", cfg.alpha_pattern)):
        # PEFT's own match (a key is a regex over the module's name, anchored at a dot); it only warns
        keys = [k for k in pattern or {} if not any(re.match(rf"(.*\.)?({k})$", n) for n in targeted)]
        if keys:
            problems.append(f"{what} {keys} matched no adapted module")
    if cfg.exclude_modules:  # a mistyped exclusion would leave LoRA on what it meant to keep out
        names = [n for n, _ in peft_model.named_modules()]
        missing = [e for e in cfg.exclude_modules if not any(n.endswith("." + e) for n in names)]
        if missing:
            problems.append(f"lora.exclude_modules {missing} matched no module")
    if cfg.modules_to_save:
        copied = [n for n, m in peft_model.named_modules() if isinstance(m, ModulesToSaveWrapper)]
        missing = [t for t in cfg.modules_to_save if not any(n.endswith(t) for n in copied)]
        if missing:
            problems.append(f"lora.modules_to_save {missing} matched no module")
    return problems


def adapter_config_dict(model: nn.Module, bias: str) -> dict[str, Any]:
    """PEFT's adapter_config.json content for the model's active adapter, with the bias mode that was saved."""
    inner = unwrap(model)
    peft_config = getattr(inner, "peft_config", None)
    if not peft_config:
        raise AdapterError("adapter_config.json needs a PEFT model (peft.get_peft_model / dist_lora.apply_lora)")
    conf = peft_config[_active_adapter(model)]
    out = conf.to_dict()
    for k, v in list(out.items()):
        if isinstance(v, set):
            out[k] = sorted(v)
    # ensure_weight_tying: PEFT put the embedding's own name in place of the tied modules, which a reload no longer
    # ties where it is not called embed_tokens (GPT-2's wte); with the tied modules named, PEFT ties them again
    tied = [base_key(alias).removesuffix(".weight") for alias in adapter_aliases(model)]
    if tied:
        out["modules_to_save"] = [*out["modules_to_save"], *(m for m in tied if m not in out["modules_to_save"])]
    out["bias"] = bias
    out["inference_mode"] = True
    return out


# ---------------------------------------------------------------------------------------------- fingerprint


def base_key(name: str) -> str:
    """A model parameter's name in the base's own files (PEFT's prefix and ``base_layer`` removed)."""
    key = canonical_name(name).removeprefix("base_model.model.")
    for wrapper in (".token_adapter.base_layer.", ".original_module."):
        key = key.replace(wrapper, ".")
    key = re.sub(r"(?:\.base_layer)+(\.|$)", r"\1", key)  # (PEFT nests one LoRA per targeted parameter of a module)
    return re.sub(r"\.modules_to_save\.[^.]+\.", ".", key)  # a modules_to_save copy starts as the base's


def base_fingerprint(model: nn.Module) -> dict[str, Any]:
    """Architecture and every base parameter's shape: a checkpoint only loads over a base that matches. ``model``
    has LoRA applied, or is the bare base (as a streaming merge builds it). Where the files it was loaded from are
    found, also a sample of their values (``content``: :func:`~dist_lora.weights.base_content`), which tells another
    checkpoint of the same architecture apart (:func:`compare_content`)."""
    adapted = next(_lora_modules(model), None) is not None
    lora_ids = {id(p) for p in adapter_parameters(model, "none").values()} if adapted else set()
    shapes = {base_key(n): list(full_shape(p)) for n, p in model.named_parameters() if id(p) not in lora_ids}
    config = getattr(unwrap(model), "config", None)
    if config is None:
        config = getattr(getattr(unwrap(model), "base_model", None), "config", None)
    out = {
        "model_type": getattr(config, "model_type", None) or type(unwrap(model)).__name__,
        "num_parameters": sum(math.prod(s) for s in shapes.values()),
        "shapes": shapes,
    }
    # a hub base's commit: the one its LoRA config names (the trainer's and load_model's; else the cache's main)
    peft_configs = getattr(unwrap(model), "peft_config", None) or {}
    revision = next((c.revision for c in peft_configs.values() if getattr(c, "revision", None)), None)
    content = _content_of(config, revision)
    if content:
        out["content"] = content
    return out


def _content_of(config: Any, revision: str | None) -> dict[str, str] | None:
    """:func:`~dist_lora.weights.base_content` of the files the model was loaded from; None where they cannot be
    found or read (a model built in code, pickle files, a file this process cannot read). The sample only ever
    adds a warning, so it is never what makes a save or a load fail."""
    from dist_lora.model import files_of
    from dist_lora.weights import base_content

    directory = files_of(config, revision)
    if directory is None:
        return None
    try:
        return base_content(directory)
    except Exception as e:  # (pickle files only, an unreadable or malformed file: the load itself says so)
        log.debug("the base's content is not sampled from %s: %s: %s", directory, type(e).__name__, e)
        return None


def compare_fingerprints(saved: dict[str, Any], model: dict[str, Any], limit: int = 8) -> list[str]:
    """Human-readable differences between two fingerprints; empty when they match."""
    diffs: list[str] = []
    if saved.get("model_type") != model.get("model_type"):
        diffs.append(f"model_type: checkpoint {saved.get('model_type')!r}, model {model.get('model_type')!r}")
    a, b = saved.get("shapes", {}), model.get("shapes", {})
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            diffs.append(f"{k}: checkpoint {a.get(k, 'absent')}, model {b.get(k, 'absent')}")
    if len(diffs) > limit:
        diffs = [*diffs[:limit], f"... and {len(diffs) - limit} more"]
    return diffs


def compare_content(saved: dict[str, Any], model: dict[str, Any], limit: int = 4) -> str | None:
    """Which of the base's sampled tensors differ between two fingerprints, said in a line; None when they match
    or cannot be compared (either has no sample: a step saved before samples were taken, a base without
    safetensors files; or no tensor is held under one name in one dtype by both)."""
    a, b = saved.get("content") or {}, model.get("content") or {}
    common = [k for k in sorted(a.keys() & b.keys()) if a[k].split(":")[0] == b[k].split(":")[0]]
    differ = [k for k in common if a[k] != b[k]]
    if not differ:
        return None
    named = ", ".join(differ[:limit]) + (f" and {len(differ) - limit} more" if len(differ) > limit else "")
    return f"{len(differ)} of the {len(common)} tensors sampled from the base differ ({named})"


def check_base(
    url: str,
    saved: dict[str, Any],
    model: dict[str, Any],
    fix: str,
    *,
    base: str = "",
    error: type[ValueError] = AdapterError,
) -> None:
    """A step's fingerprint of its base (``saved``) against the base it is put on (``model``): another model (an
    architecture or a shape that differs) raises ``error`` listing the differences; another checkpoint of the same
    one warns (:func:`_warn_other_weights`). ``fix``: what to do, completed with "... the adapter was trained on";
    ``base``: the base's name, where the message should give it."""
    diffs = compare_fingerprints(saved, model)
    if diffs:
        than = f" than {base}" if base else ""
        raise error(
            f"{url} was saved for another base model{than}; differences:\n  "
            + "\n  ".join(diffs)
            + f"\n{fix} the adapter was trained on (adapter_config.json names it)"
        )
    _warn_other_weights(url, compare_content(saved, model), fix)


def _warn_other_weights(url: str, changed: str | None, fix: str) -> None:
    """The warning of a step loaded or merged over a base of its architecture with other weights than the one it
    was trained over (``changed``: :func:`compare_content`'s line; nothing when None). It loads: an adapter is
    also put over a fine-tune of its base on purpose; ``fix``: what to do otherwise, completed with "... the
    adapter was trained on"."""
    if changed:
        log.warning(
            "%s was trained over other weights than this base's: %s. The base has the architecture the adapter was "
            "trained for, but it is another checkpoint of it (an instruct fine-tune, say) or its files changed "
            "since; the adapter is applied as asked. If that is not meant, %s the adapter was trained on "
            "(adapter_config.json names it)",
            url,
            changed,
            fix,
        )


def loraplus_groups(
    model: nn.Module, params: list[nn.Parameter], *, lr: float, ratio: float, embedding_lr: float, weight_decay: float
) -> list[dict[str, Any]]:
    """LoRA+'s parameter groups of ``params`` (the trainable tensors of ``model``, a PEFT model, wrapped or not), as
    PEFT's ``create_loraplus_optimizer`` makes them: the A matrices and other 2-D tensors at ``lr``, the B matrices
    and 1-D tensors at ``ratio * lr`` (biases without weight decay), LoRA on embeddings at ``embedding_lr``. Each
    group's ``lr_scale`` is its share of ``lr``, which a schedule that moves ``lr`` keeps. Empty groups are left
    out (DeepSpeed flattens each group into a partition)."""
    from peft.optimizers import create_loraplus_optimizer

    wanted = {id(p) for p in params}
    grouped = create_loraplus_optimizer(  # PEFT's grouping; the optimizer itself is the caller's
        model,  # type: ignore[arg-type]  # any module: PEFT reads its named parameters and modules
        torch.optim.SGD,
        lr=lr,
        loraplus_lr_ratio=ratio,
        loraplus_lr_embedding=embedding_lr,
        loraplus_weight_decay=weight_decay,
    )
    groups = []
    for group in grouped.param_groups:
        mine = [p for p in group["params"] if id(p) in wanted]
        if mine:
            share = {"lr": group["lr"], "weight_decay": group["weight_decay"], "lr_scale": group["lr"] / lr}
            groups.append({"params": mine, **share})
    placed = sum(len(group["params"]) for group in groups)
    if placed != len(params):
        raise ValueError(f"LoRA+ placed {placed} of the {len(params)} trainable tensors in its groups")
    return groups
