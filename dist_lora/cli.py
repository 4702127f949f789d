"""The ``dist-lora`` command (also ``python -m dist_lora``): train, eval, check, demo, ls, verify, pull, merge,
generate, plot."""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

# Nothing heavy is imported here: torch, transformers and the backends load inside the command that needs them,
# so that `dist-lora --help` answers at once.


ADAPTER_HELP = "a step, a checkpoint dir (its newest verified step), DIR/best, or a PEFT adapter (dir, URL, hub id)"


def _storage_options(args: argparse.Namespace) -> dict[str, Any]:
    raw = getattr(args, "storage_options", None)
    if not raw:
        return {}
    try:
        options = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(
            f'--storage-options must be a JSON object, e.g. \'{{"endpoint_url": "http://127.0.0.1:8333"}}\' '
            f"(got {raw!r}: {e})"
        ) from e
    if not isinstance(options, dict):
        raise ValueError(f"--storage-options must be a JSON object, not {type(options).__name__} (got {raw!r})")
    return options


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return str(n)


def _steps_at(args: argparse.Namespace, verify: bool = True, evals: bool = False) -> tuple[Any, list[Any]]:
    """What ``ls`` and ``verify`` report on: the one step the URL names, else every step of the checkpoint dir it
    names. A local path that does not exist, or a file, is an error naming it (an object store's prefix holds
    nothing until a step is saved there: it lists none)."""
    from dist_lora.checkpoint import inspect_step, is_step_url, list_steps
    from dist_lora.storage import Storage

    storage = Storage(args.url, _storage_options(args))
    if is_step_url(storage):
        parent_url, name = storage.url.rsplit("/", 1)
        return storage, [inspect_step(Storage(parent_url, _storage_options(args)), name, verify, evals)]
    kind = storage.kind()
    if kind == "file" or (kind is None and storage.is_local):
        raise ValueError(
            f"{args.url} {'is a file' if kind else 'does not exist'}: pass a checkpoint dir (checkpoint.dir of a "
            "run) or one of its steps"
        )
    return storage, list_steps(storage, verify, evals)


