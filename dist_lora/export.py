"""Getting adapters out: pull a verified step to a local dir, merge it into its base, load several onto one base."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dist_lora.api import adapter_mismatches, model_of, read_adapter, resolve_step, saved_revision
from dist_lora.checkpoint import (
    CheckpointError,
    LoadedStep,
    read_manifest,
    read_peft_adapter,
    read_verified,
    rehash_manifest,
    saved_config,
    template_text,
)
from dist_lora.constants import ADAPTER_CONFIG_NAME, CHAT_TEMPLATE_NAME, MANIFEST_NAME, TRAINER_STATE_NAME
from dist_lora.lora import base_fingerprint, base_key, check_base, lora_scaling
from dist_lora.model import (
    ModelError,
    base_directory,
    build_on_meta,
    load_tokenizer,
    resolve_model_path,
)
from dist_lora.storage import Storage, fsync_dir, sync_tree
from dist_lora.weights import SAFE_DTYPES, SAFE_INDEX_NAME, BaseWeights

log = logging.getLogger(__name__)


def local_output(out_dir: str | Path, verb: str) -> Path:
    """``out_dir`` as a local directory's path; a URL is refused (``Path`` would make ``s3://b/x`` a directory
    ``s3:`` under the current one), naming what to do instead."""
    if isinstance(out_dir, str) and "://" in out_dir:
        raise CheckpointError(
            f"{verb} writes into a local directory, not {out_dir}: {verb} into one here, then copy it to the store "
            "(aws s3 cp --recursive, gsutil cp -r, hf upload)"
        )
    return Path(out_dir)


@contextlib.contextmanager
def written_whole(out: Path, verb: str) -> Iterator[Path]:
    """A directory that appears at ``out`` complete or not at all: the caller writes into a hidden sibling, which
    is renamed to ``out`` once every file is in it (one rename, in the same directory). An error or an interrupt
    removes the sibling, so a merge or a pull that died half-way never leaves a model or an adapter that looks
    whole (a merged model with no chat template, or some of its files). ``out`` must be new or an empty
    directory: nothing in it is ever overwritten. Every file is fsynced before the rename, and the rename after it,
    so a power cut does not leave names over empty files either. ``verb``: what writes it, for the error."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(
            f"{out} exists and is {'not empty' if out.is_dir() else 'not a directory'}; {verb} into a new directory"
        )
    target = out.resolve()  # (a symlink to an empty directory: filled where it points)
    staging = target.parent / f".{target.name}.partial-{os.getpid()}-{os.urandom(4).hex()}"
    try:
        staging.mkdir(parents=True)
    except OSError as e:
        raise CheckpointError(
            f"cannot write {out} ({e.strerror} in {target.parent}): {verb} into a directory this user can write"
        ) from e
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    sync_tree(staging)
    try:
        staging.rename(target)  # (replaces an empty directory, never a full one)
    except OSError as e:
        raise CheckpointError(
            f"{out} was filled by something else while {verb} wrote into it; its result is kept in {staging}"
        ) from e
    fsync_dir(str(target.parent))


def pull(
    step_or_dir: str,
    out_dir: str | Path,
    *,
    base: str | None = None,
    storage_options: dict[str, Any] | None = None,
) -> Path:
    """Download a step (or a dir's newest verified step) from anywhere into a local dir, verifying every file; or
    an adapter PEFT saved (a directory, a URL or a hub id: :func:`peft_adapter_at`), copied as it is.

    The result is what ``PeftModel.from_pretrained`` and vLLM load, and ``dist-lora verify`` checks. An existing,
    non-empty ``out_dir`` is refused: nothing is overwritten. ``base`` rewrites ``base_model_name_or_path`` in the
    copy's adapter_config.json (a local directory made absolute; the saved base's ``revision`` dropped) and its
    manifest entry, so that PEFT finds the base where it is on this machine; a local ``base`` is checked against the
    step's fingerprint of its base first (another model refused, other weights of the same one warned about), as
    PEFT and vLLM load an adapter over any base whose adapted layers fit.
    """
    out = local_output(out_dir, "pull")
    with written_whole(out, "pull") as staging:
        try:
            step = resolve_step(step_or_dir, storage_options)
        except CheckpointError:
            found = peft_adapter_at(step_or_dir, storage_options)
            if found is None:
                raise
            pulled = _pull_peft(*found, staging, base)
        else:
            pulled = _pull_step(step, staging, base)
    log.info("pulled %s into %s", pulled, out)
    return out


