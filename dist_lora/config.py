"""Typed run configuration: dataclasses, YAML loading, dotted overrides and validation.

A run is described by one YAML file whose top-level sections map onto the dataclasses below. Overrides on the
command line use dotted keys (``train.lr=3e-4``), torchtune style. Unknown keys are errors that list the valid
ones, and validation collects every problem into one error.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

Bias = Literal["none", "all", "lora_only"]
BackendName = Literal["fsdp", "deepspeed", "ddp", "single"]
DType = Literal["float32", "bfloat16", "float16"]
MixedPrecision = Literal["none", "bf16"]
OnError = Literal["raise", "warn"]
DataFormat = Literal["text", "completion", "chat", "alpaca"]
TooLong = Literal["truncate", "drop"]
Turns = Literal["all", "last"]
Quantization = Literal["none", "nf4"]
LrSchedule = Literal["cosine", "linear", "constant", "wsd"]
BestMetric = Literal["loss", "accuracy"]

BIAS_MODES: tuple[str, ...] = typing.get_args(Bias)
BACKENDS: tuple[str, ...] = typing.get_args(BackendName)
DTYPES: tuple[str, ...] = typing.get_args(DType)


class ConfigError(ValueError):
    """A configuration problem; the message names every offending dotted key."""


@dataclass
class ModelConfig:
    name_or_path: str = ""
    """Base model: a local directory written by save_pretrained, or a hub id."""
    dtype: DType = "float32"
    """Dtype the base is loaded in: float32 | bfloat16 | float16."""
    quantization: Quantization = "none"
    """none | nf4 (QLoRA: the frozen linear weights held in 4-bit NormalFloat, torchao's NF4, and computed in
    dtype; the adapter trains in dtype and is saved exactly as over an unquantized base)."""
    revision: str | None = None
    """A hub id's commit, branch or tag (``from_pretrained``'s ``revision``); default: its newest (``main``). The
    commit trained on is recorded with every step either way."""
    attn_implementation: str | None = None
    """The attention kernel (transformers' ``attn_implementation``): sdpa, eager, flash_attention_2,
    flash_attention_3, flex_attention, or a hub kernel; default: transformers' choice (sdpa where the model has it)."""


@dataclass
class LoraConfig:
    r: int = 8
    """LoRA rank."""
    alpha: int = 16
    """LoRA scaling numerator: updates are scaled by alpha / r."""
    dropout: float = 0.0
    """Dropout on the LoRA input path."""
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])
    """Module names (suffixes) that get adapters, e.g. [q_proj, v_proj] or [c_attn]; or all-linear (every linear
    layer but the output head), or a regex matched against the full module name (PEFT's meaning)."""
    target_parameters: list[str] | None = None
    """Parameters (not modules) that get adapters, by name suffix: a MoE layer's fused experts, e.g.
    [mlp.experts.gate_up_proj, mlp.experts.down_proj] (PEFT's meaning; with dropout 0, without DoRA)."""
    bias: Bias = "none"
    """Which biases train and are saved: none | all | lora_only (loralib's semantics)."""
    use_rslora: bool = False
    """Rank-stabilised LoRA: scale updates by alpha / sqrt(r) instead of alpha / r."""
    use_dora: bool = False
    """DoRA: a trained magnitude vector per adapted layer on top of LoRA (PEFT's lora_magnitude_vector)."""
    init_lora_weights: bool | str = True
    """true (A Kaiming-uniform, B zero: the model starts as the base) | gaussian | false (B random too; tests).
    PiSSA, OLoRA, LoftQ, EVA and CorDA are refused: they rewrite the base weights or need data at init."""
    rank_pattern: dict[str, int] = field(default_factory=dict)
    """Per-layer rank overrides, {module name or regex: r}, e.g. {q_proj: 16}."""
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    """Per-layer alpha overrides, {module name or regex: alpha}."""
    layers_to_transform: list[int] | None = None
    """Only these layer indices get adapters (needs target_modules as a list)."""
    exclude_modules: list[str] | None = None
    """Module names (suffixes) that never get adapters, even if target_modules matches them."""
    modules_to_save: list[str] | None = None
    """Modules trained in full and saved whole with the adapter, e.g. [lm_head] or [embed_tokens] after adding
    tokens (PEFT's meaning)."""
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    """Token ids whose embedding rows train (and are saved, only those rows): a list for the input embedding, or
    {embedding module name: [ids]}."""
    ensure_weight_tying: bool = False
    """On a base that ties lm_head to the input embedding: modules_to_save on either trains one copy shared by both
    (PEFT's meaning), so the adapter merges into the tied model; without it each trains its own copy."""
    init_from: str | None = None
    """Start a fresh run's adapter from a trained one's weights (the optimizer, schedule and step count start
    afresh): a dist_lora step, a checkpoint dir (its newest verified step), DIR/best, a directory PEFT's
    save_pretrained wrote, or a PEFT adapter's hub id. Read only by a run that has no step of its own to resume."""


@dataclass
class DataConfig:
    path: str | list[str] = ""
    """Training data: a local .jsonl/.json/.parquet/.csv/.txt file (a .txt file is one document), shards of one
    kind (a glob pattern such as data/train-*.jsonl, or a directory of data files), a directory written by
    Dataset.save_to_disk, or a hub dataset id (read with Hugging Face datasets); or a list of them, whose samples
    are trained on together (the same fields in each)."""
    weights: list[float] | None = None
    """With several sources in path: how often each is drawn (normalized), mixed by the seed until every source has
    been seen whole, the smaller ones repeated (datasets' interleave_datasets, all_exhausted); null: each source
    once, one after the other."""
    format: DataFormat = "text"
    """text (every token trains) | completion (prompt and completion fields; loss on the completion) | chat (a
    messages list rendered by the chat template; loss on assistant turns) | alpaca (instruction, optional input and
    system, and output fields: a user turn and the assistant's, rendered by the chat template; loss on the output)."""
    fields: dict[str, str] = field(default_factory=dict)
    """Your column names for the fields the format reads, e.g. {messages: conversations} or {prompt: question,
    completion: answer}; default: text | prompt, completion | messages. chat also reads each message's role and
    content keys ({messages: conversations, role: from, content: value} is ShareGPT's layout), an optional tools
    column (each conversation's function schemas, for the chat template), and train: a message key whose false or 0
    makes that turn context, not a target ({train: weight} reads ShareGPT's per-turn weight); completion, with
    prompts and completions as messages, reads that tools column too. alpaca reads instruction, output, and the
    optional input, system and history columns."""
    roles: dict[str, str] = field(default_factory=dict)
    """chat: your role names onto the chat template's, e.g. {human: user, gpt: assistant} (ShareGPT's); a role not
    named is kept. The turns whose role is then assistant are the targets."""
    turns: Turns = "all"
    """chat and alpaca: the assistant turns that are targets: all | last (each conversation's last; the earlier ones are
    context, LLaMA-Factory's mask_history)."""
    seq_len: int = 128
    """Tokens per training row."""
    packing: bool = False
    """Pack several samples into each row; position ids restart per sample and no sample attends to another."""
    too_long: TooLong = "truncate"
    """A completion or chat sample longer than seq_len: truncate (keep its first seq_len tokens) | drop."""
    loss_on_prompt: bool = False
    """completion and chat: every token is a target, the prompt's and the user turns' too (axolotl's
    train_on_inputs); by default only the completion and the assistant turns are."""
    chat_template: str | None = None
    """A Jinja chat template (or a file holding one) for a tokenizer that has none, or to replace its own."""
    system_prompt: str | None = None
    """chat (and conversations as prompt and completion): a system turn put first in every conversation that has
    none (axolotl's default_system_message, LLaMA-Factory's default_system); dist-lora generate asks with it too."""
    name: str | None = None
    """A hub dataset's configuration name."""
    split: str = "train"
    """The split to train on (a hub dataset, or a save_to_disk DatasetDict)."""
    eval_path: str | list[str] | dict[str, str | list[str] | dict[str, Any]] | None = None
    """Evaluation data, read like path (same format and fields; one source or a list); or several eval sets by
    name, {name: source or [sources]}, each evaluated and logged apart (HF Trainer's dict of eval datasets). A set
    that needs its own split or hub configuration: {name: {path: source or [sources], split: S, name: C}}."""
    eval_split: str = "train"
    """The split of eval_path to evaluate on (a named set's own split, where it gives one, wins)."""
    eval_fraction: float = 0.0
    """Without eval_path: hold this fraction of the training samples out for evaluation (split by train.seed)."""
    cache_dir: str | None = None
    """Where tokenized rows are cached (default: $DIST_LORA_CACHE/data or ~/.cache/dist_lora/data)."""
    num_proc: int | None = None
    """Processes that tokenize (datasets' num_proc), on the rank of each node that prepares the data while the
    node's other ranks wait; null: one per CPU core it may use (at most 32) for 10,000 samples or more, else 1. The
    rows are the same for any number."""


