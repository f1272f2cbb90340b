"""Config-driven sweeps: `cppo sweep SWEEP.yaml` expands trials and runs each as its own `cppo train` process.

A sweep file names a training config (`base`), overrides for every trial, swept `parameters` (grid or random,
with conditions), named `variants`, `seeds` and the `metric`. Every trial is validated against the training
schema before any starts. Trials run `jobs` at a time, each in its own process (under `launcher` if given), so
a trial that crashes never takes the sweep with it; this module never imports the trainer.

On disk, under the sweep's `output_dir`:
    sweep.yaml               the sweep file as last run
    trials/NAME.yaml         the trial's resolved training config     trials/NAME/   its output_dir
    trials/NAME.log          its output, every attempt                trials/NAME.json  status, error, wall time
    results.jsonl, results.md, metric.png, tradeoff.png (cppo.sweep.report)
Trials are run by cppo.sweep.runner; the file and its trials are cppo.sweep.spec.
Running the same command again reuses finished trials, resumes stopped ones from their newest checkpoint and
retries failed ones; `--report` rebuilds the results from what is on disk.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from ..config_loading import read_yaml_mapping
from ..directories import listing, writable_directory
from ..errors import UserError
from . import report
from .runner import Runner, hold_lock
from .spec import SweepConfig, Trial, check_not_stale, load_sweep, resolve, settings, sweep_dir, variant_names
from .wandb_export import write_wandb

RECORDS = ("sweep.yaml", "results.jsonl", "results.md", "metric.png", "tradeoff.png")
"""What a sweep writes at its top level (set aside by --new-sweep); its trials live in trials/."""

_RUN_ONLY = ("jobs", "devices_per_trial", "output_dir")
"""Sweep file keys that change how the trials run, not what they are or how they are ranked."""

def sweep_differences(recorded: dict, given: dict) -> list[str]:
    """The keys in which two sweep files define different sweeps."""
    keys = sorted((set(recorded) | set(given)) - set(_RUN_ONLY))
    return [k for k in keys if json.dumps(recorded.get(k), sort_keys=True) != json.dumps(given.get(k), sort_keys=True)]


def check_directory(path: Path, out: Path, report_only: bool = False, new_sweep: bool = False) -> None:
    """`out` is this sweep's: new or empty, or holding the sweep.yaml of the same sweep (`--new-sweep`: of any
    sweep, whose records are then set aside). Anything else is refused before anything is written."""
    held = writable_directory(out, f"{path}: output_dir") if not report_only or out.is_dir() else []
    recorded = out / "sweep.yaml"
    if report_only and not recorded.is_file():
        found = f"it holds {listing(held)} and no sweep.yaml" if held else \
            "it is empty" if out.is_dir() else "it does not exist"
        raise UserError(f"--report: {out} holds no sweep ({found}); run `cppo sweep {path}` first")
    if not held:
        return
    if not recorded.is_file():
        raise UserError(f"{path}: output_dir {out} is not a sweep's directory (it holds {listing(held)} and no "
                        "sweep.yaml): give the sweep another output_dir")
    if path.resolve() == recorded.resolve():
        return
    changed = sweep_differences(read_yaml_mapping(recorded, "the sweep file"), read_yaml_mapping(path, "sweep file"))
    if not changed or new_sweep:
        return
    what = f"{out} holds another sweep: {path} differs from its sweep.yaml in {', '.join(changed)}"
    if report_only:
        raise UserError(f"--report: {what}; its own results are rebuilt with `cppo sweep {recorded} --report`")
    raise UserError(f"{what}, and its results would drop the trials {path} does not have: give the sweep another "
                    f"output_dir, or --new-sweep to start it here (the earlier records move to {out}/earlier/)")


def set_aside(out: Path) -> Path | None:
    """--new-sweep: the earlier sweep's records into `out/earlier/N/` (its trials stay: those the new sweep
    also has are reused)."""
    present = [name for name in RECORDS if (out / name).is_file()]
    if not present:
        return None
    earlier = out / "earlier"
    number = 1 + max([int(p.name) for p in earlier.iterdir() if p.name.isdigit()] if earlier.is_dir() else [0])
    target = earlier / str(number)
    target.mkdir(parents=True)
    for name in present:
        os.replace(out / name, target / name)
    return target


def run_sweep(path: str | Path, jobs: int | None = None, report_only: bool = False, dry_run: bool = False,
              wandb: bool = False, create: bool = False, new_sweep: bool = False) -> int:
    path = Path(path)
    sweep = load_sweep(path)
    if jobs is not None:
        if jobs <= 0:
            raise UserError(f"--jobs must be > 0, got {jobs}")
        sweep.jobs = jobs
    out = sweep_dir(sweep, path)
    search = resolve(sweep, path, settings(sweep, path), sweep.seeds, "search")
    if dry_run:
        for trial in search:
            print(f"{trial.name}: {' '.join(trial.overrides)}")
        print(f"{len(search)} trial(s){' before the held-out seeds' if sweep.confirm_seeds else ''}; "
              f"output in {out}", file=sys.stderr)
        return 0
    check_directory(path, out, report_only, new_sweep)
    if wandb:
        return write_wandb(sweep, path, out, create)
    check_not_stale(out, search)
    report.check_metric(sweep, report.collect(sweep, out, search))
    if report_only:
        print(report.write(sweep, path, out, search, confirm_trials(sweep, path, out, search)),
              file=sys.stderr)
        return 0
    runner = Runner(sweep, out, sweep.jobs)  # checks the devices before anything is written
    refused: list[UserError] = []

    def settled(trials: list[Trial]) -> None:
        """After each trial: the results so far; a metric the first finished trial lacks stops the sweep."""
        try:
            report.check_metric(sweep, report.write_jsonl(sweep, out, trials))
        except UserError as e:
            if not refused:
                refused.append(e)
                runner.stop_all()

    try:
        (out / "trials").mkdir(parents=True, exist_ok=True)
        lock = open(out / ".lock", "a+")  # noqa: SIM115 (the with below closes it)
    except OSError as e:
        raise UserError(f"{path}: output_dir {out} cannot be written: {e.strerror or e}") from None
    with lock:
        hold_lock(lock, out)
        if new_sweep and (kept := set_aside(out)) is not None:
            print(f"sweep: the earlier sweep's records are in {kept}", file=sys.stderr)
        if path.resolve() != (out / "sweep.yaml").resolve():  # `cppo sweep OUT/sweep.yaml` runs it again
            shutil.copyfile(path, out / "sweep.yaml")
        runner.lock = lock.fileno()
        runner.run(search, lambda: settled(search))
        confirm = [] if runner.stopping else confirm_trials(sweep, path, out, search)
        check_not_stale(out, confirm)
        if confirm:
            runner.run(confirm, lambda: settled(search + confirm))
        if refused:  # the running trials have saved a checkpoint and stopped
            raise refused[0]
        summary = report.write(sweep, path, out, search, confirm)
    print(summary, file=sys.stderr)
    if runner.stopped_by is not None:  # the results above are partial: say so, and to a script by the exit code
        print("sweep: stopped before every trial finished; run the same command again to finish", file=sys.stderr)
        return 128 + runner.stopped_by
    return 0


def confirm_trials(sweep: SweepConfig, path: Path, out: Path, search: list[Trial]) -> list[Trial]:
    """Each confirmed variant's best setting (every seed finished; mean metric) on the held-out seeds."""
    if not sweep.confirm_seeds:
        return []
    rows = report.collect(sweep, out, search)
    confirmed = {v for v in variant_names(sweep) if v is None or sweep.variants[v].confirm}
    best = report.best_settings(sweep, [r for r in rows if r["variant"] in confirmed])
    return resolve(sweep, path, [(variant, params) for variant, params in best.values()], sweep.confirm_seeds,
                   "confirm")
