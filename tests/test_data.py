"""Training data (#15): sources, chat and completion targets against independent references, packing that keeps
samples apart, the tokenization cache, evaluation and keep_best."""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import re
import types
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from dist_lora.config import ConfigError, DataConfig, load_config
from dist_lora.data import CHAT_TEMPLATES, IGNORE, DataError, check_packing, prepare_data, set_chat_template
from dist_lora.generate import turn_end_ids
from dist_lora.model import load_base, load_tokenizer
from dist_lora.weights import ModelError
from tests.dist_utils import ROOT

DATA = ROOT / "configs" / "data"
TEMPLATE = (DATA / "chat_template.jinja").read_text()


def tokenizer_of(base: Path):  # type: ignore[no-untyped-def]
    tok = load_tokenizer(str(base))
    tok.chat_template = TEMPLATE
    return tok


@pytest.mark.parametrize("config", ["gpt2", "llama"])
def test_a_base_saved_without_its_tokenizer_is_named_with_the_fix(config, tmp_path):
    """A base dir holding its config alone (as `hf download REPO config.json` leaves one, for `dist-lora check`):
    for GPT-2 transformers makes an empty tokenizer; for a Llama it says sentencepiece is missing. Both are named
    as what they are: no tokenizer there, and how to save one."""
    from transformers import GPT2Config, LlamaConfig

    (GPT2Config if config == "gpt2" else LlamaConfig)().save_pretrained(tmp_path)
    with pytest.raises(ModelError, match=r"holds no tokenizer \(tokenizer.json.*save_pretrained"):
        load_tokenizer(str(tmp_path))


def prepared(tmp_path: Path, base: Path, seed: int = 0, **data):  # type: ignore[no-untyped-def]
    cfg = DataConfig(cache_dir=str(tmp_path / "cache"), **data)
    return prepare_data(cfg, tokenizer_of(base), seed=seed)


def all_rows(rows) -> list[dict]:  # type: ignore[no-untyped-def]
    return [rows.ds[i] for i in range(len(rows))]


def test_chat_targets_are_the_assistant_tokens_of_the_tokenizers_own_mask(gpt2_base, tmp_path):
    """Every conversation's labels equal apply_chat_template(..., return_assistant_tokens_mask=True) token for token
    (the template marks assistant turns with {% generation %}; dist_lora finds them by rendering prefixes)."""
    tok = tokenizer_of(gpt2_base)
    data = prepared(tmp_path, gpt2_base, path=str(DATA / "chat.jsonl"), format="chat", seq_len=512)
    conversations = [json.loads(line)["messages"] for line in (DATA / "chat.jsonl").read_text().splitlines()]
    assert data.stats["samples"] == len(conversations) == len(data) and data.stats["truncated"] == 0
    for row, messages in zip(all_rows(data.train), conversations, strict=True):
        ref = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        assert row["input_ids"] == ref["input_ids"]
        want = [t if m else IGNORE for t, m in zip(ref["input_ids"], ref["assistant_masks"], strict=True)]
        assert row["labels"] == want
        assert sum(ref["assistant_masks"]) > 0


TOOLS_TEMPLATE = """{%- if tools -%}
<|system|>
Tools: {{ tools | tojson }}<|endoftext|>
{% endif -%}
{%- for message in messages -%}
{%- if message['role'] == 'assistant' -%}
<|assistant|>
{% generation %}{%- if message['content'] %}{{ message['content'] }}{% endif -%}
{%- if message.tool_calls is defined -%}{%- for call in message.tool_calls -%}
<call>{{ call.function.name }} {{ call.function.arguments | tojson }}</call>
{%- endfor -%}{%- endif -%}<|endoftext|>{% endgeneration %}
{% elif message['role'] == 'tool' -%}
<|tool|>
{{ message['name'] }}: {{ message['content'] }}<|endoftext|>
{% else -%}
<|{{ message['role'] }}|>
{{ message['content'] }}<|endoftext|>
{% endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
<|assistant|>
{% endif -%}"""


def tool_conversations() -> list[dict]:
    """A weather lookup (a call with no content, the tool's answer, the reply), a sum over another tool of another
    schema (two calls in one turn), and a plain chat without tools or calls: in one file, Arrow gives each message
    and tool every key and field of the others, as None."""

    def tool(name: str, properties: dict) -> dict:
        schema = {"type": "object", "properties": properties, "required": sorted(properties)}
        return {"type": "function", "function": {"name": name, "description": f"the {name} tool", "parameters": schema}}

    def call(name: str, arguments: dict) -> dict:
        return {"type": "function", "function": {"name": name, "arguments": arguments}}

    weather = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call("get_weather", {"city": "Paris"})]},
        {"role": "tool", "name": "get_weather", "content": "18 C, sunny"},
        {"role": "assistant", "content": "It is 18 C and sunny in Paris."},
    ]
    sums = [
        {"role": "system", "content": "Use the tools."},
        {"role": "user", "content": "Add 2 and 3, then 4 and 5."},
        {"role": "assistant", "tool_calls": [call("add", {"a": 2, "b": 3}), call("add", {"a": 4, "b": 5})]},
        {"role": "tool", "name": "add", "content": "5"},
        {"role": "tool", "name": "add", "content": "9"},
        {"role": "assistant", "content": "5 and 9."},
    ]
    plain = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, how can I help?"}]
    number = {"type": "number"}
    return [
        {"messages": weather, "tools": [tool("get_weather", {"city": {"type": "string"}})]},
        {"messages": sums, "tools": [tool("add", {"a": number, "b": number})]},
        {"messages": plain},
    ]


@pytest.mark.parametrize("source", ["parquet", "jsonl", "jsonl, tools as JSON text"])
def test_tool_calls_and_tools_reach_the_template_and_the_calls_are_targets(source, gpt2_base, tmp_path):
    """Conversations with tools (function schemas, or their JSON text as many datasets keep them) and assistant
    turns that call them: every row equals apply_chat_template(messages, tools=..., return_assistant_tokens_mask=
    True) of the conversation as written, token for token: the tools rendered, each call a target, the tool's
    answers not. From parquet (a hub dataset's files), Arrow gives every message each key any message has and
    every schema each field of the others, as None (a plain turn's ``tool_calls``, ``city`` among ``add``'s
    arguments): none of them reaches the template, which reads ``tool_calls is defined``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    conversations = tool_conversations()
    path = tmp_path / ("tools.parquet" if source == "parquet" else "tools.jsonl")
    if source == "parquet":
        pq.write_table(pa.Table.from_pylist(conversations), path)
    else:
        with open(path, "w") as f:
            for c in conversations:
                if source.endswith("JSON text"):
                    c = {**c, "tools": json.dumps(c["tools"]) if "tools" in c else ""}
                f.write(json.dumps(c) + "\n")
    tok = tokenizer_of(gpt2_base)
    tok.chat_template = TOOLS_TEMPLATE
    data = prepare_data(
        DataConfig(path=str(path), format="chat", seq_len=512, cache_dir=str(tmp_path / "cache")),
        tok,
        seed=0,
    )
    assert len(data) == len(conversations) and data.stats["dropped_no_target"] == 0
    calls = 0
    for row, c in zip(all_rows(data.train), conversations, strict=True):
        ref = tok.apply_chat_template(
            c["messages"], tools=c.get("tools"), tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        assert row["input_ids"] == ref["input_ids"]
        assert row["labels"] == [
            t if m else IGNORE for t, m in zip(ref["input_ids"], ref["assistant_masks"], strict=True)
        ]
        targets = tok.decode([t for t in row["labels"] if t != IGNORE])
        calls += targets.count("<call>")
        assert ("Tools:" in tok.decode(row["input_ids"])) == ("tools" in c) and "18 C, sunny" not in targets
    assert calls == 3


def test_chat_sources_of_other_arrow_types_give_the_rows_of_each_alone(gpt2_base, tmp_path):
    """Several chat sources whose conversations have other Arrow types (parquet conversations with tool calls and
    tools, the shipped JSONL chat without either) train together: the rows of each source prepared alone, one
    after the other (joined as they are, their types would not concatenate)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tok = tokenizer_of(gpt2_base)
    tok.chat_template = TOOLS_TEMPLATE
    pq.write_table(pa.Table.from_pylist(tool_conversations()), tmp_path / "tools.parquet")
    sources = [str(tmp_path / "tools.parquet"), str(DATA / "chat.jsonl")]

    def rows(path: str | list[str], cache: str) -> list[dict]:
        cfg = DataConfig(path=path, format="chat", seq_len=512, cache_dir=str(tmp_path / cache))
        return all_rows(prepare_data(cfg, tok, seed=0).train)

    alone = rows(sources[0], "a") + rows(sources[1], "b")
    assert rows(sources, "both") == alone and len(alone) == len(tool_conversations()) + 64


def test_conversational_prompt_completion_gives_the_rows_of_chat_on_its_last_turn(gpt2_base, tmp_path):
    """TRL's conversational prompt-completion (both fields lists of messages) with data.format completion: each
    sample rendered whole by the chat template, the completion's assistant turns the targets, so the same
    conversations split before their last turn give exactly the rows of chat with data.turns=last; without a
    chat template, and with one field a string and the other a list, one error each."""
    conversations = [json.loads(line)["messages"] for line in (DATA / "chat.jsonl").read_text().splitlines()]
    assert all(m[-1]["role"] == "assistant" for m in conversations)
    (tmp_path / "pc.jsonl").write_text(
        "".join(json.dumps({"prompt": m[:-1], "completion": m[-1:]}) + "\n" for m in conversations)
    )
    split = prepared(tmp_path / "pc", gpt2_base, path=str(tmp_path / "pc.jsonl"), format="completion", seq_len=512)
    chat = prepared(
        tmp_path / "chat", gpt2_base, path=str(DATA / "chat.jsonl"), format="chat", turns="last", seq_len=512
    )
    assert len(split) == len(conversations) and all_rows(split.train) == all_rows(chat.train)
    cfg = DataConfig(path=str(tmp_path / "pc.jsonl"), format="completion", cache_dir=str(tmp_path / "none"))
    with pytest.raises(DataError, match="prompts and completions as lists of messages are rendered by a chat template"):
        prepare_data(cfg, load_tokenizer(str(gpt2_base)), seed=0)  # (the tiny tokenizer has no template)
    (tmp_path / "mixed.jsonl").write_text(json.dumps({"prompt": "p", "completion": conversations[0][-1:]}) + "\n")
    with pytest.raises(DataError, match="must be strings, or both lists of messages"):
        prepared(tmp_path / "mixed", gpt2_base, path=str(tmp_path / "mixed.jsonl"), format="completion")