@dataclass
class TrainConfig:
    max_steps: int = 100
    """Optimizer steps in the whole run (the schedule's length); left out with ``epochs``, which sets it."""
    epochs: float | None = None
    """The run's length in passes over the training rows (HF Trainer's num_train_epochs; may be fractional), in
    place of max_steps: ceil(epochs x rows / global_batch_size) steps, worked out once the data is tokenized (and
    packed), the same at any world size."""
    global_batch_size: int = 8
    """Samples per optimizer step, over all ranks; fixed whatever the world size."""
    micro_batch_size: int = 1
    """Samples per forward pass on one rank."""
    lr: float = 3e-4
    """Peak learning rate (AdamW)."""
    warmup_steps: int = 0
    """Linear warm-up steps, then lr_schedule."""
    warmup_ratio: float = 0.0
    """The warm-up as a share of the run's steps instead (HF Trainer's warmup_ratio): ceil(ratio x max_steps), known
    once the run's length is (with epochs, once the data is tokenized)."""
    lr_schedule: LrSchedule = "cosine"
    """After warm-up: cosine (decay to min_lr_ratio * lr at max_steps) | linear (the same, in a straight line; HF
    Trainer's default) | constant | wsd (warmup-stable-decay: constant, then a cosine decay over the last
    decay_ratio of the steps; HF's get_wsd_schedule, torchtitan's WSD)."""
    min_lr_ratio: float = 0.1
    """The learning rate at max_steps as a fraction of lr, for cosine, linear and wsd (0: decay to zero)."""
    decay_ratio: float = 0.1
    """wsd: the share of max_steps, at the end of the run, over which the learning rate decays: ceil(ratio x
    max_steps) steps (never into the warm-up)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW's betas: the decay rates of its first and second moments (HF Trainer's adam_beta1, adam_beta2)."""
    adam_eps: float = 1e-8
    """AdamW's eps, added to the root of the second moment (HF Trainer's adam_epsilon)."""
    seed: int = 0
    """Seeds LoRA init and the sample order (which depends only on seed and step)."""
    stop_at_step: int | None = None
    """Stop (with a checkpoint) after this step, as if preempted; the schedule still spans max_steps."""
    stop_after_minutes: float | None = None
    """Stop (with a checkpoint) after the step that ends this many minutes after this job's first step began, by
    rank 0's clock, agreed in the step's all-reduce (Lightning's max_time, per job): a job in a time-limited slot
    ends itself cleanly, with time left to save, and its requeue resumes. null: no limit."""
    metrics_file: str | None = None
    """Append each step's loss, lr and seconds as JSON lines to this local file (rank 0)."""
    log_every_steps: int = 10
    """Where rank 0's stderr is not a terminal (a SLURM or Kubernetes log file), there is no progress bar: rank 0
    logs a line every N steps (and the last) with the loss, lr, gradient norm, step time, tokens/s, peak memory,
    the latest evaluation and the time left (HF Trainer's logging_steps). 0: no such lines."""
    report_to: list[str] | None = None
    """Where rank 0 also sends the metrics (HF Trainer's report_to): tensorboard (beside metrics_file), wandb
    (Weights & Biases, set up by its own WANDB_* environment: project, entity, mode); each must be installed.
    Default: TensorBoard where it is installed and metrics_file is set; [] (or none): nowhere else. One name alone
    (report_to: wandb) is a list of one, as in HF's TrainingArguments."""
    max_grad_norm: float | None = 1.0
    """Clip the global L2 norm of the adapter's gradients (over every rank's shard) to this, as
    torch.nn.utils.clip_grad_norm_ does (HF Trainer's default is 1.0); null: no clipping. Logged every step."""
    eval_every_steps: int = 0
    """Evaluate (the mean token loss over all the eval data) every N steps and at the end; 0: only at the end
    when eval data is set (data.eval_path or data.eval_fraction)."""
    eval_on_start: bool = False
    """Evaluate once before a fresh run's first step (step 0: the base with its untrained adapter, which adds
    nothing), the baseline its curves start from (HF's eval_on_start); a resumed run does not."""
    eval_batch_size: int | None = None
    """Eval rows per forward on one rank (HF's per_device_eval_batch_size); None: micro_batch_size. An evaluation
    keeps no activations for a backward, so a rank may take more rows at once than a training micro-batch."""
    early_stopping_patience: int | None = None
    """Stop when this many evaluations in a row have not improved on the best one (by best_metric) by more than
    early_stopping_threshold (HF's EarlyStoppingCallback); the step is saved. null: never."""
    early_stopping_threshold: float = 0.0
    """How much better than the best an evaluation must be to count as an improvement, in best_metric's units
    (lower for loss, higher for accuracy)."""
    best_metric: BestMetric = "loss"
    """What makes an evaluation the best, for early stopping, checkpoint.keep_best and DIR/best (HF's
    metric_for_best_model and greater_is_better): loss (the mean token loss, lower is better) | accuracy (the
    token accuracy, the share of target tokens ranked first, higher is better). A tie keeps the earlier step."""
    best_eval_set: str | None = None
    """With several named eval sets (data.eval_path as {name: source}): the one whose best_metric early stopping
    and checkpoint.keep_best follow, and the progress bar shows (HF's metric_for_best_model names one set's
    metric); required with either of those when there are several. null: the first set."""
    activation_checkpointing: bool = False
    """Recompute each transformer block's activations in backward (less memory for long sequences, about a third
    more compute); checkpoint keys do not change, so steps load with it on or off."""
    activation_checkpointing_every: int = 1
    """With activation_checkpointing: recompute only the first of every N blocks, the others keeping their
    activations (HF's every_n_layers, torchtitan's selective layer checkpointing): less recompute where memory
    allows; 1: every block."""
    compile: bool = False
    """torch.compile each transformer block in place (torchtune's and torchtitan's ``compile``): fused kernels
    for the blocks' forward and backward, compiled at the first step (and at the first evaluation); checkpoint keys
    do not change, so steps load with it on or off."""
    loss_chunk_tokens: int = 1024
    """The causal LM loss computed this many tokens at a time (dist_lora.loss): never a float32 copy of all the
    logits, the values transformers' loss gives; 0: the model's own loss (transformers' ForCausalLMLoss)."""
    gc_every_steps: int = 50
    """Python's cyclic garbage collector runs only between steps, on the young generations every N steps
    (torchtitan's gc_freq), instead of at moments of its own: a full collection pauses one rank at a step of its
    choosing, and every collective waits for the slowest rank. 0: the collector as Python runs it."""
    neftune_noise_alpha: float | None = None
    """NEFTune (HF Trainer's neftune_noise_alpha): uniform noise of scale alpha / sqrt(tokens x hidden) added to the
    input embeddings in training (not in evaluation); the paper uses 5; null: none."""
    loraplus_lr_ratio: float | None = None
    """LoRA+ (PEFT's create_loraplus_optimizer): the B matrices (and other 1-D trained tensors) learn at this many
    times lr, the A matrices at lr; null: one lr for all. The paper's default is 16."""
    loraplus_lr_embedding: float = 1e-6
    """With LoRA+: the learning rate of LoRA on embedding layers (PEFT's default), scheduled like lr."""

    def adamw(self) -> dict[str, Any]:
        """The keyword arguments of the trainer's ``torch.optim.AdamW``."""
        betas = tuple(float(b) for b in self.adam_betas)
        return {"lr": self.lr, "betas": betas, "eps": self.adam_eps, "weight_decay": self.weight_decay}

    def recompute_every(self) -> int:
        """Activation checkpointing of every N-th block, as :func:`dist_lora.model.prepare_base` takes it (0: none)."""
        return self.activation_checkpointing_every if self.activation_checkpointing else 0


