"""Finding and loading the base model and its tokenizer (``model.name_or_path``).

A local directory is used by its absolute path, so that the config saved with every step and the
``adapter_config.json`` PEFT reads name a base that can be found from any working directory. A hub id stays as it is
in every name saved; its files are read from its snapshot in the Hugging Face cache (:func:`base_directory`), at the
commit recorded with each step. A path that does not exist, and a hub id that cannot be fetched (no network, no such
repo), are one error each that says which and what to do, never a library traceback.

Sharded loading (what FSDP2 and ZeRO-3 use, see ``Backend.load_base``) builds the model on the meta device
(:func:`build_on_meta`), keeps the LoRA adapter's values while PEFT applies it there (:func:`adapters_on_cpu`), and
reads each rank's rows of each tensor from the safetensors files (:class:`dist_lora.weights.BaseWeights`).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import importlib.util
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from dist_lora.weights import SAFE_INDEX_NAME, SAFE_WEIGHTS_NAME, BaseWeights, ModelError, indexed_files

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # model.dtype's names


def _looks_like_path(name: str) -> bool:
    """A hub id is ``name`` or ``org/name``; anything else with a separator, or starting like a path, is a path."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)


def resolve_model_path(name: str, what: str = "model.name_or_path") -> str:
    """A local save_pretrained directory as an absolute path; a hub id unchanged. ModelError for a local path that
    does not exist or is not such a directory."""
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            kind = "directory" if path.is_dir() else "file"
            raise ModelError(
                f"{what} {name} is a {kind} without config.json: pass a directory written by save_pretrained "
                f"(or a hub id such as org/name){_what_it_is(path)}"
            )
        return str(path.resolve())
    if _looks_like_path(name):
        raise ModelError(
            f"{what} {name}: no such directory ({path.resolve()}); pass a directory written by save_pretrained, "
            "or a hub id such as org/name"
        )
    return name


