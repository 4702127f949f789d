"""Try a saved step: its adapter over a freshly loaded base, prompts in, text out (``dist-lora generate``).

The prompt is put to the model as the run trained on it: in a run on chat data (``data.format: chat``) as a user
turn rendered by the run's chat template with the assistant's turn opened, otherwise as plain text. ``compare_base``
also answers with the adapter turned off (PEFT's ``disable_adapter``), the same base in the same process, to see what
the training changed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dist_lora.api import model_of, read_adapter, saved_revision
from dist_lora.constants import ADAPTER_CONFIG_NAME
from dist_lora.data import no_template_fix, set_chat_template
from dist_lora.model import DTYPES, compute_device, load_tokenizer, resolve_model_path

FORMATS = ("text", "completion", "chat")


@dataclass(frozen=True)
class Sampling:
    """How tokens are drawn: greedy at ``temperature`` 0 (the default, the same text every time), else sampled
    (``top_p`` nucleus) from ``seed``."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def check(self) -> None:
        problems = [
            (self.max_new_tokens >= 1, f"max_new_tokens must be at least 1 (got {self.max_new_tokens})"),
            (self.temperature >= 0, f"temperature must be >= 0, 0 for greedy decoding (got {self.temperature})"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1] (got {self.top_p})"),
            (
                self.temperature > 0 or self.top_p == 1,
                f"top_p={self.top_p} samples from the nucleus, and decoding is greedy (temperature 0, the default): "
                "give a temperature above 0 too, or drop top_p",
            ),
        ]
        for ok, message in problems:
            if not ok:
                raise ValueError(message)

    def kwargs(self) -> dict[str, Any]:
        if self.temperature == 0:
            return {"max_new_tokens": self.max_new_tokens, "do_sample": False}
        return {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": True,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": 0,  # (transformers' default of 50 would cut the distribution beneath top_p)
        }