@dataclass
class ParallelConfig:
    backend: BackendName = "single"
    """fsdp | deepspeed | ddp | single."""
    zero_stage: int = 3
    """DeepSpeed ZeRO stage (1, 2 or 3); used with backend=deepspeed."""
    mixed_precision: MixedPrecision = "none"
    """none | bf16: FSDP2 MixedPrecisionPolicy / DeepSpeed bf16 with fp32 master weights / DDP and single: the
    forward under torch.autocast to bf16."""
    deepspeed_config: str | None = None
    """A DeepSpeed JSON merged over dist_lora's (e.g. offload or overlap settings): "auto" at any depth is dist_lora's
    value, and a setting that contradicts this config (batch sizes, stage, precision, clipping, optimizer, schedule)
    is an error naming the key to set here instead."""
    reshard_after_forward: bool | int = True
    """FSDP2: free each block's gathered parameters after its forward (true: least memory, a second all-gather in
    backward), keep them until backward and across the step's micro-batches (false: one all-gather per block and
    optimizer step; the peak holds the whole model gathered), or reshard to groups of this many ranks (an int, as
    fully_shard takes it). The last block never reshards: its backward comes first."""
    prefetch: int = 0
    """FSDP2: all-gather this many blocks ahead of the one computing, in forward and backward (explicit prefetch);
    0: FSDP2's own (the next block in backward only)."""
    keep_base_gathered: bool = False
    """FSDP2: all-gather the frozen base once, at the first forward, and keep it gathered for the run (it never
    changes); only the trained parameters (adapter, trained biases) are gathered and resharded each step, in groups
    of their own. DDP's step time for a base that fits on each device, at DDP's memory plus this rank's shard (the
    adapter and its Adam state stay sharded). Overrides reshard_after_forward and prefetch for the base."""
    replicate: int | Literal["nodes"] = 1
    """FSDP2 only: HSDP with this many replica groups. The world is split into `replicate` groups of
    world / replicate ranks; each group shards the model (all-gathers stay inside it: make it a node) and the groups
    hold replicas (gradients all-reduced across them). "nodes": one group per node (world / LOCAL_WORLD_SIZE), which
    follows an elastic job's node count; 1: plain FSDP2."""
    cpu_offload: bool = False
    """Keep the sharded parameters, their gradients and the optimizer state in host memory; a block's parameters
    go to the GPU only while it computes. FSDP2: ``CPUOffloadPolicy`` (pinned memory on a GPU); DeepSpeed:
    ZeRO-Offload (``offload_optimizer``, and at ZeRO-3 ``offload_param``, on the CPU). For a base whose shards do
    not fit on the GPUs; each step then moves the base over PCIe."""
    timeout_s: float = 1800.0
    """Process-group timeout: a collective that some rank never joins fails after this long (NCCL and gloo)."""


