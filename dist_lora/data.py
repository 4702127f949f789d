"""Training data: read with Hugging Face ``datasets``, tokenize once into a cache, cut or pack into rows, and give
each rank its micro-batches in an order that depends only on the seed and the global step.

Formats (``data.format``):

- ``text``: every token is a target. Unpacked, the documents are joined (each ending in EOS) and cut into blocks of
  ``seq_len`` tokens, as pre-training does; packed, each document (cut into ``seq_len`` pieces) is its own sample.
- ``completion``: a ``prompt`` and a ``completion`` field; only the completion's tokens (and the EOS after it) are
  targets.
- ``chat``: a ``messages`` list of ``{role, content}`` rendered by the tokenizer's chat template; only the assistant
  turns are targets.

Targets are found by characters, not by re-tokenizing pieces: the rendered text is tokenized once with offsets, and
a token is a target where its characters overlap an answer's span (the span of an assistant turn is what the
template adds between the conversation before it, rendered with ``add_generation_prompt``, and the conversation
through it).

Sample order: row ``i`` of the run (counting over all steps) is ``perm_e[i mod n]`` with ``e = i // n`` and
``perm_e`` a permutation seeded by (seed, e). Global step ``s`` uses rows ``[s*G, (s+1)*G)``; rank r's micro-batch m
takes ``micro`` of them at ``(m*W + r)*micro``. Whatever the world size, a step sees the same rows in the same
micro-batches, so a run resumed on another GPU count continues exactly where the uninterrupted run would be.

The cache: local rank 0 of each node tokenizes (once per source, tokenizer, format and row settings) and commits
the rows to ``data.cache_dir/<key>`` by an atomic rename; the other ranks wait, then read it memory-mapped.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import glob
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dist_lora.config import eval_set_reading, eval_sets

if TYPE_CHECKING:
    from datasets import Dataset

    from dist_lora.config import DataConfig

log = logging.getLogger(__name__)

IGNORE = -100
"""The label of a token that is not a target (PyTorch's and transformers' ignore_index)."""
CACHE_VERSION = 2
"""Part of every cache key: raised when the same data and settings give other rows (2: a chat message's keys
beyond its role and content, and a sample's tools, reach the chat template)."""
TOOLS = "tools"
"""chat and conversational completion: the optional column of each conversation's tools (function schemas, or their
JSON), given to the chat template as ``tools``."""
FIELDS = {
    "text": ("text",),
    "completion": ("prompt", "completion", TOOLS),
    "chat": ("messages", TOOLS),
    "alpaca": ("instruction", "input", "output", "system", "history"),
}
"""The fields each format reads; ``data.fields`` maps them onto a dataset's own column names."""
OPTIONAL = {"completion": (TOOLS,), "chat": (TOOLS,), "alpaca": ("input", "system", "history")}
"""Fields a format reads where a dataset has them (a column that ``data.fields`` names is required)."""
MESSAGE_KEYS = ("role", "content")
"""The keys chat reads in each message; ``data.fields`` maps them too (ShareGPT's ``from`` and ``value``)."""
TRAIN = "train"
"""chat: ``data.fields={train: KEY}`` names the message key whose false or 0 makes an assistant turn context, not a
target (ShareGPT's and axolotl's per-turn ``weight``); unmapped, every assistant turn trains."""
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
"""What a hub dataset id looks like ("name" or "org/name"); any other missing path is a missing local path."""
ATTENTION_WITH_PACKING = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")
ONE_ROW_ATTENTION = ("flash_attention_2", "flash_attention_3")
"""Kernels that tell packed samples apart by their position ids only in a batch of one row (transformers'
``_is_packed_sequence``; the others build a mask per row): a packed micro-batch reaches them as its rows laid end
to end, as HF's ``DataCollatorWithFlattening`` does."""


class DataError(ValueError):
    pass


def jsonl_rows(path: str | Path) -> list[tuple[int, Any]]:
    """(line number, parsed value) for every non-blank line of a JSONL file; a bad line is an error naming it."""
    rows = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append((n, json.loads(line)))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n} is not valid JSON: {e}") from e
    return rows


# ---------------------------------------------------------------------------------------------- sources


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _is_saved_dataset(p: Path) -> bool:
    return (p / "dataset_dict.json").is_file() or (p / "state.json").is_file()


def data_files(path: str) -> list[Path] | None:
    """The files a source names, in order: one data file; every file a glob pattern matches (``data/train-*.jsonl``,
    ``**`` for subdirectories); every data file of a directory that ``save_to_disk`` did not write (its shards). None
    for a ``save_to_disk`` directory or a hub id. The files are of one kind (one ``datasets`` builder)."""
    p = Path(path)
    if p.is_file():
        files = [p]
    elif any(c in path for c in "*?["):
        files = sorted(Path(f) for f in glob.glob(path, recursive=True) if Path(f).is_file())
        if not files:
            raise DataError(f"data.path {path} matches no file")
    elif p.is_dir() and not _is_saved_dataset(p):
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in FILE_BUILDERS)
        if not files:
            raise DataError(
                f"data.path {path} is a directory that holds no data file ({', '.join(FILE_BUILDERS)}) and was not "
                "written by Dataset.save_to_disk (no state.json or dataset_dict.json)"
            )
    else:
        return None
    kinds = sorted({f.suffix.lower() for f in files})
    if len(kinds) > 1:
        raise DataError(
            f"data.path {path} holds files of several kinds ({', '.join(kinds)}): give each kind as a source of its "
            "own in a list"
        )
    if kinds[0] not in FILE_BUILDERS:
        raise DataError(f"data.path {path}: unknown file type {kinds[0]!r}; use one of {', '.join(FILE_BUILDERS)}")
    return files


def load_source(
    path: str, *, name: str | None = None, split: str = "train", cache_dir: str | None = None, what: str = "data.path"
) -> Dataset:
    """A local file (.jsonl .json .parquet .csv .txt), the files of one kind a glob pattern or a directory holds
    (:func:`data_files`, read in order as one dataset), a directory written by ``save_to_disk``, or a hub dataset id
    (with ``name`` and ``split``), as one ``datasets.Dataset``. A .txt file is one document. ``what`` names the
    setting in errors (``data.path``, ``data.eval_path``, ``data.eval_path's set NAME``)."""
    import datasets

    p = Path(path)
    files = data_files(path)
    if files is not None:
        builder = FILE_BUILDERS[files[0].suffix.lower()]
        kwargs: dict[str, Any] = {"sample_by": "document"} if builder == "text" else {}
        try:
            return datasets.load_dataset(
                builder, data_files=[str(f) for f in files], split="train", cache_dir=cache_dir, **kwargs
            )
        except Exception as e:
            if builder == "json":  # pyarrow's parser counts its own blocks' rows: name the file and line instead
                where = _where_json_breaks(files)
                if where is not None:  # (the file's name once, where data.path is that file)
                    where = where[len(str(p)) :] if files == [p] else f": {where}"
                    raise DataError(f"{what} {path}{where}") from e
            cause = e.__cause__ or e.__context__  # datasets wraps the parser's error, which says where
            why = f"{type(e).__name__}: {e}" + (f" ({type(cause).__name__}: {cause})" if cause else "")
            raise DataError(f"{what} {path} cannot be read as {builder}: {why}") from e
    if p.is_dir():
        loaded = datasets.load_from_disk(str(p))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                setting = {"data.path": "data.split", "data.eval_path": "data.eval_split"}.get(
                    what, f"the split of {what}"
                )
                raise DataError(f"{setting} {split!r} is not in {path}; its splits: {', '.join(loaded)}")
            return loaded[split]
        return loaded
    if not HUB_ID.fullmatch(path) or Path(path).suffix.lower() in FILE_BUILDERS:
        raise DataError(f"{what} {path} does not exist (a data file, a save_to_disk directory or a hub dataset id)")
    if _offline():
        raise DataError(
            f"{what} {path} is not a local file or directory, and the hub is offline (HF_HUB_OFFLINE / "
            "HF_DATASETS_OFFLINE): download the dataset where the hub is reachable (save_to_disk) and pass that "
            "directory, or unset the offline variables"
        )
    try:
        return datasets.load_dataset(path, name, split=split, cache_dir=cache_dir)
    except Exception as e:
        raise DataError(
            f"{what} {path} is not a local file and loading it from the hub failed ({type(e).__name__}: {e}); "
            "check the dataset id, data.name and data.split, or download it and pass the local path"
        ) from e


