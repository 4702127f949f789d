"""dist-lora generate: a step's answers over its base, as PEFT gives them, rendered as the run trained."""

import json
import logging
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import dist_lora
from dist_lora.checkpoint import CheckpointError
from dist_lora.cli import main
from dist_lora.config import LoraConfig
from dist_lora.generate import Sampling, generate
from dist_lora.lora import AdapterError

TEMPLATE = Path(__file__).resolve().parents[1] / "configs" / "data" / "chat_template.jinja"


def saved_step(base: Path, ck: Path, *, run: dict | None = None, chat_template: str | None = None) -> str:
    """A step of a LoRA whose B is drawn at random (it is zero at init), so that the adapter changes the answers;
    ``run``: the run config its trainer state records (the trainer's ``config``); ``chat_template``: the template
    it records (as a loop of one's own may)."""
    torch.manual_seed(0)
    model = dist_lora.apply_lora(
        AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, alpha=8, target_modules=["c_attn", "c_fc"])
    )
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    state = {"config": run} if run is not None else None
    if chat_template is not None:
        state = {**(state or {}), "chat_template": chat_template}
    return dist_lora.save_checkpoint(model, str(ck), step=1, trainer_state=state)


def greedy(model, tokenizer, text: str, new: int, *, special: bool = True) -> str:
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=special)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=new, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def test_answers_equal_peft_with_the_adapter_and_the_base_alone_without(gpt2_base, tmp_path):
    step = saved_step(gpt2_base, tmp_path / "ck")
    prompts = ["The manifest", "A rank"]
    results = generate(str(tmp_path / "ck"), prompts, sampling=Sampling(max_new_tokens=8), compare_base=True)
    tokenizer = AutoTokenizer.from_pretrained(gpt2_base)
    peft_model = dist_lora.load_model(step)
    base = AutoModelForCausalLM.from_pretrained(gpt2_base).eval()
    for prompt, r in zip(prompts, results, strict=True):
        assert r["prompt"] == r["input"] == prompt  # a step without a run config: sent as text
        assert r["adapter"] == greedy(peft_model, tokenizer, prompt, 8)
        assert r["base"] == greedy(base, tokenizer, prompt, 8)
        assert r["adapter"] != r["base"]  # the adapter is on, then off


def test_sampling_draws_from_the_seed(gpt2_base, tmp_path):
    saved_step(gpt2_base, tmp_path / "ck")
    drawn = {
        seed: generate(str(tmp_path / "ck"), ["The"], sampling=Sampling(16, temperature=1.0, seed=seed))[0]["adapter"]
        for seed in (1, 2)
    }
    assert (
        generate(str(tmp_path / "ck"), ["The"], sampling=Sampling(16, temperature=1.0, seed=1))[0]["adapter"]
        == (drawn[1])
    )
    assert drawn[1] != drawn[2]


