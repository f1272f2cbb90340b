"""Running a sweep's trials: each a `cppo train` process (or under the sweep's launcher), `jobs` at a time.

The sweep holds `output_dir/.lock`, and so does every trial it starts (the descriptor is inherited): a sweep
started again after one that died waits until the old trials have saved their checkpoints and exited.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from ..errors import UserError
from ..launch import with_own_port
from .spec import SweepConfig, Trial, num_processes


def _die_with_parent(parent: int) -> None:
    """In the trial's process: SIGTERM it (it saves a checkpoint and stops) if the sweep process dies."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the sweep died before that took effect
            os.kill(os.getpid(), signal.SIGTERM)


def _error_line(output: str, returncode: int) -> str:
    """The trial's own one-line error if it printed one, else what ended it."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    mine = [line for line in lines if line.startswith("cppo: error:")]
    if mine:
        return mine[-1]
    if returncode < 0:
        return f"killed by {signal.Signals(-returncode).name}"
    return f"exit code {returncode}: {lines[-1] if lines else 'no output'}"


class Runner:
    """Runs trials as `cppo train` processes in `jobs` slots; SIGINT/SIGTERM stop it cleanly: running trials
    are asked to stop (they save a checkpoint), nothing new starts; a second SIGINT kills them."""

    def __init__(self, sweep: SweepConfig, out: Path, jobs: int, lock: int | None = None):
        self.sweep, self.out, self.jobs, self.lock = sweep, out, jobs, lock
        self.launcher = shlex.split(sweep.launcher) if sweep.launcher else [sys.executable, "-m", "cppo"]
        processes = num_processes(sweep.launcher)
        self.threads = max(1, (os.cpu_count() or 1) // (jobs * processes))
        self.devices = self._device_groups()
        self.stopping = False
        self.stopped_by: int | None = None  # the signal that stopped the sweep
        self.running: dict[int, tuple[Trial, subprocess.Popen, float, Any, int]] = {}
        self.durations: list[float] = []
        self.counts = {"finished": 0, "failed": 0}

    def _device_groups(self) -> list[str] | None:
        per = self.sweep.devices_per_trial
        if per is None:
            return None
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is None:
            listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True) if shutil.which(
                "nvidia-smi") else None
            if listing is None or listing.returncode != 0:
                raise UserError("devices_per_trial: no GPUs found (set CUDA_VISIBLE_DEVICES or install nvidia-smi)")
            visible = ",".join(str(i) for i, line in enumerate(listing.stdout.splitlines()) if line.startswith("GPU"))
        ids = [d for d in visible.split(",") if d.strip()]
        groups = [",".join(ids[i:i + per]) for i in range(0, len(ids) - per + 1, per)]
        if len(groups) < self.jobs:
            raise UserError(f"jobs must be <= {len(groups)} with devices_per_trial={per} and {len(ids)} visible "
                            f"GPU(s), got {self.jobs}")
        return groups

    def run(self, trials: list[Trial], on_settled) -> None:
        queue = [t for t in trials if not (self.out / "trials" / t.name / "summary.json").is_file()]
        total, self.todo = len(trials), len(queue)
        self.counts = {"finished": 0, "failed": 0}
        if not queue:
            return
        print(f"sweep: {total - len(queue)} of {total} trial(s) finished before; running {len(queue)}, "
              f"{self.jobs} at a time, {self.threads} thread(s) each", file=sys.stderr, flush=True)
        previous = {sig: signal.signal(sig, self._stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            while self.running or (queue and not self.stopping):
                for slot in range(self.jobs):
                    if slot not in self.running and queue and not self.stopping:
                        self._start(queue.pop(0), slot)
                time.sleep(0.05)
                for slot, (_, process, *_) in list(self.running.items()):
                    if process.poll() is not None:
                        self._settle(slot)
                        on_settled()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _stop(self, signum, frame) -> None:
        if self.stopping and signum == signal.SIGINT:  # asked twice: do not wait for checkpoints
            self._signal_all(signal.SIGKILL)
            return
        self.stopping, self.stopped_by = True, signum
        print(f"sweep: stopping; {len(self.running)} running trial(s) save a checkpoint first "
              "(run the same command again to finish)", file=sys.stderr, flush=True)
        self._signal_all(signal.SIGTERM)

    def stop_all(self) -> None:
        """Nothing new starts; the running trials save a checkpoint and stop (a sweep that cannot go on)."""
        self.stopping = True
        self._signal_all(signal.SIGTERM)

    def _signal_all(self, signum: int) -> None:
        """To each running trial's whole process group (a launcher and its workers)."""
        for _, process, *_ in list(self.running.values()):
            try:
                os.killpg(process.pid, signum)
            except ProcessLookupError:  # it has just exited
                pass

    def _start(self, trial: Trial, slot: int) -> None:
        from ..checkpoint import checkpoints

        trials = self.out / "trials"
        config_path, run_dir = trials / f"{trial.name}.yaml", trials / trial.name
        config_path.write_text(config_yaml_from(trial.config))
        command = [*self.launcher, "train", str(config_path)]
        if checkpoints(run_dir):
            command.append("--resume")  # stopped part-way: continue from its newest checkpoint, exactly
        elif run_dir.is_dir() and any(run_dir.iterdir()):
            command.append("--overwrite")  # stopped before its first checkpoint: start it again
        if self.jobs > 1:
            command = with_own_port(command)
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads)}
        if self.devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.devices[slot]
        log = open(trials / f"{trial.name}.log", "a")  # noqa: SIM115 (closed when the trial settles)
        start = log.tell()
        log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(command)}\n")
        log.flush()
        # The trial holds the sweep's lock too: a sweep started again after this one died waits for it.
        parent = os.getpid()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                   pass_fds=(self.lock,), preexec_fn=lambda: _die_with_parent(parent))
        self.running[slot] = (trial, process, time.time(), log, start)
        if self.stopping:  # the stop arrived while it was being started
            self._signal_all(signal.SIGTERM)
        self._progress(f"started {trial.name}")

    def _settle(self, slot: int) -> None:
        trial, process, started, log, start = self.running.pop(slot)
        log.close()
        wall = time.time() - started
        record = read_record(self.out, trial.name)
        record["attempts"] = record.get("attempts", 0) + 1
        record["wall_s"] = round(record.get("wall_s", 0.0) + wall, 1)
        record["returncode"] = process.returncode
        record.setdefault("started", round(started, 1))
        record["ended"] = round(time.time(), 1)
        summary = self.out / "trials" / trial.name / "summary.json"
        if summary.is_file():
            record.update(status="finished", error=None, summary_sha256=sha256_of(summary))
            self.durations.append(wall)
            self.counts["finished"] += 1
            what = f"finished {trial.name} in {wall:.0f} s"
        elif self.stopping or process.returncode == 0:  # it saved a checkpoint and stopped on a signal
            record.update(status="stopped", error=None)
            what = f"stopped {trial.name}"
        else:
            with open(self.out / "trials" / f"{trial.name}.log") as f:
                f.seek(start)
                record.update(status="failed", error=_error_line(f.read(), process.returncode))
            self.counts["failed"] += 1
            what = f"FAILED {trial.name}: {record['error']} (log: {self.out / 'trials' / trial.name}.log)"
        (self.out / "trials" / f"{trial.name}.json").write_text(json.dumps(record, indent=1) + "\n")
        self._progress(what)

    def _progress(self, what: str) -> None:
        done = self.counts["finished"] + self.counts["failed"]
        left = self.todo - done - len(self.running)
        eta = ""
        if self.durations and not self.stopping:
            seconds = sum(self.durations) / len(self.durations) * (left + len(self.running)) / self.jobs
            eta = f"; ETA {seconds / 60:.0f} min" if seconds >= 60 else f"; ETA {seconds:.0f} s"
        print(f"sweep: {what} | {self.counts['finished']}/{self.todo} done, {len(self.running)} running, "
              f"{self.counts['failed']} failed, {left} waiting{eta}", file=sys.stderr, flush=True)