def _what_it_is(path: Path) -> str:
    """For :func:`resolve_model_path`'s error: what a path without config.json probably is, as a hint ("")."""
    if path.is_file():
        return f"; {path.parent} holds the model" if (path.parent / "config.json").is_file() else ""
    try:
        adapter = json.loads((path / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return ""
    base = adapter.get("base_model_name_or_path") if isinstance(adapter, dict) else None
    trained = f": the base it was trained over is {base}" if base else ""
    return f"; {path} holds a LoRA adapter (adapter_config.json), not a base model{trained}"


def _hub_failure(name: str, what: str, error: BaseException) -> ModelError:
    first = str(error).strip().splitlines()[0].rstrip(".") if str(error).strip() else type(error).__name__
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False")
    hint = (
        "HF_HUB_OFFLINE is set and the model is not in the local cache"
        if offline
        else "check the id and the network (a gated model needs `hf auth login`)"
    )
    return ModelError(
        f"{what} {name!r} is not a local directory, and loading it from the Hugging Face hub failed ({hint}): "
        f"{first}. Download it where there is network (`hf download {name} --local-dir DIR`) and pass DIR"
    )


def _load_failure(name: str, what: str, error: BaseException) -> ModelError:
    """Why loading ``name`` (a config, a model) failed: a hub id's failure with its fix, or a local path's error."""
    return _hub_failure(name, what, error) if not Path(name).exists() else ModelError(f"{what} {name}: {error}")


def load_tokenizer(name: str, what: str = "model.name_or_path", revision: str | None = None) -> Any:
    """The base's tokenizer (AutoTokenizer; a hub id's at ``revision``), or ModelError naming the base and the
    fix."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name, revision=hub_only(name, revision))
    except (OSError, ValueError) as e:
        if not Path(name).exists():
            raise _hub_failure(name, what, e) from e
        # transformers' error for a directory without a tokenizer names a missing sentencepiece (a Llama's config)
        no_files = Path(name).is_dir() and not _has_tokenizer_files(Path(name))
        raise (_no_tokenizer(name, what) if no_files else ModelError(f"{what} {name}: {e}")) from e
    if len(tokenizer) < 2:  # transformers makes an empty one of the config's type where no tokenizer file is
        raise _no_tokenizer(name, what)
    return tokenizer


def _no_tokenizer(name: str, what: str) -> ModelError:
    return ModelError(
        f"{what} {name} holds no tokenizer (tokenizer.json, tokenizer.model or vocab files): save the tokenizer "
        f"of the model it came from there, AutoTokenizer.from_pretrained(ORIGINAL).save_pretrained({name!r})"
    )


def _has_tokenizer_files(directory: Path) -> bool:
    """Whether ``directory`` holds a file a tokenizer is read from (its vocabulary, merges, sentencepiece or
    tiktoken model, or its config)."""
    return any(
        f.name.startswith(("tokenizer", "vocab", "merges", "spiece")) or f.suffix in (".model", ".tiktoken")
        for f in directory.iterdir()
    )


def load_model_config(name: str, revision: str | None = None, what: str = "model.name_or_path") -> Any:
    """The base's config (AutoConfig; a hub id's at ``revision``: its config.json alone is fetched), or ModelError
    naming the base and the fix, as :func:`load_base`'s."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name, revision=hub_only(name, revision))
    except (OSError, ValueError) as e:
        raise _load_failure(name, what, e) from e


def context_length(name: str, revision: str | None = None) -> int | None:
    """The longest sequence a base with learned positions takes (``max_position_embeddings``, GPT-2's
    ``n_positions``): a longer one indexes past its position table. None for rotary positions, which have no table
    (a longer sequence is a context extension, as with ``rope_scaling``), and where the config names none."""
    config = load_model_config(name, revision)
    if any(getattr(config, key, None) is not None for key in ("rope_parameters", "rope_scaling", "rope_theta")):
        return None
    limit = getattr(config, "max_position_embeddings", None)
    return limit if isinstance(limit, int) else None


@functools.cache
def _no_hub_kernels() -> dict[str, Any]:
    """``from_pretrained``'s switch for hub kernels, off. transformers 5.2x kernelizes a loaded model by default
    (RMSNorm, SwiGLU, ... swapped for kernels fetched from the hub on a GPU). The sharded loads build the model from
    its config, which never kernelizes, so the whole-model load turns it off too: every engine trains the same
    forward, and a load needs no hub access for kernels. Empty where transformers has no kernels."""
    return {"use_kernels": False} if importlib.util.find_spec("transformers.integrations.hub_kernels") else {}


def load_base(name: str, dtype: Any, what: str = "model.name_or_path", revision: str | None = None) -> Any:
    """``AutoModelForCausalLM.from_pretrained`` in ``dtype`` (a hub id at ``revision``, by default its newest),
    or ModelError naming the base and the fix."""
    from transformers import AutoModelForCausalLM

    try:
        with _outside_zero_init():  # a ZeRO-3 model built earlier in this process leaves its config active
            return AutoModelForCausalLM.from_pretrained(
                name, dtype=dtype, revision=hub_only(name, revision), **_no_hub_kernels()
            )
    except (OSError, ValueError) as e:
        raise _load_failure(name, what, e) from e


HUB_SIDE_FILES = ("*.json", "*.model", "*.txt", "*.jinja", "*.tiktoken")
"""What a hub model's directory holds besides its weights: config, weight index, generation config, tokenizer."""


def hub_only(name: str, revision: str | None) -> str | None:
    """``revision`` where ``name`` is a hub id; None for a local directory, which has no revisions."""
    return None if Path(name).is_dir() else revision


def hub_snapshot(repo_id: str, *, revision: str | None = None, what: str = "model.name_or_path") -> Path | None:
    """Hub model ``repo_id`` (at ``revision``: a commit, branch or tag; by default ``main``) as a local directory,
    as ``hf download`` leaves it: its snapshot in the Hugging Face cache (named by its commit), with the config,
    tokenizer and safetensors weights (only the files the weight index names, never the pickles or ``original/``
    checkpoints beside them), downloaded where missing. None when the model has no safetensors weights (pickle files
    only, or not cached offline): it loads the full way. ModelError naming the fix when the hub cannot be reached
    and the cache does not hold the model, or there is no such model."""
    from huggingface_hub import snapshot_download

    def download(at: str | None, patterns: list[str]) -> Path:
        return Path(snapshot_download(repo_id, revision=at, allow_patterns=patterns))

    try:
        side = download(revision, list(HUB_SIDE_FILES))
        index = side / SAFE_INDEX_NAME
        files = indexed_files(index) if index.is_file() else []
        weights = files or [SAFE_WEIGHTS_NAME]
        # the weights of that same commit (side.name), even if the repo moves on meanwhile
        snapshot = download(side.name, [*HUB_SIDE_FILES, *weights])
    except (OSError, ValueError) as e:  # huggingface_hub's errors are OSErrors (HTTP, offline, not cached)
        raise _hub_failure(repo_id, what, e) from e
    if not (snapshot / "config.json").is_file():
        raise ModelError(f"{what} {repo_id!r} has no config.json on the hub: it is not a transformers model")
    missing = [f for f in weights if not (snapshot / f).is_file()]
    if files and missing:  # the index is there, some of its files are not: an interrupted download, offline now
        raise ModelError(
            f"{what} {repo_id!r}: its snapshot {snapshot} lacks {len(missing)} of the {len(files)} weight files "
            f"its index names ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): an interrupted "
            f"download? Run again with the hub reachable (HF_HUB_OFFLINE unset), or `hf download {repo_id}`"
        )
    return None if missing else snapshot


def hub_adapter(repo_id: str, what: str = "the adapter") -> Path | None:
    """Hub adapter ``repo_id`` (PEFT's adapter_config.json and adapter_model.safetensors) as its snapshot in the
    Hugging Face cache, downloaded where missing; None where ``repo_id`` is not a hub id but a path or a URL.
    ModelError naming the fix when the hub cannot be reached and the cache does not hold it."""
    from huggingface_hub import snapshot_download

    from dist_lora.constants import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME

    if "://" in repo_id or _looks_like_path(repo_id) or Path(repo_id).exists():
        return None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=[ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME]))
    except (OSError, ValueError) as e:  # huggingface_hub's errors are OSErrors (HTTP, offline, not cached)
        raise _hub_failure(repo_id, what, e) from e


