"""The checkpoint format: write a step, commit it, list, verify and retire steps.

One step is a directory (or URL prefix) ``<dir>/step-XXXXXXXX/`` holding::

    adapter_model.safetensors  the adapter, PEFT key names (PeftModel.from_pretrained and vLLM load it)
    adapter_config.json        PEFT's LoraConfig JSON with the base model's name or path
    optimizer.safetensors      optimizer state of the adapter tensors, unsharded: "<key>.exp_avg", ... "<key>.step"
                               (every element-wise field the optimizer keeps, by its name)
    trainer_state.json         step, samples seen, schedule, seeds, world size and backend that wrote it
    manifest.json              written LAST: format, each file's size and sha256, bias mode, base fingerprint

A step without a manifest does not exist for readers. Only safetensors and JSON: nothing is ever unpickled.
This layer does not know which backend made the tensors, and the storage does not know what a step is.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import math
import numbers
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from dist_lora.constants import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    CHAT_TEMPLATE_NAME,
    FORMAT_NAME,
    FORMAT_VERSION,
    LATEST_NAME,
    MANIFEST_NAME,
    OPTIMIZER_NAME,
    REQUIRED_FILES,
    STEP_DIGITS,
    STEP_PREFIX,
    TOKENIZER_CONFIG_NAME,
    TRAINER_STATE_NAME,
    VERSION,
)
from dist_lora.faults import failpoint
from dist_lora.storage import Storage, StorageError

log = logging.getLogger(__name__)

STEP_RE = re.compile(rf"^{STEP_PREFIX}(\d{{{STEP_DIGITS},}})$")
SAFE_FILE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
MAX_JSON_BYTES = 64 * 2**20


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, corrupt or does not fit the model; the message names the file."""


def check_step(step: Any) -> int:
    """A step number to save: a non-negative integer (numpy's too; not a bool, a float or a string)."""
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
        raise CheckpointError(
            f"step must be a non-negative integer (the number of optimizer steps taken so far), got {step!r}"
        )
    return int(step)


def step_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:0{STEP_DIGITS}d}"


def parse_step_name(name: str) -> int | None:
    m = STEP_RE.match(name)
    return int(m.group(1)) if m else None


# ---------------------------------------------------------------------------------------------- content


@dataclass
class AdapterState:
    """One full (unsharded) adapter with its optimizer state, as rank 0 holds it after a gather."""

    weights: dict[str, torch.Tensor]
    """checkpoint key -> tensor (CPU)."""
    optim: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    """checkpoint key -> {"exp_avg": ..., "exp_avg_sq": ..., "step": 0-d tensor}: the optimizer's element-wise state
    fields by name and its step count; empty without optimizer."""

    def nbytes(self) -> int:
        tensors = [*self.weights.values(), *(t for d in self.optim.values() for t in d.values())]
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class StepMeta:
    """Everything a step records besides tensors."""

    step: int
    bias: str
    adapter_config: dict[str, Any]
    fingerprint: dict[str, Any]
    trainer_state: dict[str, Any]
    world_size: int = 1
    backend: str = "single"
    optimizer: str | None = None
    """The class of the optimizer whose state ``optimizer.safetensors`` holds."""
    aliases: dict[str, str] = field(default_factory=dict)
    """A tied tensor's other keys (alias -> key, :func:`dist_lora.lora.adapter_aliases`): written under each."""