def cmd_ls(args: argparse.Namespace) -> int:
    storage, steps = _steps_at(args, verify=not args.fast, evals=True)
    if args.json:
        print(json.dumps([s.to_json() for s in steps], indent=2))
        return 0
    if not steps:
        print(f"no steps under {storage.url}")
        return 0
    # the best-evaluated step as the newest committed step records it, and the others keep_best: N keeps, ranked
    newest = next((s for s in reversed(steps) if s.status == "committed"), None)
    best, metric = (newest.best_eval_step, newest.best_metric) if newest is not None else (None, None)
    ranks = {step: i for i, step in enumerate(newest.kept_best or [], 1)} if newest is not None else {}

    def marked(s: Any) -> str:
        if s.status != "committed" or (s.step != best and s.step not in ranks):
            return ""
        return f"  best ({metric})" if s.step == best else f"  best #{ranks[s.step]} ({metric})"

    print(
        f"{'step':<16}{'status':<12}{'bytes':>10}  {'created':<26}{'world':>6}  {'backend':<10}{'eval loss':>10}"
        f"{'eval acc':>10}"
    )
    for s in steps:
        loss, accuracy = (f"{v:.4f}" if v is not None else "-" for v in (s.eval_loss, s.eval_accuracy))
        print(
            f"{s.name:<16}{s.status:<12}{_human(s.bytes):>10}  {s.created or '-':<26}"
            f"{s.world_size if s.world_size is not None else '-':>6}  {s.backend or '-':<10}{loss:>10}{accuracy:>10}"
            + marked(s)
        )
        if s.error and args.verbose:
            print(f"    {s.error}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    storage, steps = _steps_at(args)
    if not steps:
        print(f"no steps under {storage.url}", file=sys.stderr)
        return 1
    bad = 0
    for s in steps:
        if s.status == "committed":
            print(f"ok          {s.url}")
        elif s.status == "incomplete":
            print(f"incomplete  {s.url}: {s.error}")
            bad += len(steps) == 1  # asked for this one step: it is not a checkpoint
        else:
            print(f"CORRUPT     {s.url}: {s.error}")
            bad += 1
    return 1 if bad else 0


def _kept_after_exit(cfg: Any) -> Any:
    """``cfg``, unless its checkpoint.dir is fsspec's ``memory://``, which lives in the process and is gone, with
    every step saved there, when a command exits (ConfigError naming where steps go instead)."""
    from dist_lora.config import ConfigError

    if cfg.checkpoint.dir.lower().startswith("memory://"):
        raise ConfigError(
            f"checkpoint.dir {cfg.checkpoint.dir} is held in this process's memory, and every step saved there is "
            "gone when the command exits: set a local path or a store (s3://bucket/run); memory:// is for a run in a "
            "Python process that reads its steps back itself"
        )
    return cfg


def cmd_train(args: argparse.Namespace) -> int:
    from dist_lora.config import load_config
    from dist_lora.train import train

    train(_kept_after_exit(load_config(args.config, args.overrides)))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from dist_lora.config import load_config
    from dist_lora.train import evaluate_checkpoint

    results = evaluate_checkpoint(load_config(args.config, args.overrides), every_step=args.every_step)
    if int(os.environ.get("RANK", "0")) == 0:  # one line per step for the job, rank 0's
        for result in results:
            print(json.dumps(result))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from dist_lora.check import check_fits, check_host_fits, check_run, describe
    from dist_lora.config import load_config
    from dist_lora.logs import quiet_third_party

    quiet_third_party()
    cfg = _kept_after_exit(load_config(args.config, args.overrides))
    report = check_run(
        cfg,
        world=args.world_size,
        config_name=args.config,
        nproc_per_node=args.nproc_per_node,
        data=not args.no_data,
        show_rows=args.show_rows,
        row_ids=args.rows,
    )
    print(json.dumps(report.to_json()) if args.json else describe(report, cfg))
    if args.device_memory is not None:
        check_fits(report, cfg, args.device_memory)
    if args.host_memory is not None:
        check_host_fits(report, cfg, args.host_memory)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from dist_lora.demo import run_demo

    try:
        return run_demo(args.run_dir, nproc=args.nproc, steps=args.steps)
    except subprocess.CalledProcessError as e:  # (what went wrong is in its output, above: one line here)
        command = " ".join(map(str, e.cmd[1:] if isinstance(e.cmd, list) else [e.cmd]))
        print(f"dist-lora demo: error: {command} exited with {e.returncode}; its output is above", file=sys.stderr)
        return 2


def cmd_pull(args: argparse.Namespace) -> int:
    from dist_lora.export import pull

    print(pull(args.url, args.out_dir, base=args.base, storage_options=_storage_options(args)))
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from dist_lora.export import merge
    from dist_lora.model import DTYPES

    dtype = DTYPES[args.dtype] if args.dtype else None
    print(merge(args.url, args.out, base=args.base, dtype=dtype, storage_options=_storage_options(args)))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from dist_lora.generate import Sampling, generate, read_prompts, read_tools

    sampling = Sampling(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    prompts = [*args.prompts, *(args.prompt or [])]
    if args.prompts_file:
        prompts += read_prompts(args.prompts_file)
    results = generate(
        args.url,
        prompts,
        base=args.base,
        form=args.format,
        chat_template=args.chat_template,
        system=args.system,
        tools=read_tools(args.tools) if args.tools else None,
        sampling=sampling,
        compare_base=args.compare_base,
        storage_options=_storage_options(args),
    )
    for r in results:
        if args.json:
            print(json.dumps(r))
            continue
        cut = {k: " (cut at --max-new-tokens)" if v == "length" else "" for k, v in r["finish"].items()}
        print(f"### prompt\n{r['prompt']}\n### with the adapter{cut['adapter']}\n{r['adapter']}")
        if "base" in r:
            print(f"### the base alone{cut['base']}\n{r['base']}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from dist_lora.plot import plot_run

    print(plot_run(args.run, args.out))
    return 0


def row_ids(text: str) -> list[int]:
    """``--rows 12,40``: training row indices."""
    try:
        ids = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give row indices separated by commas, e.g. 12,40") from None
    if any(i < 0 for i in ids):
        raise argparse.ArgumentTypeError(f"{text!r}: row indices start at 0")
    return ids


def at_least(low: int) -> Callable[[str], int]:
    """An argparse type: a whole number of at least ``low``."""

    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if n < low:
            raise argparse.ArgumentTypeError(f"must be at least {low} (got {n})")
        return n

    return parse


def gigabytes(text: str) -> float:
    """An argparse type: a size in GB, above 0."""
    try:
        gb = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of GB") from None
    if not gb > 0:  # (nan too)
        raise argparse.ArgumentTypeError(f"must be a number of GB above 0 (got {text})")
    return gb


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dist-lora", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging on every rank")
    # the deepspeed launcher passes --local_rank=N (it also sets LOCAL_RANK, which is what dist_lora reads)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train LoRA from a YAML config (under torchrun, deepspeed, or alone)")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.lr=1e-4")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "eval",
        help="the eval loss of a saved step (checkpoint.resume: the newest, a URL, DIR/best, a PEFT adapter, or none "
        "for the base)",
    )
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. checkpoint.resume=URL")
    p.add_argument("--every-step", action="store_true", help="each committed step of checkpoint.dir, one base load")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "check", help="try a config before queuing a job: every check of a rank's start, no GPU; each rank's share"
    )
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, as train takes them")
    p.add_argument(
        "--world-size", type=at_least(1), default=1, help="the ranks the job will run (nodes x GPUs per node)"
    )
    p.add_argument("--nproc-per-node", type=at_least(1), help="GPUs per node (for parallel.replicate: nodes)")
    p.add_argument(
        "--no-data", action="store_true", help="skip the tokenizer and the data (the base's config.json alone is read)"
    )
    p.add_argument(
        "--show-rows",
        type=at_least(0),
        default=0,
        metavar="N",
        help="print the first N training rows, their targets marked",
    )
    p.add_argument(
        "--rows",
        type=row_ids,
        metavar="I,J,...",
        help="print these training rows (0-based, as a non-finite step's error names them), their targets marked",
    )
    p.add_argument(
        "--device-memory", type=gigabytes, help="GB of each GPU: an error (exit 2) if the model state alone exceeds it"
    )
    p.add_argument(
        "--host-memory",
        type=gigabytes,
        help="GB of host memory a node: an error (exit 2) if the state offloaded to it (cpu_offload) exceeds it",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("demo", help="tiny CPU demo: build a base, train on 2 processes (FSDP2), resume on 1")
    p.add_argument("--run-dir", default="runs/demo")
    p.add_argument("--nproc", type=at_least(1), default=2, help="processes of the first run (1, 2 or 4)")
    p.add_argument("--steps", type=at_least(2), default=40, help="steps in all; the first run makes half of them")
    p.set_defaults(func=cmd_demo)

    for name, func, text in (
        ("ls", cmd_ls, "list the steps of a checkpoint dir with their status"),
        ("verify", cmd_verify, "check every file's sha256 of a step, or of every step in a dir"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("url", help="local path or fsspec URL (s3://bucket/prefix, ...)")
        p.add_argument("--storage-options", help='JSON passed to fsspec, e.g. {"endpoint_url": "http://..."}')
        if name == "ls":
            p.add_argument("--json", action="store_true", help="machine-readable output")
            p.add_argument("--fast", action="store_true", help="check sizes only, not sha256")
        p.set_defaults(func=func)

    p = sub.add_parser("pull", help="download and verify a step into a local dir (PEFT and vLLM load it)")
    p.add_argument("url", help=ADAPTER_HELP)
    p.add_argument("out_dir", help="a local directory, new or empty (written whole, or not at all)")
    p.add_argument("--base", help="write this base model path or id into the copy's adapter_config.json")
    p.add_argument("--storage-options", help="JSON passed to fsspec")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("merge", help="merge a step (or a PEFT adapter) into its base, streamed file by file")
    p.add_argument("url", help=ADAPTER_HELP)
    p.add_argument(
        "--out", required=True, help="local directory for the merged model, new or empty (written whole, or not at all)"
    )
    p.add_argument("--base", help="base model path or id (default: the one adapter_config.json names)")
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        help="the merged weights' dtype (each merged tensor rounded once, from float32); default: the base's",
    )
    p.add_argument("--storage-options", help="JSON passed to fsspec")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("generate", help="answer prompts with a step's adapter over its base (greedy by default)")
    p.add_argument("url", help=ADAPTER_HELP)
    p.add_argument("prompts", nargs="*", metavar="PROMPT", help="prompts to answer (before those of --prompt)")
    p.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    p.add_argument("--prompts-file", help='prompts, one a line: plain text, or JSON lines with a "prompt" field')
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (the default); above 0: sampled")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling, with --temperature above 0")
    p.add_argument("--seed", type=int, default=0, help="the draws of sampling")
    p.add_argument(
        "--format",
        choices=["text", "completion", "chat"],
        help="chat: each prompt is a user turn through the chat template; text, completion: sent as it is "
        "(default: as the run trained, its data.format)",
    )
    p.add_argument(
        "--chat-template",
        help="a Jinja chat template, its file or a built-in (chatml, llama3, gemma, alpaca), in place of the run's",
    )
    p.add_argument("--system", help="a system turn before each prompt (chat)")
    p.add_argument("--tools", help="a JSON file of tool schemas, given to the chat template (chat)")
    p.add_argument("--compare-base", action="store_true", help="answer with the adapter off too")
    p.add_argument("--base", help="base model path or id (default: the one adapter_config.json names)")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt")
    p.add_argument("--storage-options", help="JSON passed to fsspec")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("plot", help="draw a run's loss curve (PNG), resume points marked")
    p.add_argument("run", help="a run dir holding metrics.jsonl, the JSONL, or a checkpoint dir (its config names it)")
    p.add_argument("--out", help="an image file (.png, .svg, .pdf, ...) or a directory (default: beside the metrics)")
    p.set_defaults(func=cmd_plot)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)  # (argparse leaves overrides given after an option unparsed)
    words = getattr(args, "overrides", getattr(args, "prompts", None))  # the command's trailing positionals
    if extra and words is not None and not any(a.startswith("-") for a in extra):
        words += extra  # check CONFIG --world-size 8 train.lr=1e-4; generate URL --max-new-tokens 8 "Hello"
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from dist_lora.logs import quiet_third_party, setup_logging

    setup_logging(args.verbose)
    if args.command in ("merge", "generate", "demo"):  # train and eval quiet them themselves (on every rank)
        quiet_third_party()
    try:
        return int(args.func(args) or 0)
    except Exception as e:
        if not _expected(e):
            raise
        # a failure the user can act on (a bad path, a full disk, a refused lease, a step that does not fit):
        # one line naming it; the traceback only with -v
        logging.getLogger("dist_lora").debug("error", exc_info=True)
        print(f"dist-lora {args.command}: error: {_describe(e)}", file=sys.stderr)
        return 2