def _pull_step(step: Storage, out: Path, base: str | None) -> str:
    """:func:`pull` of a step: its files verified and written into ``out``, with the chat template it trained with
    beside them. What was pulled, for the log."""
    manifest = read_manifest(step)
    files = read_verified(step, manifest)
    manifest_bytes = step.read(MANIFEST_NAME)
    if base:
        from dist_lora.model import resolve_model_path

        base = resolve_model_path(base, "--base")
        if Path(base).is_dir():  # (its structure from config.json alone, on the meta device; a hub id is not fetched)
            fingerprint = base_fingerprint(build_on_meta(base, torch.float32))
            saved = manifest.get("base_fingerprint", {})
            check_base(step.url, saved, fingerprint, "pull --base with the base", base=base, error=CheckpointError)
        config = json.loads(files[ADAPTER_CONFIG_NAME])
        config["base_model_name_or_path"] = base
        config["revision"] = None  # the saved base's commit: not the new base's
        files[ADAPTER_CONFIG_NAME] = json.dumps(config, indent=2).encode()
        manifest_bytes = rehash_manifest(manifest, {ADAPTER_CONFIG_NAME: files[ADAPTER_CONFIG_NAME]})
    local = Storage(str(out))
    for name, data in files.items():
        local.write(name, data)
    local.write(MANIFEST_NAME, manifest_bytes)
    state = json.loads(files[TRAINER_STATE_NAME])
    template = template_text(state.get("chat_template"))
    if template is not None:  # (outside the manifest: served beside the adapter, vLLM's --chat-template)
        (out / CHAT_TEMPLATE_NAME).write_text(served_template(template, saved_config(state)), encoding="utf-8")
    with_template = "" if template is None else f"; beside it, the run's chat template {CHAT_TEMPLATE_NAME}"
    return f"{step.url} ({len(files)} files verified{with_template})"


def peft_adapter_at(
    path: str, storage_options: dict[str, Any] | None = None
) -> tuple[Storage, dict[str, dict[str, Any]]] | None:
    """Where an adapter PEFT saved is (``adapter_config.json`` without dist_lora's manifest), with its listing:
    ``path`` itself (a directory or a URL), or a hub id's snapshot; None where there is none."""
    from dist_lora.model import hub_adapter

    store = Storage(path, storage_options)
    names = store.listdir()
    if ADAPTER_CONFIG_NAME in names and MANIFEST_NAME not in names:
        return store, names
    snapshot = None if names else hub_adapter(path, "pull")
    if snapshot is None:
        return None
    store = Storage(str(snapshot))
    return store, store.listdir()


def _pull_peft(store: Storage, names: dict[str, dict[str, Any]], out: Path, base: str | None) -> str:
    """:func:`pull` of an adapter PEFT saved: its files (the top level's) copied as they are into ``out``; ``base``
    checked to fit it (every adapter tensor's key and shape, over the base built on the meta device from its
    config.json) and written into the copy's ``adapter_config.json``. It has no manifest: nothing to verify, said
    in what it returns for the log."""
    loaded = read_peft_adapter(store, names)  # (LoRA, in safetensors, its config a JSON object: else an error)
    assert loaded is not None
    files = {  # (a hub snapshot's files are symlinks into its blobs)
        name: store.read(name)
        for name, info in sorted(names.items())
        if info["type"] == "file" or (info["type"] == "other" and Path(store.path(name)).is_file())
    }
    if base:
        from dist_lora.model import resolve_model_path

        base = resolve_model_path(base, "--base")
        if Path(base).is_dir():  # (a hub id is not fetched)
            _check_fits(loaded, base)
        config = dict(loaded.adapter_config, base_model_name_or_path=base, revision=None)
        files[ADAPTER_CONFIG_NAME] = json.dumps(config, indent=2).encode()
    local = Storage(str(out))
    for name, data in files.items():
        local.write(name, data)
    return f"{store.url} ({len(files)} files; an adapter PEFT saved: no manifest, so no sha256 to verify it by)"


def _check_fits(loaded: LoadedStep, base: str) -> None:
    """An adapter PEFT saved against ``base``'s structure: PEFT applies its config to the base built on the meta
    device, and every adapter tensor must be one the layers hold, of their shape (CheckpointError naming them)."""
    import peft

    from dist_lora.lora import adapter_parameters

    model = build_on_meta(base, torch.float32)
    # (named after the base checked, or PEFT warns that the config's base was renamed)
    config = peft.PeftConfig.from_peft_type(
        **dict(loaded.adapter_config, inference_mode=False, base_model_name_or_path=model.name_or_path)
    )
    try:
        model = peft.get_peft_model(model, config)
    except ValueError as e:  # (PEFT: no module of the base matches the adapter's targets)
        raise CheckpointError(f"{loaded.url} does not fit the base {base}: {str(e).rstrip('.')}") from e
    expected = {k: p.shape for k, p in adapter_parameters(model, loaded.manifest["bias"]).items()}
    mismatches = adapter_mismatches(expected, {k: t.shape for k, t in loaded.state.weights.items()})
    if mismatches:
        raise CheckpointError(
            f"{loaded.url} does not fit the base {base}:\n  "
            + "\n  ".join(mismatches)
            + "\n  nothing written: pull it with --base of the model it was trained over"
        )