def test_conversational_completion_reads_the_tools_column_as_chat_does(gpt2_base, tmp_path):
    """Conversational prompt-completion's optional tools column, as chat's: its rows equal those of chat with
    data.turns=last over the same conversations and tools (the tools rendered); with a source that lacks the
    column, each source gives its rows alone; data.fields names it, and a column it names is required."""
    tok = tokenizer_of(gpt2_base)
    tok.chat_template = TOOLS_TEMPLATE
    conversations = [json.loads(line)["messages"] for line in (DATA / "chat.jsonl").read_text().splitlines()][:6]
    number = {"type": "number"}
    tools = [
        {"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {"a": number}}}}
    ]

    def write(name: str, samples: list[dict]) -> str:
        (tmp_path / name).write_text("".join(json.dumps(s) + "\n" for s in samples))
        return str(tmp_path / name)

    split = [{"prompt": m[:-1], "completion": m[-1:]} for m in conversations]
    with_tools = write("tools.jsonl", [{**s, "tools": tools} for s in split[:3]])
    without = write("plain.jsonl", split[3:])
    chat = write("chat.jsonl", [{"messages": m, "tools": tools} for m in conversations[:3]])
    mapped = write("mapped.jsonl", [{**s, "functions": tools} for s in split[:3]])

    def rows(path: str | list[str], **data) -> list[dict]:  # type: ignore[no-untyped-def]
        cfg = DataConfig(path=path, seq_len=512, cache_dir=str(tmp_path / f"cache-{len(os.listdir(tmp_path))}"), **data)
        return all_rows(prepare_data(cfg, tok, seed=0).train)

    alone = rows(with_tools, format="completion")
    assert alone == rows(chat, format="chat", turns="last")
    assert all("Tools:" in tok.decode(row["input_ids"]) for row in alone)
    assert rows([with_tools, without], format="completion") == alone + rows(without, format="completion")
    assert rows(mapped, format="completion", fields={"tools": "functions"}) == alone
    with pytest.raises(DataError, match=r"plain.jsonl has no field 'functions' \(format completion\)"):
        rows([mapped, without], format="completion", fields={"tools": "functions"})


def test_shown_rows_mark_exactly_the_target_tokens_of_each_packed_sample(gpt2_base, tmp_path):
    """dist-lora check --show-rows: each packed sample of a row decoded, the runs of target tokens between the
    markers: the text without the markers is the sample's tokens decoded, the marked text is its targets
    decoded, and with chat data each marked run is one assistant turn."""
    from dist_lora.data import TARGET_CLOSE, TARGET_OPEN, shown_rows

    tok = tokenizer_of(gpt2_base)
    data = prepared(tmp_path, gpt2_base, path=str(DATA / "chat.jsonl"), format="chat", seq_len=256, packing=True)
    shown = shown_rows(data.train, tok, range(3))
    assert [r["row"] for r in shown] == [0, 1, 2]
    for r in shown:
        row = data.train.ds[r["row"]]
        assert r["tokens"] == len(row["input_ids"]) and len(r["samples"]) == len(row["lengths"]) > 1
        assert r["targets"] == sum(label != IGNORE for label in row["labels"][1:]) == row["n_targets"]
        start = 0
        for text, length in zip(r["samples"], row["lengths"], strict=True):
            ids, labels = row["input_ids"][start : start + length], row["labels"][start : start + length]
            start += length
            assert text.replace(TARGET_OPEN, "").replace(TARGET_CLOSE, "") == tok.decode(ids)
            marked = [part.split(TARGET_CLOSE)[0] for part in text.split(TARGET_OPEN)[1:]]
            assert "".join(marked) == tok.decode([t for t in labels if t != IGNORE])
            assert all(m.endswith("<|endoftext|>") and "<|user|>" not in m for m in marked)  # an assistant turn each


def test_a_default_system_turn_and_text_parts_give_the_rows_of_the_plain_conversations(gpt2_base, tmp_path):
    """data.system_prompt puts a system turn first in each conversation without one (one that has its own keeps
    it), and a content given as OpenAI's text parts is that text: the rows equal the conversations written out
    that way; the system prompt joins the cache key; refused for text data."""
    conversations = [json.loads(line)["messages"] for line in (DATA / "chat.jsonl").read_text().splitlines()]
    system = {"role": "system", "content": "Be brief."}
    written = [m if m[0]["role"] == "system" else [system, *m] for m in conversations]
    assert written != conversations and any(m[0]["role"] == "system" for m in conversations)
    (tmp_path / "written.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n" for m in written))
    parts = [
        [
            {**t, "content": [{"type": "text", "text": t["content"][:5]}, {"type": "text", "text": t["content"][5:]}]}
            for t in m
        ]
        for m in conversations
    ]
    (tmp_path / "parts.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n" for m in parts))
    common = {"format": "chat", "seq_len": 512}
    given = prepared(tmp_path / "a", gpt2_base, path=str(tmp_path / "parts.jsonl"), system_prompt="Be brief.", **common)
    plain = prepared(tmp_path / "b", gpt2_base, path=str(tmp_path / "written.jsonl"), **common)
    assert all_rows(given.train) == all_rows(plain.train)
    without = prepared(tmp_path / "a", gpt2_base, path=str(tmp_path / "parts.jsonl"), **common)
    assert without.where != given.where and all_rows(without.train) != all_rows(given.train)
    with pytest.raises(ConfigError, match="data.system_prompt is a chat turn, and data.format is text"):
        load_config(str(ROOT / "configs" / "tiny.yaml"), ["data.system_prompt=hi", "model.name_or_path=x"])
    with pytest.raises(DataError, match="data.system_prompt is a chat turn, and these prompts and completions are"):
        prepared(
            tmp_path / "c", gpt2_base, path=str(DATA / "completion.jsonl"), format="completion", system_prompt="hi"
        )


def test_bad_tools_and_a_turn_without_content_are_named(gpt2_base, tmp_path):
    tok = tokenizer_of(gpt2_base)
    tok.chat_template = TOOLS_TEMPLATE
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    cases = [
        ({"messages": turns, "tools": "[{not json"}, "sample 0 of .*/0.jsonl: its tools are text that is not JSON"),
        ({"messages": turns, "tools": '{"name": "f"}'}, "sample 0 of .*/1.jsonl: tools must be a list of tool schemas"),
        ({"messages": [turns[0], {"role": "assistant", "content": None}]}, "a turn that calls tools"),
    ]
    for i, (sample, error) in enumerate(cases):
        (tmp_path / f"{i}.jsonl").write_text(json.dumps(sample) + "\n")
        cfg = DataConfig(path=str(tmp_path / f"{i}.jsonl"), format="chat", cache_dir=str(tmp_path / "cache"))
        with pytest.raises(DataError, match=error):
            prepare_data(cfg, tok, seed=0)
    cfg = DataConfig(path=str(tmp_path / "0.jsonl"), format="chat", fields={"tools": "functions"})
    with pytest.raises(DataError, match="has no field 'functions'"):
        prepare_data(replace(cfg, cache_dir=str(tmp_path / "cache")), tok, seed=0)


def assistant_runs(mask: list[int]) -> list[list[int]]:
    """The positions of each assistant turn in a template's assistant mask (one run of ones per turn)."""
    runs: list[list[int]] = []
    for i, m in enumerate(mask):
        if m and runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        elif m:
            runs.append([i])
    return runs


def test_the_last_turn_alone_or_the_turns_a_message_key_marks_are_the_targets(gpt2_base, tmp_path):
    """data.turns=last: only each conversation's last assistant turn is a target (the earlier ones context);
    data.fields={train: weight}: the assistant turns whose weight is 0 are context (ShareGPT's per-turn weight; a
    turn without the key trains). Each row's labels are the template's own assistant mask for exactly those turns,
    token for token; a conversation left without a target is dropped and counted; refused beside loss_on_prompt."""
    tok = tokenizer_of(gpt2_base)
    conversations = [json.loads(line)["messages"] for line in (DATA / "chat.jsonl").read_text().splitlines()]
    weighted = []
    for messages in conversations:
        first = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
        weighted.append([{**m, "weight": 0} if i == first else m for i, m in enumerate(messages)])
    (tmp_path / "weighted.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n" for m in weighted))
    common = {"format": "chat", "seq_len": 512}
    last = prepared(tmp_path / "last", gpt2_base, path=str(DATA / "chat.jsonl"), turns="last", **common)
    marked = prepared(
        tmp_path / "marked", gpt2_base, path=str(tmp_path / "weighted.jsonl"), fields={"train": "weight"}, **common
    )
    several = sum(1 for m in conversations if sum(t["role"] == "assistant" for t in m) > 1)
    assert 0 < several < len(conversations)
    assert len(last) == len(conversations) and len(marked) == several
    assert marked.stats["dropped_no_target"] == len(conversations) - several  # their one turn weighs 0
    rows = iter(all_rows(marked.train))
    for messages, row in zip(conversations, all_rows(last.train), strict=True):
        ref = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        runs = assistant_runs(ref["assistant_masks"])
        assert len(runs) == sum(m["role"] == "assistant" for m in messages)
        ids = ref["input_ids"]
        assert row["input_ids"] == ids
        assert row["labels"] == [t if i in runs[-1] else IGNORE for i, t in enumerate(ids)]
        if len(runs) > 1:
            kept = {i for run in runs[1:] for i in run}
            assert next(rows)["labels"] == [t if i in kept else IGNORE for i, t in enumerate(ids)]
    with pytest.raises(ConfigError, match="data.turns=last picks the chat turns that are targets"):
        load_config(str(ROOT / "configs" / "tiny.yaml"), ["data.turns=last", "model.name_or_path=x"])
    with pytest.raises(ConfigError, match="train key picks the chat turns .*loss_on_prompt"):
        given = ["data.format=chat", "data.fields={train: weight}", "data.loss_on_prompt=true", "model.name_or_path=x"]
        load_config(str(ROOT / "configs" / "tiny.yaml"), given)