def json_state(state: dict[str, Any] | None) -> dict[str, Any]:
    """A caller's trainer state as trainer_state.json holds it, copied (an asynchronous save writes the values of
    the call, whatever the caller changes afterwards): tensors and numpy values become numbers or lists; anything
    else JSON cannot hold (a set, an object, a non-string key) is refused, naming where it is, rather than written
    as its repr and read back as a string. (dist_lora's own keys, ``step``, ``world_size``, ``backend`` and
    ``dist_lora_version``, are then written over the caller's: a state returned by a load can be passed back.)"""
    if state is None:
        return {}
    if not isinstance(state, dict):
        raise CheckpointError(f"trainer_state must be a dict of JSON values, got {type(state).__name__}")

    def value(v: Any, where: str) -> Any:
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        if isinstance(v, torch.Tensor) or type(v).__module__ == "numpy":
            return value(v.tolist(), where)  # a scalar's Python number, or nested lists
        if isinstance(v, dict):
            keys = [k for k in v if not isinstance(k, str)]
            if keys:
                raise CheckpointError(f"trainer_state{where} has keys {keys[:3]} that are not strings: JSON has none")
            return {k: value(x, f"{where}[{k!r}]") for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [value(x, f"{where}[{i}]") for i, x in enumerate(v)]
        raise CheckpointError(
            f"trainer_state{where} is of type {type(v).__name__}, which trainer_state.json cannot hold: pass numbers, "
            "strings, booleans, None, lists and dicts of them (tensors and numpy values are converted)"
        )

    out: dict[str, Any] = value(state, "")
    return out


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode()


def _optim_flat(optim: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {f"{k}.{field_}": t.contiguous() for k, d in optim.items() for field_, t in d.items()}


def _optim_nested(flat: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    nested: dict[str, dict[str, torch.Tensor]] = {}
    for k, t in flat.items():
        key, field_ = k.rsplit(".", 1)
        nested.setdefault(key, {})[field_] = t
    return nested


def non_finite_tensors(state: AdapterState) -> list[str]:
    """The adapter tensors, and optimizer state fields (``KEY.FIELD``), that hold a NaN or an inf."""
    named = {**state.weights, **_optim_flat(state.optim)} if state.optim else dict(state.weights)
    return [k for k, t in named.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def serialize_step(state: AdapterState, meta: StepMeta) -> dict[str, bytes]:
    """The data files of a step as bytes, and the manifest that commits them (under MANIFEST_NAME). An adapter or
    optimizer state holding NaN or inf is refused: such a step would load and serve like any other, and
    retention would delete the good steps before it."""
    bad = non_finite_tensors(state)
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise CheckpointError(
            f"step {meta.step} is not saved: {bad[0]}{more} hold(s) NaN or inf (training went non-finite before this "
            "save: a learning rate that diverges, a float16 overflow, a bad sample); the steps saved before it are "
            "kept. Resume from the newest of them with a lower learning rate or gradient clipping"
        )
    weights = {k: t.detach().contiguous() for k, t in state.weights.items()}
    weights.update({alias: weights[key].clone() for alias, key in meta.aliases.items()})  # safetensors never aliases
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in weights.values()})
    trainer_state = {
        **meta.trainer_state,
        "step": meta.step,
        "world_size": meta.world_size,
        "backend": meta.backend,
        "dist_lora_version": VERSION,
    }
    files = {
        ADAPTER_WEIGHTS_NAME: st_save(weights, metadata={"format": "pt"}),
        ADAPTER_CONFIG_NAME: _json_bytes(meta.adapter_config),
        TRAINER_STATE_NAME: _json_bytes(trainer_state),
    }
    if state.optim:
        files[OPTIMIZER_NAME] = st_save(_optim_flat(state.optim), metadata={"format": "pt"})
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "dist_lora_version": VERSION,
        "step": meta.step,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "bias": meta.bias,
        "dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
        "num_adapter_elements": sum(t.numel() for t in weights.values()),
        "world_size": meta.world_size,
        "backend": meta.backend,
        **({"optimizer": meta.optimizer} if meta.optimizer else {}),  # (saved with one: even before its 1st step)
        "base_fingerprint": meta.fingerprint,
        "files": {name: _file_entry(data) for name, data in files.items()},
    }
    files[MANIFEST_NAME] = _json_bytes(manifest)
    return files


def _file_entry(data: bytes) -> dict[str, Any]:
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def rehash_manifest(manifest: dict[str, Any], changed: dict[str, bytes]) -> bytes:
    """The manifest's bytes with the size and sha256 of files a copy changed (``pull --base`` edits the copy's
    adapter_config.json); the copy verifies as the original does."""
    files = {**manifest["files"], **{name: _file_entry(data) for name, data in changed.items()}}
    return _json_bytes({**manifest, "files": files})


# ---------------------------------------------------------------------------------------------- write


def write_step(
    storage: Storage,
    files: dict[str, bytes],
    step: int,
    keep_last: int | None = None,
    *,
    keep: frozenset[int] = frozenset(),
) -> str:
    """Write a serialized step and commit it; returns the step's URL.

    Data files first, each atomically; the manifest last, exclusively (a committed step is never overwritten);
    then the ``latest`` hint, then retention (their failure is a warning: the step is committed by then). What an
    earlier, uncommitted attempt left under the step's name is moved aside first. Rank 0 only.
    """
    name = step_name(step)
    check_no_newer_steps(storage, step)
    step_store = storage.child(name)
    if step_store.listdir():
        _set_aside_unless_committed(storage, name)
    for fname, data in files.items():
        if fname != MANIFEST_NAME:
            failpoint(f"write.before:{fname}")
            step_store.write(fname, data, sync_dir=False)
            failpoint(f"write.after:{fname}")
    step_store.sync_dir()  # every data file is durable before the manifest that commits them
    failpoint("commit.before_manifest")
    step_store.write(MANIFEST_NAME, files[MANIFEST_NAME], exclusive=True)
    failpoint("commit.after_manifest")
    try:  # the step is committed now: what follows is housekeeping, and its failure does not undo the commit
        failpoint("commit.latest")
        storage.write(LATEST_NAME, (name + "\n").encode())
        failpoint("commit.after_latest")
        if keep_last is not None:
            apply_retention(storage, keep_last, keep=keep)
    except Exception as e:
        log.warning(
            "step %d is committed (%s), but updating %s or retention failed afterwards: %s: %s; readers list the "
            "steps, so nothing is lost, and the next save tries again",
            step,
            step_store.url,
            LATEST_NAME,
            type(e).__name__,
            e,
        )
    return step_store.url


def check_no_newer_steps(storage: Storage, step: int) -> None:
    """Refuse to save ``step`` into a checkpoint dir that holds a committed step after it: that is another run's
    (one started over without resuming, or resumed from an older step), and saving beside it would mix two runs in
    one dir: ``resume: auto`` would take the other run's newest step, and retention would delete this run's steps
    as the oldest. Steps that never committed, or fail verification, do not count. One listing of the dir. Rank 0
    only."""
    newer = sorted(
        (n for n in storage.listdir() if (parse_step_name(n) or -1) > step),
        key=lambda n: parse_step_name(n) or 0,
    )
    # verified (each file hashed): a newer step that fails its sha256 is one resume skipped, and is set aside when
    # this run reaches its number; there is none to hash when the dir holds one run
    committed = [n for n in newer if inspect_step(storage, n, verify=True).status == "committed"]
    if committed:
        raise CheckpointError(
            f"{storage.url} holds committed step(s) {', '.join(committed[-3:])} after step {step}, which this run "
            "would save next to them: resume from the newest (checkpoint.resume: auto, or load_checkpoint of the "
            "dir), save to another checkpoint.dir, or move those steps out of the dir to start over (dist_lora "
            "never deletes or overwrites a committed step)"
        )


def _set_aside_unless_committed(storage: Storage, name: str) -> None:
    """A step directory already holds something. A committed step that verifies is never overwritten (an error);
    anything else there (a save that never committed, a corrupt step, stray files) is renamed aside, never deleted,
    so that the step number can be written again."""
    info = inspect_step(storage, name, verify=True)
    if info.status == "committed":
        raise CheckpointError(
            f"{info.url} is a committed step and will not be overwritten; resume from it (checkpoint.resume: auto) "
            "or save to another checkpoint.dir"
        )
    aside = f"{name}.aside-{_dt.datetime.now(_dt.timezone.utc).strftime('%Y%m%dT%H%M%S%fZ')}"
    storage.move(name, aside)
    log.warning(
        "%s was %s (%s); moved it aside to %s (nothing deleted) and writing step %s anew",
        info.url,
        info.status,
        info.error,
        storage.url_of(aside),
        name,
    )


# ---------------------------------------------------------------------------------------------- read


def _parse_json(data: bytes, what: str) -> Any:
    if len(data) > MAX_JSON_BYTES:
        raise CheckpointError(f"{what} is {len(data)} bytes; refusing JSON over {MAX_JSON_BYTES} bytes")
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{what} is not valid JSON: {e}") from e


def read_manifest(step_store: Storage) -> dict[str, Any]:
    """Read and check a step's manifest. Raises CheckpointError naming the problem (missing = not committed)."""
    what = step_store.url_of(MANIFEST_NAME)
    try:
        manifest = _parse_json(step_store.read(MANIFEST_NAME), what)
    except FileNotFoundError as e:
        if not step_store.listdir():
            raise CheckpointError(f"{step_store.url} does not exist (no step, nor any file of one, is there)") from e
        raise CheckpointError(f"{what} is missing: the step was never committed (incomplete save)") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{what} is not a dist_lora manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{what} has format_version {manifest.get('format_version')!r}; this dist_lora "
            f"({VERSION}) reads version {FORMAT_VERSION}"
        )
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise CheckpointError(f"{what} has no 'files' table")
    for fname, entry in files.items():
        if not isinstance(fname, str) or not SAFE_FILE_RE.match(fname) or ".." in fname:
            raise CheckpointError(f"{what} names {fname!r}, a path outside its step directory; refusing to read it")
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("size"), int)
            or not isinstance(entry.get("sha256"), str)
        ):
            raise CheckpointError(f"{what}: entry for {fname} needs an integer size and a sha256 string")
    missing = [f for f in REQUIRED_FILES if f not in files]
    if missing:
        raise CheckpointError(f"{what} does not list {missing}")
    return manifest