def test_a_chat_run_is_asked_through_its_template(gpt2_base, tmp_path):
    """A step of a run on chat data: each prompt is a user turn through the run's chat template (a file here, as
    configs/chat-tiny.yaml names one), the assistant's turn opened, no special tokens added (the template writes
    them), as the run's samples were tokenized; --format text sends it as it is."""
    template = tmp_path / "template.jinja"
    template.write_text(TEMPLATE.read_text())
    run = {"data": {"format": "chat", "chat_template": str(template)}, "model": {"dtype": "float32"}}
    step = saved_step(gpt2_base, tmp_path / "ck", run=run)
    r = generate(step, ["What is a shard?"], system="Answer briefly.", sampling=Sampling(max_new_tokens=6))[0]
    assert r["input"] == (
        "<|system|>\nAnswer briefly.<|endoftext|>\n<|user|>\nWhat is a shard?<|endoftext|>\n<|assistant|>\n"
    )
    tokenizer = AutoTokenizer.from_pretrained(gpt2_base)
    assert r["adapter"] == greedy(dist_lora.load_model(step), tokenizer, r["input"], 6, special=False)
    plain = generate(step, ["What is a shard?"], form="text", sampling=Sampling(max_new_tokens=6))[0]
    assert plain["input"] == "What is a shard?"

    with pytest.raises(ValueError, match="--system is a chat turn, and the prompts are sent as text"):
        generate(step, ["x"], form="text", system="Answer briefly.")
    run["data"]["system_prompt"] = "Be brief."  # the run's default system turn: asked with it, unless told not to
    briefly = saved_step(gpt2_base, tmp_path / "with-system", run=run)
    asked = generate(briefly, ["x"], sampling=Sampling(max_new_tokens=2))[0]["input"]
    assert asked == "<|system|>\nBe brief.<|endoftext|>\n<|user|>\nx<|endoftext|>\n<|assistant|>\n"
    unasked = generate(briefly, ["x"], system="", sampling=Sampling(max_new_tokens=2))[0]["input"]
    assert unasked.startswith("<|user|>")
    template.unlink()
    with pytest.raises(
        ValueError, match=f"run that saved {step} .*'{template}' is neither a file, a built-in template"
    ):
        generate(step, ["x"])
    with pytest.raises(ValueError, match="--chat-template 'chat.jinja' is neither a file, a built-in template"):
        generate(step, ["x"], chat_template="chat.jinja")
    given = generate(step, ["x"], chat_template=str(TEMPLATE), sampling=Sampling(max_new_tokens=2))[0]
    assert given["input"] == "<|user|>\nx<|endoftext|>\n<|assistant|>\n"
    with pytest.raises(ValueError, match="--format chat needs a chat template"):
        generate(step, ["x"], chat_template="")  # the tiny tokenizer has none of its own


def test_a_chat_runs_template_travels_with_its_steps(gpt2_base, hub_pickled_gpt2, tmp_path, caplog):
    """A run's data.chat_template (a file here) is saved as text with each step: after the file is changed,
    generate still asks the step through the template the run trained with; merge writes it as the merged model's
    chat_template.jinja (streaming, and the whole-model path of a base in pickle files), which its tokenizer reads,
    and pull beside the adapter (the copy still verifies; a step without a template gets none); a resume over the
    changed file says that the template differs. A loop of one's own that records its template
    in trainer_state is asked and merged with it alike."""
    from dist_lora.checkpoint import inspect_step
    from dist_lora.export import merge, pull
    from dist_lora.storage import Storage
    from dist_lora.train import train
    from tests.dist_utils import single_run

    template = tmp_path / "template.jinja"
    template.write_text(TEMPLATE.read_text())
    chat = ("data.format=chat", f"data.path={TEMPLATE.parent / 'chat.jsonl'}", f"data.chat_template={template}")
    run = (*chat, f"data.cache_dir={tmp_path / 'cache'}", "checkpoint.every_steps=2")
    train(single_run(gpt2_base, tmp_path / "ck", *run, "train.max_steps=2"))
    step = str(tmp_path / "ck" / "step-00000002")
    assert json.loads((Path(step) / "trainer_state.json").read_text())["chat_template"] == TEMPLATE.read_text()

    template.write_text("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}")
    asked = generate(step, ["x"], sampling=Sampling(max_new_tokens=2))[0]["input"]
    assert asked == "<|user|>\nx<|endoftext|>\n<|assistant|>\n"  # (the trained template's, not the file's now)
    for out, base in ((tmp_path / "merged", None), (tmp_path / "merged-pickled", hub_pickled_gpt2)):
        merge(step, out, base=base)
        assert (out / "chat_template.jinja").read_text() == TEMPLATE.read_text()
        assert AutoTokenizer.from_pretrained(out).chat_template == TEMPLATE.read_text()
    pulled = pull(step, tmp_path / "pulled")  # beside the adapter, for vLLM's --chat-template
    assert (pulled / "chat_template.jinja").read_text() == TEMPLATE.read_text()
    assert inspect_step(Storage(str(tmp_path)), "pulled").status == "committed"  # (outside the manifest)
    plain = saved_step(gpt2_base, tmp_path / "plain")  # a step that records no template: nothing written
    assert not (pull(plain, tmp_path / "pulled-plain") / "chat_template.jinja").exists()

    with caplog.at_level(logging.WARNING, logger="dist_lora.train"):
        train(single_run(gpt2_base, tmp_path / "ck", *run, "train.max_steps=4"))
    assert "data.chat_template's text (the template the samples are rendered with)" in caplog.text

    loop = saved_step(gpt2_base, tmp_path / "loop", chat_template=TEMPLATE.read_text())  # (a loop of one's own)
    asked = generate(loop, ["x"], form="chat", sampling=Sampling(max_new_tokens=2))[0]["input"]
    assert asked == "<|user|>\nx<|endoftext|>\n<|assistant|>\n"
    assert AutoTokenizer.from_pretrained(merge(loop, tmp_path / "merged-loop")).chat_template == TEMPLATE.read_text()


