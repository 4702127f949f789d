"""Training samples: fixed-length token blocks, in an order that depends only on the seed and the global step.

Sample ``i`` of the run (counting over all steps) is ``perm_e[i mod n]`` with ``e = i // n`` and ``perm_e`` a
permutation seeded by (seed, e). Global step ``s`` uses samples ``[s*G, (s+1)*G)``; rank r's micro-batch m takes
``micro`` of them at ``(m*W + r)*micro``. Whatever the world size, a step sees the same samples, so a run resumed on
another GPU count continues exactly where the uninterrupted run would be.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch


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


def read_texts(path: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data.path {path} does not exist (a .txt file or a .jsonl with a 'text' field)")
    if p.suffix == ".jsonl":
        texts = []
        for n, row in jsonl_rows(p):
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise DataError(f"{path}:{n} needs a string 'text' field")
            texts.append(row["text"])
        return texts
    return [p.read_text(encoding="utf-8")]


class TokenBlocks:
    """The corpus tokenized once and cut into blocks of ``seq_len`` tokens (inputs are also the labels)."""

    def __init__(self, path: str, tokenizer, seq_len: int):  # type: ignore[no-untyped-def]
        ids: list[int] = []
        eos = tokenizer.eos_token_id
        for text in read_texts(path):
            ids.extend(tokenizer(text)["input_ids"])
            if eos is not None:
                ids.append(eos)
        n = len(ids) // seq_len
        if n == 0:
            raise DataError(f"{path} has {len(ids)} tokens, fewer than data.seq_len={seq_len}")
        self.blocks = torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def sample_ids(self, seed: int, positions: range) -> list[int]:
        n, out, cache = len(self), [], {}
        for i in positions:
            epoch = i // n
            if epoch not in cache:
                g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
                cache[epoch] = torch.randperm(n, generator=g)
            out.append(int(cache[epoch][i % n]))
        return out

    def micro_batch(
        self, *, seed: int, step: int, global_batch: int, micro: int, world: int, rank: int, index: int
    ) -> dict[str, torch.Tensor]:
        start = step * global_batch + (index * world + rank) * micro
        x = self.blocks[self.sample_ids(seed, range(start, start + micro))]
        return {"input_ids": x, "labels": x}