def test_sharegpt_keys_and_roles_give_the_rows_of_the_standard_layout(gpt2_base, tmp_path):
    """ShareGPT's layout ({conversations: [{from: human|gpt|system, value}]}) read through data.fields (the column
    and each message's keys) and data.roles gives exactly the rows of the same conversations in the standard one;
    without data.roles the error names the roles found and the fix; a message without the keys names data.fields."""
    names = {"user": "human", "assistant": "gpt", "system": "system"}
    lines = []
    for line in (DATA / "chat.jsonl").read_text().splitlines():
        turns = [{"from": names[m["role"]], "value": m["content"]} for m in json.loads(line)["messages"]]
        lines.append(json.dumps({"conversations": turns}))
    (tmp_path / "sharegpt.jsonl").write_text("\n".join(lines) + "\n")
    common = {"format": "chat", "seq_len": 512}
    standard = all_rows(prepared(tmp_path, gpt2_base, path=str(DATA / "chat.jsonl"), **common).train)
    fields = {"messages": "conversations", "role": "from", "content": "value"}
    roles = {"human": "user", "gpt": "assistant"}
    sharegpt = prepared(
        tmp_path, gpt2_base, path=str(tmp_path / "sharegpt.jsonl"), fields=fields, roles=roles, **common
    )
    assert all_rows(sharegpt.train) == standard
    with pytest.raises(
        DataError, match=r"the roles found are \['gpt', 'human', 'system'\]: name yours with data.roles"
    ):
        prepared(tmp_path, gpt2_base, path=str(tmp_path / "sharegpt.jsonl"), fields=fields, **common)
    with pytest.raises(DataError, match=r"list of \{role, content\} string pairs .*mapped with data.fields"):
        prepared(
            tmp_path, gpt2_base, path=str(tmp_path / "sharegpt.jsonl"), fields={"messages": "conversations"}, **common
        )
    with pytest.raises(ConfigError, match="data.roles renames the roles of chat messages, and data.format is text"):
        load_config(str(ROOT / "configs" / "tiny.yaml"), ["data.roles={human: user}", "model.name_or_path=x"])


ALPACA = [
    {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Greet me.", "input": None, "output": "Hi.", "system": "You are terse."},
    {"instruction": "And 4 and 5?", "output": "9", "history": [["Add 2 and 3.", "5"]]},
]
NO_INPUT = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. Write a "
    "response that appropriately completes the request."
)


def alpaca_as_chat(row: dict, system: str | None = None) -> list[dict]:
    """An Alpaca sample as LLaMA-Factory reads it: system, the history's pairs, the instruction and input (a line
    apart), the output."""
    turns = [{"role": "system", "content": row.get("system") or system}] if row.get("system") or system else []
    for asked, answered in row.get("history") or []:
        turns += [{"role": "user", "content": asked}, {"role": "assistant", "content": answered}]
    user = row["instruction"] + (f"\n{row['input']}" if row.get("input") else "")
    return [*turns, {"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]


def test_alpaca_samples_are_a_user_turn_and_the_outputs_the_targets(gpt2_base, tmp_path):
    """data.format: alpaca: each sample (instruction, an input or none, a system column or data.system_prompt, a
    history of pairs, output) gives exactly the rows of the conversation LLaMA-Factory reads it as [system,
    history's turns, user: the instruction and on the next line the input; assistant: the output] in the chat
    format, through the tokenizer's template, data.turns last too; through the built-in alpaca template, the text
    of Alpaca's prompts (both preambles, an input under its own heading, the system turn in place of the
    preamble, the history's blocks first), the targets the responses and the end-of-text token alone, equal to the
    template's own assistant mask, and generation stops at that token; a source without the optional columns reads
    as one with them empty; bad samples and missing fields are named."""
    rows = [dict(r) for r in ALPACA]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    chats = [alpaca_as_chat(r, "Be kind.") for r in rows]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"messages": m}) for m in chats) + "\n")
    for turns in ("all", "last"):
        common = {"seq_len": 256, "system_prompt": "Be kind.", "turns": turns}
        alpaca = prepared(tmp_path, gpt2_base, path=str(tmp_path / "a.jsonl"), format="alpaca", **common)
        chat = prepared(tmp_path, gpt2_base, path=str(tmp_path / "c.jsonl"), format="chat", **common)
        assert all_rows(alpaca.train) == all_rows(chat.train) and len(alpaca.train) == 4

    tok = tokenizer_of(gpt2_base)
    built_in = prepared(
        tmp_path, gpt2_base, path=str(tmp_path / "a.jsonl"), format="alpaca", chat_template="alpaca", seq_len=256
    )
    set_chat_template(tok, "alpaca")
    eos = tok.eos_token
    want = {  # the text of each row, and its targets
        f"{eos}{NO_INPUT}\n\n### Instruction:\nName a colour.\n\n### Response:\nBlue.{eos}": f"Blue.{eos}",
        f"{eos}{WITH_INPUT}\n\n### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n5{eos}": f"5{eos}",
        f"{eos}You are terse.\n\n### Instruction:\nGreet me.\n\n### Response:\nHi.{eos}": f"Hi.{eos}",
        f"{eos}{NO_INPUT}\n\n### Instruction:\nAdd 2 and 3.\n\n### Response:\n5{eos}\n\n### Instruction:\nAnd 4 and 5?"
        f"\n\n### Response:\n9{eos}": f"5{eos}9{eos}",
    }
    got = {tok.decode(row["input_ids"]): row for row in all_rows(built_in.train)}
    assert sorted(got) == sorted(want)
    for text, row in got.items():
        assert tok.decode([t for t in row["labels"] if t != IGNORE]) == want[text]
    for r in rows:  # (each row equals the template's own mask over the messages dist_lora gives it)
        messages = alpaca_as_chat(r)
        user = messages[-2]
        user.update(
            content=r["instruction"], instruction=r["instruction"], **({"input": r["input"]} if r.get("input") else {})
        )
        ref = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        row = got[tok.decode(ref["input_ids"])]
        assert row["input_ids"] == ref["input_ids"]
        assert row["labels"] == [
            t if m else IGNORE for t, m in zip(ref["input_ids"], ref["assistant_masks"], strict=True)
        ]
    assert turn_end_ids(tok) == [tok.eos_token_id]

    (tmp_path / "bare.jsonl").write_text(json.dumps({"instruction": "Name a colour.", "output": "Blue."}) + "\n")
    (tmp_path / "full.jsonl").write_text("\n".join(json.dumps(r) for r in rows[1:]) + "\n")
    common = {"seq_len": 256, "system_prompt": "Be kind."}
    for mixed in (
        [tmp_path / "bare.jsonl", tmp_path / "full.jsonl"],
        [tmp_path / "full.jsonl", tmp_path / "bare.jsonl"],
    ):
        both = prepared(tmp_path, gpt2_base, path=[str(p) for p in mixed], format="alpaca", **common)
        alone = prepared(tmp_path, gpt2_base, path=str(tmp_path / "a.jsonl"), format="alpaca", **common)
        assert sorted(map(str, all_rows(both.train))) == sorted(map(str, all_rows(alone.train)))

    for bad, name in (
        ({"instruction": "x", "output": 3}, "output"),
        ({"instruction": "x", "output": "y", "history": [["q"]]}, "history"),
    ):
        (tmp_path / f"bad-{name}.jsonl").write_text(json.dumps(bad) + "\n")
        with pytest.raises(DataError, match=r"sample 0 of .*bad-.*: fields 'instruction' and 'output' must be strings"):
            prepared(tmp_path, gpt2_base, path=str(tmp_path / f"bad-{name}.jsonl"), format="alpaca", seq_len=256)
    with pytest.raises(DataError, match=r"has no field 'instruction', 'output' \(format alpaca\).*data.format chat"):
        prepared(tmp_path, gpt2_base, path=str(tmp_path / "c.jsonl"), format="alpaca", seq_len=256)
    bare_cfg = DataConfig(path=str(tmp_path / "a.jsonl"), format="alpaca", cache_dir=str(tmp_path / "none"))
    with pytest.raises(
        DataError, match="needs a chat template, and this tokenizer has none: set data.chat_template: alp"
    ):
        prepare_data(bare_cfg, load_tokenizer(str(gpt2_base)), seed=0)  # (the tiny tokenizer has no template)
    with pytest.raises(DataError, match=r"has no field 'context' \(format alpaca\)"):
        prepared(tmp_path, gpt2_base, path=str(tmp_path / "a.jsonl"), format="alpaca", fields={"input": "context"})