def merge(
    step_or_dir: str,
    out_dir: str | Path,
    *,
    base: str | None = None,
    dtype: torch.dtype | None = None,
    storage_options: dict[str, Any] | None = None,
) -> Path:
    """Merge a step into its base (the one ``adapter_config.json`` names, or ``base``) and write the merged model.

    A base in safetensors files (a local directory, or a hub id's snapshot: :func:`~dist_lora.model.hub_snapshot`)
    is merged by streaming (:func:`stream_merge`: one tensor of the base in memory at a time, the output laid out
    in the same files with the same index; ``dtype``: its floating-point tensors written in that dtype, each merged
    one rounded once from float32). A base in pickle files only takes the whole-model path: load the base (in
    ``dtype``), apply the adapter, ``merge_and_unload``, ``save_pretrained``.
    """
    out = local_output(out_dir, "merge")
    with written_whole(out, "merge") as staging:
        _merge_into(staging, step_or_dir, base, dtype, storage_options)
    log.info("merged %s into %s", step_or_dir, out)
    return out


def _merge_into(
    out: Path, step_or_dir: str, base: str | None, dtype: torch.dtype | None, storage_options: dict[str, Any] | None
) -> None:
    """:func:`merge`'s work, written into ``out`` (:func:`written_whole`'s hidden directory)."""
    loaded = read_adapter(step_or_dir, storage_options, None)  # a step, or an adapter PEFT saved
    base_path = base or loaded.adapter_config.get("base_model_name_or_path")
    if not base_path:
        raise CheckpointError(f"{loaded.url} names no base model; pass --base")
    what = "--base" if base else f"base_model_name_or_path of {loaded.url}/adapter_config.json (override: --base)"
    revision = saved_revision(loaded.adapter_config, base_path)
    base_path = resolve_model_path(base_path, what)
    directory = base_directory(base_path, what, revision)  # a hub id: its snapshot
    if directory is not None:
        try:
            stream_merge(loaded, directory, out, dtype)
            return
        except ModelError as e:  # pickle files, or tensors it cannot stream (joined MoE experts): from_pretrained
            log.warning("%s; merging the whole model in memory instead", e)
            # (a base file found truncated mid-stream: the files written before it go, not mixed into the other)
            shutil.rmtree(out)
            out.mkdir()
    model: Any = model_of(loaded, base=base_path, dtype=dtype)
    merged = model.merge_and_unload()
    merged.save_pretrained(out)
    try:
        load_tokenizer(base_path, what, revision).save_pretrained(out)
    except ModelError as e:  # a base without a tokenizer: the merged weights are still complete
        log.warning("no tokenizer copied: %s", e)
    _write_chat_template(loaded, out)


def _write_chat_template(loaded: LoadedStep, out: Path) -> None:
    """The merged model's tokenizer made to render chats as the run's samples were: its chat template (the run's
    ``data.chat_template``, which its trainer_state.json holds, else the base's own) written as
    ``chat_template.jinja``, which transformers' tokenizer (and so vLLM) reads before a template in
    tokenizer_config.json, putting the run's ``data.system_prompt`` first in a conversation that has no system turn
    (:func:`with_system_default`) as the run did. Where the template closes an assistant turn with a special token
    of its own (``<|im_end|>`` over a base that ends text with ``<|endoftext|>``), that token joins
    generation_config.json's ``eos_token_id``, which transformers' ``generate`` and vLLM stop at: else the merged
    model talks on past the end of each answer (:func:`_stop_at_turn_end`)."""
    system = system_prompt(loaded.run_config)
    if not loaded.chat_template and system is None:
        return
    try:
        tokenizer = load_tokenizer(str(out), "the merged model")
    except ModelError:  # (no tokenizer copied, said above)
        tokenizer = None
    template = loaded.chat_template or template_text(getattr(tokenizer, "chat_template", None))
    if template is None:  # (a system prompt, and no template to put it in)
        return
    template = served_template(template, loaded.run_config)
    (out / CHAT_TEMPLATE_NAME).write_text(template, encoding="utf-8")
    log.info(
        "wrote the chat template the run trained with into %s%s",
        out / CHAT_TEMPLATE_NAME,
        "" if system is None else ", its data.system_prompt first where a conversation has no system turn",
    )
    if tokenizer is not None:
        tokenizer.chat_template = template
        _stop_at_turn_end(tokenizer, out)