def test_merge_puts_the_runs_system_prompt_first_as_the_run_did(gpt2_base, tmp_path):
    """A run with data.system_prompt: the merged model's chat template (and the one pull writes beside the adapter)
    puts it first in a conversation that has no system turn, as the run did to its samples, so a server asked without one renders what generate sends (the
    prompt the model trained on); a conversation with a system turn keeps its own. The prompt comes through as it
    is (quotes, a backslash, a newline, Jinja's delimiters, an emoji), over the run's template or, where the run set
    none, the base's own."""
    from dist_lora.export import merge, pull, with_system_default

    system = 'Answer "briefly".\n\\ {{ not jinja }} %} \U0001f642'
    run = {"data": {"format": "chat", "system_prompt": system}, "model": {"dtype": "float32"}}
    step = saved_step(gpt2_base, tmp_path / "ck", run=run, chat_template=TEMPLATE.read_text())
    merged = AutoTokenizer.from_pretrained(merge(step, tmp_path / "merged"))
    pulled = (pull(step, tmp_path / "pulled") / "chat_template.jinja").read_text()  # the template vLLM serves with
    assert pulled == merged.chat_template == with_system_default(TEMPLATE.read_text(), system)
    asked = generate(step, ["x"], sampling=Sampling(max_new_tokens=1))[0]["input"]
    assert asked.startswith(f"<|system|>\n{system}<|endoftext|>\n<|user|>\nx")
    user = [{"role": "user", "content": "x"}]
    assert merged.apply_chat_template(user, tokenize=False, add_generation_prompt=True) == asked
    plain = AutoTokenizer.from_pretrained(gpt2_base)
    plain.chat_template = TEMPLATE.read_text()
    own = [{"role": "system", "content": "Be terse."}, *user]
    assert merged.apply_chat_template(own, tokenize=False) == plain.apply_chat_template(own, tokenize=False)

    base = tmp_path / "base"  # a base with a template of its own, and a run that set none
    shutil.copytree(gpt2_base, base)
    plain.save_pretrained(base)
    step = saved_step(base, tmp_path / "ck-own", run=run)
    merged = AutoTokenizer.from_pretrained(merge(step, tmp_path / "merged-own"))
    assert merged.chat_template == with_system_default(TEMPLATE.read_text(), system)
    assert merged.apply_chat_template(user, tokenize=False, add_generation_prompt=True) == asked