def test_completion_targets_are_the_completion_tokens(gpt2_base, tmp_path):
    """Reference: prompt and completion tokenized apart; labels are the completion's tokens and the EOS."""
    tok = tokenizer_of(gpt2_base)
    data = prepared(tmp_path, gpt2_base, path=str(DATA / "completion.jsonl"), format="completion", seq_len=512)
    samples = [json.loads(line) for line in (DATA / "completion.jsonl").read_text().splitlines()]
    for row, s in zip(all_rows(data.train), samples, strict=True):
        prompt = tok(s["prompt"])["input_ids"]
        completion = tok(s["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert row["input_ids"] == prompt + completion
        assert row["labels"] == [IGNORE] * len(prompt) + completion


@pytest.mark.parametrize("fmt", ["completion", "chat"])
def test_loss_on_prompt_makes_every_token_a_target(fmt, gpt2_base, tmp_path):
    """data.loss_on_prompt: the same tokens, each one a target (the first, as always, predicted by nothing); the
    default's targets are a strict subset; rows cached apart; refused for text, which trains on every token."""
    common = {"path": str(DATA / f"{fmt}.jsonl"), "format": fmt, "seq_len": 256}
    default = all_rows(prepared(tmp_path, gpt2_base, **common).train)
    everything = all_rows(prepared(tmp_path, gpt2_base, loss_on_prompt=True, **common).train)
    assert [r["input_ids"] for r in default] == [r["input_ids"] for r in everything]
    assert all(r["labels"] == r["input_ids"] for r in everything)
    assert sum(r["n_targets"] for r in default) < sum(r["n_targets"] for r in everything)
    with pytest.raises(ConfigError, match="data.loss_on_prompt is for the completion and chat formats"):
        load_config(str(ROOT / "configs" / "tiny.yaml"), ["data.loss_on_prompt=true", "model.name_or_path=x"])


def test_too_long_samples_are_truncated_or_dropped_and_counted(gpt2_base, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="dist_lora.data")
    common = {"path": str(DATA / "chat.jsonl"), "format": "chat", "seq_len": 64}
    cut = prepared(tmp_path, gpt2_base, **common)
    dropped = prepared(tmp_path, gpt2_base, too_long="drop", **common)
    assert cut.stats["truncated"] > 0 and all(len(r["input_ids"]) <= 64 for r in all_rows(cut.train))
    assert cut.stats["cut_off"] > 0 and cut.stats["dropped_no_target"] == 0  # each turn has an answer: cut off
    assert dropped.stats["dropped_long"] == cut.stats["truncated"] + cut.stats["cut_off"]
    assert len(dropped) == 64 - dropped.stats["dropped_long"]
    assert f"{cut.stats['truncated']} truncated to data.seq_len=64" in caplog.text
    assert f"{cut.stats['cut_off']} with no target within data.seq_len=64 dropped (raise seq_len" in caplog.text


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_packed_rows_give_each_sample_the_logits_it_has_alone(arch, gpt2_base, llama_base, tmp_path):
    base = gpt2_base if arch == "gpt2" else llama_base
    data = prepared(tmp_path, base, path=str(DATA / "chat.jsonl"), format="chat", seq_len=256, packing=True)
    alone = prepared(tmp_path, base, path=str(DATA / "chat.jsonl"), format="chat", seq_len=256)
    model = load_base(str(base), torch.float32).eval()
    check_packing(model, data)
    assert not data.train.one_row  # sdpa keeps the samples of each row apart itself
    assert len(data) < len(alone) / 2  # several samples per row
    batch = data.train.batch([0, 1])
    assert (batch["position_ids"] == 0).sum() > 2  # more than one sample starts in these rows
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    for r in range(2):
        start = 0
        for length, sample in zip(data.train.ds[r]["lengths"], data.train.ds[r]["samples"], strict=True):
            ids = torch.tensor([alone.train.ds[sample]["input_ids"]])
            assert ids.shape[1] == length
            with torch.no_grad():
                single = model(input_ids=ids).logits[0]
            assert (packed[r, start : start + length] - single).abs().max().item() <= 1e-5
            assert batch["labels"][r, start] == IGNORE  # nothing before a sample in its row predicts its first token
            start += length
    # a flash kernel tells packed samples apart only within one row: it gets the rows end to end, the same logits
    # and the same loss (a row's first label is no target, so no row predicts the next one's first token)
    model.config._attn_implementation = "flash_attention_2"
    check_packing(model, data)
    assert data.train.one_row
    flat = data.train.batch([0, 1])
    assert {k: v.shape for k, v in flat.items()} == {k: (1, v.numel()) for k, v in batch.items()}
    assert all(torch.equal(flat[k], v.reshape(1, -1)) for k, v in batch.items())
    model.config._attn_implementation = "sdpa"  # the same kernel computes both here: flash needs a GPU
    n = float((batch["labels"][:, 1:] != IGNORE).sum())
    with torch.no_grad():
        one_row = model(**flat, num_items_in_batch=n, use_cache=False)
        two_rows = model(**batch, num_items_in_batch=n, use_cache=False)
    assert (one_row.logits.reshape(packed.shape) - packed).abs().max().item() <= 1e-5
    assert abs(one_row.loss.item() - two_rows.loss.item()) <= 1e-6


def test_packing_is_refused_for_a_model_that_cannot_keep_samples_apart():
    class Legacy(torch.nn.Module):
        config = types.SimpleNamespace(_attn_implementation="sdpa")

    with pytest.raises(DataError, match="Legacy.*data.packing: false"):
        check_packing(Legacy(), None)


def test_the_second_run_reads_the_cache_and_a_changed_seq_len_rebuilds_it(gpt2_base, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="dist_lora.data")
    common = {"path": str(DATA / "completion.jsonl"), "format": "completion"}
    first = prepared(tmp_path, gpt2_base, seq_len=64, **common)
    again = prepared(tmp_path, gpt2_base, seq_len=64, **common)
    other = prepared(tmp_path, gpt2_base, seq_len=32, **common)
    assert first.built and not again.built and other.built
    assert again.where == first.where != other.where
    assert "cached, no tokenization" in caplog.text
    tok = tokenizer_of(gpt2_base)
    tok.chat_template = TEMPLATE + " "  # a changed tokenizer is another key
    cfg = DataConfig(cache_dir=str(tmp_path / "cache"), seq_len=64, **common)
    assert prepare_data(cfg, tok, seed=0).built


def test_every_source_kind_gives_the_same_rows(gpt2_base, tmp_path):
    """The same samples as .jsonl, .json, .parquet, .csv and a save_to_disk directory."""
    import datasets

    src = datasets.load_dataset("json", data_files=str(DATA / "completion.jsonl"), split="train")
    paths = {"jsonl": DATA / "completion.jsonl"}
    src.to_json(str(tmp_path / "c.json"), lines=False)
    src.to_parquet(str(tmp_path / "c.parquet"))
    src.to_csv(str(tmp_path / "c.csv"), index=False)
    src.save_to_disk(str(tmp_path / "saved"))
    paths |= {k: tmp_path / f"c.{k}" for k in ("json", "parquet", "csv")} | {"saved": tmp_path / "saved"}
    rows = {
        k: all_rows(prepared(tmp_path, gpt2_base, path=str(p), format="completion", seq_len=64).train)
        for k, p in paths.items()
    }
    assert all(r == rows["jsonl"] for r in rows.values())


def test_several_sources_give_the_rows_of_one_that_holds_them_all(gpt2_base, tmp_path):
    """data.path (and data.eval_path) as a list: the samples of each source one after the other, each read as its
    kind (a .jsonl, and a .parquet with a column more), give the rows of one file holding them all; a source
    without the format's fields, or with fields of other types, is named."""
    import datasets

    src = datasets.load_dataset("json", data_files=str(DATA / "completion.jsonl"), split="train")
    src.select(range(20)).to_json(str(tmp_path / "a.jsonl"))
    rest = src.select(range(20, len(src)))
    rest.add_column("origin", ["b"] * len(rest)).to_parquet(str(tmp_path / "b.parquet"))
    sources = [str(tmp_path / "a.jsonl"), str(tmp_path / "b.parquet")]
    common = {"format": "completion", "seq_len": 64}
    both = prepared(tmp_path, gpt2_base, path=sources, eval_path=sources, **common)
    whole = prepared(tmp_path, gpt2_base, path=str(DATA / "completion.jsonl"), **common)
    assert all_rows(both.train) == all_rows(whole.train) == all_rows(both.evals[None])
    assert both.stats["samples"] == len(src)

    datasets.Dataset.from_list([{"question": "q", "completion": "c"}]).to_json(str(tmp_path / "other.jsonl"))
    with pytest.raises(DataError, match=r"data.path .*other.jsonl has no field 'prompt' \(format completion\)"):
        prepared(tmp_path, gpt2_base, path=[sources[0], str(tmp_path / "other.jsonl")], **common)
    datasets.Dataset.from_list([{"prompt": [1], "completion": [2]}]).to_json(str(tmp_path / "lists.jsonl"))
    with pytest.raises(DataError, match=r"data.path .*lists.jsonl: its fields have other types than those of"):
        prepared(tmp_path, gpt2_base, path=[sources[0], str(tmp_path / "lists.jsonl")], **common)


def test_shards_by_glob_or_directory_give_the_rows_of_one_file(gpt2_base, tmp_path):
    """A glob pattern (``shards/train-*.jsonl``) or a directory of data files that save_to_disk did not write is one
    source: its files in name order give the rows of one file holding them all; a changed shard is another cache
    key; no match, mixed kinds and an empty directory are named."""
    import datasets

    from dist_lora.data import cache_key

    src = datasets.load_dataset("json", data_files=str(DATA / "completion.jsonl"), split="train")
    shards = tmp_path / "shards"
    shards.mkdir()
    for k, start in enumerate(range(0, len(src), 25)):
        src.select(range(start, min(start + 25, len(src)))).to_json(str(shards / f"train-{k:05d}.jsonl"))
    common = {"format": "completion", "seq_len": 64}
    whole = all_rows(prepared(tmp_path, gpt2_base, path=str(DATA / "completion.jsonl"), **common).train)
    for path in (str(shards / "train-*.jsonl"), str(shards)):
        assert all_rows(prepared(tmp_path, gpt2_base, path=path, **common).train) == whole, path
    cfg = DataConfig(path=str(shards / "*.jsonl"), cache_dir=str(tmp_path / "cache"), **common)
    before = cache_key(cfg, tokenizer_of(gpt2_base), 0)
    with (shards / "train-00001.jsonl").open("a") as f:
        f.write(json.dumps({"prompt": "p", "completion": " c"}) + "\n")
    assert cache_key(cfg, tokenizer_of(gpt2_base), 0) != before

    with pytest.raises(DataError, match=r"data.path .*train-\*.parquet matches no file"):
        prepared(tmp_path, gpt2_base, path=str(shards / "train-*.parquet"), **common)
    src.to_parquet(str(shards / "more.parquet"))
    with pytest.raises(DataError, match=r"holds files of several kinds \(.jsonl, .parquet\): give each kind as a"):
        prepared(tmp_path, gpt2_base, path=str(shards), **common)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="is a directory that holds no data file"):
        prepared(tmp_path, gpt2_base, path=str(tmp_path / "empty"), **common)


def test_weighted_sources_are_drawn_in_their_proportions_by_the_seed(gpt2_base, tmp_path):
    """data.weights [3, 1] over a source of 10 samples and one of 40: drawn about 3 to 1 until both were seen
    whole (the small one repeated), the same mix for a seed and another for another; trained on end to end; a
    weight per source required."""
    import datasets

    from dist_lora.data import load_sources

    for name, n in (("a", 10), ("b", 40)):
        rows = [{"prompt": f"{name}{i}: ", "completion": f"answer {i}"} for i in range(n)]
        datasets.Dataset.from_list(rows).to_json(str(tmp_path / f"{name}.jsonl"))
    sources = [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]
    cfg = DataConfig(path=sources, format="completion", weights=[3, 1])

    def mix(seed: int) -> list[str]:
        return load_sources(sources, cfg, split="train", cache_dir=None, weights=cfg.weights, seed=seed)["prompt"]

    drawn = mix(0)
    from_a = [p for p in drawn if p.startswith("a")]
    assert {f"a{i}: " for i in range(10)} <= set(from_a) and {f"b{i}: " for i in range(40)} <= set(drawn)
    assert 1.8 < len(from_a) / (len(drawn) - len(from_a)) < 4.2, len(from_a)  # 3, give or take 2 sd
    assert mix(0) == drawn and mix(1) != drawn
    data = prepared(tmp_path, gpt2_base, path=sources, format="completion", seq_len=32, weights=[3, 1])
    assert data.stats["samples"] == len(drawn)
    with pytest.raises(ConfigError, match="data.weights must give one weight > 0 to each of data.path's sources"):
        load_config(str(ROOT / "configs" / "tiny.yaml"), [f"data.path={sources}", "data.weights=[1]"])
    with pytest.raises(ConfigError, match="data.eval_fraction with data.weights would hold out samples that the mix"):
        load_config(
            str(ROOT / "configs" / "tiny.yaml"),
            [f"data.path={sources}", "data.weights=[1,1]", "data.eval_fraction=0.1"],
        )


@pytest.mark.parametrize(
    ("data", "words"),
    [
        ({"path": "org/not-here"}, ["org/not-here", "offline", "save_to_disk"]),
        (  # (named by the setting that gives it, as the cache's key reads it first)
            {"path": str(DATA / "chat.jsonl"), "format": "chat", "eval_path": "org/not-here"},
            ["data.eval_path org/not-here is not a local file", "offline"],
        ),
        (
            {"path": str(DATA / "chat.jsonl"), "format": "chat", "eval_path": {"held": "/nowhere/e.jsonl"}},
            ["data.eval_path's set held /nowhere/e.jsonl does not exist"],
        ),
        ({"path": "/nowhere/data.jsonl"}, ["/nowhere/data.jsonl", "does not exist"]),
        ({"path": str(DATA / "chat.jsonl"), "format": "completion"}, ["'prompt'", "messages", "data.format=chat"]),
        ({"path": str(DATA / "completion.jsonl"), "format": "chat"}, ["its fields prompt, completion are those of"]),
        ({"path": str(DATA / "completion.jsonl"), "format": "text"}, ["no field 'text'", "data.format=completion"]),
        (
            {"path": str(DATA / "chat.jsonl"), "format": "completion", "fields": {"prompt": "messages"}},
            ["no field 'completion'", "Map yours with data.fields"],  # (mapped: the user's own names)
        ),
        ({"path": str(DATA / "chat.jsonl"), "format": "chat", "fields": {"text": "x"}}, ["data.fields", "messages"]),
    ],
)
def test_bad_data_is_one_clear_error(data, words, gpt2_base, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError) as e:
        prepared(tmp_path, gpt2_base, **data)
    assert all(w in str(e.value) for w in words), str(e.value)


@pytest.mark.parametrize(
    "name, packing, needs",
    [
        ("short.txt", False, "a text corpus needs at least seq_len tokens"),
        ("blank.jsonl", False, "a text corpus needs at least seq_len tokens"),
        ("blank.jsonl", True, "packed, a text needs at least 2 tokens"),
    ],
)
def test_text_too_short_for_one_row_is_one_clear_error(name, packing, needs, gpt2_base, tmp_path):
    """Fewer tokens than one row, or only empty texts: the error says so (datasets had raised its own, about a
    schema or a missing column, from steps that made no row)."""
    (tmp_path / "short.txt").write_text("hello world")
    (tmp_path / "blank.jsonl").write_text('{"text": ""}\n{"text": ""}\n')
    with pytest.raises(DataError, match=f"{name} gives no training row: .*; {needs}"):
        prepared(tmp_path, gpt2_base, path=str(tmp_path / name), seq_len=64, packing=packing)


def test_a_json_file_the_parser_refuses_is_named_by_its_line(gpt2_base, tmp_path):
    """pyarrow's error counts rows of its own blocks ("in row 0" for the file's second line): the error names the
    file, the line and the column, an array document's line, a line that is not an object, a file with nothing."""
    cases = {
        "bad.jsonl": ('{"text": "fine"}\n\n{"text": "cut\n', r"bad.jsonl line 3, column 14: not valid JSON \(Invalid"),
        "list.jsonl": ('{"text": "fine"}\n["x"]\n', r"list.jsonl line 2: not a JSON object \(one sample per line"),
        "doc.json": ('[{"text": "a"},\n {"text": "b"\n]\n', r"doc.json line 3, column 1: not valid JSON \(Expecting"),
        "empty.jsonl": ("\n\n", r"empty.jsonl: empty, no sample in it"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(DataError, match=f"^data.path {tmp_path / message}"):
            prepared(tmp_path, gpt2_base, path=str(tmp_path / name))
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "a.jsonl").write_text('{"text": "fine"}\n')
    (shards / "b.jsonl").write_text(cases["bad.jsonl"][0])
    with pytest.raises(DataError, match=r"shards/\*.jsonl: .*shards/b.jsonl line 3, column 14: not valid JSON"):
        prepared(tmp_path, gpt2_base, path=str(shards / "*.jsonl"))


def test_a_file_the_parser_refuses_is_named_with_the_parsers_reason(gpt2_base, tmp_path):
    (tmp_path / "bad.csv").write_text('text,other\n"fine",1\n"two",2,3,4\n')
    with pytest.raises(DataError, match=r"bad.csv cannot be read as csv: "):
        prepared(tmp_path, gpt2_base, path=str(tmp_path / "bad.csv"))


def test_a_sample_of_the_wrong_type_is_named_by_its_place_in_its_source(gpt2_base, tmp_path):
    """By its index in the file it was read from, which it keeps after data.eval_fraction's shuffled split (the
    train split's index was named: "sample 0" for the fourth line) and in a mix of several sources, concatenated or
    drawn by data.weights."""
    good = '{"prompt": "a", "completion": " b"}'
    completions = tmp_path / "c.jsonl"
    completions.write_text(f'{good}\n{good}\n{{"prompt": "a", "completion": null}}\n')
    with pytest.raises(
        DataError,
        match=rf"sample 2 of {re.escape(str(completions))}: fields 'prompt' and 'completion' must be strings, or both "
        r"lists of messages .*\(got 'a', None",
    ):
        prepared(tmp_path, gpt2_base, path=str(completions), format="completion")
    texts = tmp_path / "t.jsonl"
    texts.write_text('{"text": "fine"}\n{"text": 5}\n')
    with pytest.raises(
        DataError, match=rf"^sample 1 of {re.escape(str(texts))}: field 'text' must be a string \(got 5\)"
    ):
        prepared(tmp_path, gpt2_base, path=str(texts))
    texts.write_text('{"text": "fine"}\n{"content": "the text under another key"}\n')  # (its text: None)
    with pytest.raises(
        DataError, match=r"sample 1 of .*: field 'text' must be a string \(got None: the sample lacks it"
    ):
        prepared(tmp_path, gpt2_base, path=str(texts))
    chats = tmp_path / "m.jsonl"
    fine = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}'
    chats.write_text(f'{fine}\n{fine}\n{fine}\n{{"messages": "hi"}}\n')
    error = rf"^sample 3 of {re.escape(str(chats))}: field 'messages' must be a list of {{role, content}}"
    with pytest.raises(DataError, match=error):
        prepared(tmp_path, gpt2_base, path=str(chats), format="chat")
    for fraction in (0.25, 0.5):  # (the bad sample held out for eval, or kept for training)
        with pytest.raises(DataError, match=error):
            prepared(tmp_path, gpt2_base, path=str(chats), format="chat", eval_fraction=fraction)
    for weights in (None, [1.0, 1.0]):
        mix = [str(DATA / "chat.jsonl"), str(chats)]
        with pytest.raises(DataError, match=error):
            prepared(
                tmp_path,
                gpt2_base,
                path=mix,
                format="chat",
                weights=weights,
                chat_template=str(DATA / "chat_template.jinja"),
            )


@pytest.mark.parametrize("fmt", ["chat", "text"])
def test_tokenizing_on_several_processes_gives_the_rows_of_one(fmt, gpt2_base, tmp_path, caplog, monkeypatch):
    """data.num_proc=3 (datasets' num_proc) gives the rows, counts and cache key of one process, samples truncated
    and dropped included (chat, packed) or a corpus cut into blocks (text); a bad sample is named by its index in
    the whole data, not in a worker's share."""
    common = {"path": str(DATA / "chat.jsonl"), "format": "chat", "seq_len": 64, "packing": True, "too_long": "drop"}
    if fmt == "text":
        corpus = (ROOT / "dist_lora" / "assets" / "tiny_corpus.txt").read_text().splitlines()
        (tmp_path / "texts.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus))
        common = {"path": str(tmp_path / "texts.jsonl"), "seq_len": 32}
    from dist_lora import data as data_module

    pids = tmp_path / "pids"
    real = data_module._tokenize_fn

    def recorded(*args):  # type: ignore[no-untyped-def]
        fn = real(*args)

        def tokenize(batch, indices):  # type: ignore[no-untyped-def]
            with open(pids, "a") as f:
                f.write(f"{os.getpid()}\n")
            return fn(batch, indices)

        return tokenize

    monkeypatch.setattr(data_module, "_tokenize_fn", recorded)
    caplog.set_level(logging.INFO, logger="dist_lora.data")
    one = prepared(tmp_path / "one", gpt2_base, num_proc=1, **common)
    assert "processes (data.num_proc)" not in caplog.text and set(pids.read_text().split()) == {str(os.getpid())}
    pids.unlink()
    three = prepared(tmp_path / "three", gpt2_base, num_proc=3, **common)
    assert "train samples on 3 processes (data.num_proc)" in caplog.text
    assert len(set(pids.read_text().split()) - {str(os.getpid())}) == 3  # three workers tokenized
    assert one.stats == three.stats and len(one) > 1
    assert one.where.name == three.where.name  # the same cache key: the rows do not depend on it
    assert all_rows(one.train) == all_rows(three.train)
    if fmt == "chat":
        assert one.stats["dropped_long"] > 0
    lines = [f'{{"prompt": "p{i}", "completion": " c{i}"}}' for i in range(9)]
    lines[7] = '{"prompt": "p7", "completion": 7}'
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"sample 7 of .*/c.jsonl: fields 'prompt' and 'completion' must be strings"):
        prepared(tmp_path, gpt2_base, path=str(tmp_path / "c.jsonl"), format="completion", num_proc=3)


def test_tokenizing_processes_by_default_follow_the_data_and_the_cores(monkeypatch):
    from dist_lora import data

    monkeypatch.setattr(data.os, "sched_getaffinity", lambda pid: set(range(48)))
    auto = DataConfig()
    assert data.tokenize_processes(auto, data.AUTO_PROCESSES_FROM - 1) == 1
    assert data.tokenize_processes(auto, data.AUTO_PROCESSES_FROM) == data.MAX_AUTO_PROCESSES == 32
    monkeypatch.setattr(data.os, "sched_getaffinity", lambda pid: {0, 1})
    assert data.tokenize_processes(auto, 10**6) == 2
    assert data.tokenize_processes(DataConfig(num_proc=8), 5) == 5  # never more than the samples
    assert data.tokenize_processes(DataConfig(num_proc=8), 100) == 8
    with pytest.raises(ConfigError, match="data.num_proc must be >= 1, or null for auto"):
        load_config(str(ROOT / "configs" / "tiny.yaml"), ["data.num_proc=0", "model.name_or_path=x"])


def test_chat_needs_a_template(gpt2_base, tmp_path):
    cfg = DataConfig(path=str(DATA / "chat.jsonl"), format="chat", cache_dir=str(tmp_path))
    with pytest.raises(DataError, match="data.chat_template"):
        prepare_data(cfg, load_tokenizer(str(gpt2_base)), seed=0)


@pytest.mark.parametrize("name", sorted(CHAT_TEMPLATES))
def test_a_built_in_chat_template_trains_each_assistant_turn_through_its_end_token(name, gpt2_base, tmp_path):
    """data.chat_template: chatml, llama3 or gemma, over a tokenizer that has the template's special tokens: every
    row equals apply_chat_template(..., return_assistant_tokens_mask=True) of the built-in (its {% generation %}
    marks), every assistant turn is one run of targets that ends with the turn's closing token (what teaches the
    model to stop) and generation stops there; gemma opens the first user turn with the system turn's text."""
    tok = load_tokenizer(str(gpt2_base))
    tok.add_special_tokens({"additional_special_tokens": list(CHAT_TEMPLATES[name])})
    cfg = DataConfig(
        path=str(DATA / "chat.jsonl"), format="chat", seq_len=512, cache_dir=str(tmp_path), chat_template=name
    )
    data = prepare_data(cfg, tok, seed=0)
    assert tok.chat_template == (ROOT / "dist_lora" / "assets" / "chat_templates" / f"{name}.jinja").read_text()
    end = tok.convert_tokens_to_ids(CHAT_TEMPLATES[name][-1])
    assert turn_end_ids(tok) == [end]
    conversations = [json.loads(line)["messages"] for line in (DATA / "chat.jsonl").read_text().splitlines()]
    for row, messages in zip(all_rows(data.train), conversations, strict=True):
        ref = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        assert row["input_ids"] == ref["input_ids"]
        assert row["labels"] == [
            t if m else IGNORE for t, m in zip(ref["input_ids"], ref["assistant_masks"], strict=True)
        ]
        runs = [list(run) for targets, run in itertools.groupby(row["labels"], key=lambda t: t != IGNORE) if targets]
        assert len(runs) == sum(m["role"] == "assistant" for m in messages)
        assert all(run[-1] == end and end not in run[:-1] for run in runs)
    system = next(m for m in conversations if m[0]["role"] == "system")
    text = tok.apply_chat_template(system, tokenize=False)
    assert system[0]["content"] in text and text.count(CHAT_TEMPLATES[name][0]) == len(system) - (name == "gemma")


def test_a_built_in_chat_template_is_refused_where_it_would_not_work(gpt2_base, tmp_path, monkeypatch):
    """A built-in over a tokenizer without its special tokens (their text pieces would leave no token to stop at)
    is refused, naming them and a built-in whose tokens the tokenizer has; a tokenizer without a template is told
    the built-in that fits it; tools and tool calls, which the built-ins do not render, are refused, not dropped; a
    name that is neither is an error listing the built-ins; a file of a built-in's name is that file."""
    tok = load_tokenizer(str(gpt2_base))
    with pytest.raises(DataError, match=r"data.chat_template chatml: this tokenizer lacks its special tokens <\|im_s"):
        set_chat_template(tok, "chatml")
    tok.add_special_tokens({"additional_special_tokens": list(CHAT_TEMPLATES["llama3"])})
    with pytest.raises(DataError, match="use the built-in llama3, whose tokens it has, or a template of"):
        set_chat_template(tok, "chatml")
    cfg = DataConfig(path=str(DATA / "chat.jsonl"), format="chat", cache_dir=str(tmp_path))
    with pytest.raises(DataError, match="has none: set data.chat_template: llama3 \\(built in, and this tokenizer"):
        prepare_data(cfg, tok, seed=0)
    with pytest.raises(
        DataError, match=r"is neither a file, a built-in template \(chatml, llama3, gemma, alpaca\) nor"
    ):
        set_chat_template(tok, "lama3")
    set_chat_template(tok, "llama3")
    call = {"type": "function", "function": {"name": "f", "arguments": {}}}
    for messages, tools in (
        ([{"role": "user", "content": "x"}], [{"type": "function", "function": {"name": "f"}}]),
        ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "", "tool_calls": [call]}], None),
    ):
        with pytest.raises(Exception, match="the built-in llama3 template does not render tool"):
            tok.apply_chat_template(messages, tools=tools, tokenize=False)
    monkeypatch.chdir(tmp_path)
    Path("llama3").write_text(TEMPLATE)
    set_chat_template(tok, "llama3")
    assert tok.chat_template == TEMPLATE