def read_verified(step_store: Storage, manifest: dict[str, Any], names: list[str] | None = None) -> dict[str, bytes]:
    """Read files of a step and check each one's size and sha256 against the manifest before it is used."""
    out = {}
    for fname in names if names is not None else list(manifest["files"]):
        entry = manifest["files"].get(fname)
        if entry is None:
            raise CheckpointError(f"{step_store.url_of(fname)} is not listed in the step's manifest")
        try:
            data = step_store.read(fname)
        except FileNotFoundError as e:
            raise CheckpointError(f"{step_store.url_of(fname)} is missing (listed in the manifest)") from e
        if len(data) != entry["size"]:
            raise CheckpointError(
                f"{step_store.url_of(fname)} is {len(data)} bytes, the manifest says {entry['size']}: "
                "truncated or corrupt"
            )
        digest = hashlib.sha256(data).hexdigest()
        if digest != entry["sha256"]:
            raise CheckpointError(
                f"{step_store.url_of(fname)} fails its sha256 check (got {digest[:16]}..., manifest "
                f"{entry['sha256'][:16]}...): the file is corrupt"
            )
        out[fname] = data
    return out


def _load_tensors(data: bytes, what: str) -> dict[str, torch.Tensor]:
    try:
        return st_load(data)
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise CheckpointError(f"{what} is not a valid safetensors file: {e}") from e


