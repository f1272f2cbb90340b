"""`cppo train CONFIG --accelerate-config NAME|PATH [--num-processes N]`: cppo starts `accelerate launch` itself.

Before any process starts, the accelerate config is read and checked and the training config is validated for
that many processes (batch sizes that do not split, prompt groups split across processes): one line, exit 2,
nothing launched. While the run lasts, the processes' output passes through; when one of them ends the run with
its `cppo: error:` line, the launcher's own report of the failed process (its traceback) is dropped and the exit
code is 2, as for a single process. Launched by hand (`accelerate launch -m cppo ...`) the launcher prints that
report itself.
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

from .config_loading import load_config, read_yaml_mapping
from .errors import UserError

SHIPPED = Path(__file__).resolve().parent.parent / "configs" / "accelerate"
"""The accelerate configs shipped with cppo's source (configs/accelerate/NAME.yaml)."""
_DISTRIBUTED_TYPES = ("NO", "MULTI_GPU", "MULTI_CPU", "DEEPSPEED", "FSDP", "MULTI_XPU", "MULTI_NPU", "MULTI_MLU",
                      "MULTI_SDAA", "MULTI_MUSA", "MULTI_HPU", "XLA")
_LAUNCHER_LOG = re.compile(r"^[WEIF]\d{4} |^\s*(warnings\.warn|torch\.distributed\.elastic)")
"""torch's elastic agent logs, glog-style (`E1202 10:00:00.1 ...`), as it stops the other processes."""


def shipped_names() -> list[str]:
    return sorted(p.stem for p in SHIPPED.glob("*.yaml")) if SHIPPED.is_dir() else []


def accelerate_config(value: str) -> Path:
    """--accelerate-config's file: a path, or the name of a shipped config."""
    path = Path(value).expanduser()
    if path.is_file():
        return path
    shipped = SHIPPED / f"{value}.yaml"
    if "/" not in value and shipped.is_file():
        return shipped
    names = ", ".join(shipped_names()) or "none in this installation"
    raise UserError(f"--accelerate-config: {value} is neither a file nor the name of a shipped config ({names})")


def processes(path: Path, raw: dict, num_processes: int | None) -> int:
    """How many processes the launch starts: --num-processes, else the config's num_processes (× machines)."""
    kind = raw.get("distributed_type", "NO")
    if kind not in _DISTRIBUTED_TYPES:
        raise UserError(f"accelerate config {path}: distributed_type must be one of {', '.join(_DISTRIBUTED_TYPES)}, "
                        f"got {kind!r}")
    if num_processes is not None:
        if num_processes < 1:
            raise UserError(f"--num-processes must be >= 1, got {num_processes}")
        return num_processes
    count = raw.get("num_processes", 1)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise UserError(f"accelerate config {path}: num_processes must be an integer >= 1, got {count!r}")
    return count


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def with_own_port(command: list[str]) -> list[str]:
    """Launches at once on one machine under `accelerate launch` or `torchrun` would all rendezvous on the
    default port (29500), and all but the first would fail: each gets a free one, unless the launcher names
    one."""
    for i, word in enumerate(command[:-1]):
        name = Path(word).name
        if (name == "accelerate" and command[i + 1] == "launch") or word == "accelerate.commands.launch":
            at, flag = i + 1 + (name == "accelerate"), "--main_process_port"
        elif name == "torchrun" or word == "torch.distributed.run":
            at, flag = i + 1, "--master_port"
        else:
            continue
        if not any(w.startswith(flag) for w in command):
            return [*command[:at], flag, str(free_port()), *command[at:]]
        break
    return command


def launch(config_path: str, overrides: list[str], accelerate: str, num_processes: int | None,
           flags: list[str]) -> int:
    """Check, then run `accelerate launch` on `cppo train`; its exit code (2 when a process reported an error)."""
    path = accelerate_config(accelerate)
    raw = read_yaml_mapping(path, "accelerate config")
    count = processes(path, raw, num_processes)
    load_config(config_path, overrides, num_processes=count)  # every process would refuse it: refused here, once
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(path),
               *(["--num_processes", str(num_processes)] if num_processes is not None else []),
               "-m", "cppo", "train", config_path, *overrides, *flags]
    if raw.get("num_machines", 1) == 1 and "main_process_port" not in raw:  # machines share the config's port
        command = with_own_port(command)
    print(f"cppo: launching {count} process(es) with {path}", file=sys.stderr, flush=True)
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, bufsize=1)
    forwarded = {sig: signal.signal(sig, lambda signum, frame: process.send_signal(signum))
                 for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        reported, held = relay(process.stderr, sys.stderr)
        code = process.wait()
    finally:
        for sig, handler in forwarded.items():
            signal.signal(sig, handler)
    if code != 0 and reported:
        return 2  # the processes' one line is out; the launcher's traceback about it is not the user's concern
    sys.stderr.writelines(held)
    return code


def relay(source, sink) -> tuple[bool, list[str]]:
    """Pass the launch's stderr through, line by line. Once a `cppo: error:` line has passed, the launcher's
    report of the stopped processes (its logs, then a traceback) is held back instead: returns whether an
    error line passed and what was held."""
    reported, held = False, []
    for line in source:
        if reported and (held or line.startswith("Traceback") or _LAUNCHER_LOG.match(line)):
            held.append(line)
            continue
        reported = reported or line.startswith("cppo: error:")
        sink.write(line)
        sink.flush()
    return reported, held