def test_a_mistyped_template_path_is_named_not_rendered_as_text(gpt2_base, tmp_path):
    """A chat_template without Jinja's syntax that is no file (a typo in its path) would render every conversation
    as that one line, and the run would fail later for want of targets: it is refused by name first."""
    typo = str(DATA / "chat_tmplate.jinja")
    cfg = DataConfig(path=str(DATA / "chat.jsonl"), format="chat", cache_dir=str(tmp_path), chat_template=typo)
    with pytest.raises(DataError, match=f"data.chat_template '{typo}' is neither a file, a built-in template"):
        prepare_data(cfg, load_tokenizer(str(gpt2_base)), seed=0)
    for template in (str(DATA / "chat_template.jinja"), (DATA / "chat_template.jinja").read_text()):
        tok = load_tokenizer(str(gpt2_base))
        set_chat_template(tok, template)
        assert tok.chat_template == (DATA / "chat_template.jinja").read_text()


def test_eval_fraction_splits_by_seed(gpt2_base, tmp_path):
    common = {"path": str(DATA / "completion.jsonl"), "format": "completion", "seq_len": 64, "eval_fraction": 0.25}
    a, b, c = (prepared(tmp_path, gpt2_base, seed=s, **common) for s in (0, 0, 1))
    assert list(a.evals) == [None] and len(a.evals[None]) == 16 and len(a) == 48
    assert all_rows(a.evals[None]) == all_rows(b.evals[None]) != all_rows(c.evals[None])
    train_ids = {tuple(r["input_ids"]) for r in all_rows(a.train)}
    assert not train_ids & {tuple(r["input_ids"]) for r in all_rows(a.evals[None])}