def _stop_at_turn_end(tokenizer: Any, out: Path) -> None:
    """The special token that closes the tokenizer's chat template's assistant turn (:func:`turn_end_ids`) added
    to ``out``'s generation_config.json's ``eos_token_id``, where it is not there yet."""
    from transformers import AutoConfig, GenerationConfig
    from transformers.utils import GENERATION_CONFIG_NAME

    from dist_lora.generate import turn_end_ids

    ends = turn_end_ids(tokenizer)
    if (out / GENERATION_CONFIG_NAME).is_file():
        generation = GenerationConfig.from_pretrained(out)
    else:
        generation = GenerationConfig.from_model_config(AutoConfig.from_pretrained(out))
    eos = generation.eos_token_id if generation.eos_token_id is not None else tokenizer.eos_token_id
    had = [eos] if isinstance(eos, int) else list(eos or [])
    stops = list(dict.fromkeys([*had, *ends]))
    if stops != had:
        generation.eos_token_id = stops
        generation.save_pretrained(out)
        log.info(
            "%s: eos_token_id %s -> %s (%s closes the chat template's assistant turn: generation stops there)",
            out / GENERATION_CONFIG_NAME,
            had,
            stops,
            tokenizer.convert_ids_to_tokens(ends[0]),
        )


def system_prompt(run_config: dict[str, Any]) -> str | None:
    """The ``data.system_prompt`` of a run's config (:attr:`LoadedStep.run_config`)."""
    return (run_config.get("data") or {}).get("system_prompt")


def served_template(template: str, run_config: dict[str, Any]) -> str:
    """The chat template to serve a run's adapter with: ``template`` (the one its samples were rendered with), its
    ``data.system_prompt`` first where a conversation has no system turn (:func:`with_system_default`)."""
    system = system_prompt(run_config)
    return template if system is None else with_system_default(template, system)


def with_system_default(template: str, system: str) -> str:
    """``template`` that puts ``system`` first in a conversation that has no system turn, as ``data.system_prompt``
    did to each conversation of the run (:func:`~dist_lora.data.with_system`), so that a server asked without one
    renders the prompt the model trained on (LLaMA-Factory and axolotl bake their default system message into the
    exported template too). ``system`` goes in as a Jinja string literal (JSON's escapes are Jinja's)."""
    literal = json.dumps(system, ensure_ascii=False)
    return (
        "{%- if not (messages | selectattr('role', 'equalto', 'system') | list) %}"
        f"{{%- set messages = [{{'role': 'system', 'content': {literal}}}] + messages %}}"
        "{%- endif %}" + template
    )


def _token_indices(config: dict[str, Any], layer: str) -> list[int]:
    """The token ids a ``trainable_token_indices`` config trains in embedding ``layer``."""
    indices = config.get("trainable_token_indices")
    if isinstance(indices, dict):
        for name, ids in indices.items():
            if layer == name or layer.endswith("." + name):
                return list(ids)
        raise CheckpointError(
            f"the adapter trains token rows of {layer}, but trainable_token_indices {indices} in its "
            "adapter_config.json names no such layer: the step's files disagree (was adapter_config.json edited?); "
            "restore the file the step was saved with"
        )
    return list(indices or [])


@dataclass
class _Edit:
    """What the merge does to one base tensor."""

    lora: tuple[torch.Tensor, torch.Tensor, float] | None = None  # A, B, scaling
    magnitude: torch.Tensor | None = None  # DoRA
    replace: torch.Tensor | None = None  # a modules_to_save copy, a trained bias
    rows: tuple[list[int], torch.Tensor] | None = None  # trainable tokens
    experts: _Experts | None = None  # LoRA on a MoE layer's fused experts (PEFT's ParamWrapper)

    def experts_only(self) -> bool:
        return self.experts is not None and self.lora is self.magnitude is self.replace is self.rows is None

    def replace_only(self) -> bool:
        return self.replace is not None and self.lora is self.magnitude is self.rows is self.experts is None


@dataclass
class _Experts:
    """PEFT's LoRA on a parameter that holds several experts, ``(experts, X, Y)``: lora_A is ``(r * experts, in)``,
    lora_B ``(out, r * experts)``, and expert ``e``'s delta is ``scaling * B_e @ A_e`` as ``(out, in)`` or, where
    the experts are laid out ``(in, out)`` (PEFT's ``_did_swap_in_out_features`` false), its transpose: PEFT's
    ``ParamWrapper.get_delta_weight``, an expert's rows at a time."""

    a: torch.Tensor
    b: torch.Tensor
    scaling: float
    count: int
    out_first: bool

    def delta(self, shape: tuple[int, ...], first: int, last: int) -> torch.Tensor:
        """Elements ``[first, last)`` of the flattened delta of a ``shape`` tensor, within one expert, in float32."""
        cols, slab = shape[2], shape[1] * shape[2]
        expert = first // slab
        first, last = first - expert * slab, last - expert * slab
        a = self.a.float().reshape(self.count, -1, self.a.shape[-1])[expert]  # (r, in)
        b = self.b.float().reshape(self.b.shape[0], -1, self.count)[:, :, expert]  # (out, r)
        top, bottom = first // cols, -(-last // cols)
        block = b[top:bottom] @ a if self.out_first else a[:, top:bottom].T @ b.T
        return (block * self.scaling).reshape(-1)[first - top * cols : last - top * cols]