@dataclass
class CheckpointConfig:
    dir: str = ""
    """Where steps go: a local path or any fsspec URL (file://, s3://bucket/prefix, memory://)."""
    every_steps: int = 0
    """Save every N steps (0: only at the end)."""
    every_minutes: float | None = None
    """Also save the step that ends this many minutes after the last save (or the first step's start), by rank 0's
    clock, agreed by every rank within the step's own all-reduce (Lightning's train_time_interval): a run whose
    steps vary in time, or a preemptible job, loses at most this much work. With every_steps, whichever comes
    first (each save restarts the clock). null: by steps only."""
    keep_last: int | None = None
    """Keep the newest N committed steps, delete older ones that dist_lora wrote (None: keep all)."""
    resume: str = "auto"
    """auto (newest verified step in dir, if any) | none | the URL of one step."""
    bucket_mb: float = 32.0
    """Size of one gather/broadcast bucket; one collective per bucket."""
    async_save: bool = True
    """Write and upload in the background; training waits only for the gather (the next save waits for this one)."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """Passed to fsspec, e.g. {endpoint_url: ..., key: ..., secret: ...} for s3fs; else AWS env vars apply."""
    keep_best: bool | int = False
    """With keep_last: also keep the best-evaluated step, by train.best_metric (recorded in each step's
    trainer_state.json); N: the N best-evaluated steps (Lightning's save_top_k), to compare before serving one."""
    on_error: OnError = "raise"
    """A save that failed (after its retries): raise (training stops with the error) | warn (training goes on)."""
    retry_attempts: int = 5
    """Object-store calls are tried this many times in all (transient errors only) before the save fails."""
    retry_backoff_s: float = 0.5
    """Wait before the 2nd try; doubled each time (+-25% jitter), up to retry_max_backoff_s."""
    retry_max_backoff_s: float = 8.0
    io_timeout_s: float = 60.0
    """Connect/read timeout of one object-store request."""
    run_id: str | None = None
    """This job's id in the dir's lease (a restart with the same id takes it over at once). Default: the env
    DIST_LORA_RUN_ID, SLURM_JOB_ID or TORCHELASTIC_RUN_ID, else a fresh id."""
    lease_ttl_s: float = 600.0
    """A lease its holder has not renewed for this long is stale: another run may take the dir over."""


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


EVAL_SET_NAME = re.compile(r"[A-Za-z0-9_.-]+")
"""What a named eval set may be called (it becomes part of metric names: ``eval/NAME/loss``)."""


def eval_sets(d: DataConfig) -> dict[str | None, str | list[str]]:
    """``data.eval_path`` as eval sets in order: ``{name: sources}`` as given, ``{None: sources}`` for one unnamed
    set (a source or a list of them), ``{}`` for none (``data.eval_fraction``'s held-out samples are an unnamed
    set, made from the training data)."""
    if isinstance(d.eval_path, dict):
        return {
            name: value.get("path", "") if isinstance(value, dict) else value for name, value in d.eval_path.items()
        }
    return {None: d.eval_path} if d.eval_path else {}


EVAL_SET_OPTIONS = ("path", "split", "name")


def eval_set_reading(d: DataConfig, name: str | None) -> tuple[str, str | None]:
    """The split and hub configuration an eval set is read with: its own, where ``data.eval_path`` gives them as
    ``{name: {path, split, name}}``, else ``data.eval_split`` and ``data.name``."""
    value = d.eval_path.get(name) if isinstance(d.eval_path, dict) and name is not None else None
    options = value if isinstance(value, dict) else {}
    return options.get("split", d.eval_split), options.get("name", d.name)


def best_eval_set(cfg: RunConfig) -> str | None:
    """The named eval set whose best_metric early stopping and keep_best follow (``train.best_eval_set``, else the
    first); None for an unnamed set."""
    names = [name for name in eval_sets(cfg.data) if name is not None]
    return cfg.train.best_eval_set or (names[0] if names else None)


def _validate_eval_sets(cfg: RunConfig, check: Any) -> None:
    d, t = cfg.data, cfg.train
    example = "e.g. data.eval_path={general: general.jsonl, domain: [a.jsonl, b.jsonl]}"

    def sources_ok(value: Any) -> bool:
        items = [value] if isinstance(value, str) else value
        return isinstance(items, list) and bool(items) and all(isinstance(p, str) and p for p in items)

    if isinstance(d.eval_path, dict):
        check(bool(d.eval_path), f"data.eval_path is an empty mapping: name at least one eval set ({example})")
        for name, value in d.eval_path.items():
            check(
                isinstance(name, str) and EVAL_SET_NAME.fullmatch(name) is not None,
                f"data.eval_path: eval set name {name!r} must be letters, digits, '_', '.' or '-' (it names the "
                f"set's metrics, eval/NAME/loss); {example}",
            )
            if isinstance(value, dict):
                unknown = sorted(set(value) - set(EVAL_SET_OPTIONS))
                check(
                    not unknown and sources_ok(value.get("path")),
                    f"data.eval_path's set {name!r} as a mapping takes path (a source or a non-empty list of them), "
                    f"split and name (got {value!r}{'; unknown: ' + ', '.join(map(str, unknown)) if unknown else ''}); "
                    f"e.g. {{{name}: {{path: org/dataset, split: validation, name: all}}}}",
                )
                for option in ("split", "name"):
                    check(
                        option not in value or (isinstance(value[option], str) and bool(value[option])),
                        f"data.eval_path's set {name!r}: {option} must be a non-empty string "
                        f"(got {value.get(option)!r})",
                    )
                continue
            check(
                sources_ok(value),
                f"data.eval_path's set {name!r} must be a source or a non-empty list of them (got {value!r}); "
                f"{example}",
            )
    elif d.eval_path is not None:
        check(
            sources_ok(d.eval_path),
            f"data.eval_path must be a source, a list of them, or {{name: source}} (got {d.eval_path!r}); {example}",
        )
    names = [name for name in eval_sets(d) if name is not None]
    if t.best_eval_set is not None:
        check(
            t.best_eval_set in names,
            f"train.best_eval_set={t.best_eval_set} names no eval set of data.eval_path"
            + (f" (its sets: {', '.join(names)})" if names else ": it picks one of several named sets, {name: source}"),
        )
    elif len(names) > 1:
        for setting, on in (
            ("train.early_stopping_patience", t.early_stopping_patience is not None),
            ("checkpoint.keep_best", cfg.checkpoint.keep_best),
        ):
            check(
                not on,
                f"{setting} follows one eval set's {t.best_metric}, and data.eval_path has {len(names)} sets "
                f"({', '.join(names)}): "
                f"say which with train.best_eval_set, e.g. train.best_eval_set={names[0]}",
            )


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


KNOWN_AS = {  # what PEFT, HF TrainingArguments, TRL, axolotl and LLaMA-Factory call some settings
    "rank": "lora.r",
    "lora_r": "lora.r",
    "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "learning_rate": "train.lr",
    "num_train_epochs": "train.epochs",
    "per_device_train_batch_size": "train.micro_batch_size",
    "per_device_eval_batch_size": "train.eval_batch_size",
    "gradient_accumulation_steps": "train.global_batch_size = micro_batch_size x ranks x steps accumulated",
    "gradient_checkpointing": "train.activation_checkpointing",
    "lr_scheduler_type": "train.lr_schedule",
    "eval_steps": "train.eval_every_steps",
    "save_steps": "checkpoint.every_steps",
    "logging_steps": "train.log_every_steps",
    "save_total_limit": "checkpoint.keep_last",
    "output_dir": "checkpoint.dir",
    "resume_from_checkpoint": "checkpoint.resume",
    "lora_model_dir": "lora.init_from",  # (axolotl's)
    "adapter_name_or_path": "lora.init_from",  # (LLaMA-Factory's)
    "max_seq_length": "data.seq_len",
    "max_length": "data.seq_len",
    "model_name_or_path": "model.name_or_path",
    "torch_dtype": "model.dtype",
    "bf16": "parallel.mixed_precision: bf16 (or model.dtype: bfloat16)",
    "deepspeed": "parallel.deepspeed_config, with parallel.backend: deepspeed",
    "fsdp": "parallel.backend: fsdp",
    "optim": "train.lr, train.adam_betas, train.adam_eps and train.weight_decay: the optimizer is torch's AdamW",
    "optimizer": "train.lr, train.adam_betas, train.adam_eps and train.weight_decay: the optimizer is torch's AdamW",
    "torch_compile": "train.compile",
    "eval_strategy": "train.eval_every_steps",
    "metric_for_best_model": "train.best_metric",
    "load_best_model_at_end": "checkpoint.keep_best (DIR/best names the best step)",
    "dataset_text_field": "data.fields: {text: COLUMN}",
    "completion_only_loss": "data.format: completion",  # (TRL's)
    "assistant_only_loss": "data.format: chat",
    "base_model": "model.name_or_path",  # (axolotl's, to the end of the block)
    "datasets": "data.path",
    "test_datasets": "data.eval_path",
    "dataset_prepared_path": "data.cache_dir",
    "val_set_size": "data.eval_fraction",
    "sequence_len": "data.seq_len",
    "sample_packing": "data.packing",
    "train_on_inputs": "data.loss_on_prompt",
    "num_epochs": "train.epochs",
    "lr_scheduler": "train.lr_schedule",
    "lora_target_modules": "lora.target_modules",
    "lora_target_linear": "lora.target_modules: all-linear",
    "lora_modules_to_save": "lora.modules_to_save",
    "peft_use_rslora": "lora.use_rslora",
    "peft_use_dora": "lora.use_dora",
    "load_in_4bit": "model.quantization: nf4",
    "flash_attention": "model.attn_implementation: flash_attention_2",
    "wandb_project": "train.report_to: [wandb], with WANDB_PROJECT in the environment",
    "dataset": "data.path",  # (LLaMA-Factory's, to the end)
    "eval_dataset": "data.eval_path",
    "cutoff_len": "data.seq_len",
    "val_size": "data.eval_fraction",
    "template": "data.chat_template",
    "lora_rank": "lora.r",
    "lora_target": "lora.target_modules",
    "additional_target": "lora.modules_to_save",
    "quantization_bit": "model.quantization: nf4 (4 bits)",
}


def _meant(key: str, valid: dict[str, Any], prefix: str) -> str:
    """What an unknown key was probably meant to be, as a hint to add to its error: the same key in another
    section (``train.zero_stage`` is ``parallel.zero_stage``), PEFT's or HF's name for a setting
    (:data:`KNOWN_AS`), else the section's closest key (a typo); or ""."""
    if key in KNOWN_AS:
        return f" (in dist_lora: {KNOWN_AS[key]})"
    sections = {name: tp for name, tp in _field_types(RunConfig).items() if isinstance(tp, type)}
    elsewhere = [f"{name}.{key}" for name, tp in sections.items() if key in _field_types(tp)]
    if elsewhere and f"{prefix}{key}" not in elsewhere:
        return f" (it is {' or '.join(elsewhere)})"
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.75)
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return value in typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(tp)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    if typing.get_origin(tp) is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", str(tp))


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _build(cls: Any, data: Any, prefix: str, errors: list[str]) -> Any:
    if not isinstance(data, dict):
        errors.append(f"{prefix.rstrip('.') or 'config'} must be a mapping (got {data!r})")
        return cls()
    types_ = _field_types(cls)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in types_:
            hint = _meant(str(key), types_, prefix)
            errors.append(f"unknown key {prefix}{key}{hint}; valid keys: {', '.join(sorted(types_))}")
            continue
        tp = types_[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, f"{prefix}{key}.", errors)
        elif tp is float and isinstance(value, str) and _is_float(value):
            kwargs[key] = float(value)  # PyYAML reads 1e-4 (no dot) as a string
        elif f"{prefix}{key}" == "train.report_to" and isinstance(value, str):  # as HF's TrainingArguments takes it
            kwargs[key] = [] if value == "none" else [value]
        elif not _type_ok(value, tp):
            errors.append(f"{prefix}{key} must be {_type_name(tp)} (got {value!r})")
        else:
            kwargs[key] = float(value) if tp is float else value
    return cls(**kwargs)