def base_directory(name: str, what: str = "model.name_or_path", revision: str | None = None) -> str | None:
    """Collective. The local directory of base ``name`` that sharded loading reads: ``name`` itself when it is a
    directory; for a hub id, its snapshot at ``revision`` (:func:`hub_snapshot`; the directory's name is the
    commit). Every rank asks for it at once: the hub's file locks let one process per cache fetch each file while
    the others wait on the lock (not on a collective, whose timeout a long download would outlast), then find it in
    place. The ranks must have read one commit (a branch moved while the job started: an error that says so). None
    for a hub model without safetensors weights, which loads the full way. A failure on any rank is raised on every
    rank alike."""
    import torch.distributed as dist

    from dist_lora.agree import raise_agreed
    from dist_lora.gather import broadcast_json

    if Path(name).is_dir():
        return name
    snapshot: Path | None = None
    error: BaseException | None = None
    try:
        snapshot = hub_snapshot(name, revision=revision, what=what)
    except Exception as e:
        error = e
    if not (dist.is_available() and dist.is_initialized()):
        if error is not None:
            raise error
        return str(snapshot) if snapshot is not None else None
    raise_agreed(error)
    commit = snapshot.name if snapshot is not None else None
    first = broadcast_json(commit)  # rank 0's
    if commit != first:
        error = ModelError(
            f"{what} {name!r}: rank {dist.get_rank()} read the hub's commit {commit}, rank 0 read {first}: the repo "
            f"changed while the job started; start it again, or pin the commit with model.revision={first}"
        )
    raise_agreed(error)
    return str(snapshot) if snapshot is not None else None


def files_of(config: Any, revision: str | None = None) -> Path | None:
    """The local directory of the files a model was loaded from: its config's ``name_or_path`` where that is a
    directory, else the hub cache's snapshot of that id at ``revision`` (``main`` when None); None where there is
    neither (a model built in code, a hub model not in this machine's cache). Never reaches the network."""
    name = str(getattr(config, "name_or_path", None) or "")
    if not name:
        return None
    if Path(name).is_dir():
        return Path(name)
    if _looks_like_path(name):
        return None
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(name, "config.json", revision=revision)
    except ValueError:  # (not a valid hub id)
        return None
    return Path(found).parent if isinstance(found, str) else None