def _where_json_breaks(files: list[Path]) -> str | None:
    """Where the first of ``files`` that JSON cannot read breaks (a JSON-lines file: its first line that is not a
    JSON object; a file that is one JSON document: the parser's line and column), or that they are all empty; None
    when each reads (the error was elsewhere). Read a line at a time: only a failed load comes here."""
    empty = True
    for f in files:
        with open(f, encoding="utf-8", errors="replace") as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                if empty and line.lstrip().startswith("["):  # a JSON array, not JSON lines
                    return _where_json_document_breaks(f)
                empty = False
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    why = e.msg.removesuffix(" at")
                    return f"{f} line {number}, column {e.colno}: not valid JSON ({why}): {line.strip()[:80]!r}"
                if not isinstance(row, dict):
                    return f"{f} line {number}: not a JSON object (one sample per line, {{...}}): {line.strip()[:80]!r}"
    return f"{', '.join(map(str, files))}: empty, no sample in it" if empty else None


def _where_json_document_breaks(f: Path) -> str | None:
    try:
        with open(f, encoding="utf-8") as doc:
            json.load(doc)
    except json.JSONDecodeError as e:
        return f"{f} line {e.lineno}, column {e.colno}: not valid JSON ({e.msg.removesuffix(' at')})"
    return None


def listed(paths: str | list[str]) -> list[str]:
    """``data.path`` or ``data.eval_path``: one source, or several."""
    return [paths] if isinstance(paths, str) else list(paths)


def named(paths: str | list[str]) -> str:
    """One source or several, for a message."""
    return ", ".join(listed(paths))


def load_sources(
    paths: str | list[str],
    cfg: DataConfig,
    *,
    split: str,
    cache_dir: str | None,
    what: str = "data.path",
    weights: list[float] | None = None,
    seed: int = 0,
) -> Dataset:
    """The samples of one source (:func:`load_source`) or of several: each source's columns of the format's fields
    (``data.fields``), which every source must have, with the same types; one source after the other, or, with
    ``weights``, drawn in those proportions by ``seed`` until every source was seen whole (the smaller repeated)."""
    import datasets

    sources = listed(paths)
    if len(sources) == 1:
        return _placed(load_source(sources[0], name=cfg.name, split=split, cache_dir=cache_dir, what=what), None)
    loaded: list[Dataset] = []
    for path in sources:
        ds = load_source(path, name=cfg.name, split=split, cache_dir=cache_dir, what=what)
        missing = [c for c in _needed(cfg) if c not in ds.column_names]
        if missing:
            raise DataError(
                f"{what} {path} has no field {', '.join(map(repr, missing))} (format {cfg.format}), which the other "
                f"sources have; its fields: {', '.join(ds.column_names)}. Every source needs the same fields "
                "(data.fields maps one set of names)"
            )
        loaded.append(ds)
    columns = [c for c in _fields(cfg).values() if any(c in ds.column_names for ds in loaded)]
    for column in columns:  # an optional one that some sources lack: null in their samples, of the others' type
        typed = next(ds.features[column] for ds in loaded if column in ds.column_names)
        loaded = [
            ds if column in ds.column_names else ds.add_column(column, [None] * len(ds), feature=typed) for ds in loaded
        ]
    parts = [
        _placed(_as_json_text(ds, cfg) if cfg.format == "chat" else ds.select_columns(columns), i)
        for i, ds in enumerate(loaded)
    ]
    first = parts[0].features
    for i, (path, ds) in enumerate(zip(sources, parts, strict=True)):
        if ds.features != first:
            try:
                parts[i] = ds.cast(first)
            except (ValueError, TypeError) as e:
                raise DataError(
                    f"{what} {path}: its fields have other types than those of {sources[0]} ({dict(ds.features)} "
                    f"against {dict(first)}), and do not convert ({type(e).__name__}: {e})"
                ) from e
    if weights:
        shares = [w / sum(weights) for w in weights]
        return datasets.interleave_datasets(parts, shares, seed=seed, stopping_strategy="all_exhausted")
    return datasets.concatenate_datasets(parts)


SAMPLE, SOURCE = "_dist_lora_sample", "_dist_lora_source"
"""Columns that :func:`load_sources` adds: each sample's index in its source, and which source (of several) it came
from, so that an error names the sample where the user finds it, after an eval split's shuffle or a mix."""


def _placed(ds: Dataset, source: int | None) -> Dataset:
    """``ds`` with :data:`SAMPLE` (and, ``source`` given, :data:`SOURCE`) added."""
    import numpy as np

    ds = ds.add_column(SAMPLE, np.arange(len(ds), dtype=np.int64))
    return ds if source is None else ds.add_column(SOURCE, np.full(len(ds), source, dtype=np.int32))