def _edits(loaded: LoadedStep, on_parameters: dict[str, Any] | None = None) -> dict[str, _Edit]:
    """Base tensor name -> its edit, from the step's adapter tensors (PEFT's key names); ``on_parameters``: PEFT's
    LoRA on parameters, by the module path its keys name (:func:`_parameter_wrappers`)."""
    config, adapter = loaded.adapter_config, loaded.state.weights
    edits: dict[str, _Edit] = {}
    for key, value in adapter.items():
        if ".lora_A." in key:
            module = key.split(".lora_A.")[0]
            b = adapter[key.replace(".lora_A.", ".lora_B.")]
            wrapper = (on_parameters or {}).get(module)
            if wrapper is None:  # a layer's LoRA
                layer = base_key(module)
                edit = edits.setdefault(f"{layer}.weight", _Edit())
                if edit.lora is not None:  # (PEFT's wrappers nested on one module, each on a parameter of its own)
                    raise ModelError(f"{loaded.url} holds several LoRA adapters of {layer}: merge the whole model")
                edit.lora = (value, b, lora_scaling(config, layer, value.shape[0]))
            elif wrapper.num_experts > 1:  # PEFT's LoRA on a parameter that holds several experts
                count, out_first = wrapper.num_experts, wrapper._did_swap_in_out_features
                experts = _Experts(value, b, _scaling(wrapper), count, out_first)
                edits.setdefault(_parameter_name(module, wrapper), _Edit()).experts = experts
            else:  # on one matrix (a router's weight): as on a layer
                edits.setdefault(_parameter_name(module, wrapper), _Edit()).lora = (value, b, _scaling(wrapper))
        elif key.endswith(".lora_magnitude_vector"):
            edits.setdefault(
                f"{base_key(key.removesuffix('.lora_magnitude_vector'))}.weight", _Edit()
            ).magnitude = value
        elif key.endswith(".token_adapter.trainable_tokens_delta"):
            layer = base_key(key.removesuffix(".token_adapter.trainable_tokens_delta"))
            edits.setdefault(f"{layer}.weight", _Edit()).rows = (_token_indices(config, layer), value)
        elif ".lora_B." not in key:
            if ".lora_" in key:
                raise CheckpointError(f"streaming merge does not know adapter tensor {key} of {loaded.url}")
            edits.setdefault(base_key(key), _Edit()).replace = value
    return edits


def _parameter_wrappers(loaded: LoadedStep, base_dir: str) -> dict[str, Any]:
    """PEFT's LoRA on parameters (``target_parameters``; PEFT's own choice for a router that is not an
    ``nn.Linear``): each ``ParamWrapper`` by the module path that the adapter's keys name, as PEFT builds them over
    the base from the step's adapter_config.json (on the meta device: their structure only). PEFT nests one wrapper
    per parameter of a module, and which is which is PEFT's to say."""
    if not loaded.adapter_config.get("target_parameters"):
        return {}
    import peft
    from peft.tuners.lora.layer import ParamWrapper

    config = peft.PeftConfig.from_peft_type(**loaded.adapter_config)  # (as PEFT reads it: unknown keys dropped)
    model = peft.get_peft_model(build_on_meta(base_dir, torch.float32), config)
    return {name: m for name, m in model.named_modules() if isinstance(m, ParamWrapper)}


def _joined_pieces(
    edits: dict[str, _Edit], weights: BaseWeights
) -> dict[str, list[tuple[int, int, _Edit, tuple[int, ...], int]]]:
    """Where the edits the files' own tensors cannot take whole land in them: LoRA on a MoE layer's fused experts,
    and a copy (``modules_to_save``) that replaces a tensor the files hold as several that transformers joins (a
    MoE layer's experts, one tensor each). By the files' tensor, its elements ``[first, last)`` get elements
    ``[at, at + last - first)`` of the edit of the model's tensor (of ``shape``): the experts' LoRA one expert's
    slab at a time (its delta is an expert's), a copy in the pieces that hold it."""
    names = {entry: key for key, entry in weights.entries.items()}
    out: dict[str, list[tuple[int, int, _Edit, tuple[int, ...], int]]] = {}
    for name, edit in edits.items():
        if edit.experts is None and (edit.replace is None or weights.stored_as(name) is not None):
            continue  # (edited whole, in the files' own tensor)
        shape = tuple(weights.shape(name))
        numel = math.prod(shape)
        if edit.experts is not None:
            if len(shape) != 3:
                raise ModelError(f"LoRA on the experts of {name}, of shape {list(shape)}: a streaming merge takes 3-D")
            slab = shape[1] * shape[2]
            spans = [(at, at + slab) for at in range(0, numel, slab)]
        else:
            spans = [(0, numel)]
        for at, end in spans:
            for entry, first, last in weights.ranges(name, at, end):
                out.setdefault(names[entry], []).append((first, last, edit, shape, at))
                at += last - first
    return out