@contextlib.contextmanager
def _outside_zero_init() -> Iterator[None]:
    """transformers builds every model under DeepSpeed's ``zero.Init`` while any HfDeepSpeedConfig of ZeRO-3 lives
    in the process (a ZeRO-3 model trained before); a meta-device build must not be partitioned."""
    from transformers.integrations import deepspeed as hf_deepspeed

    held = getattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", None)
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = held


def skip_weight_init() -> Any:
    """transformers' switch that skips random weight init (its meta tensors would only be drawn for nothing; the
    first draw on meta imports torch's reference ops, a second of a rank's start-up)."""
    from transformers.initialization import no_init_weights

    return no_init_weights()


def build_on_meta(name_or_path: str, dtype: torch.dtype, revision: str | None = None) -> Any:
    """The causal LM that ``config.json`` describes, its parameters on the meta device (no memory, no init) and
    its buffers computed on the CPU as ``from_pretrained`` computes them (rotary ``inv_freq``); tied weights tied.
    ``revision``: a hub id's commit, branch or tag (its config alone is fetched)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = load_model_config(name_or_path, revision)
    with _outside_zero_init(), init_empty_weights(include_buffers=False), skip_weight_init():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()
    return model


def set_attention(model: Any, implementation: str | None, what: str = "model.attn_implementation") -> None:
    """Switch ``model`` (built on the meta device, partitioned or loaded: only its config changes) to the attention
    kernel ``implementation``, as ``from_pretrained(attn_implementation=...)`` would; None keeps transformers'
    default. ModelError naming ``what`` where transformers refuses it (a kernel whose package is missing, one the
    architecture does not have) or the model cannot switch."""
    if implementation is None or implementation == model.config._attn_implementation:
        return
    if not model._can_set_attn_implementation():
        raise ModelError(
            f"{what}: {type(model).__name__} builds its attention without transformers' attention interface, so it "
            f"cannot use {implementation!r}; leave {what} unset"
        )
    try:
        model.set_attn_implementation(implementation)
    except (ImportError, ValueError) as e:
        raise ModelError(f"{what}={implementation!r} for {type(model).__name__}: {e}") from None


def enable_activation_checkpointing(model: Any, every: int = 1) -> None:
    """Recompute transformer blocks' activations in backward, non-reentrant: every block, or (``every`` N) the
    first of every N (HF's ``every_n_layers``, torchtitan's selective layer checkpointing), the others keeping
    theirs. HF's flag on each block: no wrapper module, so no new prefix in any parameter name (transformers'
    ``activation_checkpointing_enable``; its old name, ``gradient_checkpointing_enable``, warns once per rank)."""
    model.activation_checkpointing_enable(
        activation_checkpointing_kwargs={"use_reentrant": False}, every_n_layers=every
    )


def transformer_blocks(model: Any) -> list[Any]:
    """The model's transformer blocks, in order: the modules whose classes HF lists in ``_no_split_modules`` (what
    FSDP2 shards one by one, activation checkpointing recomputes and :func:`compile_blocks` compiles), also once
    ``fully_shard`` has made each an instance of ``FSDP<class>``, a subclass of its own."""
    from torch.distributed.fsdp import FSDPModule

    from dist_lora.lora import unwrap

    def class_name(module: Any) -> str:
        bases = type(module).__bases__ if isinstance(module, FSDPModule) else (type(module),)
        return next(base.__name__ for base in bases if base is not FSDPModule)

    model = unwrap(model)
    names = next((set(m._no_split_modules) for m in model.modules() if getattr(m, "_no_split_modules", None)), set())
    return [module for module in model.modules() if class_name(module) in names]


COMPILED = "_dist_lora_compiled"
"""The attribute :func:`compile_blocks` sets on each block it compiles."""


def compile_blocks(model: Any, what: str = "train.compile") -> int:
    """``torch.compile`` each transformer block's ``forward`` in place, as torchtune and torchtitan compile block by
    block; returns how many blocks. Call it after the engine wrapped the model: ``fully_shard`` makes each block an
    instance of a subclass, whose ``forward`` is the one to compile (transformers 5 checkpoints activations inside
    the ``forward`` of the block's own class, and only there).

    No module is wrapped (no ``_orig_mod.`` prefix), so no parameter name changes: a step saved compiled loads
    uncompiled and the other way round. Every block runs one compiled graph (the blocks' parameters are its inputs,
    not constants). Activation checkpointing recomputes inside it. What runs around a block's ``forward`` stays
    eager: the hooks on the block (FSDP2's all-gather and reshard) and what runs between blocks (the embeddings, the
    head, the loss). DDP's and ZeRO-1/2's hooks are on the gradients, outside the graph; ZeRO-3's, on each layer
    inside a block, would split it at every layer (refused: ``config.ZERO3_COMPILE``). Compilation happens at the
    first forward of each mode (training, then evaluation without gradients)."""
    blocks = transformer_blocks(model)
    if not blocks:
        raise ModelError(
            f"{what}: the model names no transformer block class (transformers' _no_split_modules), so there is "
            f"no block to compile; set {what}: false"
        )
    # the blocks share one code object, whose graphs torch caps at recompile_limit (8) before it runs it eagerly:
    # the first block's input needs no gradient, a micro-batch may need a mask or none and a length of its own,
    # evaluation runs without gradients, and each may combine with the others
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
    for block in blocks:
        if not getattr(block, COMPILED, False):
            block.forward = _compiled(block.forward, what)
            setattr(block, COMPILED, True)
    return len(blocks)


def _compiled(forward: Callable[..., Any], what: str) -> Callable[..., Any]:
    """``torch.compile(forward)``, whose compiler's failure (no C++ compiler for inductor's CPU kernels, a GPU that
    Triton does not support) is a :class:`ModelError` naming the key, with torch's reason."""
    from torch._dynamo.exc import BackendCompilerFailed

    compiled = torch.compile(forward)

    @functools.wraps(forward)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return compiled(*args, **kwargs)
        except BackendCompilerFailed as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelError(
                f"{what}: torch.compile could not compile the transformer blocks ({reason}); fix what it names, or "
                f"set {what}: false to train them uncompiled"
            ) from e

    return run