def test_named_eval_sets_each_give_the_rows_of_their_sources_alone(gpt2_base, tmp_path, caplog):
    """data.eval_path as {name: source or [sources]}: each set's rows equal those of its sources given alone as the
    eval data, in the order named, the training rows unchanged; the log names each set's rows; the names are part
    of the cache key; a set without a usable sample is named."""
    import datasets

    src = datasets.load_dataset("json", data_files=str(DATA / "completion.jsonl"), split="train")
    src.select(range(10)).to_json(str(tmp_path / "a.jsonl"))
    src.select(range(10, 30)).to_json(str(tmp_path / "b.jsonl"))
    src.select(range(30, 40)).to_parquet(str(tmp_path / "c.parquet"))
    sets = {"small": str(tmp_path / "a.jsonl"), "mixed": [str(tmp_path / "b.jsonl"), str(tmp_path / "c.parquet")]}
    common = {"path": str(DATA / "completion.jsonl"), "format": "completion", "seq_len": 64}
    with caplog.at_level(logging.INFO, logger="dist_lora.data"):
        named = prepared(tmp_path, gpt2_base, eval_path=sets, **common)
    assert list(named.evals) == ["small", "mixed"]
    for name, sources in sets.items():
        alone = prepared(tmp_path, gpt2_base, eval_path=sources, **common)
        assert list(alone.evals) == [None] and all_rows(named.evals[name]) == all_rows(alone.evals[None])
        assert all_rows(named.train) == all_rows(alone.train)
    assert (len(named.evals["small"]), len(named.evals["mixed"])) == (10, 30)
    assert named.stats["eval_rows"] == 40 and named.stats["extra"]["eval.mixed"]["samples"] == 30
    assert "eval rows: small 10, mixed 30" in caplog.text
    swapped = prepared(tmp_path, gpt2_base, eval_path={"mixed": sets["mixed"], "small": sets["small"]}, **common)
    renamed = prepared(tmp_path, gpt2_base, eval_path={"tiny": sets["small"], "mixed": sets["mixed"]}, **common)
    assert list(swapped.evals) == ["mixed", "small"] and list(renamed.evals) == ["tiny", "mixed"]
    assert len({named.where, swapped.where, renamed.where}) == 3
    assert all_rows(renamed.evals["tiny"]) == all_rows(named.evals["small"])

    datasets.Dataset.from_list([{"prompt": "word " * 200, "completion": "c"}] * 2).to_json(
        str(tmp_path / "empty.jsonl")
    )
    empty = {"small": sets["small"], "blank": str(tmp_path / "empty.jsonl")}
    with pytest.raises(DataError, match=r"the eval data \(set blank: .*empty.jsonl\) has no usable sample"):
        prepared(tmp_path, gpt2_base, eval_path=empty, **common)


