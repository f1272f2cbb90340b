"""Command line: `cppo train CONFIG [key=value ...]` (also `python -m cppo`, `accelerate launch -m cppo`).

A mistake in what the user gave (config, data, reward code, output directory) ends the process with
one line, `cppo: error: ...`, and exit code 2. When the mistake raised an exception in the user's code
(or a write failed), its whole traceback is saved to a log file that the line names; `CPPO_DEBUG=1`
raises it instead, traceback on the terminal.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import time
import traceback

from .config_loading import load_config
from .errors import UserError


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def train(args: argparse.Namespace) -> int:
    if args.accelerate_config is not None:
        if "LOCAL_RANK" in os.environ:
            raise UserError("--accelerate-config starts `accelerate launch` itself: run `cppo train ... "
                            "--accelerate-config NAME` on its own, not under a launcher")
        from .launch import launch

        flags = [*(["--resume", args.resume] if args.resume else []), *(["--force"] if args.force else []),
                 *(["--overwrite"] if args.overwrite else [])]
        return launch(args.config, args.overrides, args.accelerate_config, args.num_processes, flags)
    config = load_config(args.config, args.overrides, num_processes=int(os.environ.get("WORLD_SIZE", "1")))
    if _is_main_process():
        for line in config.ignored():
            print(f"cppo: warning: {line}", file=sys.stderr, flush=True)
    from .continual import run

    summary = run(config, resume=args.resume, force=args.force, overwrite=args.overwrite)
    if "preempted" in summary:
        return 0
    if _is_main_process():
        reward = summary["final_stats"].get("reward/mean", float("nan"))
        print(f"done: {len(config.tasks)} task(s), last step reward/mean={reward:.4f}; final policy in "
              f"{os.path.join(config.output_dir, 'policy')}", file=sys.stderr)
    return 0


def demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .demo import DemoSizes, run_demo

    run_demo(Path(args.output_dir), DemoSizes.quick() if args.quick else DemoSizes(), args.seed)
    return 0


def sweep(args: argparse.Namespace) -> int:
    from .sweep import run_sweep

    return run_sweep(args.sweep, jobs=args.jobs, report_only=args.report, dry_run=args.dry_run,
                     wandb=args.wandb, create=args.create, new_sweep=args.new_sweep)


def build_tiny(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .builtin_models import build_tiny_gpt2
    from .directories import listing, writable_directory
    from .errors import UserError

    out = Path(args.out_dir)
    held = writable_directory(out, "build-tiny")
    if held:
        raise UserError(f"build-tiny: {out} is not empty ({listing(held)}): give a directory that does not exist "
                        "yet or is empty")
    try:
        path = build_tiny_gpt2(out)
    except OSError as e:
        raise UserError(f"build-tiny: cannot write {out}: {e.strerror or e}") from None
    print(f"tiny GPT-2 and tokenizer written to {path}")
    return 0


_OVERRIDE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*=")


def show_config(args: argparse.Namespace) -> int:
    """`cppo config`: the resolved config with every default, or the documentation of every field."""
    if args.doc:
        from .config import Config
        from .config_docs import schema

        for row in schema(Config):
            print(f"{row.key}: {row.type} = {row.default}\n    {row.doc}")
        return 0
    from .config_loading import config_yaml

    print(config_yaml(load_config(args.config, args.overrides)), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="cppo", description="Continual PPO for causal language models.")
    parser.add_argument("--version", action="version", version=f"cppo {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("train", help="train on a config: cppo train CONFIG [key=value ...]")
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. ppo.learning_rate=1e-5 output_dir=runs/x")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CHECKPOINT",
                   help="continue from the newest valid checkpoint in output_dir, or from CHECKPOINT")
    p.add_argument("--force", action="store_true",
                   help="resume even if result-changing config fields or the prompts differ (with a warning)")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in a non-empty output_dir: what it holds is removed once this run has "
                        "finished its first step")
    p.add_argument("--accelerate-config", metavar="NAME|PATH", default=None,
                   help="start the processes with accelerate launch and this config (a file, or a shipped one: "
                        "multi_gpu, zero2, zero3, fsdp2, ...), checked with the training config first")
    p.add_argument("--num-processes", type=int, default=None, metavar="N",
                   help="with --accelerate-config: processes to start (default: the config's num_processes)")
    p.set_defaults(run=train)
    p = commands.add_parser("demo", help="the whole pipeline offline on CPU: data, SFT, reward models, "
                                         "PPO and CPPO over three domains, report")
    p.add_argument("--output-dir", default="runs/demo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a much smaller run (seconds), for smoke tests")
    p.set_defaults(run=demo)
    p = commands.add_parser("sweep", help="run the trials of a sweep file, each as its own `cppo train`: "
                                          "cppo sweep SWEEP.yaml (again: finishes it)")
    p.add_argument("sweep", help="sweep file (YAML): base config, parameters, variants, seeds, metric, jobs")
    p.add_argument("--jobs", type=int, default=None, help="trials at once (default: the sweep file's `jobs`)")
    p.add_argument("--report", action="store_true", help="rebuild results.jsonl/.md and the plots, run nothing")
    p.add_argument("--dry-run", action="store_true", help="list the trials and their overrides, run nothing")
    p.add_argument("--wandb", action="store_true",
                   help="write a wandb sweep definition per variant (wandb agent then runs the same trials)")
    p.add_argument("--create", action="store_true", help="with --wandb: also create the sweeps on the wandb server")
    p.add_argument("--new-sweep", action="store_true",
                   help="run a changed sweep file in the output_dir of an earlier sweep: its sweep.yaml and results "
                        "move to OUTPUT_DIR/earlier/N/, its trials the new sweep also has are reused")
    p.set_defaults(run=sweep)
    p = commands.add_parser("build-tiny", help="write a tiny offline GPT-2 and its tokenizer to a directory")
    p.add_argument("out_dir")
    p.set_defaults(run=build_tiny)
    p = commands.add_parser("config", help="print a config resolved, every default filled in: cppo config [CONFIG] "
                                           "[key=value ...]; --doc: every field's documentation")
    p.add_argument("config", nargs="?", default=None, help="YAML config file (none: every default)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, as for train")
    p.add_argument("--doc", action="store_true", help="print every field with its type, default and meaning")
    p.set_defaults(run=show_config)
    return parser


_LONG_OVERRIDE = re.compile(r"^--[A-Za-z_][A-Za-z0-9_.-]*=")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line as the commands read it (`key=value` overrides gathered wherever they stand;
    `--section.field=value`, as TRL's scripts spell them, is the same override)."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    takes_overrides = args.command in ("train", "config")
    unknown = [a[2:] if takes_overrides and _LONG_OVERRIDE.match(a) else a for a in unknown]
    # `key=value` overrides may also come after the flags (`cppo train c.yaml --resume ppo.steps=80`).
    stray = [a for a in unknown if a.startswith("-") or "=" not in a]
    if stray and takes_overrides and stray[0].startswith("--") and "." in stray[0]:
        parser.error(f"unrecognized argument {stray[0]}: a config field is set as {stray[0][2:]}=VALUE "
                     f"(or --{stray[0][2:]}=VALUE), not as a separate flag and value")
    if stray or (unknown and not takes_overrides):
        parser.error(f"unrecognized arguments: {' '.join(stray or unknown)}")
    if unknown:
        args.overrides = [*args.overrides, *unknown]
    resume = getattr(args, "resume", None)
    if resume not in (None, "auto") and _OVERRIDE.match(resume) and not os.path.isdir(resume):
        # `--resume key=value`: argparse gave the override to --resume as its CHECKPOINT (an existing
        # directory of that name is still taken for the checkpoint).
        args.overrides, args.resume = [*args.overrides, args.resume], "auto"
    if getattr(args, "num_processes", None) is not None and args.accelerate_config is None:
        parser.error("--num-processes goes with --accelerate-config")
    if getattr(args, "create", False) and not args.wandb:
        parser.error("--create goes with --wandb")
    if getattr(args, "new_sweep", False) and (args.report or args.dry_run):
        parser.error("--new-sweep starts a sweep: it does not go with --report or --dry-run")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.command not in ("sweep", "config"):  # neither loads a model: none of the libraries they need
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # loading/saving bars would bury the training progress
        import datasets

        datasets.disable_progress_bars()
    try:
        return args.run(args)
    except UserError as e:
        if os.environ.get("CPPO_DEBUG", "0") not in ("", "0"):
            raise
        if not report(e):
            leave_after_the_reporter()
        return 2


class _Stopped(Exception):
    pass


def leave_after_the_reporter(longest_s: float = 60.0) -> None:
    """A process of a multi-process launch that stops on an error another process reports leaves after that
    one: the launcher stops every process as soon as one exits, and would stop the reporter before its line is
    out (the user would see only the launcher's traceback). The launcher's SIGTERM ends the wait."""
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return

    def stop(signum, frame):
        raise _Stopped

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        time.sleep(longest_s)
    except _Stopped:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)


def report(error: UserError) -> bool:
    """The one line. An error of this process alone (its share of a batch made the user's code fail) is
    reported by that process, with its rank; an error that wraps an exception names the log that keeps
    its traceback; any other error is the same on every process and the main process reports it. Returns
    whether this process reported it."""
    from .outputs import write_error_log

    if error.quiet:  # another process failed and reports it
        return False
    if not (error.own or error.wraps) and not _is_main_process():
        return False
    line = error.line(None if _is_main_process() else int(os.environ["RANK"]))
    if error.wraps:
        log = write_error_log(error, error.output_dir)
        if log is None:  # nowhere to keep it: the traceback goes to the terminal rather than be lost
            traceback.print_exception(error)
        line += f" (traceback: {log})" if log else ""
    print(line, file=sys.stderr, flush=True)
    return True


if __name__ == "__main__":
    sys.exit(main())