@contextlib.contextmanager
def adapters_on_cpu() -> Iterator[None]:
    """While LoRA is applied to a base on the meta device: PEFT creates each adapter on the CPU (drawing its init
    from the global RNG, as over a loaded base) and then moves it to its base layer's device twice (the layer's
    ``_move_adapter_to_device_of_base_layer``, the model's ``_replace_module``), which would turn it into an empty
    meta tensor. Keep it on the CPU instead (cast to the base's dtype, as PEFT does), so that the adapter's values
    are exactly those of a full load with the same seed (tests/test_sharded_load.py checks it bit for bit)."""
    from peft.tuners.lora.dora import DoraLinearLayer
    from peft.tuners.lora.layer import ParamWrapper
    from peft.tuners.lora.model import LoraModel
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer
    from peft.tuners.tuners_utils import BaseTunerLayer

    move_adapter = BaseTunerLayer._move_adapter_to_device_of_base_layer
    move_parameter_adapter = ParamWrapper._move_adapter_to_device_of_base_layer
    replace_module = LoraModel._replace_module
    dora_update = DoraLinearLayer.update_layer

    def on_meta(layer: Any) -> bool:  # (a module's own weight; a MoE layer's experts: their parameters)
        base = getattr(layer, "base_layer", layer)
        weight = getattr(base, "weight", None)
        return weight.is_meta if weight is not None else any(p.is_meta for p in base.parameters())

    def move(self: Any, adapter_name: str, device: torch.device | None = None) -> None:
        if isinstance(self, TrainableTokensLayer) and on_meta(self):
            return  # its rows are the base's: they stay on meta until read from the files (fill_from_files)
        move_adapter(self, adapter_name, torch.device("cpu") if device is None and on_meta(self) else device)

    def move_parameter(self: Any, adapter_name: str, device: torch.device | None = None) -> None:
        """PEFT's LoRA on a parameter (``target_parameters``; a MoE router) moves its adapter to the parameter's
        device and dtype: on meta, to the CPU in that dtype."""
        param = self.get_param()
        if param.is_meta:
            self.get_param = lambda: torch.empty(0, dtype=param.dtype)  # (an instance attribute, deleted below)
        try:
            move_parameter_adapter(self, adapter_name, device)
        finally:
            self.__dict__.pop("get_param", None)

    def dora_init(self: Any, *, base_layer: Any, lora_A: Any, lora_B: Any, scaling: float, **kw: Any) -> None:
        if getattr(base_layer, "weight", None) is not None and base_layer.weight.is_meta:
            # the magnitude is the norm of the base's rows: computed from the files (fill_from_files)
            self.weight = torch.nn.Parameter(torch.empty(lora_B.shape[0], dtype=lora_A.dtype, device="meta"))
        else:
            dora_update(self, base_layer=base_layer, lora_A=lora_A, lora_B=lora_B, scaling=scaling, **kw)

    def replace(self: Any, parent: Any, child_name: str, new_module: Any, child: Any) -> None:
        if on_meta(child):
            setattr(parent, child_name, new_module)  # as PEFT does, without moving the adapter to the meta device
        else:
            replace_module(self, parent, child_name, new_module, child)

    BaseTunerLayer._move_adapter_to_device_of_base_layer = move  # type: ignore[method-assign]
    ParamWrapper._move_adapter_to_device_of_base_layer = move_parameter  # type: ignore[method-assign]
    LoraModel._replace_module = replace  # type: ignore[method-assign]
    DoraLinearLayer.update_layer = dora_init  # type: ignore[method-assign]
    try:
        yield
    finally:
        BaseTunerLayer._move_adapter_to_device_of_base_layer = move_adapter  # type: ignore[method-assign]
        ParamWrapper._move_adapter_to_device_of_base_layer = move_parameter_adapter  # type: ignore[method-assign]
        LoraModel._replace_module = replace_module  # type: ignore[method-assign]
        DoraLinearLayer.update_layer = dora_update  # type: ignore[method-assign]


