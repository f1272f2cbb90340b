"""Metrics out: metrics.jsonl, the resolved config, wandb / tensorboard (through accelerate's trackers),
and progress on the terminal. Only the main process writes; nothing is written before the first
step has finished (the first write claims the output directory, cppo.outputs), so a run that fails on
its inputs or its first step leaves the directory as it was."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from datetime import timedelta
from pathlib import Path

from .config import Config
from .config_loading import config_yaml
from .outputs import OutputDir, replace_text, writing

# Shown on the progress bar / plain progress lines, in this order.
_PROGRESS_KEYS = {"reward/mean": "reward", "kl/mean": "kl", "policy/clipfrac": "clipfrac"}


class Tracker:
    def __init__(self, accelerator, config: Config, output: OutputDir):
        self.accelerator, self.config, self.output = accelerator, config, output
        self.output_dir = Path(config.output_dir)
        self.enabled = accelerator.is_main_process
        self._started = False
        self.run_id: str | None = None
        self.resumed_step: int | None = None
        self.backend: dict = {}  # what the run runs on (cppo.session.announce_backend)

    def resume(self, run_id: str, step: int | None) -> None:
        """Log under `run_id` (a resumed run continues its wandb run); when resuming from `step`, the
        metrics lines written after it are dropped at the first write (`_start`), so the replayed steps
        are neither missing nor doubled, and a resume that fails early changes nothing."""
        self.run_id, self.resumed_step = run_id, step

    def _drop_lines_after(self, step: int) -> None:
        path = self.output_dir / "metrics.jsonl"
        if not path.is_file():
            return
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        replace_text(path, "".join(line + "\n" for line in kept))

    def _start(self) -> None:
        self.output.claim()
        with writing(self.output_dir, "metrics.jsonl and config.yaml in"):
            if self.resumed_step is not None:
                self._drop_lines_after(self.resumed_step)
            replace_text(self.output_dir / "config.yaml", config_yaml(self.config))
            replace_text(self.output_dir / "backend.json", json.dumps(self.backend, indent=1) + "\n")
        if self.config.report_to:
            run_name = self.config.run_name or self.output_dir.name
            init_kwargs = {"wandb": {"name": run_name, "dir": str(self.output_dir), "id": self.run_id,
                                     "resume": "allow", "group": self.config.run_group}}
            tracked = _flatten({**self.config.to_dict(), "backend": self.backend})
            self.accelerator.init_trackers(self.config.project, config=tracked, init_kwargs=init_kwargs)
        self._started = True

    def log(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            self.output.claim()  # on every process: the directory is this run's now (where its error log goes)
            return
        if not self._started:
            self._start()
        with writing(self.output_dir / "metrics.jsonl", "metrics"), open(self.output_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.config.report_to:
            self.accelerator.log({k: v for k, v in metrics.items() if isinstance(v, int | float)}, step=step)

    def log_extra(self, metrics: dict[str, float], step: int) -> None:
        """Metrics of something other than a training step (the rollout memory's build), to the trackers only."""
        if self.enabled and self.config.report_to:
            self.accelerator.log(metrics, step=step)

    def log_evaluation(self, results: dict[str, dict], step: int) -> None:
        """One row of the evaluation matrix, to the trackers (metrics.jsonl holds training steps only)."""
        if self.enabled and self.config.report_to:
            self.accelerator.log({f"eval/{task}/{kind}": value for task, scores in results.items()
                                  for kind, value in scores.items() if value is not None}, step=step)

    def log_summary(self, summary: dict) -> None:
        """The run's continual metrics (summary.json without the last step's stats, which are logged already)
        to the trackers as `summary/reward/final_average`, once, after the last step: the last value of a key
        is its value in the wandb run summary, which is what a wandb sweep optimises."""
        if not (self.enabled and self.config.report_to):
            return
        flat = _flatten({k: v for k, v in summary.items() if k != "final_stats"}, "summary.")
        values = {key.replace(".", "/"): value for key, value in flat.items() if isinstance(value, int | float)}
        if values:
            self.accelerator.log(values)

    def finish(self) -> None:
        """Close the trackers (main process) and the process group (every process)."""
        self.accelerator.end_training()

    @contextlib.contextmanager
    def progress(self, total: int, initial: int, name: str):
        """A tqdm bar on a terminal; a plain line every `logging_steps` steps otherwise."""
        display = _Progress(total, initial, self.config.logging_steps, self.enabled, name)
        try:
            yield display
        finally:
            display.close()


class _Progress:
    def __init__(self, total: int, initial: int, every: int, enabled: bool, name: str):
        self.total, self.initial, self.every, self.name = total, initial, every, name
        self.started = time.perf_counter()
        self.bar = None
        self.enabled = enabled
        if enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=name, dynamic_ncols=True)

    def update(self, step: int, stats: dict[str, float]) -> None:
        if not self.enabled:
            return
        shown = {label: stats[key] for key, label in _PROGRESS_KEYS.items() if key in stats}
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()}, refresh=False)
            self.bar.update(step - self.bar.n)
        elif step % self.every == 0 or step == self.total:
            elapsed = time.perf_counter() - self.started
            eta = elapsed / max(step - self.initial, 1) * (self.total - step)
            fields = " ".join(f"{k}={v:.4g}" for k, v in shown.items())
            print(f"[{self.name}] step {step}/{self.total} {fields} {stats.get('time/step_s', 0):.2f}s/step "
                  f"eta {timedelta(seconds=round(eta))}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, int | float | str | bool) else str(value)
    return flat