@dataclass
class LoadedStep:
    url: str
    manifest: dict[str, Any]
    state: AdapterState
    adapter_config: dict[str, Any]
    trainer_state: dict[str, Any]
    verified: bool = True  # False: an adapter PEFT saved, which has no manifest (no sha256, no base fingerprint)

    @property
    def run_config(self) -> dict[str, Any]:
        """The config of the run that saved the step (its trainer_state.json's ``config``); {} where none is kept."""
        return saved_config(self.trainer_state)

    @property
    def chat_template(self) -> str | None:
        """The chat template the run rendered its samples with, as its trainer_state.json keeps it, if it does."""
        return template_text(self.trainer_state.get("chat_template"))


def saved_config(trainer_state: dict[str, Any]) -> dict[str, Any]:
    """The config of the run that saved a step, as its trainer_state.json keeps it; {} where none is kept."""
    config = trainer_state.get("config")
    return config if isinstance(config, dict) else {}


def template_text(template: Any) -> str | None:
    """A chat template as a step keeps it: its text, or None for none (nor an empty one, nor a tokenizer's dict of
    named templates)."""
    return template if isinstance(template, str) and template else None


def read_step(step_store: Storage) -> LoadedStep:
    """Read, verify and decode one committed step (rank 0 only)."""
    manifest = read_manifest(step_store)
    files = read_verified(step_store, manifest)
    weights = _load_tensors(files[ADAPTER_WEIGHTS_NAME], step_store.url_of(ADAPTER_WEIGHTS_NAME))
    optim = {}
    if OPTIMIZER_NAME in files:
        optim = _optim_nested(_load_tensors(files[OPTIMIZER_NAME], step_store.url_of(OPTIMIZER_NAME)))
    adapter_config = _parse_json(files[ADAPTER_CONFIG_NAME], step_store.url_of(ADAPTER_CONFIG_NAME))
    trainer_state = _parse_json(files[TRAINER_STATE_NAME], step_store.url_of(TRAINER_STATE_NAME))
    return LoadedStep(step_store.url, manifest, AdapterState(weights, optim), adapter_config, trainer_state)