LORA_INITS = (True, False, "gaussian")


def _validate_lora(lora: LoraConfig, check: Any) -> None:
    """PEFT's options that dist_lora accepts, with PEFT's meaning; the ones it cannot save faithfully refused."""
    init = lora.init_lora_weights
    check(
        init in LORA_INITS,
        f"lora.init_lora_weights={init!r} is refused: only true, false and gaussian are supported. PiSSA, OLoRA, "
        "LoftQ, EVA and CorDA rewrite the base weights (or need data) at init, so an adapter saved alone would not "
        "reproduce the trained model over the original base",
    )
    check(
        all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in lora.rank_pattern.values()),
        f"lora.rank_pattern values must be ranks >= 1 (got {lora.rank_pattern})",
    )
    check(
        all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in lora.alpha_pattern.values()),
        f"lora.alpha_pattern values must be alphas > 0 (got {lora.alpha_pattern})",
    )
    check(
        all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in lora.layers_to_transform or []),
        f"lora.layers_to_transform must be layer indices >= 0 (got {lora.layers_to_transform})",
    )
    check(
        lora.layers_to_transform is None or not isinstance(lora.target_modules, str),
        "lora.layers_to_transform needs lora.target_modules as a list of module names (PEFT cannot combine it "
        f"with a regex or all-linear; got target_modules={lora.target_modules!r})",
    )
    if lora.target_parameters:  # PEFT's LoRA on a parameter adds B @ A to the weight: no input to drop out
        check(
            lora.dropout == 0 and not lora.use_dora,
            "lora.target_parameters (LoRA on a parameter, PEFT's ParamWrapper) works with lora.dropout: 0 and "
            f"without lora.use_dora (got dropout={lora.dropout}, use_dora={lora.use_dora}): set those, or leave "
            "target_parameters out",
        )
    if isinstance(lora.trainable_token_indices, dict):
        check(
            all(
                isinstance(v, list) and all(isinstance(i, int) for i in v)
                for v in lora.trainable_token_indices.values()
            ),
            "lora.trainable_token_indices must be a list of token ids or {embedding module: [token ids]} "
            f"(got {lora.trainable_token_indices})",
        )