def prepare_base(
    base: Any,
    attn_implementation: str | None,
    loss_chunk_tokens: int,
    checkpoint_every: int = 0,
    settings: tuple[str, str] = ("model.attn_implementation", "train.loss_chunk_tokens"),
) -> None:
    """What the trainer, :func:`dist_lora.load_sharded` and ``dist-lora check`` all do to a base before LoRA, so that
    each builds the same model: no key-value cache (training reads none), the attention kernel, the chunked loss
    (:mod:`dist_lora.loss`), activation checkpointing of every ``checkpoint_every``-th block (0: none).
    ``settings`` names the first two in errors and warnings."""
    from dist_lora.loss import chunk_the_loss

    base.config.use_cache = False
    set_attention(base, attn_implementation, what=settings[0])
    if loss_chunk_tokens:
        chunk_the_loss(base, loss_chunk_tokens, what=settings[1])
    if checkpoint_every:  # HF's flag on each block: no wrapper, so no new prefix in any key
        enable_activation_checkpointing(base, checkpoint_every)


def apply_lora_seeded(base: Any, cfg: Any, name_or_path: str, revision: str | None, seed: int) -> Any:
    """LoRA over ``base``, loaded or on the meta device, in train mode (``from_pretrained`` returns eval mode: LoRA
    dropout and activation checkpointing need train mode). The adapter is drawn from ``torch.manual_seed(seed)``, as
    over a loaded base even on the meta device (:func:`adapters_on_cpu`): the same values on every rank, at every
    world size and on every backend."""
    from dist_lora.lora import apply_lora

    torch.manual_seed(seed)
    with adapters_on_cpu():
        model = apply_lora(base, cfg, name_or_path, revision)
    return model.train()