def read_prompts(path: str) -> list[str]:
    """The prompts of a file, one a line (blank lines skipped): a .jsonl file's lines are JSON objects whose
    ``prompt`` field is the prompt; any other file's lines are prompts as they are."""
    _need_file(path, "--prompts-file", "prompts, one a line")
    lines = [(n, line) for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1) if line.strip()]
    if not path.endswith(".jsonl"):
        return [line for _, line in lines]
    prompts = []
    for n, line in lines:
        try:
            prompt = json.loads(line)["prompt"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            why = f"{type(e).__name__}: {e}"
            raise ValueError(f'{path}, line {n}: not a JSON object with a "prompt" field ({why})') from e
        if not isinstance(prompt, str):
            raise ValueError(f'{path}, line {n}: "prompt" is {type(prompt).__name__}, not a string')
        prompts.append(prompt)
    return prompts


def _need_file(path: str, option: str, holds: str) -> None:
    if not Path(path).is_file():
        what = "is a directory" if Path(path).is_dir() else "does not exist"
        raise ValueError(f"{option} {path} {what}: give a file that holds {holds}")


def read_tools(path: str) -> list[dict[str, Any]]:
    """The tools of a JSON file (a list of function schemas, as a chat template takes them with ``tools=``)."""
    _need_file(path, "--tools", "a JSON list of tool schemas")
    try:
        tools = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--tools {path}: cannot read it as JSON ({type(e).__name__}: {e})") from e
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise ValueError(f"--tools {path}: must hold a JSON list of tool schemas (got {type(tools).__name__})")
    return tools


def _render(tokenizer: Any, prompt: str, form: str, system: str | None, tools: list[dict[str, Any]] | None) -> str:
    if form != "chat":
        return prompt
    if not tokenizer.chat_template:
        raise ValueError(
            "--format chat needs a chat template, and neither the run nor the base's tokenizer has one: "
            f"{no_template_fix(tokenizer, '--chat-template')}; or --format text to send the prompt as it is"
        )
    turns = [{"role": "system", "content": system}] if system else []
    turns.append({"role": "user", "content": prompt})
    return str(tokenizer.apply_chat_template(turns, tools=tools, tokenize=False, add_generation_prompt=True))


_SENTINEL = "\u2063dist-lora-answer\u2063"  # (an assistant turn's content, found again in its rendering)


def turn_end_ids(tokenizer: Any, tools: list[dict[str, Any]] | None = None) -> list[int]:
    """The special token the chat template closes an assistant turn with (``<|eot_id|>``, ``<|im_end|>``,
    ``</s>``, ``<end_of_turn>``), found by rendering a turn: generation stops there as well as at the model's own
    end of text, which for a base trained on chat data through a template of one's own is often another token (a
    Llama-3 base ends text with ``<|end_of_text|>``, its turns with ``<|eot_id|>``). Empty where the turn ends in
    plain text, or where the template will not render such a turn (one that wants a system turn first, say): the
    answer then ends at the model's end of text alone, as before."""
    user = [{"role": "user", "content": "x"}]
    turn = [*user, {"role": "assistant", "content": _SENTINEL}]
    try:
        opened = str(tokenizer.apply_chat_template(user, tools=tools, tokenize=False, add_generation_prompt=True))
        whole = str(tokenizer.apply_chat_template(turn, tools=tools, tokenize=False))
    except Exception:  # (jinja2's TemplateError, or a template's own raise_exception)
        return []
    if not whole.startswith(opened) or _SENTINEL not in whole[len(opened) :]:
        return []
    after = whole[len(opened) :].split(_SENTINEL, 1)[1]
    ids = tokenizer(after, add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids) | {
        i for i, added in tokenizer.added_tokens_decoder.items() if getattr(added, "special", False)
    }
    return ids[:1] if ids and ids[0] in special else []


def generate(
    step_or_dir: str,
    prompts: list[str],
    *,
    base: str | None = None,
    form: str | None = None,
    chat_template: str | None = None,
    system: str | None = None,
    tools: list[dict[str, Any]] | None = None,
    sampling: Sampling | None = None,
    compare_base: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """The step's answer to each prompt (a step URL, or a checkpoint dir: its newest verified step).

    ``form``: how prompts are put to the model, "chat" (a user turn through the chat template) or "text"/"completion"
    (as they are); default: as the run trained (its ``data.format``; "text" for a step that records none).
    ``chat_template``: a template or its file, in place of the run's or the tokenizer's; ``system``: a system turn
    before each prompt (chat only; default: the run's ``data.system_prompt``); ``tools``: function schemas the chat
    template shows the model (``tools=``), as a run on tool-calling data trained with them (chat only). ``base``:
    another base than the one the step names (checked against its fingerprint as any load is). Returns one dict per
    prompt: ``prompt``, ``input`` (the text the model saw), ``adapter`` (the continuation), with ``compare_base``,
    ``base`` (the continuation with the adapter off), and ``finish``: why each ended, ``stop`` (an end-of-text
    token, or in chat the token that closes the template's assistant turn: :func:`turn_end_ids`) or ``length``
    (``max_new_tokens`` reached: the answer may be cut).
    Single process, on the current CUDA device or the CPU, in the run's ``model.dtype``.
    """
    sampling = sampling or Sampling()
    sampling.check()
    if not prompts or any(not isinstance(p, str) or not p for p in prompts):
        raise ValueError("give at least one prompt, and no empty one (--prompt TEXT, or --prompts-file FILE)")
    if form is not None and form not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)} (got {form!r})")
    loaded = read_adapter(step_or_dir, storage_options, None)  # a step, or an adapter PEFT saved
    step_url, adapter_config = loaded.url, loaded.adapter_config
    run = loaded.run_config  # the run that saved it: how it rendered its samples
    data, model_cfg = run.get("data") or {}, run.get("model") or {}
    trained_as = str(data.get("format") or "text")
    form = form or ("chat" if trained_as == "alpaca" else trained_as)  # (an alpaca run's prompt: a user turn)
    if system is None and form == "chat":  # the run's default system turn, as its conversations had it
        system = data.get("system_prompt")
    if system and form != "chat":
        raise ValueError(f"--system is a chat turn, and the prompts are sent as {form}: add --format chat or drop it")
    if tools and form != "chat":
        raise ValueError(
            f"--tools go to the chat template, and the prompts are sent as {form}: add --format chat or drop it"
        )
    dtype = DTYPES.get(model_cfg.get("dtype") or "float32", torch.float32)

    model: Any = model_of(loaded, base=base, dtype=dtype)
    tokenizer_source = base or adapter_config.get("base_model_name_or_path")
    what = "--base" if base else f"base_model_name_or_path of {step_url}/{ADAPTER_CONFIG_NAME}"
    tokenizer = load_tokenizer(
        resolve_model_path(str(tokenizer_source), what), what, saved_revision(adapter_config, str(tokenizer_source))
    )
    if chat_template is not None:
        set_chat_template(tokenizer, chat_template, "--chat-template")
    elif loaded.chat_template:  # the text the run rendered its samples with
        tokenizer.chat_template = loaded.chat_template
    else:  # a step saved before the text was: the run's data.chat_template, a template or the file it was read from
        what = f"the data.chat_template of the run that saved {step_url} (override: --chat-template)"
        set_chat_template(tokenizer, data.get("chat_template"), what)
    device = compute_device()
    model.to(device)

    # as in training: special tokens added to text and completion samples, none to a rendered chat (its template
    # writes them)
    special = form != "chat"
    chat = form == "chat" and tokenizer.chat_template  # (without one, the first prompt's rendering says so)
    ends = _end_ids(model, tokenizer) + (turn_end_ids(tokenizer, tools) if chat else [])
    ends = list(dict.fromkeys(ends))
    results = []
    for prompt in prompts:
        text = _render(tokenizer, prompt, form, system, tools)
        inputs = tokenizer(text, return_tensors="pt", add_special_tokens=special).to(device)
        answer, finish = _continue(model, tokenizer, inputs, sampling, ends)
        result: dict[str, Any] = {"prompt": prompt, "input": text, "adapter": answer, "finish": {"adapter": finish}}
        if compare_base:
            with model.disable_adapter():
                result["base"], result["finish"]["base"] = _continue(model, tokenizer, inputs, sampling, ends)
        results.append(result)
    return results


def _end_ids(model: Any, tokenizer: Any) -> list[int]:
    """The model's own end-of-text tokens (its generation config's, else the tokenizer's)."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = configured if configured is not None else tokenizer.eos_token_id
    return [int(i) for i in (ids if isinstance(ids, list) else [ids]) if i is not None]


def _continue(model: Any, tokenizer: Any, inputs: Any, sampling: Sampling, ends: list[int]) -> tuple[str, str]:
    """The new text after ``inputs``, drawn from ``sampling.seed`` (the same draws with and without the adapter),
    ended at any of ``ends``, and why it ended (``stop`` or ``length``)."""
    torch.manual_seed(sampling.seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        out = model.generate(**inputs, **sampling.kwargs(), pad_token_id=pad, eos_token_id=ends or None)
    new = out[0, inputs["input_ids"].shape[1] :]
    finish = "stop" if len(new) and int(new[-1]) in ends else "length"
    return str(tokenizer.decode(new, skip_special_tokens=True)), finish