def config_yaml_from(resolved: dict) -> str:
    """A resolved config dict as the YAML `cppo train` reads."""
    return yaml.safe_dump(resolved, sort_keys=False)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_json(path: Path, what: str) -> dict:
    """A JSON file the sweep reads back (a trial's record or summary): a damaged one is one line naming it."""
    try:
        found = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: {what} is unreadable ({type(e).__name__}); remove {path.parent / path.stem}* "
                        "to run that trial again") from None
    if not isinstance(found, dict):
        raise UserError(f"{path}: {what} must hold a JSON object")
    return found


def read_record(out: Path, name: str) -> dict:
    path = out / "trials" / f"{name}.json"
    return read_json(path, "the trial's record") if path.is_file() else {}


def hold_lock(lock, out: Path) -> None:
    """Hold `out/.lock` (its trials inherit it). Held by a live sweep: refused; held only by the trials of a
    sweep that died: wait until they have saved their checkpoints and exited."""
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip()
        if holder.isdigit() and _live_sweep(int(holder)):
            raise UserError(f"another `cppo sweep` (pid {holder}) is running in {out}; wait for it or stop it "
                            "first") from None
        print(f"sweep: waiting for the trials of an earlier sweep in {out} to save a checkpoint and exit",
              file=sys.stderr, flush=True)
        fcntl.flock(lock, fcntl.LOCK_EX)
    lock.seek(0)
    lock.truncate()
    lock.write(str(os.getpid()))
    lock.flush()


def _live_sweep(pid: int, grace_s: float = 5.0) -> bool:
    """Whether `pid` is a `cppo sweep` that goes on running. A sweep just killed (SIGKILL, the OOM killer) is
    not: its process may still exist for a moment (being torn down, or a zombie its parent has not reaped),
    so a process that looks alive is watched for `grace_s` before it counts as live."""
    deadline = time.monotonic() + grace_s
    while _running(pid):
        if time.monotonic() >= deadline:
            return True
        time.sleep(0.1)
    return False


def _running(pid: int) -> bool:
    """The process exists, is not a zombie or dying, and is a `cppo sweep` (not another process that has
    since been given the same pid)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    proc = Path(f"/proc/{pid}")
    if not proc.is_dir():  # no /proc (macOS): what kill(0) says
        return True
    try:
        status = dict(line.split(":", 1) for line in (proc / "status").read_text().splitlines() if ":" in line)
        command = (proc / "cmdline").read_bytes().split(b"\0")
    except OSError:  # it has just gone
        return False
    if status.get("State", "").strip()[:1] in ("Z", "X"):
        return False
    pending = int(status.get("SigPnd", "0").strip(), 16) | int(status.get("ShdPnd", "0").strip(), 16)
    if pending & (1 << (signal.SIGKILL - 1)):
        return False
    return any(b"sweep" in word for word in command)