def compute_device() -> torch.device:
    """Where this rank computes: the current CUDA device (``torch.cuda.set_device``), else the CPU. Its shards live
    there too, but for FSDP2's CPU offload (host memory)."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def fill_from_files(model: Any, weights: BaseWeights) -> None:
    """The adapter tensors that PEFT derives from the base's values, computed from the files for a model built on
    the meta device (before it is sharded), exactly as PEFT computes them over a loaded base: DoRA's magnitude
    (the norm of each row of W + scaling * B @ A, by PEFT's own code, one base weight read at a time) and trainable
    token rows (the base's rows of those ids)."""
    from peft.tuners.lora.dora import DoraLinearLayer
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    from dist_lora.lora import base_key

    for name, module in model.named_modules():
        if isinstance(module, DoraLinearLayer) and module.weight.is_meta:
            layer_name, adapter = name.rsplit(".lora_magnitude_vector.", 1)
            layer = model.get_submodule(layer_name)
            weight = weights.read(f"{base_key(layer_name)}.weight")
            base = torch.nn.Linear(1, 1, bias=False)  # a stand-in holding the real weight, in the model's dtype
            base.weight = torch.nn.Parameter(weight.to(layer.get_base_layer().weight.dtype), requires_grad=False)
            module.fan_in_fan_out = layer.fan_in_fan_out
            DoraLinearLayer.update_layer(
                module,
                base_layer=base,
                lora_A=layer.lora_A[adapter].weight,
                lora_B=layer.lora_B[adapter].weight,
                scaling=layer.scaling[adapter],
            )
        elif isinstance(module, TrainableTokensLayer) and module.tied_adapter is None:
            key = f"{base_key(name.removesuffix('.token_adapter'))}.weight"
            for adapter, delta in list(module.trainable_tokens_delta.items()):
                if not delta.is_meta:
                    continue
                rows = torch.cat([weights.rows(key, i, i + 1) for i in module.token_indices[adapter]])
                rows = rows.to(delta.dtype)
                module.trainable_tokens_delta[adapter] = torch.nn.Parameter(rows.clone())
                module.trainable_tokens_original[adapter] = rows.clone()


def host_tensors(model: Any) -> dict[str, torch.Tensor]:
    """Copies of every parameter and buffer that is not on the meta device (the adapter, computed buffers), by
    canonical name: what sharded loading puts back after materializing, since the files do not hold them."""
    from dist_lora.lora import canonical_name

    out = {}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if not t.is_meta:
            out[canonical_name(name)] = t.detach().clone()
    return out


@contextlib.contextmanager
def collection_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off while a model is built. A build allocates some 10^5 objects (modules,
    parameters, hooks), which sets off full collections, and each one walks every object the process holds:
    after importing torch, transformers, PEFT and DeepSpeed, about 0.4 million, 0.1-0.2 s a walk. Measured, they
    were 0.25-0.3 s of a 0.7 s sharded load of a 1.5B base. Reference counting still frees what a build drops;
    the few cycles it leaves wait for the collector, which runs as before afterwards.

    The objects that exist when the build starts are frozen too (``gc.freeze``, unless the process froze some
    itself), so that a collection a library asks for by name walks only what the build made: DeepSpeed's ZeRO-3
    calls ``gc.collect()`` as it flattens the trained partitions, 0.3 s of a 1 s load when it walked everything."""
    enabled = gc.isenabled()
    freeze = gc.get_freeze_count() == 0
    gc.disable()
    if freeze:
        gc.freeze()
    try:
        yield
    finally:
        if freeze:
            gc.unfreeze()
        if enabled:
            gc.enable()


@functools.cache
def _libc() -> Any:
    """glibc, or None elsewhere; found once per process (``find_library`` runs ``ldconfig -p`` in a child process,
    which a sharded load would otherwise start as it returns the freed heap)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    return libc if libc is not None and hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def release_freed_memory() -> None:
    """Hand the heap that loading freed back to the kernel (glibc ``malloc_trim``). A sharded load allocates and
    frees a whole tensor at a time; glibc keeps those pages in its arenas, and a rank's resident memory would then
    stay at the load's high-water mark for the whole run. Elsewhere (not glibc) this does nothing."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)
MMAP_THRESHOLD_BYTES = 4 << 20


def return_large_blocks_to_the_os() -> None:
    """Serve every host allocation of 4 MiB or more with its own mapping, unmapped when freed. glibc otherwise
    raises that threshold to the largest block freed so far (up to 32 MiB), and from then on serves FSDP2's and
    ZeRO-3's per-block all-gather buffers from its heap, which it rarely returns: measured, a 1.42 GB base at
    world size 4 held 1.87 GB per rank after two training steps instead of 0.95 GB. Only for the engines that
    all-gather parameters: under DDP and in one process the large blocks are activations, reused every step, and
    mapping them afresh each time cost 2-3% of a step (measured). A threshold the user set (MALLOC_MMAP_THRESHOLD_)
    is left alone; elsewhere (not glibc) this does nothing."""
    libc = _libc()
    if libc is not None and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