def read_peft_adapter(store: Storage, names: dict[str, dict[str, Any]] | None = None) -> LoadedStep | None:
    """An adapter directory PEFT's ``save_pretrained`` wrote (adapter_config.json and adapter_model.safetensors,
    no manifest: a published adapter, or one trained elsewhere) read as a step without optimizer state, unverified
    (there is no sha256 to check it against, nor a fingerprint of its base). None where ``store`` holds no
    adapter_config.json, or is a dist_lora step (rank 0 only). ``names``: ``store``'s listing, where the caller
    has it (one LIST request fewer on an object store)."""
    names = store.listdir() if names is None else names
    if ADAPTER_CONFIG_NAME not in names or MANIFEST_NAME in names:
        return None
    config = _parse_json(store.read(ADAPTER_CONFIG_NAME), store.url_of(ADAPTER_CONFIG_NAME))
    if not isinstance(config, dict):
        raise CheckpointError(f"{store.url_of(ADAPTER_CONFIG_NAME)} is not a JSON object: not PEFT's adapter config")
    kind = config.get("peft_type", "LORA")
    if kind != "LORA":
        raise CheckpointError(f"{store.url_of(ADAPTER_CONFIG_NAME)} is a {kind} adapter's: dist_lora trains LoRA")
    if ADAPTER_WEIGHTS_NAME not in names:
        pickles = sorted(n for n in names if n.endswith(".bin"))
        raise CheckpointError(
            f"{store.url} holds {ADAPTER_CONFIG_NAME} but no {ADAPTER_WEIGHTS_NAME}"
            + (f" ({', '.join(pickles)} is a pickle, which dist_lora does not unpickle)" if pickles else "")
            + ": load it with PeftModel.from_pretrained and save it again with save_pretrained(dir), whose "
            "default is safetensors"
        )
    weights = _load_tensors(store.read(ADAPTER_WEIGHTS_NAME), store.url_of(ADAPTER_WEIGHTS_NAME))
    manifest = {"bias": config.get("bias", "none")}
    template = _saved_chat_template(store, names)
    state = {"chat_template": template} if template else {}
    return LoadedStep(store.url, manifest, AdapterState(weights), config, state, verified=False)


def _saved_chat_template(store: Storage, names: dict[str, dict[str, Any]]) -> str | None:
    """The chat template of the tokenizer saved beside an adapter (TRL's trainers save the one they trained with):
    its ``chat_template.jinja``, or the ``chat_template`` string of its tokenizer_config.json; None where there is
    none (or a dict of named templates)."""
    if CHAT_TEMPLATE_NAME in names:
        return template_text(store.read(CHAT_TEMPLATE_NAME).decode("utf-8"))
    if TOKENIZER_CONFIG_NAME in names:
        tokenizer_config = _parse_json(store.read(TOKENIZER_CONFIG_NAME), store.url_of(TOKENIZER_CONFIG_NAME))
        return template_text(tokenizer_config.get("chat_template")) if isinstance(tokenizer_config, dict) else None
    return None


# ---------------------------------------------------------------------------------------------- list