def test_an_alpaca_run_is_asked_with_alpacas_prompt(gpt2_base, tmp_path):
    """A step of a run on data.format: alpaca with the built-in alpaca template: each prompt is the instruction of
    Alpaca's prompt, its response opened (the run's system prompt in place of the preamble); the answer is PEFT's
    greedy one over that text."""
    run = {"data": {"format": "alpaca", "chat_template": "alpaca"}, "model": {"dtype": "float32"}}
    step = saved_step(gpt2_base, tmp_path / "ck", run=run)
    r = generate(step, ["Name a colour."], sampling=Sampling(max_new_tokens=6))[0]
    preamble = (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    )
    assert r["input"] == f"<|endoftext|>{preamble}\n\n### Instruction:\nName a colour.\n\n### Response:\n"
    tokenizer = AutoTokenizer.from_pretrained(gpt2_base)
    assert r["adapter"] == greedy(dist_lora.load_model(step), tokenizer, r["input"], 6, special=False)
    run["data"]["system_prompt"] = "Be brief."
    briefly = saved_step(gpt2_base, tmp_path / "brief", run=run)
    asked = generate(briefly, ["x"], sampling=Sampling(max_new_tokens=2))[0]["input"]
    assert asked == "<|endoftext|>Be brief.\n\n### Instruction:\nx\n\n### Response:\n"


CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_a_chat_answer_stops_at_the_token_that_closes_the_templates_turn(tmp_path):
    """A base whose end of text is <|endoftext|> trained through a ChatML template, whose turns close with
    <|im_end|> (a special token of its own): that token is found by rendering a turn, and a chat answer stops
    there (finish: stop), where a plain-text prompt runs on to max_new_tokens (finish: length). The model is made
    to answer <|im_end|> at once (its last norm gives every position the direction of that token's embedding)."""
    from dist_lora.demo import build_tokenizer, corpus_path
    from dist_lora.generate import turn_end_ids

    tokenizer = build_tokenizer(corpus_path())
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert turn_end_ids(tokenizer) == [im_end] != [tokenizer.eos_token_id]
    tokenizer.chat_template = TEMPLATE.read_text()  # the tiny runs' template: turns end with <|endoftext|>
    assert turn_end_ids(tokenizer) == [tokenizer.eos_token_id]
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n\\n' }}{% endfor %}"
    assert turn_end_ids(tokenizer) == []  # plain text closes the turn: nothing to stop at but the end of text
    tokenizer.chat_template = "{% if messages[0]['role'] != 'system' %}{{ raise_exception('system first') }}{% endif %}"
    assert turn_end_ids(tokenizer) == []  # a template that will not render the probe turn: the end of text alone

    from transformers import GPT2Config, GPT2LMHeadModel

    ids = {"bos_token_id": tokenizer.eos_token_id, "eos_token_id": tokenizer.eos_token_id}
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=2, n_head=2, **ids)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():  # every position's logits: the embeddings' dot with <|im_end|>'s, its own the largest
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(model.transformer.wte.weight[im_end] * 10)
    tokenizer.chat_template = None
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    run = {"data": {"format": "chat", "chat_template": CHATML}, "model": {"dtype": "float32"}}
    step = saved_step(tmp_path / "base", tmp_path / "ck", run=run)
    chat = generate(step, ["hi"], sampling=Sampling(max_new_tokens=5), compare_base=True)[0]
    assert chat["input"] == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert chat["finish"] == {"adapter": "stop", "base": "stop"} and chat["adapter"] == ""
    text = generate(step, ["hi"], form="text", sampling=Sampling(max_new_tokens=5))[0]
    assert text["finish"] == {"adapter": "length"}

    # merged, the step's template is the model's and its turn's end a stop token, as transformers and vLLM read them
    from transformers import GenerationConfig

    from dist_lora.export import merge

    loop = saved_step(tmp_path / "base", tmp_path / "loop", chat_template=CHATML)
    merged = merge(loop, tmp_path / "merged")
    assert GenerationConfig.from_pretrained(merged).eos_token_id == [tokenizer.eos_token_id, im_end]
    served, served_tokenizer = AutoModelForCausalLM.from_pretrained(merged), AutoTokenizer.from_pretrained(merged)
    turn = [{"role": "user", "content": "hi"}]
    prompt = served_tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)
    inputs = served_tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = served.generate(inputs, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert out[0, inputs.shape[1] :].tolist() == [im_end]  # (stopped at the turn's end, not at max_new_tokens)


def test_tools_reach_the_chat_template(gpt2_base, tmp_path):
    """--tools FILE: the schemas go to the chat template with the prompt (as a run on tool-calling data saw them),
    the answer is PEFT's over that text; refused outside chat, and a file that is not a list of schemas is named."""
    from dist_lora.generate import read_tools

    tools_template = "{%- if tools -%}<|tools|>\n{{ tools | tojson }}<|endoftext|>\n{% endif -%}" + TEMPLATE.read_text()
    run = {"data": {"format": "chat", "chat_template": tools_template}, "model": {"dtype": "float32"}}
    step = saved_step(gpt2_base, tmp_path / "ck", run=run)
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": schema}}]
    (tmp_path / "tools.json").write_text(json.dumps(tools))
    r = generate(step, ["Weather in Paris?"], tools=read_tools(str(tmp_path / "tools.json")), sampling=Sampling(6))[0]
    tokenizer = AutoTokenizer.from_pretrained(gpt2_base)
    tokenizer.chat_template = tools_template
    turn = [{"role": "user", "content": "Weather in Paris?"}]
    assert r["input"] == tokenizer.apply_chat_template(turn, tools=tools, tokenize=False, add_generation_prompt=True)
    assert r["input"].startswith("<|tools|>\n") and '"get_weather"' in r["input"]
    assert r["adapter"] == greedy(dist_lora.load_model(step), tokenizer, r["input"], 6, special=False)
    with pytest.raises(ValueError, match="--tools go to the chat template, and the prompts are sent as text"):
        generate(step, ["x"], form="text", tools=tools)
    (tmp_path / "bad.json").write_text('{"name": "f"}')
    with pytest.raises(ValueError, match="bad.json: must hold a JSON list of tool schemas"):
        read_tools(str(tmp_path / "bad.json"))
    with pytest.raises(ValueError, match=r"^--tools \[\{bad does not exist: give a file that holds a JSON list of"):
        read_tools("[{bad")  # (the schemas given inline, where their file goes)


def test_bad_settings_are_refused_naming_them(gpt2_base, llama_base, tmp_path):
    step = saved_step(gpt2_base, tmp_path / "ck")
    with pytest.raises(AdapterError, match=f"was trained over another model than {llama_base}"):
        generate(step, ["x"], base=str(llama_base))  # (PEFT finds none of its targets there)
    for sampling, message in (
        (Sampling(max_new_tokens=0), "max_new_tokens must be at least 1"),
        (Sampling(temperature=-1), "temperature must be >= 0"),
        (Sampling(temperature=1, top_p=0), r"top_p must be in \(0, 1\]"),
        (Sampling(top_p=0.9), r"top_p=0.9 samples from the nucleus, and decoding is greedy \(temperature 0"),
    ):
        with pytest.raises(ValueError, match=message):
            generate(step, ["x"], sampling=sampling)
    with pytest.raises(ValueError, match="give at least one prompt, and no empty one"):
        generate(step, [""])
    with pytest.raises(CheckpointError):
        generate(str(tmp_path / "nothing-here"), ["x"])


def test_the_command_prints_the_answers(gpt2_base, tmp_path, capsys):
    from tests.dist_utils import cli_in_child

    step = saved_step(gpt2_base, tmp_path / "ck")
    want = generate(step, ["The", "A"], sampling=Sampling(max_new_tokens=4), compare_base=True)
    cmd = ["dist-lora", "generate", step, "--prompt", "The", "--prompt", "A", "--max-new-tokens", "4"]
    out = subprocess.run([*cmd, "--compare-base", "--json"], capture_output=True, text=True)  # the installed script
    assert out.returncode == 0, out.stderr
    assert [json.loads(line) for line in out.stdout.splitlines()] == want
    out = cli_in_child(cmd)
    assert out.returncode == 0, out.stderr
    assert want[0]["finish"]["adapter"] == "length"  # 4 tokens, no end of text: the header says it was cut
    header = "### with the adapter (cut at --max-new-tokens)"
    assert out.stdout.startswith(f"### prompt\nThe\n{header}\n{want[0]['adapter']}\n### prompt\nA\n")
    # prompts as words too, before and after the options (as `ollama run` or `llm` take them)
    assert main(["generate", step, "The", "--max-new-tokens", "4", "--compare-base", "--json", "A"]) == 0
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == want
    out = cli_in_child([*cmd, "--temperature", "-1"])
    assert out.returncode == 2 and "error: temperature must be >= 0" in out.stderr, out.stderr

    # the same prompts from a file: plain lines, or JSON lines with a "prompt" field (blank lines skipped)
    (tmp_path / "prompts.txt").write_text("The\n\nA\n")
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "The"}\n{"prompt": "A", "id": 7}\n')
    for name in ("prompts.txt", "prompts.jsonl"):
        from_file = [step, "--prompts-file", str(tmp_path / name), "--max-new-tokens", "4", "--json"]
        out = cli_in_child(["dist-lora", "generate", *from_file])
        assert out.returncode == 0, out.stderr
        assert [json.loads(line)["adapter"] for line in out.stdout.splitlines()] == [r["adapter"] for r in want]
    (tmp_path / "bad.jsonl").write_text('{"prompt": "The"}\n{"text": "A"}\n')
    out = cli_in_child(["dist-lora", "generate", step, "--prompts-file", str(tmp_path / "bad.jsonl")])
    assert out.returncode == 2 and 'bad.jsonl, line 2: not a JSON object with a "prompt" field' in out.stderr
    out = cli_in_child(["dist-lora", "generate", step, "--prompts-file", str(tmp_path)])
    assert out.returncode == 2 and f"--prompts-file {tmp_path} is a directory: give a file that holds" in out.stderr