def test_a_named_eval_set_is_read_with_its_own_split(gpt2_base, tmp_path):
    """data.eval_path's set as {path, split, name}: two sets from the validation and test splits of one
    save_to_disk DatasetDict, beside a file: each set's rows equal those of its split given alone (data.eval_split),
    the cache key tells the splits apart, the split a set names is read whatever data.eval_split says; a split the
    dataset lacks is one error naming the set; the saved config keeps each set's options, its path absolute."""
    import datasets

    from dist_lora.config import eval_set_reading

    src = datasets.load_dataset("json", data_files=str(DATA / "completion.jsonl"), split="train")
    splits = {
        "train": src.select(range(20)),
        "validation": src.select(range(20, 30)),
        "test": src.select(range(30, 45)),
    }
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "dict"))
    src.select(range(45, 50)).to_json(str(tmp_path / "a.jsonl"))
    common = {"path": str(DATA / "completion.jsonl"), "format": "completion", "seq_len": 64}
    sets = {
        "val": {"path": str(tmp_path / "dict"), "split": "validation"},
        "test": {"path": str(tmp_path / "dict"), "split": "test", "name": "unused-by-local-data"},
        "file": str(tmp_path / "a.jsonl"),
    }
    named = prepared(tmp_path, gpt2_base, eval_path=sets, eval_split="train", **common)
    assert list(named.evals) == ["val", "test", "file"]
    for name, split in (("val", "validation"), ("test", "test")):
        alone = prepared(tmp_path, gpt2_base, eval_path=str(tmp_path / "dict"), eval_split=split, **common)
        assert all_rows(named.evals[name]) == all_rows(alone.evals[None]), name
    assert (len(named.evals["val"]), len(named.evals["test"]), len(named.evals["file"])) == (10, 15, 5)
    cfg = DataConfig(eval_path=sets, eval_split="train", name="cfg")
    assert eval_set_reading(cfg, "val") == ("validation", "cfg") and eval_set_reading(cfg, "file") == ("train", "cfg")
    assert eval_set_reading(cfg, "test") == ("test", "unused-by-local-data")
    swapped = {**sets, "val": {**sets["val"], "split": "test"}}
    assert prepared(tmp_path, gpt2_base, eval_path=swapped, **common).where != named.where
    with pytest.raises(DataError, match=r"the split of data.eval_path's set val 'nope' is not in .*dict; its splits"):
        prepared(tmp_path, gpt2_base, eval_path={**sets, "val": {**sets["val"], "split": "nope"}}, **common)

    from dist_lora.train import _local_abs_sets

    relative = {"val": {"path": "configs/data/completion.jsonl", "split": "validation"}}
    kept = _local_abs_sets(relative)  # (run from the repository root by the suite)
    assert kept == {"val": {"path": str(ROOT / "configs/data/completion.jsonl"), "split": "validation"}}


def test_config_errors_for_named_eval_sets(tmp_path):
    """Bad named eval sets, each one error naming the key and the fix; several sets under early stopping or
    keep_best need train.best_eval_set."""
    tiny = ROOT / "configs" / "tiny.yaml"
    two = "data.eval_path={general: a.jsonl, domain: [b.jsonl, c.jsonl]}"
    ok = load_config(
        tiny,
        [
            two,
            "train.eval_every_steps=2",
            "train.early_stopping_patience=2",
            "train.best_eval_set=domain",
            "checkpoint.keep_best=true",
        ],
    )
    assert ok.data.eval_path == {"general": "a.jsonl", "domain": ["b.jsonl", "c.jsonl"]}
    bad = {
        "data.eval_path={}": "data.eval_path is an empty mapping",
        "data.eval_path={a/b: x.jsonl}": "eval set name 'a/b' must be letters, digits",
        "data.eval_path={general: []}": "data.eval_path's set 'general' must be a source or a non-empty list",
        "data.eval_path={general: 3}": "data.eval_path's set 'general' must be a source",
        "data.eval_path=[a.jsonl, 3]": "data.eval_path must be str | list[str] | dict[str, str | list[str] | dict[",
        "data.eval_path={general: {split: test}}": "data.eval_path's set 'general' as a mapping takes path (a source",
        "data.eval_path={general: {path: a.jsonl, splits: test}}": "(got {'path': 'a.jsonl', 'splits': 'test'}; "
        "unknown: splits)",
        "data.eval_path={general: {path: a.jsonl, split: 3}}": "data.eval_path's set 'general': split must be a "
        "non-empty string (got 3)",
        "data.eval_path=[]": "data.eval_path must be a source, a list of them, or {name: source}",
    }
    for override, message in bad.items():
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(tiny, [override])
    with pytest.raises(
        ConfigError,
        match=r"train.best_eval_set=gen names no eval set of data.eval_path \(its sets: "
        r"general, domain\)",
    ):
        load_config(tiny, [two, "train.best_eval_set=gen"])
    with pytest.raises(ConfigError, match="train.best_eval_set=general names no eval set of data.eval_path: it picks"):
        load_config(tiny, ["data.eval_path=a.jsonl", "train.best_eval_set=general"])
    for setting in ("train.early_stopping_patience=2", "checkpoint.keep_best=true"):
        key = setting.split("=")[0]
        with pytest.raises(
            ConfigError,
            match=f"{re.escape(key)} follows one eval set's loss, and data.eval_path has 2 sets "
            r"\(general, domain\): say which with train.best_eval_set, e.g. ",
        ):
            load_config(tiny, [two, "train.eval_every_steps=2", setting])
    one = load_config(tiny, ["data.eval_path={general: a.jsonl}", "checkpoint.keep_best=true"])
    assert one.train.best_eval_set is None  # one named set: it is the one followed


def test_config_errors_for_eval_and_keep_best(tmp_path):
    from dist_lora.config import ConfigError

    tiny = ROOT / "configs" / "tiny.yaml"
    with pytest.raises(ConfigError, match="train.eval_every_steps=5 needs eval data"):
        load_config(tiny, ["train.eval_every_steps=5"])
    with pytest.raises(ConfigError, match="keep_best needs eval data"):
        load_config(tiny, ["checkpoint.keep_best=true"])
    with pytest.raises(ConfigError, match="not both"):
        load_config(tiny, ["data.eval_fraction=0.1", "data.eval_path=x.jsonl"])
    with pytest.raises(ConfigError, match=r"train.best_metric must be one of loss, accuracy \(got 'f1'\)"):
        load_config(tiny, ["train.best_metric=f1"])
    with pytest.raises(
        ConfigError, match=r"checkpoint.keep_best must be true, false or a number of steps >= 1 \(got -1"
    ):
        load_config(tiny, ["data.eval_fraction=0.1", "checkpoint.keep_best=-1"])


@pytest.mark.parametrize("metric", ["loss", "accuracy"])
def test_early_stopping_and_the_best_evaluation_follow_best_metric(metric):
    """The same evaluations by loss and by accuracy: the loss stops improving after step 2, the accuracy goes on
    rising to step 4 (by more than the threshold, 0.01, at step 3 only; an equal accuracy at step 6 is no
    improvement). Each metric's best and plateau, as every rank computes them from the agreed values."""
    from types import SimpleNamespace

    from dist_lora.train import Trainer, improves

    cfg = load_config(
        ROOT / "configs" / "tiny.yaml",
        ["data.eval_fraction=0.1", f"train.best_metric={metric}", "train.early_stopping_threshold=0.01"],
    )
    history = [
        {"step": 1, "eval_loss": 3.0, "eval_accuracy": 0.10},
        {"step": 2, "eval_loss": 2.0, "eval_accuracy": 0.20},
        {"step": 3, "eval_loss": 2.5, "eval_accuracy": 0.30},
        {"step": 4, "eval_loss": 2.1, "eval_accuracy": 0.305},
        {"step": 5, "eval_loss": 2.2, "eval_accuracy": 0.25},
        {"step": 6, "eval_loss": 2.0, "eval_accuracy": 0.305},
    ]
    trainer = SimpleNamespace(cfg=cfg, eval_history=history)
    trainer.best_evals = lambda n: Trainer.best_evals(trainer, n)  # type: ignore[arg-type]
    best, plateau = Trainer.best_eval(trainer), Trainer.plateau(trainer)  # type: ignore[arg-type]
    ranked = [e["step"] for e in trainer.best_evals(4)]  # (keep_best: 4)
    if metric == "loss":  # 2.0 at step 2, equalled (not beaten) at step 6: 4 evaluations without improvement
        assert best["step"] == 2 and plateau == (4, history[1]) and ranked == [2, 6, 4, 5]
    else:  # 0.305 at step 4 (the first of a tie); step 3 the last to improve by more than 0.01
        assert best["step"] == 4 and plateau == (3, history[2]) and ranked == [4, 6, 3, 5]
    assert improves({"eval_accuracy": 0.5}, {"eval_accuracy": 0.4}, "accuracy")
    assert not improves({"eval_loss": 0.5}, {"eval_loss": 0.4}, "loss")
    assert not improves({"eval_loss": 1.0}, {"eval_loss": 1.0, "eval_accuracy": 0.1}, "accuracy")  # none recorded


# ---------------------------------------------------------------------------------------------- multi-rank

WORKER = ROOT / "tests" / "workers" / "runs_worker.py"
ENGINES = {"fsdp": ["parallel.backend=fsdp"], "zero3": ["parallel.backend=deepspeed", "parallel.zero_stage=3"]}


