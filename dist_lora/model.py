"""Finding and loading the base model and its tokenizer (``model.name_or_path``).

A local directory is used by its absolute path, so that the config saved with every step and the
``adapter_config.json`` PEFT reads name a base that can be found from any working directory. A hub id stays as it is
in every name saved; its files are read from its snapshot in the Hugging Face cache (:func:`base_directory`), at the
commit recorded with each step. A path that does not exist, and a hub id that cannot be fetched (no network, no such
repo), are one error each that says which and what to do, never a library traceback.

Sharded loading (what FSDP2 and ZeRO-3 use, see ``Backend.load_base``) builds the model on the meta device
(:func:`build_on_meta`), keeps the LoRA adapter's values while PEFT applies it there (:func:`adapters_on_cpu`), and
reads each rank's rows of each tensor from the safetensors files (:class:`BaseWeights`).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import importlib.util
import json
import math
import mmap
import os
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dist_lora.constants import ENV_LOCAL_SIZE, ENV_LOCAL_WORLD_SIZE

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # model.dtype's names


class ModelError(ValueError):
    """The base model (or its tokenizer) cannot be found or loaded; the message says why and the fix."""


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
                "(or a hub id such as org/name)"
            )
        return str(path.resolve())
    if _looks_like_path(name):
        raise ModelError(
            f"{what} {name}: no such directory ({path.resolve()}); pass a directory written by save_pretrained, "
            "or a hub id such as org/name"
        )
    return name


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


def load_tokenizer(name: str, what: str = "model.name_or_path", revision: str | None = None) -> Any:
    """The base's tokenizer (AutoTokenizer; a hub id's at ``revision``), or ModelError naming the base and the
    fix."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name, revision=hub_only(name, revision))
    except (OSError, ValueError) as e:
        raise _hub_failure(name, what, e) if not Path(name).exists() else ModelError(f"{what} {name}: {e}") from e
    if len(tokenizer) < 2:  # transformers makes an empty one of the config's type where no tokenizer file is
        raise ModelError(
            f"{what} {name} holds no tokenizer (tokenizer.json, tokenizer.model or vocab files): save the tokenizer "
            f"of the model it came from there, AutoTokenizer.from_pretrained(ORIGINAL).save_pretrained({name!r})"
        )
    return tokenizer


def context_length(name: str, revision: str | None = None) -> int | None:
    """The longest sequence a base with learned positions takes (``max_position_embeddings``, GPT-2's
    ``n_positions``): a longer one indexes past its position table. None for rotary positions, which have no table
    (a longer sequence is a context extension, as with ``rope_scaling``), and where the config names none."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(name, revision=hub_only(name, revision))
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
        raise _hub_failure(name, what, e) if not Path(name).exists() else ModelError(f"{what} {name}: {e}") from e


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


# ---------------------------------------------------------------------------------------------- sharded loading

SAFE_INDEX_NAME = "model.safetensors.index.json"
SAFE_WEIGHTS_NAME = "model.safetensors"


# safetensors' dtype names (the format's header: an 8-byte little-endian length, then JSON)
_SAFE_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def indexed_files(index: Path) -> list[str]:
    """The safetensors files a weight index (``model.safetensors.index.json``) names, each once, sorted."""
    return sorted(set(json.loads(index.read_text())["weight_map"].values()))


@dataclass(frozen=True)
class _Entry:
    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    """Where the tensor's bytes start in the file."""