def test_an_adapter_peft_saved_answers_as_peft_gives_it(gpt2_base, tmp_path):
    """An adapter trained elsewhere (PEFT's save_pretrained, no manifest, no run config): asked as text, its
    answers are PeftModel.from_pretrained's. With a tokenizer saved beside it, its chat template is the adapter's."""
    import peft

    torch.manual_seed(3)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], init_lora_weights=False)
    peft.get_peft_model(AutoModelForCausalLM.from_pretrained(gpt2_base), lora).save_pretrained(tmp_path / "adapter")
    results = generate(str(tmp_path / "adapter"), ["The manifest"], sampling=Sampling(max_new_tokens=8))
    reference = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(gpt2_base), tmp_path / "adapter")
    tokenizer = AutoTokenizer.from_pretrained(gpt2_base)
    assert results[0]["adapter"] == greedy(reference.eval(), tokenizer, "The manifest", 8)

    # the tokenizer saved beside it (as TRL's trainers save the one they trained with): its chat template is the
    # one --format chat asks through and merge writes, from chat_template.jinja or an older tokenizer_config.json
    from dist_lora.export import merge

    tokenizer.chat_template = TEMPLATE.read_text()
    tokenizer.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "chat_template.jinja").is_file()
    older = tmp_path / "older"
    shutil.copytree(tmp_path / "adapter", older)
    (older / "chat_template.jinja").unlink()
    config = json.loads((older / "tokenizer_config.json").read_text())
    (older / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE.read_text()}))
    for adapter in (tmp_path / "adapter", older):
        asked = generate(str(adapter), ["x"], form="chat", sampling=Sampling(max_new_tokens=1))[0]["input"]
        assert asked == "<|user|>\nx<|endoftext|>\n<|assistant|>\n"
        merged = merge(str(adapter), tmp_path / f"merged-{adapter.name}")
        assert AutoTokenizer.from_pretrained(merged).chat_template == TEMPLATE.read_text()