def _naming_samples(
    fn: Callable[[dict[str, list], list[str]], dict[str, list]], sources: list[str]
) -> Callable[[dict[str, list], list[int]], dict[str, list]]:
    """A batched ``datasets.map`` function with indices, calling ``fn`` with each sample's place in its source
    ("sample 7 of data/b.jsonl", from :data:`SAMPLE` and :data:`SOURCE`) in place of its index in the dataset."""

    def run(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        samples = batch.get(SAMPLE) or indices
        origins = batch.get(SOURCE) or [0] * len(indices)
        return fn(batch, [f"sample {i} of {sources[o]}" for i, o in zip(samples, origins, strict=True)])

    return run


def _as_json_text(ds: Dataset, cfg: DataConfig) -> Dataset:
    """A chat source's conversations (and tools, "" where it has none) as JSON text, its Arrow fill-in nulls left
    out: sources whose messages carry other keys (tool calls, names, weights) or whose tools have other schemas
    have other Arrow types, which cannot be joined as they are; the text of each can."""
    messages, tools = _fields(cfg)["messages"], _fields(cfg)[TOOLS]

    def text(values: list[Any]) -> list[str]:
        return [v if isinstance(v, str) else json.dumps(without_nones(v)) if v is not None else "" for v in values]

    def convert(batch: dict[str, list]) -> dict[str, list]:
        n = len(batch[messages])
        return {messages: text(batch[messages]), tools: text(batch[tools]) if tools in batch else [""] * n}

    return ds.map(convert, batched=True, remove_columns=ds.column_names, desc="chat as JSON text")


def _hash_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(str(p.name).encode() + b"\0")
        with p.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def source_id(path: str, name: str | None, split: str, cache_dir: str | None, what: str = "data.path") -> str:
    """What identifies the data: the bytes of a local file or saved directory; a hub dataset's fingerprint.
    ``what``: the setting that names it, for errors."""
    p = Path(path)
    files = data_files(path)
    if files is not None:
        return ("file:" if p.is_file() else "files:") + _hash_files(files)
    if p.is_dir():
        return f"dir:{split}:" + _hash_files([f for f in p.rglob("*") if f.is_file()])
    return "hub:" + load_source(path, name=name, split=split, cache_dir=cache_dir, what=what)._fingerprint


def sources_id(
    paths: str | list[str], name: str | None, split: str, cache_dir: str | None, what: str = "data.path"
) -> str | list[str]:
    """:func:`source_id` of one source, or of each of several in their order."""
    ids = [source_id(path, name, split, cache_dir, what) for path in listed(paths)]
    return ids[0] if isinstance(paths, str) else ids


def tokenizer_id(tokenizer: Any) -> str:
    """A hash of everything in the tokenizer that changes token ids: its vocabulary and rules, special tokens,
    chat template."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    rules = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    h.update(rules.encode())
    h.update(json.dumps([str(tokenizer.special_tokens_map), str(tokenizer.chat_template)]).encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- tokenize


@dataclass
class Stats:
    """What tokenization kept and left out; logged once, when the cache is built, and kept in it."""

    samples: int = 0
    truncated: int = 0
    dropped_long: int = 0
    dropped_no_target: int = 0
    cut_off: int = 0  # truncated to seq_len before their first target: dropped
    rows: int = 0
    eval_rows: int = 0
    targets: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def _fields(cfg: DataConfig) -> dict[str, str]:
    """The format's columns, by the names ``data.fields`` gives them."""
    readable = (*FIELDS[cfg.format], *((*MESSAGE_KEYS, TRAIN) if cfg.format == "chat" else ()))
    unknown = set(cfg.fields) - set(readable)
    if unknown:
        raise DataError(
            f"data.fields names {', '.join(sorted(unknown))}, which format {cfg.format} does not read; it reads "
            f"{', '.join(readable)}"
        )
    return {f: cfg.fields.get(f, f) for f in FIELDS[cfg.format]}


def _needed(cfg: DataConfig) -> list[str]:
    """The columns a dataset must have for the format: its fields but the optional ones ``data.fields`` leaves
    unnamed (:data:`OPTIONAL`)."""
    optional = OPTIONAL.get(cfg.format, ())
    return [column for f, column in _fields(cfg).items() if f not in optional or f in cfg.fields]


def _message_keys(cfg: DataConfig) -> tuple[str, str]:
    """chat: the role and content keys of a message, by the names ``data.fields`` gives them."""
    return cfg.fields.get("role", "role"), cfg.fields.get("content", "content")


def without_nones(value: Any) -> Any:
    """``value`` with every None inside it left out, at any depth: a dataset in Arrow's struct columns (parquet
    files, a hub dataset) gives each message every key any message has (a plain turn gets ``tool_calls: None``)
    and each tool schema every field of any other, which a chat template reads as set (``'tool_calls' in
    message``). TRL drops them alike."""
    if isinstance(value, dict):
        return {k: without_nones(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_nones(v) for v in value]
    return value


def _turns(messages: Any, cfg: DataConfig) -> list[dict[str, Any]] | None:
    """A sample's messages as the chat template takes them: ``role`` (renamed by ``data.roles``) and ``content``
    under the message keys, and the message's other keys as they are (``tool_calls``, ``tool_call_id``, ``name``,
    ...), Arrow's fill-in Nones left out, a content of text parts (``[{"type": "text", "text": ...}]``) joined
    into one string; or None where a message has no string role, or no string content without tool calls (an
    assistant turn that only calls tools may leave it out or null; other parts, an image, are not text)."""
    role, content = _message_keys(cfg)
    if isinstance(messages, str):  # (several sources: their conversations as JSON text)
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError:
            return None
    if not isinstance(messages, list):
        return None
    turns = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get(role), str):
            return None
        text = m.get(content)
        if isinstance(text, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in text):
            text = "".join(p.get("text") or "" for p in text)  # OpenAI's text parts: one string, as templates join them
        if not isinstance(text, str) and not (text is None and m.get("tool_calls")):
            return None
        rest = without_nones({k: v for k, v in m.items() if k not in (role, content)})
        turns.append({"role": cfg.roles.get(m[role], m[role]), "content": text or "", **rest})
    return turns


def with_system(turns: list[dict[str, Any]], cfg: DataConfig) -> list[dict[str, Any]]:
    """``data.system_prompt`` as the first turn of a conversation that has no system turn."""
    if cfg.system_prompt is None or any(t["role"] == "system" for t in turns):
        return turns
    return [{"role": "system", "content": cfg.system_prompt}, *turns]


def _tools(value: Any, sample: str) -> list[Any] | None:
    """A conversation's tools for the chat template: a list of schemas, or its JSON text (as many datasets keep
    them); None or empty: none."""
    if isinstance(value, str):
        if not value.strip():
            return None
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise DataError(f"{sample}: its tools are text that is not JSON ({e}): {value!r:.200}") from e
    if not value:
        return None
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise DataError(
            f"{sample}: tools must be a list of tool schemas (or its JSON text), got {type(value).__name__}: "
            f"{value!r:.200}"
        )
    return without_nones(value)


def _roles_seen(ds: Any, cfg: DataConfig, limit: int = 200) -> list[str]:
    """The roles (after ``data.roles``) of the first ``limit`` chat samples, for a message about targets."""
    field_ = _fields(cfg)["messages"]
    seen: set[str] = set()
    for messages in ds.select(range(min(limit, len(ds))))[field_]:
        seen.update(t["role"] for t in _turns(messages, cfg) or [])
    return sorted(seen)


def _target_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """Whether each token (by its character offsets) overlaps one of the answer spans."""
    return [any(s < te and ts < e for s, e in spans) for ts, te in offsets]


def trained_turns(turns: list[dict[str, Any]], cfg: DataConfig) -> list[int]:
    """The indices of the assistant turns that are targets: every one, or the last (``data.turns``), less those
    whose ``data.fields`` train key is false or 0."""
    chosen = [i for i, t in enumerate(turns) if t["role"] == "assistant"]
    if cfg.turns == "last":
        chosen = chosen[-1:]
    key = cfg.fields.get(TRAIN)
    return [i for i in chosen if not key or turns[i].get(key, True) not in (False, 0)]


def chat_spans(
    tokenizer: Any, messages: list[dict[str, Any]], tools: list[Any] | None = None, trained: list[int] | None = None
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation (with its ``tools``, as the template shows them) and the character span of each
    assistant turn in it (of those ``trained`` names), its tool calls included (trailing whitespace, which the
    template adds between turns, left out)."""

    def render(msgs: list[dict[str, Any]], gen: bool = False) -> str:
        return str(tokenizer.apply_chat_template(msgs, tools=tools, tokenize=False, add_generation_prompt=gen))

    full = render(messages)
    spans = []
    for i, m in enumerate(messages):
        if m.get("role") != "assistant" or (trained is not None and i not in trained):
            continue
        before = render(messages[:i], gen=True) if i else ""
        through = render(messages[: i + 1])
        if not (through.startswith(before) and full.startswith(through)):
            raise DataError(
                "the chat template does not render a conversation prefix by prefix (the text through an assistant "
                "turn does not start with the text before it), so its answer tokens cannot be found; use a template "
                "that does (data.chat_template)"
            )
        end = len(through.rstrip())
        if end > len(before):
            spans.append((len(before), end))
    return full, spans


def _tokenize_fn(cfg: DataConfig, tokenizer: Any) -> Callable[[dict[str, list], list[str]], dict[str, list]]:
    """A batched function of samples and their places (:func:`_naming_samples`) -> input_ids, labels, and a status
    per sample. A sample of the wrong type is an error naming its place."""
    f = _fields(cfg)
    eos = tokenizer.eos_token_id
    seq_len = cfg.seq_len

    def finish(ids: list[int], targets: list[bool]) -> tuple[list[int], list[int], str]:
        labels = [t if keep else IGNORE for t, keep in zip(ids, targets, strict=True)]
        status = "ok"
        if len(ids) > seq_len:
            if cfg.too_long == "drop":
                return [], [], "dropped_long"
            ids, labels, status = ids[:seq_len], labels[:seq_len], "truncated"
        if all(x == IGNORE for x in labels[1:]):  # the first label is never predicted
            return [], [], "cut_off" if status == "truncated" else "dropped_no_target"
        return ids, labels, status

    def text(batch: dict[str, list], samples: list[str]) -> dict[str, list]:
        for where, value in zip(samples, batch[f["text"]], strict=True):
            if not isinstance(value, str):
                got = "None: the sample lacks it, or it is null" if value is None else f"{value!r:.200}"
                raise DataError(
                    f"{where}: field {f['text']!r} must be a string (got {got}); fix or remove the "
                    "sample, or name the text's column with data.fields, e.g. {text: content}"
                )
        out: dict[str, list] = {"input_ids": [], "labels": [], "status": []}
        for ids in tokenizer(batch[f["text"]])["input_ids"]:
            ids = ids + ([eos] if eos is not None else [])
            pieces = [ids[i : i + seq_len] for i in range(0, len(ids), seq_len)] if cfg.packing else [ids]
            for piece in pieces:  # unpacked text is joined and cut later: nothing is truncated
                if len(piece) >= 2 or not cfg.packing:
                    out["input_ids"].append(piece)
                    out["labels"].append(list(piece))
                    out["status"].append("ok")
        return out

    def answers(texts: list[str], spans: list[list[tuple[int, int]]], *, rendered: bool) -> dict[str, list]:
        """``rendered``: texts a chat template wrote, its special tokens in them; else plain text, the tokenizer's
        special tokens added and EOS after the completion."""
        enc = tokenizer(texts, add_special_tokens=not rendered, return_offsets_mapping=True)
        out: dict[str, list] = {"input_ids": [], "labels": [], "status": []}
        for ids, offsets, sp in zip(enc["input_ids"], enc["offset_mapping"], spans, strict=True):
            targets = [True] * len(ids) if cfg.loss_on_prompt else _target_mask([tuple(o) for o in offsets], sp)
            if not rendered and eos is not None and ids[-1] != eos:
                ids, targets = [*ids, eos], [*targets, True]  # the model learns to stop after the completion
            ids, labels, status = finish(ids, targets)
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out["status"].append(status)
        return out

    def completion(batch: dict[str, list], samples: list[str]) -> dict[str, list]:
        prompts, completions = batch[f["prompt"]], batch[f["completion"]]
        if all(isinstance(x, list) for x in [*prompts, *completions]):
            return conversational(batch, samples, prompts, completions)
        for where, p, c in zip(samples, prompts, completions, strict=True):
            if not isinstance(p, str) or not isinstance(c, str):
                raise DataError(
                    f"{where}: fields {f['prompt']!r} and {f['completion']!r} must be strings, or both lists of "
                    f"messages (TRL's conversational prompt-completion) (got {p!r:.200}, {c!r:.200})"
                )
        if cfg.system_prompt is not None:
            raise DataError(
                "data.system_prompt is a chat turn, and these prompts and completions are plain text (no chat "
                "template renders them): drop it, or give them as lists of messages"
            )
        texts = [p + c for p, c in zip(prompts, completions, strict=True)]
        return answers(texts, [[(len(p), len(t))] for p, t in zip(prompts, texts, strict=True)], rendered=False)

    def conversational(batch: dict[str, list], samples: list[str], prompts: list, completions: list) -> dict[str, list]:
        """TRL's conversational prompt-completion: both fields lists of messages, rendered together by the chat
        template; the completion's assistant turns are the targets."""
        if not tokenizer.chat_template:
            raise DataError(
                "prompts and completions as lists of messages are rendered by a chat template, and this tokenizer "
                f"has none: {no_template_fix(tokenizer)}"
            )
        texts, spans = [], []
        tools = batch.get(f[TOOLS]) or [None] * len(samples)
        for where, p, c, given in zip(samples, prompts, completions, tools, strict=True):
            prompt, answer = _turns(p, cfg), _turns(c, cfg)
            if prompt is None or answer is None:
                raise DataError(
                    f"{where}: fields {f['prompt']!r} and {f['completion']!r} as lists of messages must hold "
                    f"{{role, content}} string pairs (got {p!r:.200}, {c!r:.200})"
                )
            turns = with_system(prompt + answer, cfg)
            trained = [j for j in range(len(turns) - len(answer), len(turns)) if turns[j]["role"] == "assistant"]
            text, sp = chat_spans(tokenizer, turns, _tools(given, where), trained)
            texts.append(text)
            spans.append(sp)
        return answers(texts, spans, rendered=True)

    def chat(batch: dict[str, list], samples: list[str]) -> dict[str, list]:
        texts, spans = [], []
        tools = batch.get(f[TOOLS]) or [None] * len(samples)
        for where, messages, given in zip(samples, batch[f["messages"]], tools, strict=True):
            turns = _turns(messages, cfg)
            if turns is None:
                role, content = _message_keys(cfg)
                raise DataError(
                    f"{where}: field {f['messages']!r} must be a list of {{{role}, {content}}} string pairs (got "
                    f"{messages!r:.200}); other keys are mapped with data.fields, e.g. {{role: from, content: value}}; "
                    "a turn that calls tools (tool_calls) may leave its content null"
                )
            turns = with_system(turns, cfg)
            text, sp = chat_spans(tokenizer, turns, _tools(given, where), trained_turns(turns, cfg))
            texts.append(text)
            spans.append(sp)
        return answers(texts, spans, rendered=True)

    def alpaca(batch: dict[str, list], samples: list[str]) -> dict[str, list]:
        """Alpaca's samples as conversations (LLaMA-Factory's reading): the system column's turn (else
        ``data.system_prompt``'s), the history's pairs as user and assistant turns, a user turn (the instruction,
        and on the next line the input where there is one; both also under their own keys, for a template that
        sets them apart, as the built-in ``alpaca`` does), and the output as the assistant's."""
        texts, spans = [], []
        blank = [None] * len(samples)
        instructions, outputs = batch[f["instruction"]], batch[f["output"]]
        optional = [batch.get(f[name], blank) for name in ("input", "system", "history")]
        for where, instruction, output, given, system, history in zip(
            samples, instructions, outputs, *optional, strict=True
        ):
            pairs = history or []
            if (
                not (isinstance(instruction, str) and isinstance(output, str))
                or not all(v is None or isinstance(v, str) for v in (given, system))
                or not isinstance(pairs, list)
                or not all(
                    isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)
                    for pair in pairs
                )
            ):
                raise DataError(
                    f"{where}: fields {f['instruction']!r} and {f['output']!r} must be strings, {f['input']!r} and "
                    f"{f['system']!r} strings or empty, and {f['history']!r} a list of [instruction, response] "
                    f"string pairs or empty (got {instruction!r:.100}, {output!r:.100}, {given!r:.100}, "
                    f"{system!r:.100}, {history!r:.200})"
                )
            turns = [{"role": "system", "content": system}] if system else []
            for asked, answered in pairs:
                turns += [{"role": "user", "content": asked}, {"role": "assistant", "content": answered}]
            user = {"role": "user", "content": f"{instruction}\n{given}" if given else instruction}
            user.update(instruction=instruction, **({"input": given} if given else {}))
            turns = with_system([*turns, user, {"role": "assistant", "content": output}], cfg)
            text, sp = chat_spans(tokenizer, turns, None, trained_turns(turns, cfg))
            texts.append(text)
            spans.append(sp)
        return answers(texts, spans, rendered=True)

    return {"text": text, "completion": completion, "chat": chat, "alpaca": alpaca}[cfg.format]


# ---------------------------------------------------------------------------------------------- rows


def _blocks(samples: Dataset, seq_len: int) -> Iterator[dict[str, Any]]:
    """Unpacked text: all documents joined and cut into blocks of seq_len tokens (a short tail is left out)."""
    carry: list[int] = []
    for batch in samples.iter(batch_size=1000):
        for ids in batch["input_ids"]:
            carry.extend(ids)
            while len(carry) >= seq_len:
                block, carry = carry[:seq_len], carry[seq_len:]
                yield {"input_ids": block, "labels": block, "lengths": [seq_len], "n_targets": seq_len - 1}


def pack_plan(lengths: list[int], seq_len: int) -> list[list[int]]:
    """Best-fit decreasing: samples longest first, each into the row whose free room fits it most tightly (a new
    row if none does). Returns each row's sample indices; rows in the order they were opened, samples in the order
    placed. Deterministic: a function of the lengths only. O(n log seq_len)."""
    rows: list[list[int]] = []
    by_room: dict[int, list[int]] = {}  # free room -> rows with exactly that much (a stack)
    rooms: list[int] = []  # the sorted free-room values that some row has
    for i in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        n = lengths[i]
        at = bisect.bisect_left(rooms, n)
        if at < len(rooms):
            room = rooms[at]
            row = by_room[room].pop()
            if not by_room[room]:
                del by_room[room]
                rooms.pop(at)
        else:
            room, row = seq_len, len(rows)
            rows.append([])
        rows[row].append(i)
        left = room - n
        if left > 0:
            if left not in by_room:
                by_room[left] = []
                bisect.insort(rooms, left)
            by_room[left].append(row)
    return rows


def _packed(samples: Dataset, seq_len: int) -> Iterator[dict[str, Any]]:
    """Rows of several samples (:func:`pack_plan`). A sample's first label is not a target: nothing before it in
    the row belongs to it."""
    plan = pack_plan([len(x) for batch in samples.iter(batch_size=1000) for x in batch["input_ids"]], seq_len)
    for chunk in range(0, len(plan), 1000):
        rows = plan[chunk : chunk + 1000]
        flat = [i for row in rows for i in row]
        read = samples.select(flat)
        at = 0
        for row in rows:
            ids: list[int] = []
            labels: list[int] = []
            lengths: list[int] = []
            for k in range(at, at + len(row)):
                sample = read[k]
                ids += sample["input_ids"]
                labels += [IGNORE, *sample["labels"][1:]]
                lengths.append(len(sample["input_ids"]))
            at += len(row)
            yield {
                "input_ids": ids,
                "labels": labels,
                "lengths": lengths,
                "samples": row,
                "n_targets": sum(x != IGNORE for x in labels),
            }


def _unpacked(samples: Dataset) -> Iterator[dict[str, Any]]:
    for batch in samples.iter(batch_size=1000):
        for s_ids, s_labels in zip(batch["input_ids"], batch["labels"], strict=True):
            n = sum(x != IGNORE for x in s_labels[1:])
            yield {"input_ids": s_ids, "labels": s_labels, "lengths": [len(s_ids)], "n_targets": n}


def _rows(samples: Dataset, cfg: DataConfig, cache: str) -> Dataset:
    """The training rows of tokenized samples; an empty dataset when they make none (the caller says why)."""
    from datasets import Dataset
    from datasets.arrow_writer import SchemaInferenceError
    from datasets.exceptions import DatasetGenerationError

    gen: Callable[[Dataset], Iterator[dict[str, Any]]]
    if cfg.packing:
        gen = functools.partial(_packed, seq_len=cfg.seq_len)
    elif cfg.format == "text":
        gen = functools.partial(_blocks, seq_len=cfg.seq_len)
    else:
        gen = _unpacked

    made = [0]

    def rows() -> Iterator[dict[str, Any]]:
        for row in gen(samples):
            made[0] += 1
            yield row

    empty = Dataset.from_dict({"input_ids": [], "labels": [], "lengths": [], "n_targets": []})
    if len(samples) == 0:
        return empty
    try:
        return Dataset.from_generator(rows, cache_dir=cache, keep_in_memory=False)
    except DatasetGenerationError as e:  # no row at all (a corpus shorter than a row): datasets cannot say so
        if made[0] or not isinstance(e.__cause__, SchemaInferenceError):
            raise
        return empty


# ---------------------------------------------------------------------------------------------- the cache


def cache_root(cfg: DataConfig) -> Path:
    """``data.cache_dir``, else $DIST_LORA_CACHE/data, else ~/.cache/dist_lora/data."""
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser().absolute()
    return Path(os.environ.get("DIST_LORA_CACHE") or Path.home() / ".cache" / "dist_lora").expanduser() / "data"


def cache_key(cfg: DataConfig, tokenizer: Any, seed: int) -> str:
    """Everything that changes the rows: the data (by content), the tokenizer, the format and the row settings."""
    hf_cache = str(cache_root(cfg) / "hf")
    parts = {
        "version": CACHE_VERSION,
        "train": sources_id(cfg.path, cfg.name, cfg.split, hf_cache),
        "eval": _eval_id(cfg, hf_cache),
        "eval_fraction": cfg.eval_fraction,
        "split_seed": seed if cfg.eval_fraction else None,
        "tokenizer": tokenizer_id(tokenizer),
        "format": cfg.format,
        # (tools, optional, entered the key as tools_field, where mapped, before it was a field: caches stay valid)
        "fields": {f: column for f, column in _fields(cfg).items() if f != TOOLS},
        # (absent where chat reads the default keys and roles: earlier caches stay valid)
        **({"message_keys": _message_keys(cfg)} if cfg.format == "chat" and _message_keys(cfg) != MESSAGE_KEYS else {}),
        **({"roles": cfg.roles} if cfg.roles else {}),
        **({"turns": cfg.turns} if cfg.turns != "all" else {}),
        **({"system_prompt": cfg.system_prompt} if cfg.system_prompt is not None else {}),
        **{f"{name}_field": cfg.fields[name] for name in (TOOLS, TRAIN) if name in cfg.fields},
        "seq_len": cfg.seq_len,
        "packing": cfg.packing,
        "too_long": cfg.too_long,
        **({"loss_on_prompt": True} if cfg.loss_on_prompt else {}),  # (absent when off: earlier caches stay valid)
        **({"weights": cfg.weights, "mix_seed": seed} if cfg.weights else {}),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def _eval_id(cfg: DataConfig, hf_cache: str) -> Any:
    """The eval data's part of the cache key: one unnamed set's sources as before, named sets as [name, sources]
    pairs in order (the first is the one followed by default)."""
    sets = []
    for name, src in eval_sets(cfg).items():
        split, config_name = eval_set_reading(cfg, name)
        sets.append([name, sources_id(src, config_name, split, hf_cache, eval_setting(name))])
    return sets[0][1] if sets and sets[0][0] is None else (sets or None)


def eval_setting(name: str | None) -> str:
    """The setting that names an eval set's sources, for errors: ``data.eval_path``, or its set NAME's."""
    return "data.eval_path" if name is None else f"data.eval_path's set {name}"


def eval_split(name: str | None) -> str:
    """The cached split of an eval set: ``eval`` for the unnamed one, ``eval.NAME`` for a named one."""
    return "eval" if name is None else f"eval.{name}"


def _left_out(stats: Stats, cfg: DataConfig, ds: Any) -> str:
    """Why samples gave no row: the counts, and what to change (for chat samples without an assistant turn, the
    roles they have)."""
    counts = (
        f"{stats.samples} samples, {stats.dropped_long} longer than data.seq_len={cfg.seq_len} dropped, "
        f"{stats.cut_off} with no target within data.seq_len, {stats.dropped_no_target} without a target"
    )
    if cfg.format == "chat" and not cfg.loss_on_prompt and stats.dropped_no_target:
        roles = _roles_seen(ds, cfg)
        if "assistant" not in roles:
            return (
                f"{counts}; chat trains on the turns whose role is assistant, and the roles found are {roles}: name "
                "yours with data.roles, e.g. data.roles={gpt: assistant, human: user}"
            )
    if cfg.format == "text":
        return f"{counts}; " + (
            "packed, a text needs at least 2 tokens" if cfg.packing else "a text corpus needs at least seq_len tokens"
        )
    return counts


AUTO_PROCESSES_FROM = 10_000
"""Samples from which ``data.num_proc: null`` tokenizes on several processes (below, starting them costs more than
it saves)."""
MAX_AUTO_PROCESSES = 32


def tokenize_processes(cfg: DataConfig, samples: int) -> int:
    """How many processes tokenize ``samples`` samples: ``data.num_proc``, or by default one per CPU core this
    process may use (at most :data:`MAX_AUTO_PROCESSES`) from :data:`AUTO_PROCESSES_FROM` samples; never more than
    the samples."""
    if cfg.num_proc is not None:
        wanted = cfg.num_proc
    elif samples < AUTO_PROCESSES_FROM:
        wanted = 1
    else:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        wanted = min(cores, MAX_AUTO_PROCESSES)
    return max(1, min(wanted, samples))


def _tokenize(
    ds: Dataset, cfg: DataConfig, tokenizer: Any, what: str, key: str, tmp: str, sources: str | list[str]
) -> tuple[Dataset, Stats]:
    """``ds``'s samples tokenized (``sources``: where they were read from, to name a bad one), and what was kept."""
    missing = [c for c in _needed(cfg) if c not in ds.column_names]
    given = [c for c in ds.column_names if c not in (SAMPLE, SOURCE)]
    other = [
        f for f, names in FIELDS.items() if f != cfg.format and set(names) - set(OPTIONAL.get(f, ())) <= set(given)
    ]
    if missing and other and not cfg.fields:  # (the samples are another format's, by its own field names)
        raise DataError(
            f"{what} has no field {', '.join(map(repr, missing))} (format {cfg.format}); its fields "
            f"{', '.join(given)} are those of data.format {other[0]}: set data.format={other[0]}"
        )
    if missing:
        raise DataError(
            f"{what} has no field {', '.join(map(repr, missing))} (format {cfg.format}); its fields: "
            f"{', '.join(given)}. Map yours with data.fields, e.g. data.fields={{{FIELDS[cfg.format][0]}: {given[0]}}}"
        )
    processes = tokenize_processes(cfg, len(ds))
    parallel = {"num_proc": processes} if processes > 1 else {}
    if parallel:
        log.info("data: tokenizing %d %s samples on %d processes (data.num_proc)", len(ds), what, processes)
    tokenized = ds.map(
        _naming_samples(_tokenize_fn(cfg, tokenizer), listed(sources)),
        batched=True,
        with_indices=True,
        remove_columns=ds.column_names,
        new_fingerprint=f"{key}-{what}-tok",
        cache_file_name=os.path.join(tmp, f"{what}-tokens.arrow"),
        desc=f"tokenizing {what}",
        **parallel,
    )
    status = tokenized["status"] if len(tokenized) else []  # no sample made a piece: no column either
    stats = Stats(
        samples=len(ds),
        truncated=status.count("truncated"),
        dropped_long=status.count("dropped_long"),
        dropped_no_target=status.count("dropped_no_target"),
        cut_off=status.count("cut_off"),
    )
    if not status:
        return tokenized, stats
    kept = tokenized.filter(
        lambda s: [x in ("ok", "truncated") for x in s],
        input_columns="status",
        batched=True,
        new_fingerprint=f"{key}-{what}-kept",
        cache_file_name=os.path.join(tmp, f"{what}-kept.arrow"),
        **parallel,
    )
    return kept, stats


def build_cache(cfg: DataConfig, tokenizer: Any, seed: int, key: str) -> tuple[Path, bool]:
    """Tokenize the train (and eval) data into rows under ``cache_root/key`` unless they are there already;
    returns the directory and whether this call built it. One process (per node) calls this."""
    import datasets

    root = cache_root(cfg)
    final = root / key
    if (final / "meta.json").is_file():
        return final, False
    if cfg.format in ("chat", "alpaca") and not tokenizer.chat_template:
        fix = no_template_fix(tokenizer)
        if cfg.format == "alpaca":
            fix = f"set data.chat_template: alpaca (built in: Alpaca's prompts); or {fix.removeprefix('set ')}"
        raise DataError(f"data.format {cfg.format} needs a chat template, and this tokenizer has none: {fix}")
    if cfg.format != "text" and not getattr(tokenizer, "is_fast", False):
        raise DataError(
            f"data.format {cfg.format} finds answer tokens by character offsets, which needs a fast tokenizer "
            f"({type(tokenizer).__name__} is not); install `tokenizers` or convert the tokenizer"
        )
    root.mkdir(parents=True, exist_ok=True)
    hf_cache = str(root / "hf")
    tmp = tempfile.mkdtemp(prefix=f".{key}.", dir=root)
    try:
        train = load_sources(cfg.path, cfg, split=cfg.split, cache_dir=hf_cache, weights=cfg.weights, seed=seed)
        eval_srcs: dict[str | None, Dataset] = {}
        for name, src in eval_sets(cfg).items():
            split, config_name = eval_set_reading(cfg, name)
            reading = dataclasses.replace(cfg, name=config_name)  # (a set's own hub configuration)
            eval_srcs[name] = load_sources(src, reading, split=split, cache_dir=hf_cache, what=eval_setting(name))
        if cfg.eval_fraction:
            if len(train) < 2:
                raise DataError(
                    f"data.eval_fraction needs at least 2 samples in {named(cfg.path)} (it has {len(train)}); a .txt "
                    "file is one document: split it into a .jsonl, or set data.eval_path"
                )
            parts = train.train_test_split(test_size=cfg.eval_fraction, seed=seed, shuffle=True)
            train, eval_srcs[None] = parts["train"], parts["test"]
        samples, stats = _tokenize(train, cfg, tokenizer, "train", key, tmp, cfg.path)
        splits = {"train": _rows(samples, cfg, tmp)}
        stats.rows, stats.targets = len(splits["train"]), int(sum(splits["train"]["n_targets"]))
        if stats.rows == 0:
            raise DataError(f"{named(cfg.path)} gives no training row: {_left_out(stats, cfg, train)}")
        for name, eval_src in eval_srcs.items():
            split = eval_split(name)
            sources = cfg.path if name is None and cfg.eval_fraction else eval_sets(cfg)[name]
            eval_samples, eval_stats = _tokenize(eval_src, cfg, tokenizer, split, key, tmp, sources)
            splits[split] = _rows(eval_samples, cfg, tmp)
            eval_stats.rows = len(splits[split])
            stats.extra[split] = eval_stats.__dict__
            stats.eval_rows += eval_stats.rows
            if eval_stats.rows == 0:
                where = "data.eval_fraction" if cfg.eval_fraction else named(eval_sets(cfg)[name])
                where = where if name is None else f"set {name}: {where}"
                raise DataError(f"the eval data ({where}) has no usable sample: {_left_out(eval_stats, cfg, eval_src)}")
        stats.extra["eval_sets"] = list(eval_srcs)  # in order, the unnamed one as null
        out = Path(tmp) / "rows"
        datasets.DatasetDict(splits).save_to_disk(str(out))
        (out / "meta.json").write_text(json.dumps({"key": key, "stats": stats.__dict__}, indent=1))
        try:
            os.rename(out, final)  # atomic: a reader sees all of it or nothing
        except OSError:
            if not (final / "meta.json").is_file():  # not another node's copy of the same rows: a real error
                raise
        return final, True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _log_stats(stats: dict[str, Any], cfg: DataConfig, built: bool, where: Path) -> None:
    left_out = []
    if stats["truncated"]:
        left_out.append(f"{stats['truncated']} truncated to data.seq_len={cfg.seq_len}")
    if stats["dropped_long"]:
        left_out.append(f"{stats['dropped_long']} longer than data.seq_len={cfg.seq_len} dropped")
    if stats.get("cut_off"):  # (a cache built before it was counted apart has none)
        cut = stats["cut_off"]
        left_out.append(f"{cut} with no target within data.seq_len={cfg.seq_len} dropped (raise seq_len to keep them)")
    if stats["dropped_no_target"]:
        left_out.append(f"{stats['dropped_no_target']} without a target token dropped")
    log.info(
        "data: %s %d %s samples into %d rows (%d target tokens%s)%s; %s",
        "tokenized" if built else "cached, no tokenization:",
        stats["samples"],
        cfg.format,
        stats["rows"],
        stats["targets"],
        _eval_rows_shown(stats),
        "; " + ", ".join(left_out) if left_out else "",
        where,
    )


def _eval_rows_shown(stats: dict[str, Any]) -> str:
    """ ", N eval rows", or each named set's rows; nothing without eval data."""
    names = [n for n in stats["extra"].get("eval_sets", []) if n is not None]
    if names:
        return ", eval rows: " + ", ".join(f"{n} {stats['extra'][eval_split(n)]['rows']}" for n in names)
    return f", {stats['eval_rows']} eval rows" if stats["eval_rows"] else ""


# ---------------------------------------------------------------------------------------------- batches


def _list_lengths(ds: Dataset, column: str) -> torch.Tensor:
    """The length of each row's list in ``column``, read by Arrow (the lists themselves never become Python)."""
    import pyarrow.compute as pc

    if not len(ds):
        return torch.zeros(0, dtype=torch.long)
    lengths = pc.list_value_length(ds.with_format("arrow")[column]).to_numpy(zero_copy_only=False)
    return torch.tensor(lengths, dtype=torch.long).reshape(-1)


class Rows:
    """Tokenized rows (blocks, samples or packed samples) and how a list of them becomes one padded batch."""

    def __init__(self, ds: Dataset, *, pad_id: int, packed: bool):
        self.ds = ds
        self.pad_id = pad_id
        self.packed = packed
        self.one_row = False
        """Packed rows laid end to end in one row of the batch (:data:`ONE_ROW_ATTENTION`). Exact: a row's first
        label, like every sample's, is no target, and its position ids restart."""
        self.n_targets = torch.tensor(ds["n_targets"], dtype=torch.long)

    @functools.cached_property
    def n_tokens(self) -> torch.Tensor:
        """Each row's tokens, padding excluded (read once, where asked: the training rows' throughput)."""
        return _list_lengths(self.ds, "input_ids")

    def __len__(self) -> int:
        return len(self.ds)

    def max_token_id(self) -> int:
        """The largest token id of the rows and their padding, read by Arrow."""
        import pyarrow.compute as pc

        if not len(self.ds):
            return self.pad_id
        ids = pc.list_flatten(self.ds.with_format("arrow")["input_ids"])
        return max(int(pc.max(ids).as_py() or 0), self.pad_id)

    def batch(self, ids: list[int], *, no_targets: bool = False) -> dict[str, torch.Tensor]:
        """Rows ``ids`` padded to the longest: input_ids, labels and (packed) position ids restarting at each
        sample, so that transformers keeps packed samples from attending to each other (in one row where
        :attr:`one_row`); or (unpacked, padded) an attention mask. ``no_targets``: every label ignored (a rank's
        filler batch in evaluation)."""
        rows = self.ds[ids]
        width = max(len(x) for x in rows["input_ids"])
        n = len(ids)
        input_ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        labels = torch.full((n, width), IGNORE, dtype=torch.long)
        for i, (x, y) in enumerate(zip(rows["input_ids"], rows["labels"], strict=True)):
            input_ids[i, : len(x)] = torch.tensor(x)
            if not no_targets:
                labels[i, : len(y)] = torch.tensor(y)
        out = {"input_ids": input_ids, "labels": labels}
        if self.packed:
            position_ids = torch.zeros((n, width), dtype=torch.long)
            for i, lengths in enumerate(rows["lengths"]):
                pad = width - sum(lengths)
                position_ids[i] = torch.cat([torch.arange(k) for k in [*lengths, pad] if k])
            out["position_ids"] = position_ids
            if self.one_row:
                out = {k: v.reshape(1, -1) for k, v in out.items()}
        elif any(len(x) < width for x in rows["input_ids"]):
            lens = torch.tensor([len(x) for x in rows["input_ids"]])
            out["attention_mask"] = (torch.arange(width)[None, :] < lens[:, None]).long()
        return out


TARGET_OPEN, TARGET_CLOSE = "⟦", "⟧"
"""How :func:`shown_rows` marks the tokens that are targets."""


def shown_rows(rows: Rows, tokenizer: Any, which: Iterable[int]) -> list[dict[str, Any]]:
    """Training rows ``which`` as text, for a person to see what trains: each sample of a row decoded, the runs of
    target tokens (the tokens the loss predicts: a label that is not ignored, past the row's first token) between
    :data:`TARGET_OPEN` and :data:`TARGET_CLOSE`; ``{"row", "tokens", "targets", "samples": [text, ...]}`` per row,
    ``targets`` the row's count in the loss. A row past the last is an error naming how many there are."""
    out = []
    for i in which:
        if not 0 <= i < len(rows):
            raise DataError(f"training row {i} does not exist: the data has {len(rows)} rows, 0 to {len(rows) - 1}")
        row = rows.ds[i]
        ids = row["input_ids"]
        target = [j > 0 and label != IGNORE for j, label in enumerate(row["labels"])]
        lengths = row.get("lengths") or [len(ids)]
        samples, start = [], 0
        for length in lengths:
            pieces, run = [], start
            for j in range(start + 1, start + length + 1):
                if j == start + length or target[j] != target[run]:
                    text = tokenizer.decode(ids[run:j])
                    pieces.append(f"{TARGET_OPEN}{text}{TARGET_CLOSE}" if target[run] else text)
                    run = j
            samples.append("".join(pieces))
            start += length
        out.append({"row": i, "tokens": len(ids), "targets": sum(target), "samples": samples})
    return out


def micro_place(index: int, world: int, rank: int) -> int:
    """Where micro-batch ``index`` of ``rank`` sits among the global batch's micro-batches (rank-major within each
    accumulation round), which fixes its rows and its random draws at any world size."""
    return index * world + rank


def draw_seed(seed: int, step: int, place: int) -> int:
    """The seed of the random draws in the forward (LoRA dropout) of the micro-batch at ``place`` in ``step``."""
    return ((seed * 1_000_003 + step) * 1_000_003 + place) % 2**63


@functools.lru_cache(maxsize=2)
def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The row order of one epoch: a permutation of ``n`` rows from ``seed`` and ``epoch`` alone (computed once per
    epoch, not at every micro-batch: a randperm of a million rows takes milliseconds)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


class TrainData:
    """The run's rows: ``train`` (in a seeded order) and ``evals``, the eval sets by name in order (one unnamed
    set under None; none without eval data)."""

    def __init__(self, where: Path, *, pad_id: int, packed: bool, built: bool):
        import datasets

        loaded = datasets.load_from_disk(str(where))
        self.where = where
        self.built = built
        self.stats = json.loads((where / "meta.json").read_text())["stats"]
        self.train = Rows(loaded["train"], pad_id=pad_id, packed=packed)
        names = self.stats["extra"].get("eval_sets", [None] if "eval" in loaded else [])  # (a cache before names)
        self.evals = {name: Rows(loaded[eval_split(name)], pad_id=pad_id, packed=packed) for name in names}

    def __len__(self) -> int:
        return len(self.train)

    @property
    def eval_rows(self) -> int:
        """The rows of every eval set together."""
        return sum(map(len, self.evals.values()))

    def sample_ids(self, seed: int, positions: range) -> list[int]:
        """The training rows at ``positions`` of the run's sample order: each epoch a seeded permutation."""
        n = len(self)
        return [int(_epoch_order(n, seed, i // n)[i % n]) for i in positions]

    def step_ids(self, seed: int, step: int, global_batch: int) -> list[int]:
        """The rows of the whole global batch of ``step``."""
        return self.sample_ids(seed, range(step * global_batch, (step + 1) * global_batch))

    def step_targets(self, *, seed: int, step: int, global_batch: int) -> int:
        """Target tokens in the whole global batch of ``step`` (every rank knows it without communicating)."""
        return int(self.train.n_targets[self.step_ids(seed, step, global_batch)].sum())

    def step_tokens(self, *, seed: int, step: int, global_batch: int) -> int:
        """The tokens of the whole global batch of ``step``, padding excluded."""
        return int(self.train.n_tokens[self.step_ids(seed, step, global_batch)].sum())

    def micro_batch_ids(
        self, *, seed: int, step: int, global_batch: int, micro: int, world: int, rank: int, index: int
    ) -> list[int]:
        """The rows of micro-batch ``index`` of ``rank``'s share of ``step``: those at its place in the global batch
        (:func:`micro_place`), the same rows at any world size for the same ``micro``."""
        start = step * global_batch + micro_place(index, world, rank) * micro
        return self.sample_ids(seed, range(start, start + micro))

    def micro_batch(
        self, *, seed: int, step: int, global_batch: int, micro: int, world: int, rank: int, index: int
    ) -> dict[str, torch.Tensor]:
        """Micro-batch ``index`` of ``rank``'s share of ``step`` (:meth:`micro_batch_ids`), as one padded batch."""
        ids = self.micro_batch_ids(
            seed=seed, step=step, global_batch=global_batch, micro=micro, world=world, rank=rank, index=index
        )
        return self.train.batch(ids)

    def eval_batches(self, name: str | None, micro: int, world: int, rank: int) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's share of eval set ``name``'s rows (rows rank, rank + world, ...) in batches of ``micro``;
        every rank yields the same number of batches (filler ones without targets), as sharded forwards are
        collectives."""
        rows = self.evals[name]
        mine = list(range(rank, len(rows), world))
        per_rank = math.ceil(math.ceil(len(rows) / world) / micro)
        for b in range(per_rank):
            ids = mine[b * micro : (b + 1) * micro]
            yield rows.batch(ids) if ids else rows.batch([0], no_targets=True)


CHAT_TEMPLATES = {  # built-in templates (dist_lora/assets/chat_templates), by the special tokens each needs
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "llama3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "gemma": ("<start_of_turn>", "<end_of_turn>"),
}
TEXT_TEMPLATES = ("alpaca",)
"""Built-in templates of plain text, whose turns end with the tokenizer's end-of-text token (Alpaca's prompts)."""
BUILT_IN_TEMPLATES = (*CHAT_TEMPLATES, *TEXT_TEMPLATES)


def _one_token(tokenizer: Any, text: str) -> bool:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]) == 1


def fitting_templates(tokenizer: Any) -> list[str]:
    """The built-in chat templates whose special tokens this tokenizer has, each one token."""
    return [name for name, tokens in CHAT_TEMPLATES.items() if all(_one_token(tokenizer, t) for t in tokens)]


def no_template_fix(tokenizer: Any, what: str = "data.chat_template") -> str:
    """How to give a tokenizer without a chat template one: ``what``, a built-in fitting its tokens first."""
    fitting = fitting_templates(tokenizer)
    names = ", ".join(BUILT_IN_TEMPLATES)
    if fitting:
        return f"set {what}: {fitting[0]} (built in, and this tokenizer has its special tokens), or a Jinja template"
    return f"set {what} (a Jinja template, a file holding one, or a built-in: {names})"


def set_chat_template(tokenizer: Any, template: str | None, what: str = "data.chat_template") -> None:
    """``data.chat_template``: a Jinja template, the path of a file holding one, or the name of a built-in
    (:data:`BUILT_IN_TEMPLATES`), set on the tokenizer. A built-in needs its special tokens in the tokenizer, each one
    token (split into text pieces, a turn's end would be no token to stop at): an error names those missing. A value
    that is none of these (no ``{`` of Jinja's syntax, no such file nor built-in: a mistyped path) is an error naming
    ``what``, not a template that renders every conversation as that text."""
    if not template:
        return
    if "{" in template:
        tokenizer.chat_template = template
        return
    p = Path(template)
    if p.is_file():
        tokenizer.chat_template = p.read_text(encoding="utf-8")
        return
    if template in TEXT_TEMPLATES and tokenizer.eos_token is None:
        raise DataError(
            f"{what} {template}: its turns end with the end-of-text token, and this tokenizer has none (no "
            "eos_token): set the tokenizer's eos_token, or give a template of its own tokens"
        )
    if template in BUILT_IN_TEMPLATES:
        missing = [t for t in CHAT_TEMPLATES.get(template, ()) if not _one_token(tokenizer, t)]
        if missing:
            fitting = fitting_templates(tokenizer)
            instead = f"the built-in {fitting[0]}, whose tokens it has, or " if fitting else ""
            raise DataError(
                f"{what} {template}: this tokenizer lacks its special tokens {', '.join(missing)} (the turns would "
                f"be text pieces, with no token for generation to stop at): use {instead}a template of this "
                "tokenizer's own tokens (configs/data/chat_template.jinja ends turns with the end-of-text token)"
            )
        chat_templates = resources.files("dist_lora") / "assets" / "chat_templates"
        tokenizer.chat_template = (chat_templates / f"{template}.jinja").read_text(encoding="utf-8")
        return
    raise DataError(
        f"{what} {template!r} is neither a file, a built-in template ({', '.join(BUILT_IN_TEMPLATES)}) nor a Jinja "
        "template (a template holds {{ }} or {% %}): fix the path or the name, or give the template itself"
    )


def check_packing(model: Any, data: TrainData) -> None:
    """Packing relies on transformers' packed-sequence masks (position ids that restart mark where a sample
    begins); a model that builds its mask otherwise would let packed samples attend to each other. A kernel that
    reads them only from a batch of one row gets ``data``'s micro-batches laid end to end."""
    import inspect
    import sys

    module = sys.modules.get(type(model).__module__)
    source = inspect.getsource(module) if module is not None else ""
    attn = getattr(model.config, "_attn_implementation", None)
    if "create_causal_mask(" not in source or attn not in ATTENTION_WITH_PACKING:
        raise DataError(
            f"data.packing: {type(model).__name__} (attention {attn}) does not build its attention mask with "
            "transformers' packed-sequence support, so packed samples would attend to each other; set "
            "data.packing: false for this model"
        )
    for rows in (data.train, *data.evals.values()):
        rows.one_row = attn in ONE_ROW_ATTENTION


def check_vocab(model: Any, data: TrainData) -> None:
    """Every token id of the rows (and the padding) within ``model``'s input embeddings. A tokenizer given tokens
    that the base's embeddings were never resized for (a chat template's, added by hand) would otherwise fail at the
    first forward that meets one: an IndexError on a CPU, a device-side assert on a GPU, the other ranks left
    waiting on a collective."""
    rows_of = model.get_input_embeddings().num_embeddings
    for name, rows in (
        ("training", data.train),
        *((f"eval set {n}" if n else "eval", r) for n, r in data.evals.items()),
    ):
        biggest = rows.max_token_id()
        if biggest >= rows_of:
            raise DataError(
                f"the {name} rows hold token id {biggest}, and the base's input embeddings have {rows_of} rows: the "
                "tokenizer has tokens the base was not resized for (added special tokens, say); resize the base for "
                "them (resize_token_embeddings, then save_pretrained) and train their rows (lora.trainable_token_"
                "indices), or use a tokenizer and template of the base's own tokens"
            )


def prepare_data(cfg: DataConfig, tokenizer: Any, *, seed: int) -> TrainData:
    """Collective: local rank 0 of each node builds (or finds) the cached rows; every rank then reads them. A
    failure on a building rank is raised on every rank alike."""
    import torch.distributed as dist

    from dist_lora.agree import raise_agreed
    from dist_lora.gather import broadcast_json

    set_chat_template(tokenizer, cfg.chat_template)
    distributed = dist.is_available() and dist.is_initialized()
    builds = not distributed or int(os.environ.get("LOCAL_RANK", "0")) == 0
    result: Any = None
    error: BaseException | None = None
    if builds:
        try:
            key = cache_key(cfg, tokenizer, seed)
            result = [key, build_cache(cfg, tokenizer, seed, key)[1]]
        except Exception as e:
            error = e
    if distributed:
        raise_agreed(error)
        result = broadcast_json(result)  # rank 0's key: every node built its rows under it, in its own cache
    elif error is not None:
        raise error
    key, built = str(result[0]), bool(result[1])
    where = cache_root(cfg) / key
    missing = None
    if not (where / "meta.json").is_file():
        missing = DataError(
            f"the tokenized rows {where} are missing on this node: the data or tokenizer differs from rank 0's "
            "(another key), or data.cache_dir is not reachable here"
        )
    if distributed:
        raise_agreed(missing)  # every rank raises it, none waits at a later collective
    elif missing is not None:
        raise missing
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    data = TrainData(where, pad_id=pad if pad is not None else 0, packed=cfg.packing, built=built and builds)
    if not distributed or dist.get_rank() == 0:
        _log_stats(data.stats, cfg, built, where)
    return data