def _parameter_name(module: str, wrapper: Any) -> str:
    """The base's name of the parameter a ``ParamWrapper`` (at ``module``) adapts."""
    return f"{base_key(module)}.{wrapper.parameter_name}"


def _scaling(wrapper: Any) -> float:
    return float(next(iter(wrapper.scaling.values())))


def _same(a: _Edit, b: _Edit) -> bool:
    """Whether two edits replace a tensor by the same values (and do nothing else)."""
    if a.replace is None or b.replace is None or any(e.lora or e.magnitude is not None or e.rows for e in (a, b)):
        return False
    return torch.equal(a.replace, b.replace)


def _merged(tensor: torch.Tensor, edit: _Edit, fan_in_fan_out: bool, dtype: torch.dtype) -> torch.Tensor:
    """One base tensor with its edit applied, as PEFT's ``merge_and_unload`` computes it (in float32), in ``dtype``."""
    if edit.replace is not None:
        return edit.replace.to(dtype)
    w = tensor.float()
    if edit.rows is not None:
        ids, delta = edit.rows
        w = w.index_copy(0, torch.tensor(ids), delta.float())
    if edit.lora is not None:
        a, b, scaling = edit.lora
        w = w.T if fan_in_fan_out else w  # PEFT's orientation: (out_features, in_features)
        w = w + (b.float() @ a.float()) * scaling
        if edit.magnitude is not None:  # DoRA: each output row rescaled to the trained magnitude
            w = (edit.magnitude.float() / torch.linalg.norm(w, dim=1)).view(-1, 1) * w
        w = w.T if fan_in_fan_out else w
    return w.to(dtype)


_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".safetensors", ".h5", ".msgpack", ".gguf", ".onnx", ".pkl")


def _other_weights(name: str) -> bool:
    """Whether a file of the base directory is another copy of its weights (pickles, TF, Flax, GGUF and their
    indexes), which a streaming merge does not rewrite."""
    return name.endswith(_WEIGHT_SUFFIXES) or (name.endswith(".index.json") and name != SAFE_INDEX_NAME)