def _validate(cfg: RunConfig, errors: list[str]) -> None:
    """Checks beyond the types (Literal value sets are checked when the dataclasses are built)."""

    def check(ok: bool, msg: str) -> None:
        if not ok:
            errors.append(msg)

    check(bool(cfg.model.name_or_path), "model.name_or_path is required (a save_pretrained dir or hub id)")
    check(
        cfg.model.revision is None or (isinstance(cfg.model.revision, str) and cfg.model.revision != ""),
        f"model.revision must be a hub commit, branch or tag (got {cfg.model.revision!r}); omit it for the newest",
    )
    check(
        cfg.model.attn_implementation != "",
        "model.attn_implementation is empty: name a kernel (sdpa, eager, flash_attention_2, ...) or omit it for "
        "transformers' default",
    )
    check(cfg.lora.r >= 1, f"lora.r must be >= 1 (got {cfg.lora.r})")
    check(cfg.lora.alpha > 0, f"lora.alpha must be > 0 (got {cfg.lora.alpha})")
    check(0.0 <= cfg.lora.dropout < 1.0, f"lora.dropout must be in [0, 1) (got {cfg.lora.dropout})")
    check(
        bool(cfg.lora.target_modules) or bool(cfg.lora.target_parameters),
        "lora.target_modules must name at least one module (or lora.target_parameters a parameter)",
    )
    _validate_lora(cfg.lora, check)
    d = cfg.data
    check(
        bool(d.path) and all(isinstance(p, str) and p for p in ([d.path] if isinstance(d.path, str) else d.path)),
        f"data.path is required (a data file, a save_to_disk directory or a hub dataset id, or a list of them; got "
        f"{d.path!r})",
    )
    check(d.seq_len >= 2, f"data.seq_len must be >= 2 (got {d.seq_len})")
    for key, value in (("data.cache_dir", d.cache_dir), ("train.metrics_file", cfg.train.metrics_file)):
        check(
            value is None or "://" not in str(value),
            f"{key} is a local path (got {value}, which would become a directory {str(value).split('/')[0]} here): "
            "set a path on this machine's disk (train.report_to: [wandb] sends the metrics off the machine)",
        )
    check(d.num_proc is None or d.num_proc >= 1, f"data.num_proc must be >= 1, or null for auto (got {d.num_proc})")
    sources = 1 if isinstance(d.path, str) else len(d.path)
    check(
        d.weights is None or (len(d.weights) == sources > 1 and all(w > 0 for w in d.weights)),
        f"data.weights must give one weight > 0 to each of data.path's sources, and data.path must list several "
        f"(got {d.weights} for {sources} source(s))",
    )
    check(
        not (d.weights and d.eval_fraction),
        "data.eval_fraction with data.weights would hold out samples that the mix repeats, into both splits: set "
        "data.eval_path instead",
    )
    check(
        not (d.loss_on_prompt and d.format == "text"),
        "data.loss_on_prompt is for the completion and chat formats: text already trains on every token",
    )
    check(
        d.turns == "all" or (d.format in ("chat", "alpaca") and not d.loss_on_prompt),
        f"data.turns={d.turns} picks the chat turns that are targets: it needs data.format chat or alpaca (got "
        f"{d.format}) and no data.loss_on_prompt (which makes every token a target)",
    )
    check(
        "train" not in d.fields or not d.loss_on_prompt,
        "data.fields' train key picks the chat turns that are targets, and data.loss_on_prompt makes every token "
        "one: drop either",
    )
    check(
        d.system_prompt is None or (isinstance(d.system_prompt, str) and d.format != "text"),
        f"data.system_prompt is a chat turn, and data.format is {d.format}: drop it, or use chat or alpaca (or "
        "completion with conversations)",
    )
    check(
        not d.roles or d.format == "chat",
        f"data.roles renames the roles of chat messages, and data.format is {d.format}: drop it or set format: chat",
    )
    check(0.0 <= d.eval_fraction < 1.0, f"data.eval_fraction must be in [0, 1), e.g. 0.05 (got {d.eval_fraction})")
    _validate_eval_sets(cfg, check)
    check(
        not (d.eval_path and d.eval_fraction),
        "set data.eval_path or data.eval_fraction, not both (eval_fraction holds training samples out)",
    )
    check(
        cfg.train.eval_every_steps == 0 or bool(d.eval_path or d.eval_fraction),
        f"train.eval_every_steps={cfg.train.eval_every_steps} needs eval data: set data.eval_path or "
        "data.eval_fraction",
    )
    check(
        not cfg.train.eval_on_start or bool(d.eval_path or d.eval_fraction),
        "train.eval_on_start needs eval data: set data.eval_path or data.eval_fraction",
    )
    check(
        cfg.train.early_stopping_patience is None or cfg.train.eval_every_steps > 0,
        "train.early_stopping_patience needs evaluations during the run: set train.eval_every_steps (and eval data)",
    )
    check(
        cfg.train.early_stopping_patience is None or cfg.train.early_stopping_patience >= 1,
        f"train.early_stopping_patience must be >= 1 (got {cfg.train.early_stopping_patience}); null: never stop early",
    )
    check(
        cfg.train.early_stopping_threshold >= 0,
        f"train.early_stopping_threshold must be >= 0 (got {cfg.train.early_stopping_threshold})",
    )
    check(cfg.train.eval_every_steps >= 0, f"train.eval_every_steps must be >= 0 (got {cfg.train.eval_every_steps})")
    check(
        cfg.train.loss_chunk_tokens >= 0,
        f"train.loss_chunk_tokens must be >= 0 (got {cfg.train.loss_chunk_tokens}); 0 uses the model's own loss",
    )
    check(cfg.train.gc_every_steps >= 0, f"train.gc_every_steps must be >= 0 (got {cfg.train.gc_every_steps})")
    check(cfg.train.log_every_steps >= 0, f"train.log_every_steps must be >= 0 (got {cfg.train.log_every_steps})")
    check(
        not cfg.checkpoint.keep_best or bool(d.eval_path or d.eval_fraction),
        "checkpoint.keep_best needs eval data: set data.eval_path or data.eval_fraction",
    )
    check(
        cfg.checkpoint.keep_best >= 0,
        f"checkpoint.keep_best must be true, false or a number of steps >= 1 (got {cfg.checkpoint.keep_best})",
    )
    t = cfg.train
    check(t.max_steps >= 1, f"train.max_steps must be >= 1 (got {t.max_steps})")
    check(t.micro_batch_size >= 1, f"train.micro_batch_size must be >= 1 (got {t.micro_batch_size})")
    check(
        t.eval_batch_size is None or t.eval_batch_size >= 1,
        f"train.eval_batch_size must be >= 1, or null for train.micro_batch_size (got {t.eval_batch_size})",
    )
    check(
        t.global_batch_size >= t.micro_batch_size,
        f"train.global_batch_size must be >= train.micro_batch_size (got {t.global_batch_size} < {t.micro_batch_size})",
    )
    check(t.lr > 0, f"train.lr must be > 0 (got {t.lr})")
    check(
        len(t.adam_betas) == 2 and all(0.0 <= b < 1.0 for b in t.adam_betas),
        f"train.adam_betas must be two numbers in [0, 1), e.g. [0.9, 0.95] (got {t.adam_betas})",
    )
    check(t.adam_eps > 0, f"train.adam_eps must be > 0 (got {t.adam_eps})")
    for name in t.report_to or []:
        if name not in REPORTERS:
            errors.append(f"train.report_to: {name!r} is not one of {', '.join(REPORTERS)}")
        elif importlib.util.find_spec(REPORTERS[name]) is None:
            errors.append(f"train.report_to names {name}, which is not installed here: pip install {REPORTERS[name]}")
    check(
        t.report_to is None or "tensorboard" not in t.report_to or t.metrics_file is not None,
        "train.report_to names tensorboard, whose logs go beside train.metrics_file: set train.metrics_file",
    )
    check(
        t.neftune_noise_alpha is None or t.neftune_noise_alpha > 0,
        f"train.neftune_noise_alpha must be > 0 (got {t.neftune_noise_alpha}); null adds no noise",
    )
    check(
        t.loraplus_lr_ratio is None or t.loraplus_lr_ratio > 0,
        f"train.loraplus_lr_ratio must be > 0 (got {t.loraplus_lr_ratio}); null turns LoRA+ off",
    )
    check(t.loraplus_lr_embedding >= 0, f"train.loraplus_lr_embedding must be >= 0 (got {t.loraplus_lr_embedding})")
    check(t.warmup_steps >= 0, f"train.warmup_steps must be >= 0 (got {t.warmup_steps})")
    check(0.0 <= t.warmup_ratio < 1.0, f"train.warmup_ratio must be in [0, 1) (got {t.warmup_ratio})")
    check(
        not (t.warmup_ratio and t.warmup_steps),
        f"train.warmup_steps={t.warmup_steps} and train.warmup_ratio={t.warmup_ratio} both set the warm-up: keep one",
    )
    check(0.0 <= t.min_lr_ratio <= 1.0, f"train.min_lr_ratio must be in [0, 1] (got {t.min_lr_ratio})")
    check(
        t.activation_checkpointing_every >= 1,
        f"train.activation_checkpointing_every must be >= 1 (got {t.activation_checkpointing_every}); 1 recomputes "
        "every block",
    )
    check(0.0 < t.decay_ratio <= 1.0, f"train.decay_ratio must be in (0, 1], e.g. 0.1 (got {t.decay_ratio})")
    check(t.weight_decay >= 0, f"train.weight_decay must be >= 0 (got {t.weight_decay})")
    check(t.seed >= 0, f"train.seed must be >= 0 (got {t.seed})")
    check(
        t.max_grad_norm is None or t.max_grad_norm > 0,
        f"train.max_grad_norm must be > 0, or null for no clipping (got {t.max_grad_norm})",
    )
    check(t.epochs is None or t.epochs > 0, f"train.epochs must be > 0 (got {t.epochs})")
    check(  # (with epochs, the run's end is known once the data is: the trainer checks it then)
        t.stop_at_step is None or (t.stop_at_step >= 1 and (t.epochs is not None or t.stop_at_step <= t.max_steps)),
        f"train.stop_at_step must be in [1, train.max_steps={t.max_steps}] (got {t.stop_at_step})",
    )
    check(
        t.stop_after_minutes is None or t.stop_after_minutes > 0,
        f"train.stop_after_minutes must be > 0 (got {t.stop_after_minutes}); null: no time limit",
    )
    p = cfg.parallel
    check(p.zero_stage in (1, 2, 3), f"parallel.zero_stage must be 1, 2 or 3 (got {p.zero_stage})")
    check(p.prefetch >= 0, f"parallel.prefetch must be >= 0 blocks (got {p.prefetch})")
    check(p.timeout_s > 0, f"parallel.timeout_s must be > 0 seconds (got {p.timeout_s})")
    check(p.replicate == "nodes" or p.replicate >= 1, f"parallel.replicate must be >= 1 or nodes (got {p.replicate})")
    check(
        isinstance(p.reshard_after_forward, bool) or p.reshard_after_forward >= 1,
        f"parallel.reshard_after_forward must be true, false or a group size >= 1 (got {p.reshard_after_forward})",
    )
    check(
        p.replicate == 1 or p.backend == "fsdp",
        f"parallel.replicate={p.replicate} (HSDP) needs parallel.backend=fsdp (got {p.backend})",
    )
    check(
        not p.keep_base_gathered or p.backend == "fsdp",
        f"parallel.keep_base_gathered needs parallel.backend=fsdp (got {p.backend}); DDP and ZeRO-1/2 keep the "
        "whole base on every rank already",
    )
    check(
        not p.cpu_offload or p.backend in ("fsdp", "deepspeed"),
        f"parallel.cpu_offload needs parallel.backend fsdp or deepspeed (got {p.backend}): DDP and a single process "
        "keep a whole replica on each device, which they compute with; shard the base instead",
    )
    check(not (t.compile and p.backend == "deepspeed" and p.zero_stage == 3), f"train.compile {ZERO3_COMPILE}")
    if p.backend == "deepspeed" and p.deepspeed_config:
        from dist_lora.backends.deepspeed_config import config_errors  # reads the JSON only

        errors.extend(
            config_errors(
                p.deepspeed_config,
                zero_stage=p.zero_stage,
                micro_batch_size=t.micro_batch_size,
                global_batch_size=t.global_batch_size,
                bf16=p.mixed_precision == "bf16",
                max_grad_norm=t.max_grad_norm,
                adamw=t.adamw(),
                cpu_offload=p.cpu_offload,
            )
        )
    if cfg.model.quantization == "nf4":
        check(
            p.backend in ("fsdp", "ddp", "single"),
            f"model.quantization=nf4 runs on parallel.backend fsdp (which shards the 4-bit base), ddp or single, "
            f"not {p.backend}: deepspeed.initialize moves and casts the module with Module._apply, which cannot "
            "swap torchao's NF4 parameters (RuntimeError: Couldn't swap Linear.weight, at every ZeRO stage), and "
            "ZeRO-3 keeps every parameter as a slice of its own flat buffers, which NF4's packed tensors are not",
        )
        check(
            not cfg.lora.use_dora,
            "lora.use_dora with model.quantization=nf4 is refused: DoRA's magnitude needs the dequantized base "
            "weight in every forward, which PEFT reads only from bitsandbytes' layers; train DoRA over an "
            "unquantized base, or plain LoRA over NF4",
        )
    errors.extend(checkpoint_errors(cfg.checkpoint))