@dataclass
class StepInfo:
    name: str
    step: int
    url: str
    status: str  # committed | incomplete | corrupt
    bytes: int = 0
    created: str | None = None
    world_size: int | None = None
    backend: str | None = None
    error: str | None = None
    eval_loss: float | None = None  # the eval loss the run recorded at this step, if it evaluated at it
    eval_accuracy: float | None = None  # and the token accuracy
    best_eval_step: int | None = None  # the best-evaluated step so far, as this step's trainer_state records it
    best_metric: str | None = None  # what made it the best: loss or accuracy (train.best_metric)
    kept_best: list[int] | None = None  # the steps checkpoint.keep_best keeps, best first, as this step records them

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def inspect_step(storage: Storage, name: str, verify: bool = True, evals: bool = False) -> StepInfo:
    """Status of one step: committed (manifest and every file check out), incomplete (no manifest) or corrupt;
    ``evals``: also the eval loss and accuracy the run recorded at it and its best-evaluated step (``dist-lora
    ls``; without ``verify`` that reads its trainer_state.json, which nothing else here needs)."""
    step = parse_step_name(name)
    step_store = storage.child(name)
    info = StepInfo(name, step if step is not None else -1, step_store.url, "incomplete")
    listing = step_store.listdir()
    info.bytes = sum(e["size"] for e in listing.values())
    if not listing:
        info.error = "no such step: nothing is stored there"
        return info
    if MANIFEST_NAME not in listing:
        info.error = "no manifest (the save never committed)"
        return info
    try:
        manifest = read_manifest(step_store)
        info.created = manifest.get("created")
        info.world_size, info.backend = manifest.get("world_size"), manifest.get("backend")
        if verify:
            files = read_verified(step_store, manifest)
        else:
            for fname, entry in manifest["files"].items():
                size = listing.get(fname, {}).get("size")
                if size != entry["size"]:
                    raise CheckpointError(f"{step_store.url_of(fname)}: size {size}, manifest {entry['size']}")
            wanted = evals and TRAINER_STATE_NAME in manifest["files"]
            files = {TRAINER_STATE_NAME: step_store.read(TRAINER_STATE_NAME)} if wanted else {}
        info.status = "committed"
        if evals:
            _read_evals(info, files.get(TRAINER_STATE_NAME))
    except (CheckpointError, StorageError) as e:
        info.status, info.error = "corrupt", str(e)
    return info


def _read_evals(info: StepInfo, state: bytes | None) -> None:
    """``info``'s eval loss and accuracy at its step, and the best-evaluated step and the metric that made it so,
    from the step's trainer_state.json (a step saved without evaluations, or by a loop of the user's own, has
    neither)."""
    try:
        trainer_state = json.loads(state) if state else {}
    except ValueError:
        return
    history = trainer_state.get("eval_history") or []
    here = next((e for e in history if isinstance(e, dict) and e.get("step") == info.step), {})
    info.eval_loss, info.eval_accuracy = here.get("eval_loss"), here.get("eval_accuracy")
    best = trainer_state.get("best_eval")
    if isinstance(best, dict):
        config = trainer_state.get("config") or {}
        info.best_eval_step = best.get("step")
        # (a step the HF callback saved names the Trainer's metric_for_best_model; the trainer's, its config's)
        info.best_metric = best.get("metric") or (config.get("train") or {}).get("best_metric", "loss")
        keep = int((config.get("checkpoint") or {}).get("keep_best") or 0)  # (true: 1)
        evaluated = [e for e in history if isinstance(e, dict) and isinstance(e.get("step"), int)]
        info.kept_best = [e["step"] for e in best_first(evaluated, info.best_metric)[:keep]]


def improves(evaluation: dict[str, Any], best: dict[str, Any], metric: str, by: float = 0.0) -> bool:
    """Whether ``evaluation`` is better than ``best`` by more than ``by`` in ``metric`` (``train.best_metric``:
    a lower eval_loss, a higher eval_accuracy); one without that metric (recorded before it was) is never better."""

    def score(e: dict[str, Any]) -> float:
        value = e.get(f"eval_{metric}")
        return -math.inf if value is None else (-value if metric == "loss" else value)

    return score(evaluation) > score(best) + by