def _expected(e: BaseException) -> bool:
    """Errors whose message says what was wrong: OSError covers full disks, permissions, paths that are files and
    every StorageError; ValueError covers config, data, adapter, checkpoint and quantization errors; RankError
    another rank's; NonFiniteError a first step that went NaN (it names the layer)."""
    from dist_lora.agree import RankError
    from dist_lora.guard import NonFiniteError

    return isinstance(e, (OSError, ValueError, RankError, NonFiniteError))


def _describe(e: BaseException) -> str:
    from dist_lora.checkpoint import CheckpointError
    from dist_lora.storage import StorageError

    rank = getattr(e, "failed_rank", None)
    where = f" (on rank {rank})" if rank not in (None, 0) else ""
    plain = isinstance(e, (CheckpointError, StorageError)) or type(e) is ValueError  # their messages say it all
    return f"{e}{where}" if plain else f"{type(e).__name__}: {e}{where}"


def entry() -> None:
    """The ``dist-lora`` command and ``python -m dist_lora``: :func:`main`, then exit with its status.

    A rank whose run ended with every rank in agreement exits at once (:func:`dist_lora.distributed.exit_process`).
    """
    code = main()
    distributed = sys.modules.get("dist_lora.distributed")  # loaded only by commands that ran collectives
    if distributed is not None:
        distributed.exit_process(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