def checkpoint_errors(c: CheckpointConfig, prefix: str = "checkpoint.") -> list[str]:
    """Every problem of a checkpoint section (also for a CheckpointConfig made in code: the HF callback, the
    Python API), each naming its dotted key."""
    checks = [
        (bool(c.dir), f"{prefix}dir is required (a local path or an fsspec URL such as s3://bucket/run)"),
        (c.every_steps >= 0, f"{prefix}every_steps must be >= 0 (got {c.every_steps})"),
        (
            c.every_minutes is None or c.every_minutes > 0,
            f"{prefix}every_minutes must be > 0 (got {c.every_minutes}); null: save by steps only",
        ),
        (c.keep_last is None or c.keep_last >= 1, f"{prefix}keep_last must be >= 1 (got {c.keep_last})"),
        (c.bucket_mb > 0, f"{prefix}bucket_mb must be > 0 (got {c.bucket_mb})"),
        (bool(c.resume), f"{prefix}resume must be auto, none or the URL of one step"),
        (c.on_error in typing.get_args(OnError), f"{prefix}on_error must be raise or warn (got {c.on_error!r})"),
        (c.retry_attempts >= 1, f"{prefix}retry_attempts must be >= 1 (got {c.retry_attempts})"),
        (
            c.retry_backoff_s >= 0 and c.retry_max_backoff_s >= 0,
            f"{prefix}retry_backoff_s and retry_max_backoff_s must be >= 0 (got {c.retry_backoff_s}, "
            f"{c.retry_max_backoff_s})",
        ),
        (c.io_timeout_s > 0, f"{prefix}io_timeout_s must be > 0 (got {c.io_timeout_s})"),
        (c.lease_ttl_s > 0, f"{prefix}lease_ttl_s must be > 0 (got {c.lease_ttl_s})"),
    ]
    return [message for ok, message in checks if not ok]