def _header_in(header: bytes, keys: list[str], dtype: torch.dtype) -> tuple[bytes, int]:
    """A safetensors file's header (length prefix included) with its floating-point tensors in ``dtype``, their
    offsets laid out again in the same order, and the bytes of its tensors then."""
    names = {t: name for name, t in SAFE_DTYPES.items()}
    meta = json.loads(header[8:])
    offset = 0
    for key in keys:
        info = meta[key]
        if SAFE_DTYPES[info["dtype"]].is_floating_point:
            info["dtype"] = names[dtype]
        size = math.prod(info["shape"]) * SAFE_DTYPES[info["dtype"]].itemsize
        info["data_offsets"] = [offset, offset + size]
        offset += size
    text = json.dumps(meta, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # (safetensors aligns the data to 8 bytes)
    return struct.pack("<Q", len(text)) + text, offset


def _config_in(text: str, dtype: torch.dtype) -> str:
    """A model's config.json naming ``dtype`` as the weights' (``dtype``, and ``torch_dtype`` where it has one)."""
    config = json.loads(text)
    name = str(dtype).removeprefix("torch.")
    for key in [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]:
        config[key] = name
    return json.dumps(config, indent=2, sort_keys=True) + "\n"


def stream_merge(loaded: LoadedStep, base_dir: str, out_dir: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Merge a step into a local safetensors base one tensor at a time, as PEFT's ``merge_and_unload`` would:
    each LoRA target weight gets ``scaling * B @ A`` (per-layer alpha and rank, rsLoRA; transposed for a
    ``fan_in_fan_out`` layer such as GPT-2's Conv1D), DoRA rescales its rows to the trained magnitudes, trained
    token rows and ``modules_to_save`` copies replace the base's, and so do the biases the checkpoint trained;
    LoRA on a MoE layer's fused experts adds each expert's delta to the elements of the files that hold that
    expert, and a copy of experts the files hold one tensor each replaces them piece by piece
    (:func:`_joined_pieces`).
    Every file is written under its own name with its own header (the dtypes and shapes do not change; ``dtype``:
    the floating-point tensors in that dtype, each merged one rounded once from float32, and the index's total
    size and config.json's dtype say so), its tensors streamed in order, and the index and the other files of the
    base directory (config, generation config, tokenizer) are copied. Peak memory is the largest tensor of the
    base, never a file or the model."""
    from transformers.pytorch_utils import Conv1D

    out = Path(out_dir)
    model = build_on_meta(base_dir, torch.float32)  # the layout: which layers are (in, out), which tensors tied
    fan_in_fan_out = {name for name, module in model.named_modules() if isinstance(module, Conv1D)}
    if loaded.verified:  # (an adapter PEFT saved has no fingerprint of its base: its layers' shapes are checked)
        check_base(
            loaded.url,
            loaded.manifest.get("base_fingerprint", {}),
            base_fingerprint(model),
            "merge (--base) into the base",
            base=base_dir,
            error=CheckpointError,
        )
    weights = BaseWeights(base_dir).follow(model)
    edits = _checked_edits(loaded, base_dir, model, weights, fan_in_fan_out)
    in_files = {  # the files' names of the tensors edited whole -> the model's
        stored: k for k, e in edits.items() if (stored := weights.stored_as(k)) is not None and not e.experts_only()
    }
    pieces = _joined_pieces(edits, weights)

    def merged(key: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if key in in_files:
            name = in_files[key]
            tensor = _merged(tensor, edits[name], name.removesuffix(".weight") in fan_in_fan_out, dtype)
        if key in pieces:  # the elements of this tensor that a fused or joined tensor's edit changes
            tensor = _with_pieces(tensor, pieces[key], dtype)
        return tensor.to(dtype)

    out.mkdir(parents=True, exist_ok=True)
    names = sorted(set(weights.files.values()))
    total = sum(_write_merged_file(out / name, weights, name, merged, dtype) for name in names)
    _copy_the_rest(Path(base_dir), out, names, dtype, total)
    _write_chat_template(loaded, out)
    log.info("merged %s by streaming, one tensor at a time (%d tensors changed)", loaded.url, len(edits))
    return out


def _checked_edits(
    loaded: LoadedStep, base_dir: str, model: Any, weights: BaseWeights, fan_in_fan_out: set[str]
) -> dict[str, _Edit]:
    """The step's edits of ``base_dir``'s tensors (:func:`_edits`), each checked to fit the base before a byte is
    written: a separate copy of a tied tensor, a tensor the base does not hold, a copy or a LoRA update of another
    shape, and an edit of experts the files hold in a way a stream cannot write, are each refused, named."""
    edits = _edits(loaded, _parameter_wrappers(loaded, base_dir))
    for alias, key in weights.aliases.items():  # one copy trained for both tied names (ensure_weight_tying)
        if alias in edits and key in edits and _same(edits[alias], edits[key]):
            del edits[alias]
    tied = [k for k in edits if k in weights.aliases]
    if tied:
        embedding = model.get_input_embeddings()
        embedding_weight = next(f"{n}.weight" for n, m in model.named_modules() if m is embedding)
        ties = [
            f"{k} is tied to {'the input embedding ' if weights.aliases[k] == embedding_weight else ''}"
            f"{weights.aliases[k]}"
            for k in tied
        ]
        raise CheckpointError(
            f"{loaded.url} trained a separate copy of a tied tensor ({'; '.join(ties)} in this base), which a merged "
            "model cannot hold (its files store one tensor for both): use the adapter with PeftModel, or train "
            "with lora.ensure_weight_tying: true (one copy for both) or without modules_to_save on it"
        )
    missing = [k for k in edits if k not in weights]
    if missing:
        raise CheckpointError(f"{loaded.url} adapts {missing[:5]}, which {base_dir} does not hold: not its base?")
    for name, edit in edits.items():  # a copy that replaces a tensor (whole, or in the pieces that hold it)
        if edit.replace is not None and list(edit.replace.shape) != weights.shape(name):
            raise CheckpointError(
                f"the step's copy of {name} has shape {list(edit.replace.shape)}, the base's {weights.shape(name)}: "
                "the step does not fit this base"
            )
        if edit.lora is not None:  # B @ A as (out, in); the base's tensor transposed for a fan_in_fan_out layer
            a, b, _ = edit.lora
            delta, held = [b.shape[0], a.shape[1]], weights.shape(name)
            if name.removesuffix(".weight") in fan_in_fan_out:
                held = held[::-1]
            if delta != held:
                raise CheckpointError(
                    f"{loaded.url}'s LoRA of {name} makes a {delta} update, where the base's weight is {held} "
                    f"(out, in): the adapter was trained over another model than {base_dir}"
                )
    unwritable = sorted(
        k for k, e in edits.items() if weights.stored_as(k) is None and not (e.experts_only() or e.replace_only())
    )
    if unwritable:
        raise ModelError(  # (merge then merges the whole model)
            f"{loaded.url} changes {unwritable[:5]}, which {base_dir}'s files hold as several tensors that "
            "transformers joins as it loads them (a MoE layer's experts), in a way a streaming merge cannot write "
            "into the files' own tensors"
        )
    return edits


def _with_pieces(
    tensor: torch.Tensor, pieces: list[tuple[int, int, _Edit, tuple[int, ...], int]], dtype: torch.dtype
) -> torch.Tensor:
    """A tensor of the files with the edits of the fused or joined tensors that hold some of its elements applied
    (:func:`_joined_pieces`), in float32, then in ``dtype``."""
    flat = tensor.float().reshape(-1)
    for first, last, edit, shape, at in pieces:
        if edit.experts is not None:
            flat[first:last] += edit.experts.delta(shape, at, at + last - first)
        elif edit.replace is not None:
            flat[first:last] = edit.replace.reshape(-1)[at : at + last - first]
    return flat.to(dtype).view(tensor.shape)


def _write_merged_file(
    path: Path,
    weights: BaseWeights,
    name: str,
    merged: Callable[[str, torch.Tensor, torch.dtype], torch.Tensor],
    dtype: torch.dtype | None,
) -> int:
    """One file of the merged model, streamed: the base file ``name``'s header (its floating-point tensors in
    ``dtype`` where one is given), then each tensor read, ``merged`` and written in the header's order. The bytes of
    its tensors where ``dtype`` changed them (the index's total size), else 0."""
    header, keys = weights.layout(name)
    size = 0
    if dtype is not None:
        header, size = _header_in(header, keys, dtype)
    with open(path, "wb") as f:
        f.write(header)
        for key in keys:
            tensor = weights.read(key)
            wanted = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
            tensor = merged(key, tensor, wanted)
            f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)  # its bytes, not a copy
    return size


def _copy_the_rest(base_dir: Path, out: Path, written: list[str], dtype: torch.dtype | None, total: int) -> None:
    """The base directory's other files copied beside the merged ones (config, generation config, tokenizer; with
    ``dtype``, the index's total size and config.json's dtype rewritten), but other copies of the weights, which
    would still hold the base without the adapter (left out, with a warning)."""
    skipped = []
    for extra in base_dir.iterdir():
        if not extra.is_file() or extra.name in written:
            continue
        if _other_weights(extra.name):  # unmerged: a loader that picked them would serve the base without the adapter
            skipped.append(extra.name)
        elif dtype is not None and extra.name == SAFE_INDEX_NAME:
            index = json.loads(extra.read_text())
            index.setdefault("metadata", {})["total_size"] = total
            (out / extra.name).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        elif dtype is not None and extra.name == "config.json":
            (out / extra.name).write_text(_config_in(extra.read_text(), dtype))
        else:
            shutil.copy2(extra, out / extra.name)
    if skipped:
        log.warning("not copied from %s (weights the merge did not write): %s", base_dir, ", ".join(sorted(skipped)))


def load_adapters(
    base_model: nn.Module, adapters: dict[str, str], *, storage_options: dict[str, Any] | None = None
) -> nn.Module:
    """Several checkpoints as named adapters on one base (PEFT's multi-adapter API); ``set_adapter(name)`` switches.

    Each step is pulled and verified first, so a corrupt checkpoint never loads, and checked against the base's
    fingerprint as :func:`~dist_lora.api.load_checkpoint` checks it: a step of another model is refused, one
    trained over other weights of this one loads with a warning. An adapter PEFT saved (:func:`pull` takes it)
    has no fingerprint: PEFT checks its shapes as it loads it.
    """
    from peft import PeftModel

    if not adapters:
        raise ValueError("load_adapters needs at least one {name: step URL}")
    model: Any = None
    fingerprint = base_fingerprint(base_model)  # (before any adapter is put on it)
    with tempfile.TemporaryDirectory(prefix="dist-lora-adapters-") as tmp:
        for name, url in adapters.items():
            local = pull(url, Path(tmp) / name, storage_options=storage_options)
            if (local / MANIFEST_NAME).is_file():  # (an adapter PEFT saved has no fingerprint: PEFT checks shapes)
                saved = json.loads((local / MANIFEST_NAME).read_text()).get("base_fingerprint", {})
                check_base(url, saved, fingerprint, f"load adapter {name!r} over the base")
            if model is None:
                model = PeftModel.from_pretrained(base_model, str(local), adapter_name=name)
            else:
                model.load_adapter(str(local), adapter_name=name)
    model.set_adapter(next(iter(adapters)))
    return model
