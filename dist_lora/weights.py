"""A base's safetensors files, read rank by rank (sharded loading; see ``Backend.load_base``).

:class:`BaseWeights` indexes the files (one, or several with ``model.safetensors.index.json``) by their headers,
follows transformers' checkpoint conversions (renames, a MoE's experts fused from one tensor each) so that every
tensor is asked for by the model's name, and gives each rank only the rows it holds: plain reads into a tensor of
their size, or views of the file's pages for a frozen CPU tensor in the file's dtype. :func:`base_content` samples
a base's values for the step's base fingerprint. The model is built on the meta device first
(:func:`dist_lora.model.build_on_meta`). A base in pickle files is never unpickled here: :class:`ModelError`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import mmap
import os
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dist_lora.constants import ENV_LOCAL_SIZE, ENV_LOCAL_WORLD_SIZE


class ModelError(ValueError):
    """The base model (or its tokenizer) cannot be found or loaded; the message says why and the fix."""


SAFE_INDEX_NAME = "model.safetensors.index.json"
SAFE_WEIGHTS_NAME = "model.safetensors"


# safetensors' dtype names (the format's header: an 8-byte little-endian length, then JSON)
SAFE_DTYPES = {
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
        if info["dtype"] not in SAFE_DTYPES:
            raise ModelError(f"{path}: tensor {key} has dtype {info['dtype']}, which sharded loading does not read")
        begin, end = (8 + length + int(offset) for offset in info["data_offsets"])
        if end > size:
            raise ModelError(
                f"{path} is {size} bytes, but its tensor {key} ends at byte {end}: the file is truncated (an "
                "interrupted copy or download); copy it again, or re-save the base with save_pretrained"
            )
        out[key] = _Entry(path, SAFE_DTYPES[info["dtype"]], tuple(info["shape"]), begin)
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
    dtype_names = {dtype: name for name, dtype in SAFE_DTYPES.items()}
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