def check_checkpoint(c: CheckpointConfig, prefix: str = "checkpoint.") -> CheckpointConfig:
    """``c``, or ConfigError naming every problem."""
    errors = checkpoint_errors(c, prefix)
    if errors:
        raise ConfigError("invalid checkpoint settings:\n  " + "\n  ".join(errors))
    return c


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A key given twice in one YAML mapping."""


class _UniqueKeys(yaml.SafeLoader):
    """yaml's safe loader, where a key given twice in one mapping is an error: PyYAML keeps the last one silently
    (a second ``lora:`` section, or ``{r: 8, r: 16}``, replaced the first), and YAML itself requires unique keys.
    A merge key's (``<<: *defaults``) keys may still be set again after it."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # (its keys come first: the mapping's own set them again)
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, typing.Hashable):  # (yaml's own construct_mapping names it)
                continue
            if key in seen:
                raise DuplicateKeyError(
                    None,
                    None,
                    f"key {key!r} is given twice in one mapping (first on line {seen[key] + 1}); YAML keeps one of "
                    "them silently: keep one",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def yaml_load(source: str | typing.TextIO) -> Any:
    """YAML text (or an open file, which its errors name) as Python values, a key given twice in one mapping
    refused (:class:`_UniqueKeys`)."""
    return yaml.load(source, Loader=_UniqueKeys)  # (a SafeLoader)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], value), the value typed by YAML (``3e-4`` -> float, ``[a, b]`` -> list)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value, e.g. train.lr=3e-4")
    key, raw = item.split("=", 1)
    try:
        value = yaml_load(raw) if raw.strip() else ""
    except DuplicateKeyError as e:
        raise ConfigError(f"override {item!r}: {e.problem}") from e
    except yaml.YAMLError as e:
        where = f" ({e.problem})" if isinstance(e, yaml.MarkedYAMLError) and e.problem else ""
        raise ConfigError(
            f"override {item!r}: its value is read as YAML, and {raw!r} is not valid YAML{where}: e.g. "
            f"{key.strip()}=[a,b] for a list, or quote it in the shell as text: '{key.strip()}=\"{raw}\"'"
        ) from e
    return key.strip().split("."), value


def _is_yaml(text: str) -> bool:
    try:
        yaml_load(text)
    except yaml.YAMLError:
        return False
    return True


def _cut_by_the_shell(overrides: list[str], i: int) -> ConfigError | None:
    """Where ``overrides[i]``'s value did not parse: the error of an override the shell cut at a space
    (``data.fields={text: body}`` unquoted: ``data.fields={text:`` and ``body}``), giving it back whole and quoted,
    if the arguments after it complete it; None otherwise."""
    item = overrides[i]
    if not item.partition("=")[2].lstrip().startswith(("{", "[")):
        return None
    for j in range(i + 1, len(overrides)):
        if "=" in overrides[j].split(":", 1)[0]:  # the next override (key=value; a value's own '=' after ':')
            return None
        joined = " ".join(overrides[i : j + 1])
        if _is_yaml(joined.partition("=")[2]):
            rest = overrides[i + 1 : j + 1]
            came = "an argument of its own" if len(rest) == 1 else "arguments of their own"
            return ConfigError(
                f"override {item!r} was cut at a space by the shell ({' '.join(map(repr, rest))} came as {came}): "
                f"quote the whole override, '{joined}'"
            )
    return None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for i, item in enumerate(overrides):
        try:
            path, value = parse_override(item)
        except ConfigError:
            cut = _cut_by_the_shell(overrides, i)
            if cut is not None:
                raise cut from None
            raise
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return data


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    """Build and validate a RunConfig; raises ConfigError listing every problem at once."""
    errors: list[str] = []
    cfg = _build(RunConfig, data or {}, "", errors)
    _validate(cfg, errors)  # a key rejected while building kept its default: the rest is still checked
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
    return cfg


ALTERNATIVES = (("epochs", "max_steps"), ("warmup_ratio", "warmup_steps"))
"""Keys of ``train`` that set one thing in two ways (the run's length, its warm-up): a config gives one of each."""


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config, apply dotted ``key=value`` overrides, validate."""
    typed, path = str(path), Path(path)
    if not path.is_file():
        problem = f"config file {typed} {'is a directory' if path.is_dir() else 'does not exist'}"
        if "://" in typed or path.is_dir():  # a step, a checkpoint dir or an adapter, given where the config goes
            raise ConfigError(
                f"{problem}: train, eval and check read the run's YAML config first; a step, a checkpoint dir or "
                f"an adapter goes after it as an override, e.g. `dist-lora eval CONFIG checkpoint.resume={typed}`"
            )
        raise ConfigError(problem)
    try:
        with path.open() as f:
            data = yaml_load(f) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections (model, lora, data, ...)")
    overrides = overrides or []
    given = {o.split("=", 1)[0].strip() for o in overrides}
    train = data.get("train")
    for pair in ALTERNATIVES:  # one of a pair on the command line replaces the file's other
        for key, other in (pair, pair[::-1]):
            if f"train.{key}" in given and f"train.{other}" not in given and isinstance(train, dict):
                train.pop(other, None)
    data = apply_overrides(data, overrides)
    train = data.get("train")
    if isinstance(train, dict) and train.get("epochs") is not None and "max_steps" in train:
        raise ConfigError(
            f"invalid config:\n  train.epochs={train['epochs']} and train.max_steps={train['max_steps']} both set the "
            "run's length: keep one (epochs: passes over the data; max_steps: optimizer steps)"
        )
    return config_from_dict(data)


SECRET_WORDS = ("key", "secret", "token", "password", "credential")


def redact(value: Any) -> Any:
    """A copy with secrets replaced by "***": values under keys that name a key, secret, token or password, and
    credentials inside URLs (``s3://user:pass@host``)."""
    if isinstance(value, dict):
        return {
            k: "***" if any(w in str(k).lower() for w in SECRET_WORDS) and v else redact(v) for k, v in value.items()
        }
    if isinstance(value, list):
        return [redact(v) for v in value]
    if isinstance(value, str) and "://" in value and "@" in value.split("://", 1)[1].split("/", 1)[0]:
        scheme, rest = value.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return value


def config_to_dict(cfg: RunConfig, *, secrets: bool = False) -> dict[str, Any]:
    """The config as plain data; secrets are redacted unless ``secrets=True`` (never write those to a checkpoint)."""
    data = dataclasses.asdict(cfg)
    return data if secrets else redact(data)


ZERO3_COMPILE = (
    "is refused on ZeRO-3: ZeRO-3 gathers each layer's parameters in hooks inside every block, which split the "
    "block's compiled graph at every layer (torch recompiles DeepSpeed's hooks past its limit, then runs them "
    "eagerly); compile on FSDP2 (parallel.backend=fsdp), whose all-gathers run around each block, or on ZeRO-1/2"
)
"""Why ``train.compile`` (and ``load_sharded(compile=True)``) is refused on ZeRO-3."""

REPORTERS = {"tensorboard": "tensorboard", "wandb": "wandb"}
"""``train.report_to``'s names, and the package each needs."""

RESUME_FREE = (
    "parallel.",
    "checkpoint.",
    "lora.init_from",  # (read only by a fresh run)
    "train.stop_at_step",
    "train.stop_after_minutes",
    "train.metrics_file",
    "train.log_every_steps",
    "train.report_to",
    "train.micro_batch_size",
    "train.eval_batch_size",
    "model.attn_implementation",
    "train.loss_chunk_tokens",
    "train.compile",
    "train.activation_checkpointing",  # (and train.activation_checkpointing_every)
    "data.num_proc",
    "data.cache_dir",
)
"""Settings a resume may change without changing what is trained: where and how it runs (ranks, engine, sharding,
saving, the attention kernel, the loss's chunks, compilation, activation checkpointing, tokenizing's processes and
cache), and how each global
batch is cut into micro-batches."""


def config_changes(saved: dict[str, Any] | None, now: dict[str, Any]) -> list[str]:
    """The settings (``section.key``) that differ between the config a step was saved with and this run's, with
    both values, but for :data:`RESUME_FREE`; empty for a step saved without its config. A setting the step's
    version of dist_lora did not have yet counts as its default there."""
    if not saved:
        return []

    def flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) and prefix == "" else {f"{prefix}{k}": v})
        return out

    before, after = {**flat(config_to_dict(RunConfig())), **flat(saved)}, flat(now)
    return [
        f"{key} {before.get(key, 'unset')!r} -> {after.get(key, 'unset')!r}"
        for key in sorted(set(before) | set(after))
        if not key.startswith(RESUME_FREE) and before.get(key) != after.get(key)
    ]