def best_first(history: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """Evaluations ranked best first by ``metric`` (:func:`improves`), the earlier of a tie first."""
    ranked: list[dict[str, Any]] = []
    for e in history:  # each goes before the first one it beats (ties: after)
        at = next((i for i, r in enumerate(ranked) if improves(e, r, metric)), len(ranked))
        ranked.insert(at, e)
    return ranked


def list_steps(storage: Storage, verify: bool = True, evals: bool = False) -> list[StepInfo]:
    """Every step directory under a checkpoint dir, oldest first, with its status (and ``evals``: see
    :func:`inspect_step`)."""
    names = [n for n, e in storage.listdir().items() if parse_step_name(n) is not None]
    infos = [inspect_step(storage, n, verify, evals) for n in names]
    # object stores may keep an empty "directory" after retention deleted every file in it: nothing is there
    infos = [s for s in infos if s.status != "incomplete" or s.bytes or storage.child(s.name).listdir()]
    return sorted(infos, key=lambda s: s.step)


STEP_FILES = frozenset({MANIFEST_NAME, OPTIMIZER_NAME, *REQUIRED_FILES})


def no_step_error(storage: Storage) -> CheckpointError:
    """The error of a URL given as a step or a checkpoint dir that holds no committed, verified step, saying what is
    there instead: nothing, a file, a model or a PEFT adapter saved otherwise, or steps none of which verifies."""
    url, kind = storage.url, storage.kind()
    names = storage.listdir() if kind == "directory" else {}
    steps = [n for n in names if parse_step_name(n) is not None]
    fix = "pass a checkpoint dir (checkpoint.dir of a run) or one of its steps"
    if kind is None:
        why = "it does not exist"
    elif kind != "directory":
        why = "it is a file"
        holder, _, name = url.rpartition("/")
        if holder and name in STEP_FILES:  # (one of a step's files: its directory is the step)
            fix = f"pass the step directory that holds it, {holder}"
    elif steps:
        why, fix = f"{len(steps)} step(s) there, none committed and verifying", f"dist-lora ls {url} says why"
    elif "config.json" in names:
        why = "it holds a model (config.json), not dist_lora's steps"
    elif ADAPTER_CONFIG_NAME in names:
        why = f"it holds an adapter without dist_lora's {MANIFEST_NAME} (saved by PEFT, or never committed)"
        fix = (
            "PeftModel.from_pretrained loads it, and so do dist-lora pull, merge, generate and eval and "
            "lora.init_from (a new run that starts from it); dist_lora verifies and resumes the steps it committed"
        )
    else:
        why = "no step-* in it"
    return CheckpointError(f"no committed, verified step under {url}: {why}; {fix}")


def is_step_url(storage: Storage) -> bool:
    """A URL names one step when its last component looks like step-XXXXXXXX or it holds a manifest."""
    return parse_step_name(storage.url.rsplit("/", 1)[-1]) is not None or storage.exists(MANIFEST_NAME)


def _newest_first(storage: Storage) -> list[str]:
    """Step names, newest first. Listing is the truth; the ``latest`` hint is only checked, and a hint that names
    no step is reported."""
    names = sorted(
        (n for n in storage.listdir() if parse_step_name(n) is not None), key=lambda n: parse_step_name(n) or 0
    )
    try:
        hint = storage.read(LATEST_NAME).decode().strip()
    except (FileNotFoundError, StorageError, UnicodeDecodeError):
        hint = None
    if hint is not None and hint not in names:
        log.warning("%s names %r, which does not exist; using the listing", storage.url_of(LATEST_NAME), hint)
    return names[::-1]


def newest_verified_step(storage: Storage) -> Storage | None:
    """The newest step that is committed and verifies; corrupt or incomplete newer ones are skipped, with a warning."""
    for name in _newest_first(storage):
        info = inspect_step(storage, name, verify=True)
        if info.status == "committed":
            return storage.child(name)
        log.warning("skipping %s: %s (%s)", info.url, info.status, info.error)
    return None


BEST_ALIAS = "best"
"""``DIR/best`` (where DIR holds no such entry) names DIR's best-evaluated step: :func:`best_evaluated_step`."""


def best_evaluated_step(storage: Storage) -> Storage:
    """The best-evaluated step of a checkpoint dir, as its newest committed step records it (``best_eval`` in its
    trainer_state.json, whose sha256 is checked: the step ``checkpoint.keep_best`` keeps). Only that file of the
    newest step is read, and the best step's manifest and sizes: whoever reads the step verifies every file it
    reads (an adapter of gigabytes on S3 is not downloaded twice). An error names why there is none: no step, no
    evaluation recorded, the base itself best (step 0), or the step gone or incomplete."""
    for name in _newest_first(storage):
        newest = storage.child(name)
        try:
            manifest = read_manifest(newest)
            state = read_verified(newest, manifest, [TRAINER_STATE_NAME])[TRAINER_STATE_NAME]
        except (CheckpointError, StorageError) as e:
            log.warning("skipping %s: %s", newest.url, e)
            continue
        info = StepInfo(name, parse_step_name(name) or 0, newest.url, "committed")
        _read_evals(info, state)
        best = info.best_eval_step
        if best is None:
            raise CheckpointError(
                f"{storage.url_of(BEST_ALIAS)}: {newest.url} records no best evaluation (the run had no eval data: "
                "data.eval_path or data.eval_fraction; an HF Trainer's, no eval_strategy or metric_for_best_model); "
                "name a step instead"
            )
        if best == 0:
            raise CheckpointError(
                f"{storage.url_of(BEST_ALIAS)}: the base itself evaluated best (step 0, train.eval_on_start), as "
                f"{newest.url} records: no trained step improves on it"
            )
        found = inspect_step(storage, step_name(best), verify=False)
        if found.status != "committed":
            raise CheckpointError(
                f"{storage.url_of(BEST_ALIAS)}: the best-evaluated step, as {newest.url} records it, is {found.url}, "
                f"which is {found.status} ({found.error}); retention keeps it only with checkpoint.keep_best: true "
                "(HF's DistLoraCallback: load_best_model_at_end=True)"
            )
        log.info(
            "%s is %s (the best eval %s, as %s records it)",
            storage.url_of(BEST_ALIAS),
            found.url,
            info.best_metric,
            name,
        )
        return storage.child(found.name)
    raise CheckpointError(f"{storage.url_of(BEST_ALIAS)}: no committed step under {storage.url}")


def read_newest_step(storage: Storage) -> LoadedStep | None:
    """Read (and so verify, once) the newest step that is committed and verifies; corrupt or incomplete newer
    ones are skipped, with a warning naming why. None when there is none. Rank 0 only."""
    for name in _newest_first(storage):
        step_store = storage.child(name)
        try:
            return read_step(step_store)
        except CheckpointError as e:
            log.warning("skipping %s: %s", step_store.url, e)
    return None


# ---------------------------------------------------------------------------------------------- retention


def delete_step(storage: Storage, name: str) -> None:
    """Retire one committed step: the manifest goes first (the step stops existing for readers), then the files
    it lists. Files the manifest does not list are left alone: dist_lora deletes only what it wrote."""
    step_store = storage.child(name)
    manifest = read_manifest(step_store)
    step_store.delete(MANIFEST_NAME)
    failpoint("retention.after_manifest_delete")
    for fname in manifest["files"]:
        step_store.delete(fname)
        failpoint("retention.after_file_delete")
    step_store.remove_empty_dir("")


def apply_retention(storage: Storage, keep_last: int, *, keep: frozenset[int] = frozenset()) -> list[str]:
    """Delete committed steps older than the newest ``keep_last`` committed ones, except the steps in ``keep``.
    Returns the deleted names.

    Never deletes the newest verified step, incomplete steps, or anything that is not a dist_lora step.
    """
    if keep_last < 1:
        raise CheckpointError(f"keep_last must be >= 1 (got {keep_last})")
    steps = [s for s in list_steps(storage, verify=False) if s.status == "committed"]
    if len(steps) <= keep_last:
        return []
    newest = newest_verified_step(storage)
    kept = {s.name for s in steps[-keep_last:]} | {step_name(k) for k in keep}
    if newest is not None:
        kept.add(newest.url.rsplit("/", 1)[-1])
    deleted = []
    for s in steps:
        if s.name not in kept:
            delete_step(storage, s.name)
            deleted.append(s.name)
    if deleted:
        log.info("retention (keep_last=%d) deleted %s", keep_last, ", ".join(deleted))
    return deleted