@dataclass(frozen=True)
class _Pieces:
    """A model tensor that the files hold as several tensors, which transformers joins as it loads them (a MoE
    layer's experts, saved one tensor each and fused into one parameter): its flattened values are the ``pieces``
    in order, each elements ``[first, last)`` of a tensor in the files."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    pieces: tuple[tuple[_Entry, int, int], ...]


class BaseWeights:
    """A base's tensors as ``save_pretrained`` wrote them: ``model.safetensors``, or several files listed by
    ``model.safetensors.index.json``. Keys are the base's own parameter names (``lora.base_key``).

    A rank gets the rows it holds in one of two ways, never a whole tensor it does not hold:

    - :meth:`rows` reads them with plain reads straight into a tensor of their size (a GPU shard, another dtype,
      a tensor being quantized). No map: with safetensors' own ``get_slice``, every page a rank touches would stay
      resident beside the copy for as long as the file is open, doubling what a rank holds while it loads.
    - :meth:`mapped` returns them as a view of the file's own pages for a frozen CPU tensor of the file's dtype,
      as ``from_pretrained`` leaves a CPU model: the map *is* the tensor, so nothing is read or copied until the
      rows are used, and the pages are the page cache's, which the kernel may drop and read again under pressure.
      The map is private (copy-on-write): a write to such a tensor never reaches the file.

    Before either, :meth:`read_ahead` starts bringing the rank's bytes into memory on a thread of its own, while
    the engine is set up.

    The files may name and lay out tensors otherwise than the model built from ``config.json`` does: transformers
    renames keys and fuses a MoE layer's experts (saved one tensor each) as it loads them, and saves them back that
    way. :meth:`follow` reads transformers' own conversion mapping for the model, so that every tensor is asked for
    by the model's name and a fused tensor's rows are read from the pieces that hold them.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index = self.directory / SAFE_INDEX_NAME
        if index.is_file():
            names = indexed_files(index)
        elif (self.directory / SAFE_WEIGHTS_NAME).is_file():
            names = [SAFE_WEIGHTS_NAME]
        else:
            pickles = sorted(p.name for p in self.directory.glob("*.bin"))
            found = f"it holds {', '.join(pickles)} (pickle)" if pickles else "it holds no model weights"
            raise ModelError(
                f"{self.directory} has no {SAFE_WEIGHTS_NAME} or {SAFE_INDEX_NAME} ({found}); sharded loading reads "
                "safetensors only and never unpickles: re-save the base with "
                "model.save_pretrained(DIR, safe_serialization=True)"
            )
        self.entries: dict[str, _Entry] = {}
        self.aliases: dict[str, str] = {}  # a tied parameter's other name -> the name the model holds it under
        self.renamed: dict[str, str] = {}  # a model name -> the name the files hold that tensor under
        self.joined: dict[str, _Pieces] = {}  # a model name -> the tensors of the files it is joined from
        for name in names:
            self.entries.update(_read_header(self.directory / name))
        self._ahead: dict[tuple[Path, int, int], tuple[mmap.mmap, int]] = {}  # read_ahead's maps for views to come

    @classmethod
    def of(cls, name_or_path: str) -> BaseWeights | None:
        """The weights of a local save_pretrained directory; None for a hub id (it loads the full way)."""
        return cls(name_or_path) if Path(name_or_path).is_dir() else None

    @property
    def files(self) -> dict[str, str]:
        """Tensor name -> the file that holds it (as in the index)."""
        return {key: entry.path.name for key, entry in self.entries.items()}

    def __contains__(self, key: str) -> bool:
        stored = self.stored_as(key)
        return stored is None or stored in self.entries

    def follow(self, model: Any) -> BaseWeights:
        """Name every tensor as ``model`` (built from the base's config, not yet given LoRA) does: the files' keys as
        transformers renames and joins them when it loads this model (:meth:`_convert`), and a tied parameter's other
        names (GPT-2's ``lm_head.weight`` is ``transformer.wte.weight``) read from the tensor the files hold, as a
        copy of it (PEFT's ``modules_to_save``) must be."""
        self._convert(model)
        first: dict[int, str] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            if id(p) in first and name not in self and first[id(p)] in self:
                self.aliases[name] = first[id(p)]
            first.setdefault(id(p), name)
        return self

    def _convert(self, model: Any) -> None:
        """transformers' conversion of this model's checkpoint layout (``get_model_conversion_mapping``, applied to
        the files' keys as ``from_pretrained`` applies it): a renamed key is read under its name in the files; a
        tensor joined from several (``MergeModulelist``, then ``Concatenate``: a MoE layer's experts, and their
        gate and up projections) is read piece by piece. A conversion of another kind cannot be read by rows: a
        ModelError names it and the fix (a copy of the base saved in the model's own layout)."""
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

        mapping = get_model_conversion_mapping(model)
        renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
        converters = [m for m in mapping if isinstance(m, WeightConverter)]
        if not renamings and not converters:
            return
        names = dict(model.named_parameters(remove_duplicate=False))
        names.update(model.named_buffers())
        prefix = model.base_model_prefix
        groups: dict[str, dict[str, list[_Entry]]] = {}
        converter_of = {pattern: c for c in converters for pattern in c.source_patterns}
        for key in sorted(self.entries, key=dot_natural_key):  # experts in their numeric order, as transformers
            target, pattern = rename_source_key(key, renamings, converters, prefix, names)
            if target not in names and key in names:  # as from_pretrained: a key the model has is not renamed
                target, pattern = rename_source_key(key, [], [], prefix, names)
            if target not in names or target == key:
                continue
            if pattern is None:
                self.renamed[target] = key
            else:
                groups.setdefault(target, {}).setdefault(pattern, []).append(self.entries[key])
        for target, inputs in groups.items():
            converter = converter_of[next(iter(inputs))]
            joined = _join(converter, inputs, target, self.directory)
            shape = tuple(getattr(names[target], "ds_shape", names[target].shape))  # (ZeRO-3 partitions at build)
            if joined.shape != shape:
                raise ModelError(
                    f"{self.directory}: joining {target} from the files gives shape {list(joined.shape)}, and the "
                    f"model built from config.json has {list(shape)}: the files and the config do not match "
                    "(re-save the base with save_pretrained)"
                )
            self.joined[target] = joined

    def stored_as(self, key: str) -> str | None:
        """The name the files hold a model tensor under; None where it is joined from several of them."""
        key = self.aliases.get(key, key)
        return None if key in self.joined else self.renamed.get(key, key)

    def _entry(self, key: str) -> _Entry | _Pieces:
        stored = self.stored_as(key)
        if stored is None:
            return self.joined[self.aliases.get(key, key)]
        key = stored
        if key not in self.entries:
            raise ModelError(
                f"{self.directory} holds no tensor {key!r} that the model built from its config.json has; the files "
                "and the config do not match (re-save the base with save_pretrained)"
            )
        return self.entries[key]

    def shape(self, key: str) -> list[int]:
        return list(self._entry(key).shape)

    def ranges(self, key: str, first: int, last: int) -> list[tuple[_Entry, int, int]]:
        """Elements ``[first, last)`` of a model tensor's flattened values as ranges of the files' tensors (the
        tensor of the files, its first and last element), in order: one for a tensor the files hold as it is, the
        pieces it is joined from for a fused one."""
        return _ranges(self._entry(key), first, last)

    def read(self, key: str) -> torch.Tensor:
        """A whole tensor."""
        return self.rows(key, 0, self._entry(key).shape[0] if self._entry(key).shape else 1)

    def layout(self, name: str) -> tuple[bytes, list[str]]:
        """One file's header, byte for byte (length prefix included), and its tensors in the order of their bytes:
        a file with the same tensors, dtypes and shapes is that header followed by those tensors' bytes."""
        path = self.directory / name
        with open(path, "rb") as f:
            head = f.read(8)
            header = head + f.read(struct.unpack("<Q", head)[0])
        keys = sorted((k for k, e in self.entries.items() if e.path == path), key=lambda k: self.entries[k].offset)
        return header, keys

    def read_ahead(
        self, share: Callable[[tuple[int, ...]], tuple[list[tuple[int, int]], bool]], view_dtype: torch.dtype | None
    ) -> threading.Thread | None:
        """Start bringing the bytes this rank is going to load into memory, on a thread of its own, so that the
        reads of a cold page cache (and the page faults of a warm one) overlap the engine's set-up instead of
        following it. Called as soon as the model is built, once :meth:`follow` has learnt its names for the
        tensors (the files may name and join them otherwise).

        ``share(shape)``: the ranges ``[first, last)`` of a tensor's flattened values that this rank holds (its
        rows, its partition, its slice of every expert), and whether they are a whole shard, which the load takes as
        a view of the file where it can;
        ``view_dtype``: the dtype of such views (the CPU model's), None where none is made (a GPU, a base to be
        quantized). For a view to come, its own map is made now (:meth:`mapped` hands it over) and the thread maps
        its pages in; any other range is read into the page cache through a map the thread drops once read.
        What a load leaves unused is dropped by :meth:`drop_unused_maps`. At most half the memory available to
        each rank of the node is read ahead, in the files' order: more would evict pages before they are used,
        and the rest is read as it is used. Returns the thread (None: nothing to read)."""
        budget = _memory_for_read_ahead()
        jobs: list[tuple[mmap.mmap, int, int, bool]] = []  # (map, first byte, bytes, kept for a view)
        pieces = {entry for joined in self.joined.values() for entry, _, _ in joined.pieces}  # read as the joined
        tensors = [e for e in self.entries.values() if e not in pieces] + list(self.joined.values())
        ranges = []  # (a tensor of the files, its first and last element, kept for a view)
        for tensor in sorted(tensors, key=_first_byte):
            held, whole = share(tensor.shape)
            parts = [part for first, last in held for part in _ranges(tensor, first, last)]
            ranges += [(*part, whole and len(parts) == 1) for part in parts]  # (a joined tensor's view: one piece)
        for entry, first, last, keep in ranges:
            size = entry.dtype.itemsize
            nbytes = (last - first) * size
            if nbytes > budget:
                break
            mapped = _map(entry.path, entry.offset + first * size, nbytes)
            if mapped is None:  # a file system that cannot map files: no read-ahead
                break
            budget -= nbytes
            keep = keep and entry.dtype == view_dtype
            if keep:
                self._ahead[(entry.path, entry.offset + first * size, nbytes)] = mapped
            jobs.append((*mapped, nbytes, keep))
        if not jobs:
            return None
        thread = threading.Thread(target=_fault_in, args=(jobs,), name="dist_lora-read-ahead", daemon=True)
        thread.start()
        return thread

    def drop_unused_maps(self) -> None:
        """Drop what :meth:`read_ahead` mapped for views the load did not take (its pages are the page cache's
        again once the thread is done with them)."""
        self._ahead.clear()

    def rows(self, key: str, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``[start, stop)`` of a tensor (dim 0; a scalar is one row), read from the file alone; straight
        into ``out`` when it is given (contiguous, of the file's dtype and those rows' size)."""
        entry = self._entry(key)
        first, last, shape = _row_range(entry, start, stop)
        return self._read_any(entry, first, last, shape, out)

    def mapped(self, key: str, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor | None:
        """Rows ``[start, stop)`` of a tensor as a view of its file's pages (a private, copy-on-write map of those
        pages), or None where a view cannot be had: the file holds another dtype than ``dtype``,
        or the rows are not where a tensor of that dtype may start."""
        entry = self._entry(key)
        first, last, shape = _row_range(entry, start, stop)
        view = self._view_any(entry, first, last, dtype)
        return None if view is None else view.view(shape)

    def mapped_flat(self, key: str, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor | None:
        """Elements ``[start, stop)`` of the flattened tensor (clipped to its size) as a view of its file's pages,
        as :meth:`mapped`."""
        entry = self._entry(key)
        return self._view_any(entry, *_element_range(entry, start, stop), dtype)

    def _view_any(self, entry: _Entry | _Pieces, first: int, last: int, dtype: torch.dtype) -> torch.Tensor | None:
        """:meth:`_view`, of a joined tensor too where the elements lie in one of its pieces (else None)."""
        if isinstance(entry, _Entry):
            return self._view(entry, first, last, dtype)
        parts = _ranges(entry, first, last)
        if len(parts) != 1:
            return torch.empty(0, dtype=dtype) if not parts and entry.dtype == dtype else None
        return self._view(*parts[0], dtype)

    def _view(self, entry: _Entry, first: int, last: int, dtype: torch.dtype) -> torch.Tensor | None:
        """Elements ``[first, last)`` of the flattened tensor, 1-D, in a private map of just their pages (the one
        :meth:`read_ahead` made, if it did). A map of the whole file would let the kernel map the neighbouring rows
        with them (it maps the page cache's large folios, up to 2 MB, around each fault): a rank would count other
        ranks' rows as its own memory."""
        size = dtype.itemsize
        begin, nbytes = entry.offset + first * size, max(0, last - first) * size
        if entry.dtype != dtype or begin % size:
            return None
        if not nbytes:
            return torch.empty(0, dtype=dtype)
        mapped = self._ahead.pop((entry.path, begin, nbytes), None) or _map(entry.path, begin, nbytes)
        if mapped is None:
            return None
        pages, skip = mapped
        return torch.frombuffer(pages, dtype=dtype, count=nbytes // size, offset=skip)

    def flat(self, key: str, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Elements ``[start, stop)`` of the flattened tensor (clipped to its size), read from the file alone;
        straight into ``out`` when it is given."""
        entry = self._entry(key)
        first, last = _element_range(entry, start, stop)
        return self._read_any(entry, first, last, (max(0, last - first),), out)

    def _read_any(
        self, entry: _Entry | _Pieces, first: int, last: int, shape: tuple[int, ...], out: torch.Tensor | None
    ) -> torch.Tensor:
        """:meth:`_read`, of a joined tensor too: each piece's elements straight into their place in ``out`` (or
        in a fresh tensor of ``shape``)."""
        if isinstance(entry, _Entry):
            return self._read(entry, first, last, shape, out)
        target = out if out is not None and out.is_contiguous() else torch.empty(shape, dtype=entry.dtype)
        flat, at = target.view(-1), 0
        for piece, a, b in _ranges(entry, first, last):
            self._read(piece, a, b, (b - a,), flat[at : at + b - a])
            at += b - a
        if out is not None and target is not out:
            out.copy_(target.view(out.shape))
        return out if out is not None else target

    @staticmethod
    def _read(entry: _Entry, first: int, last: int, shape: tuple[int, ...], out: torch.Tensor | None) -> torch.Tensor:
        """Elements ``[first, last)`` of the flattened tensor as ``shape``. The file's bytes land in ``out`` itself
        when it can take them (no temporary, no copy), else in a fresh tensor that is copied into ``out``."""
        direct = out is not None and out.dtype == entry.dtype and out.is_contiguous() and out.device.type == "cpu"
        target = out if direct and out is not None else torch.empty(shape, dtype=entry.dtype)
        assert target.numel() == max(0, last - first), (target.shape, shape)
        if target.numel():
            _read_into(entry.path, entry.offset + first * target.element_size(), target)
        if out is not None and not direct:
            out.copy_(target.view(out.shape))
        result = out if out is not None else target
        return result if entry.shape else result.reshape(())


def _row_range(entry: _Entry | _Pieces, start: int, stop: int) -> tuple[int, int, tuple[int, ...]]:
    """Rows ``[start, stop)`` (clipped to the tensor; a scalar is one row) as elements ``[first, last)`` of the
    flattened tensor, and the shape of those rows."""
    shape = entry.shape or (1,)
    start, stop = min(start, shape[0]), min(stop, shape[0])
    row = math.prod(shape[1:])
    return start * row, stop * row, (max(0, stop - start), *shape[1:])


def _element_range(entry: _Entry | _Pieces, start: int, stop: int) -> tuple[int, int]:
    """Elements ``[start, stop)`` of the flattened tensor, clipped to its size."""
    numel = math.prod(entry.shape)
    return min(start, numel), min(stop, numel)


def _ranges(tensor: _Entry | _Pieces, first: int, last: int) -> list[tuple[_Entry, int, int]]:
    """Elements ``[first, last)`` of a tensor's flattened values as ranges of the files' tensors: (tensor of the
    files, its first and last element), in order."""
    if isinstance(tensor, _Entry):
        return [(tensor, first, last)] if last > first else []
    out, at = [], 0
    for entry, a, b in tensor.pieces:
        low, high = max(first, at), min(last, at + b - a)
        if low < high:
            out.append((entry, a + low - at, a + high - at))
        at += b - a
    return out


def _first_byte(tensor: _Entry | _Pieces) -> tuple[Path, int]:
    entry = tensor if isinstance(tensor, _Entry) else tensor.pieces[0][0]
    return entry.path, entry.offset


def _join(converter: Any, inputs: dict[str, list[_Entry]], target: str, directory: Path) -> _Pieces:
    """The layout of the tensor transformers' ``converter`` (a ``WeightConverter``) makes of the files' tensors
    ``inputs`` (by source pattern, in the files' order), worked out without reading them: ``MergeModulelist`` stacks
    each pattern's tensors, ``Concatenate`` joins the patterns' results. Other operations move elements within a
    tensor (a transpose, an interleave, a split), which rows cannot be read through: ModelError with the fix."""
    from transformers.core_model_loading import Concatenate, MergeModulelist

    def whole(entry: _Entry) -> _Pieces:
        return _Pieces(entry.dtype, entry.shape, ((entry, 0, math.prod(entry.shape)),))

    values: dict[str, _Pieces | list[_Pieces]] = {k: [whole(e) for e in entries] for k, entries in inputs.items()}
    for op in converter.operations:
        if isinstance(op, MergeModulelist):
            one = len(values) == 1  # (as transformers names the result: the target, else the pattern)
            values = {target if one else k: _cat(_listed(v), op.dim, stack=True) for k, v in values.items()}
        elif isinstance(op, Concatenate):
            parts = [t for k in converter.source_patterns if k in values for t in _listed(values[k])]
            values = {target: _cat(parts, op.dim, stack=False)}
        else:
            values = {}
            break
    joined = values.get(target)
    if not isinstance(joined, _Pieces) or len(values) != 1:
        raise ModelError(
            f"{directory}: transformers builds {target} from the files' {', '.join(inputs)} with "
            f"{', '.join(map(repr, converter.operations))}, which sharded loading cannot read row by row; save a copy "
            "of the base in the model's own layout once (AutoModelForCausalLM.from_pretrained(BASE)"
            ".save_pretrained(DIR, save_original_format=False)) and train on DIR"
        )
    return joined


def _listed(value: _Pieces | list[_Pieces]) -> list[_Pieces]:
    return value if isinstance(value, list) else [value]


def _cat(tensors: list[_Pieces], dim: int, *, stack: bool) -> _Pieces:
    """The layout of ``torch.stack`` (``stack``) or ``torch.cat`` of ``tensors`` along ``dim``: for each index of
    the dims before ``dim``, each tensor's block of the dims from ``dim`` on, in turn."""
    head = tensors[0]
    for t in tensors:
        if t.dtype != head.dtype or t.shape[:dim] != head.shape[:dim] or (stack and t.shape != head.shape):
            found = [(str(t.dtype), list(t.shape)) for t in tensors]
            raise ModelError(f"the files' tensors to join on dim {dim} do not fit together: {found}")
    inner = [math.prod(t.shape[dim:]) for t in tensors]
    if stack:
        shape = (*head.shape[:dim], len(tensors), *head.shape[dim:])
    else:
        shape = (*head.shape[:dim], sum(t.shape[dim] for t in tensors), *head.shape[dim + 1 :])
    pieces: list[tuple[_Entry, int, int]] = []
    for i in range(math.prod(head.shape[:dim])):
        for t, size in zip(tensors, inner, strict=True):
            for entry, a, b in _ranges(t, i * size, (i + 1) * size):
                if pieces and pieces[-1][0] is entry and pieces[-1][2] == a:
                    pieces[-1] = (entry, pieces[-1][1], b)  # one read where the files hold them in a row
                else:
                    pieces.append((entry, a, b))
    return _Pieces(head.dtype, shape, tuple(pieces))


def _read_header(path: Path) -> dict[str, _Entry]:
    """The tensors a safetensors file holds. A file shorter than its header says is refused here: read through a
    map, its missing bytes would kill the process (SIGBUS) instead of raising."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
        size = os.fstat(f.fileno()).st_size
    header.pop("__metadata__", None)
    out = {}
    for key, info in header.items():
        if info["dtype"] not in _SAFE_DTYPES:
            raise ModelError(f"{path}: tensor {key} has dtype {info['dtype']}, which sharded loading does not read")
        begin, end = (8 + length + int(offset) for offset in info["data_offsets"])
        if end > size:
            raise ModelError(
                f"{path} is {size} bytes, but its tensor {key} ends at byte {end}: the file is truncated (an "
                "interrupted copy or download); copy it again, or re-save the base with save_pretrained"
            )
        out[key] = _Entry(path, _SAFE_DTYPES[info["dtype"]], tuple(info["shape"]), begin)
    return out


CONTENT_TENSORS = 1024
"""The most tensors of a base that :func:`base_content` samples (evenly over their sorted names)."""
CONTENT_ELEMENTS = 8
"""Elements a tensor's sample reads at its start and again at its middle."""


def base_content(directory: str | Path) -> dict[str, str]:
    """A sample of a base's values, tensor by tensor, as its safetensors files hold them: ``{name: "F32:<hex>"}``,
    the hex the start of the sha256 of the first and the middle :data:`CONTENT_ELEMENTS` elements' bytes. Another
    checkpoint of the same architecture (an instruct fine-tune, a base changed on disk) differs in nearly every
    tensor; the same weights in other files or shards do not. Two small reads per tensor (at most
    :data:`CONTENT_TENSORS` tensors): no tensor is read whole. A ModelError where ``directory`` holds no
    safetensors files."""
    entries = BaseWeights(directory).entries
    names = sorted(entries)
    names = names[:: math.ceil(len(names) / CONTENT_TENSORS)] if names else names
    dtype_names = {dtype: name for name, dtype in _SAFE_DTYPES.items()}
    out: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        files: dict[Path, int] = {}
        for name in names:
            entry = entries[name]
            numel, size = math.prod(entry.shape), entry.dtype.itemsize
            if entry.path not in files:
                files[entry.path] = stack.enter_context(open(entry.path, "rb", buffering=0)).fileno()
            digest = hashlib.sha256()
            for first in dict.fromkeys((0, numel // 2)):  # (one range for a tensor of one element)
                count = min(CONTENT_ELEMENTS, numel - first) * size
                digest.update(os.pread(files[entry.path], count, entry.offset + first * size))
            out[name] = f"{dtype_names[entry.dtype]}:{digest.hexdigest()[:16]}"
    return out


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


def _map(path: Path, begin: int, nbytes: int) -> tuple[mmap.mmap, int] | None:
    """A private, copy-on-write map of the pages holding bytes ``[begin, begin + nbytes)`` of a file, and where
    those bytes start in it; None on a file system that cannot map files (some FUSE mounts)."""
    start = begin - begin % mmap.ALLOCATIONGRANULARITY
    try:
        with open(path, "rb") as f:  # the map outlives the file object; a tensor made from it keeps it
            pages = mmap.mmap(
                f.fileno(),
                begin + nbytes - start,
                flags=mmap.MAP_PRIVATE,
                prot=mmap.PROT_READ | mmap.PROT_WRITE,
                offset=start,
            )
    except OSError:
        return None
    return pages, begin - start


def _fault_in(jobs: list[tuple[mmap.mmap, int, int, bool]]) -> None:
    """:meth:`BaseWeights.read_ahead`'s thread: read one byte of every page of each range, which maps the page
    (reading it from storage first if the page cache lacks it). torch releases the GIL while it reads, so the
    thread runs beside the engine's set-up. A map not kept for a view is dropped once read. The maps are popped
    as they are done, so that a view the model drops frees its pages."""
    jobs.reverse()
    while jobs:
        pages, skip, nbytes, keep = jobs.pop()
        torch.frombuffer(pages, dtype=torch.uint8, count=nbytes, offset=skip)[:: mmap.PAGESIZE].max()
        if not keep:
            pages.close()


def _memory_for_read_ahead() -> int:
    """Half of the memory the kernel says is available (``MemAvailable``), shared by this node's ranks."""
    try:
        with open("/proc/meminfo") as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return 0
    ranks = os.environ.get(ENV_LOCAL_WORLD_SIZE) or os.environ.get(ENV_LOCAL_SIZE) or "1"
    return available // 2 // max(1, int(ranks))


def _read_into(path: Path, offset: int, out: torch.Tensor) -> None:
    view = out.reshape(-1).view(torch.uint8).numpy().data  # writable: reads land in the tensor
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        done = 0
        while done < len(view):
            n = f.readinto(view[done:])
            if not n:
                raise ModelError(f"{path} ends before the tensor at byte {offset} does: the file is truncated")
            done += n


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
    import importlib

    try:
        module = importlib.import_module("transformers.initialization")
    except ImportError:  # transformers 4 keeps it in modeling_utils
        module = importlib.import_module("transformers.modeling_utils")
    return module.no_init_weights()


def build_on_meta(name_or_path: str, dtype: torch.dtype, revision: str | None = None) -> Any:
    """The causal LM that ``config.json`` describes, its parameters on the meta device (no memory, no init) and
    its buffers computed on the CPU as ``from_pretrained`` computes them (rotary ``inv_freq``); tied weights tied.
    ``revision``: a hub id's commit, branch or tag (its config alone is fetched)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(name_or_path, revision=hub_only(name_or_path, revision))
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


def enable_activation_checkpointing(model: Any) -> None:
    """Recompute each transformer block's activations in backward, non-reentrant: HF's flag on each block (no
    wrapper module, so no new prefix in any parameter name). transformers 5 names it
    ``activation_checkpointing_enable`` (its old name warns once per rank); transformers 4 has the old name only."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


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
    activation_checkpointing: bool = False,
    settings: tuple[str, str] = ("model.attn_implementation", "train.loss_chunk_tokens"),
) -> None:
    """What the trainer, :func:`dist_lora.load_sharded` and ``dist-lora check`` all do to a base before LoRA, so that
    each builds the same model: no key-value cache (training reads none), the attention kernel, the chunked loss
    (:mod:`dist_lora.loss`), activation checkpointing. ``settings`` names the first two in errors and warnings."""
    from dist_lora.loss import chunk_the_loss

    base.config.use_cache = False
    set_attention(base, attn_implementation, what=settings[0])
    if loss_chunk_tokens:
        chunk_the_loss(base, loss_chunk_tokens, what=settings[1])
    if activation_checkpointing:  # HF's flag on each block: no wrapper, so no new prefix in any key
        enable_activation_checkpointing(base)


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