def chat_run(base: Path, *extra: str) -> list[str]:
    """Chat data, packed, a quarter held out for evaluation; 6 rows a step (world sizes 1, 2 and 3 divide it)."""
    return [
        f"model.name_or_path={base}",
        f"data.path={DATA / 'chat.jsonl'}",
        "data.format=chat",
        f"data.chat_template={DATA / 'chat_template.jinja'}",
        "data.packing=true",
        "data.seq_len=128",
        "data.eval_fraction=0.25",
        "train.global_batch_size=6",
        "train.micro_batch_size=1",
        "train.max_steps=6",
        "train.warmup_steps=0",
        "lora.target_modules=[q_proj,v_proj]",
        *extra,
    ]


@pytest.mark.multiproc
@pytest.mark.timeout(600)
def test_eval_is_equal_at_any_world_size_and_engine_and_chat_resume_continues_the_run(llama_base, tmp_path):
    """Chat data with packing on a tiny Llama. World size 2 (FSDP2): 6 steps uninterrupted, and 3 steps saved mid-
    epoch. World size 3 (ZeRO-3) resumes that step and its 3 steps match the uninterrupted run's (1e-4). The eval
    loss of the saved step is equal (1e-6) at world sizes 1, 2 and 3 on FSDP2 and ZeRO-3, and so is its token
    accuracy (exactly)."""
    from tests.dist_utils import run_worker

    mid = str(tmp_path / "first" / "step-00000003")

    def evals(world: int) -> list[dict]:
        return [
            {"name": f"eval-{e}-w{world}", "overrides": [*chat_run(llama_base), *flags], "steps": 0, "resume": mid}
            | {"eval": True}
            for e, flags in ENGINES.items()
        ]

    launches = {
        2: [
            {"name": "full", "overrides": [*chat_run(llama_base), *ENGINES["fsdp"]], "steps": 6},
            {"name": "first", "overrides": [*chat_run(llama_base), *ENGINES["fsdp"]], "steps": 3},
            *evals(2),
        ],
        3: [
            {"name": "rest", "overrides": [*chat_run(llama_base), *ENGINES["zero3"]], "steps": 3, "resume": mid},
            *evals(3),
        ],
        1: evals(1),
    }
    results = {}
    for world, runs in launches.items():
        for run in runs:  # every launch saves under tmp_path: the resumed step is found there
            run["overrides"] = [*run["overrides"], f"data.cache_dir={tmp_path / 'cache'}"]
        run_worker(world, {"runs": runs, "out": str(tmp_path)}, worker=WORKER)
        results[world] = json.loads((tmp_path / "runs.json").read_text())
    full, rest = results[2]["full"]["losses"], results[3]["rest"]["losses"]
    assert all(abs(a - b) <= 1e-4 * abs(a) for a, b in zip(full[3:], rest, strict=True)), (full, rest)
    values = [results[w][f"eval-{e}-w{w}"]["eval_loss"] for w in (1, 2, 3) for e in ENGINES]
    assert all(abs(v - values[0]) <= 1e-6 * values[0] for v in values), values
    accuracy = [results[w][f"eval-{e}-w{w}"]["eval_accuracy"] for w in (1, 2, 3) for e in ENGINES]
    assert 0 < accuracy[0] < 1 and all(a == accuracy[0] for a in accuracy), accuracy


@pytest.mark.parametrize(("metric", "keep"), [("loss", "true"), ("accuracy", "true"), ("loss", "3")])
def test_keep_best_keeps_the_best_evaluated_step(metric, keep, gpt2_base, tmp_path, capsys):
    """One process: evaluation every 2 steps, a save every 2 steps, keep_last 1 and keep_best: the dir holds the
    newest step and the best-evaluated one, by train.best_metric (the lowest eval loss, or the highest token
    accuracy: a step the loss would not pick), or with keep_best: 3 the three best; every step's trainer_state.json records the evaluations so far, and
    ``dist-lora ls`` shows each step's eval loss and accuracy with the best one marked (and with keep_best: 3 the
    other two, ranked). Each step's tokens_per_s
    counts its rows' own tokens, not their padding."""
    from dist_lora.cli import main
    from dist_lora.config import load_config
    from dist_lora.train import evaluate_checkpoint, train

    cfg = load_config(
        ROOT / "configs" / "tiny.yaml",
        [
            f"model.name_or_path={gpt2_base}",
            f"data.path={DATA / 'completion.jsonl'}",
            "data.format=completion",
            "data.eval_fraction=0.25",
            f"data.cache_dir={tmp_path / 'cache'}",
            "parallel.backend=single",
            "train.max_steps=8",
            "train.lr=0.05",  # here the token accuracy peaks at step 4, the loss at step 8
            "train.eval_every_steps=2",
            f"train.best_metric={metric}",
            f"train.metrics_file={tmp_path / 'metrics.jsonl'}",
            f"checkpoint.dir={tmp_path / 'ck'}",
            "checkpoint.every_steps=2",
            "checkpoint.keep_last=1",
            f"checkpoint.keep_best={keep}",
        ],
    )
    train(cfg)
    state = json.loads((tmp_path / "ck" / "step-00000008" / "trainer_state.json").read_text())
    history = state["eval_history"]
    assert [e["step"] for e in history] == [2, 4, 6, 8]
    by_loss = min(history, key=lambda e: e["eval_loss"])
    by_accuracy = max(history, key=lambda e: e["eval_accuracy"])  # (the first of a tie)
    best = by_loss if metric == "loss" else by_accuracy
    assert by_loss["step"] != by_accuracy["step"], history  # else this run could not tell which metric is followed
    assert state["best_eval"] == best
    kept = sorted(p.name for p in (tmp_path / "ck").glob("step-*"))
    top = sorted(history, key=lambda e: e["eval_loss"])[:3] if keep == "3" else [best]
    assert kept == sorted({f"step-{e['step']:08d}" for e in top} | {"step-00000008"})
    assert keep == "true" or len(kept) == 3  # (the best three by loss here: 8, 6 and 4; step 2 gone)
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["eval_loss"] for r in logged if r.get("event") == "eval"] == [
        e["eval_loss"] for e in state["eval_history"]
    ]
    data = prepare_data(cfg.data, load_tokenizer(str(gpt2_base)), seed=0)
    for r in (r for r in logged if "event" not in r):  # the step's own tokens a second, its padding not counted
        batch = cfg.train.global_batch_size
        ids = data.sample_ids(0, range((r["step"] - 1) * batch, r["step"] * batch))
        tokens = sum(len(data.train.ds[i]["input_ids"]) for i in ids)
        assert tokens < batch * cfg.data.seq_len and r["tokens_per_s"] == pytest.approx(tokens / r["seconds"], rel=0.01)
    for fast in ([], ["--fast"]):  # dist-lora ls: each kept step's eval loss and accuracy, the best one marked
        assert main(["ls", str(tmp_path / "ck"), "--json", *fast]) == 0
        listed = {r["step"]: (r["eval_loss"], r["eval_accuracy"]) for r in json.loads(capsys.readouterr().out)}
        assert listed == {e["step"]: (e["eval_loss"], e["eval_accuracy"]) for e in history if e["step"] in listed}
    assert main(["ls", str(tmp_path / "ck")]) == 0
    table = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in table if line.endswith(f"  best ({metric})")] == [f"step-{best['step']:08d}"]
    marks = {line.split()[0]: line.split("  best", 1)[1] for line in table if "  best" in line}
    ranked = [f"step-{e['step']:08d}" for e in top]  # keep_best: 3 marks the other two it keeps, in rank order
    assert marks == {name: f" #{i}" * (i > 1) + f" ({metric})" for i, name in enumerate(ranked, 1)}, table
    assert (
        f"{best['eval_loss']:.4f}    {best['eval_accuracy']:.4f}  best" in table[1 + sorted(listed).index(best["step"])]
    )
    (evaluated,) = evaluate_checkpoint(replace(cfg, checkpoint=replace(cfg.checkpoint, resume=f"{tmp_path}/ck/best")))
    assert evaluated["step"] == best["step"] and evaluated["eval_loss"] == pytest.approx(best["eval_loss"], rel=1e-6)
    assert main(["pull", str(tmp_path / "ck" / "best"), str(tmp_path / "served")]) == 0  # DIR/best: that step
    chosen = tmp_path / "ck" / f"step-{best['step']:08d}"
    assert (tmp_path / "served" / "adapter_model.safetensors").read_bytes() == (
        chosen / "adapter_model.safetensors"
    ).read_bytes()


@pytest.mark.parametrize("name", ["chat-tiny", "completion-tiny", "alpaca-tiny"])
def test_the_shipped_examples_train_and_evaluate(name, gpt2_base, tmp_path, monkeypatch):
    """configs/chat-tiny.yaml, completion-tiny.yaml and alpaca-tiny.yaml on the tiny base (one process, 4 steps)."""
    from dist_lora.train import train

    monkeypatch.chdir(ROOT)  # their data paths are relative to the repository root
    cfg = load_config(
        ROOT / "configs" / f"{name}.yaml",
        [
            f"model.name_or_path={gpt2_base}",
            "parallel.backend=single",
            "train.max_steps=4",
            "train.eval_every_steps=2",
            f"checkpoint.dir={tmp_path / 'ck'}",
            "checkpoint.every_steps=2",
        ],
    )
    metrics = train(cfg)
    assert len(metrics) == 4 and all(math.isfinite(m["loss"]) for m in metrics)
    state = json.loads((tmp_path / "ck" / "step-00000004" / "trainer_state.json").read_text())
    assert [e["step"] for e in state["eval_history"]] == [2, 4]


def test_the_plot_draws_the_eval_curve(tmp_path):
    from dist_lora.plot import plot_run, read_metrics

    rows = [{"step": s, "loss": 3.0 - 0.1 * s} for s in range(1, 7)]
    rows += [{"event": "eval", "step": s, "eval_loss": 3.1 - 0.1 * s} for s in (2, 4, 6)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    read = read_metrics(tmp_path / "metrics.jsonl")
    assert len(read.steps) == 6 and [e["step"] for e in read.evals] == [2, 4, 6]
    png = plot_run(tmp_path)
    assert png.stat().st_size > 0
