"""Config-driven sweeps: `cppo sweep SWEEP.yaml` expands trials and runs each as its own `cppo train` process.

A sweep file names a training config (`base`), overrides for every trial, swept `parameters` (grid or random,
with conditions), named `variants`, `seeds` and the `metric`. Every trial is validated against the training
schema before any starts. Trials run `jobs` at a time, each in its own process (under `launcher` if given), so
a trial that crashes never takes the sweep with it; this module never imports the trainer.

On disk, under the sweep's `output_dir`:
    sweep.yaml               the sweep file as last run
    trials/NAME.yaml         the trial's resolved training config     trials/NAME/   its output_dir
    trials/NAME.log          its output, every attempt                trials/NAME.json  status, error, wall time
    results.jsonl, results.md, metric.png, tradeoff.png (cppo/sweep_report.py)
Trials are run by cppo/sweep_run.py.
Running the same command again reuses finished trials, resumes stopped ones from their newest checkpoint and
retries failed ones; `--report` rebuilds the results from what is on disk.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .config_loading import config_differences, from_dict, load_config, read_yaml_mapping
from .directories import listing, writable_directory
from .errors import UserError

DISTRIBUTIONS = ("uniform", "log_uniform", "int_uniform")
_NAME = re.compile(r"^[A-Za-z0-9._+-]+$")


@dataclass
class Metric:
    name: str = "reward.final_average"
    """A key of the trial's summary.json, dotted (`reward.final_average`, `final_stats.reward/mean`), or of
    the last line of its metrics.jsonl (`reward/mean`)."""
    goal: Literal["maximize", "minimize"] = "maximize"
    """Which way is better."""


@dataclass
class Variant:
    overrides: list[str] = field(default_factory=list)
    """`key=value` overrides of this variant (e.g. `algo=cppo`, `cppo.weighting=balance`)."""
    parameters: dict[str, Any] = field(default_factory=dict)
    """Parameters swept in this variant only (same forms as the sweep's `parameters`, which it extends)."""
    confirm: bool = True
    """Run this variant's best setting on `confirm_seeds` (false: its trials are reference points only)."""


@dataclass
class SweepConfig:
    base: str = ""
    """The training config every trial starts from (a path, relative to where `cppo sweep` runs)."""
    overrides: list[str] = field(default_factory=list)
    """`key=value` overrides applied to every trial."""
    method: Literal["grid", "random"] = "grid"
    """`grid`: every combination of the parameters' values; `random`: `trials` settings drawn per variant."""
    parameters: dict[str, Any] = field(default_factory=dict)
    """Dotted config key → a list of values, or {values: [...]} / {distribution: uniform | log_uniform |
    int_uniform, min:, max:} (random only), either with `when: {other_key: value or [values]}`: swept only
    in settings where that earlier parameter has one of those values."""
    variants: dict[str, Variant] = field(default_factory=dict)
    """Named override sets (name → {overrides, parameters, confirm}, or name → [overrides]); each variant is
    swept over the parameters. Empty: one unnamed variant."""
    seeds: list[int] = field(default_factory=list)
    """Every setting runs once per seed (the training config's `seed`); empty: the base config's seed."""
    confirm_seeds: list[int] = field(default_factory=list)
    """Held-out seeds: once the sweep is done, each variant's best setting (mean metric over `seeds`) runs on
    these, and results.md reports them apart. Disjoint from `seeds`."""
    trials: int = 10
    """Settings drawn per variant (`method: random`); each runs on every seed."""
    sample_seed: int = 0
    """Seed of the random draws (`method: random`): the same seed draws the same settings."""
    metric: Metric = field(default_factory=Metric)
    """What ranks the settings."""
    jobs: int = 1
    """Trials at once; this machine's CPU threads are split between them (OMP_NUM_THREADS)."""
    launcher: str | None = None
    """Command that stands for `python -m cppo`, e.g. `accelerate launch --config_file
    configs/accelerate/multi_gpu.yaml -m cppo`. With `jobs` > 1 each trial gets its own rendezvous port."""
    devices_per_trial: int | None = None
    """GPUs per trial: the visible GPUs are split into `jobs` groups of this size (CUDA_VISIBLE_DEVICES)."""
    output_dir: str | None = None
    """Where the trials and results go; default `runs/sweeps/<sweep file name>`."""


@dataclass(frozen=True)
class Parameter:
    key: str
    values: tuple | None
    distribution: str | None = None
    low: float | None = None
    high: float | None = None
    when: tuple[tuple[str, tuple], ...] = ()

    def applies(self, chosen: dict[str, Any]) -> bool:
        return all(key in chosen and chosen[key] in allowed for key, allowed in self.when)

    def can_take(self, value: Any) -> bool:
        if self.values is not None:
            return any(json.dumps(value) == json.dumps(v) for v in self.values)
        if isinstance(value, bool) or not isinstance(value, int | float) or not self.low <= value <= self.high:
            return False
        return self.distribution == "int_uniform" and float(value).is_integer()  # a real draw never equals it

    def describe(self) -> str:
        if self.values is not None:
            return "only " + ", ".join(map(repr, self.values))
        return f"{self.distribution} values in [{self.low}, {self.high}]"

    def sample(self, rng: random.Random) -> Any:
        if self.values is not None:
            return rng.choice(self.values)
        if self.distribution == "int_uniform":
            return rng.randint(int(self.low), int(self.high))
        if self.distribution == "log_uniform":
            value = math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        else:
            value = rng.uniform(self.low, self.high)
        return float(f"{value:.4g}")  # 4 significant digits: the trial's name shows exactly what it ran


@dataclass
class Trial:
    name: str
    stage: Literal["search", "confirm"]
    variant: str | None
    params: dict[str, Any]
    seed: int
    overrides: list[str]
    """The trial's own overrides (variant, parameters, seed), after the sweep's."""
    config: dict
    """Its resolved training config."""

    @property
    def setting(self) -> tuple:
        return self.variant, json.dumps(self.params)


# ---------------------------------------------------------------------------------------------------
# The sweep file -> settings -> trials with resolved configs.


def load_sweep(path: str | Path) -> SweepConfig:
    path = Path(path)
    raw = read_yaml_mapping(path, "sweep file")
    variants = raw.get("variants")
    if isinstance(variants, list):
        raise UserError(f"{path}: variants must map names to override sets (name: [key=value, ...]), got a list")
    if isinstance(variants, dict):  # name: [overrides] is short for name: {overrides: [...]}
        raw["variants"] = {name: {"overrides": v} if isinstance(v, list | str) else v for name, v in variants.items()}
    try:
        sweep = from_dict(SweepConfig, raw)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    _validate(sweep, path)
    return sweep


def _validate(sweep: SweepConfig, path: Path) -> None:
    def check(ok: bool, name: str, value: Any, allowed: str) -> None:
        if not ok:
            raise UserError(f"{path}: {name} must be {allowed}, got {value!r}")

    check(bool(sweep.base), "base", sweep.base, "the training config every trial starts from")
    check(Path(sweep.base).is_file(), "base", sweep.base, "an existing training config file")
    check(sweep.jobs > 0, "jobs", sweep.jobs, "> 0")
    check(sweep.trials > 0, "trials", sweep.trials, "> 0")
    check(sweep.devices_per_trial is None or sweep.devices_per_trial > 0, "devices_per_trial",
          sweep.devices_per_trial, "> 0 or null")
    check(len(set(sweep.seeds)) == len(sweep.seeds), "seeds", sweep.seeds, "distinct")
    check(not set(sweep.seeds) & set(sweep.confirm_seeds), "confirm_seeds", sweep.confirm_seeds,
          "disjoint from seeds (held-out seeds)")
    check(not sweep.confirm_seeds or bool(sweep.seeds), "seeds", sweep.seeds,
          "set when confirm_seeds is (the best setting is chosen on them)")
    for name in sweep.variants:
        check(bool(_NAME.match(name)), "variants", name, "names of letters, digits and . _ + - (they name directories)")
    for where, overrides in [("overrides", sweep.overrides),
                             *[(f"variants.{n}.overrides", v.overrides) for n, v in sweep.variants.items()]]:
        for item in overrides:
            key = item.partition("=")[0]
            check("=" in item and bool(key), where, item, "key=value overrides")
            check(key not in ("output_dir", "seed"), where, item,
                  "free of output_dir and seed (the sweep sets them: `output_dir` and `seeds` in the sweep file)")
    if sweep.launcher is not None:
        try:
            words = shlex.split(sweep.launcher)
        except ValueError as e:
            raise UserError(f"{path}: launcher must be a command line, got {sweep.launcher!r} ({e})") from None
        check(bool(words), "launcher", sweep.launcher, "a command that stands for `python -m cppo`, or null")
        check(shutil.which(words[0]) is not None, "launcher", sweep.launcher,
              f"a command whose program exists ({words[0]!r} is not an executable file or on PATH)")
    for variant in _variants(sweep):
        _parameters(sweep, variant, path)  # every parameter's form checked before anything runs


def _variants(sweep: SweepConfig) -> list[str | None]:
    return list(sweep.variants) or [None]


def _parameters(sweep: SweepConfig, variant: str | None, path: Path) -> list[Parameter]:
    """The parameters swept in `variant`: the sweep's, then the variant's own (which replace same-named ones)."""
    raw = {**sweep.parameters, **(sweep.variants[variant].parameters if variant else {})}
    where = f"variants.{variant}.parameters" if variant else "parameters"
    parsed: list[Parameter] = []
    for key, spec in raw.items():
        name = f"{path}: {where}['{key}']"
        if key in ("seed", "output_dir"):
            raise UserError(f"{name}: {key} is set by the sweep (`seeds` / `output_dir`), not swept as a parameter")
        if isinstance(spec, list):
            spec = {"values": spec}
        if not isinstance(spec, dict):
            raise UserError(f"{name} must be a list of values or a mapping with `values` or `distribution`, "
                            f"got {spec!r}")
        unknown = sorted(set(spec) - {"values", "distribution", "min", "max", "when"})
        if unknown:
            raise UserError(f"{name}: unknown key '{unknown[0]}' (known: values, distribution, min, max, when)")
        when = spec.get("when") or {}
        if not isinstance(when, dict):
            raise UserError(f"{name}: when must map an earlier parameter to its value(s), got {when!r}")
        earlier = [p.key for p in parsed]
        for other in when:
            if other not in earlier:
                raise UserError(f"{name}: when names '{other}', which is not a parameter listed before it "
                                f"(earlier: {', '.join(earlier) or 'none'})")
        conditions = tuple((k, tuple(v) if isinstance(v, list) else (v,)) for k, v in when.items())
        for other, wanted in conditions:
            taken = next(p for p in parsed if p.key == other)
            never = [v for v in wanted if not taken.can_take(v)]
            if never:
                raise UserError(f"{name}: when {{{other}: {never[0]!r}}} never holds: {other} takes "
                                f"{taken.describe()}, so this parameter would never be swept")
        if ("values" in spec) == ("distribution" in spec):
            raise UserError(f"{name}: give either values: [...] or distribution: {' | '.join(DISTRIBUTIONS)}")
        if "values" in spec:
            values = spec["values"]
            if not isinstance(values, list) or not values:
                raise UserError(f"{name}: values must be a non-empty list, got {values!r}")
            if len({json.dumps(v) for v in values}) != len(values):
                raise UserError(f"{name}: values must be distinct, got {values!r}")
            parsed.append(Parameter(key, tuple(values), when=conditions))
            continue
        kind, low, high = spec["distribution"], spec.get("min"), spec.get("max")
        if sweep.method == "grid":
            raise UserError(f"{name}: a distribution needs method: random (a grid takes a list of values)")
        if kind not in DISTRIBUTIONS:
            raise UserError(f"{name}: distribution must be one of {', '.join(DISTRIBUTIONS)}, got {kind!r}")
        numbers = all(isinstance(x, int | float) and not isinstance(x, bool) for x in (low, high))
        if not numbers or not low < high:
            raise UserError(f"{name}: needs numbers min < max, got min={low!r}, max={high!r}")
        if kind == "log_uniform" and low <= 0:
            raise UserError(f"{name}: log_uniform needs min > 0, got {low!r}")
        if kind == "int_uniform" and not (isinstance(low, int) and isinstance(high, int)):
            raise UserError(f"{name}: int_uniform needs integer min and max, got {low!r}, {high!r}")
        parsed.append(Parameter(key, None, kind, low, high, conditions))
    return parsed


def settings(sweep: SweepConfig, path: Path) -> list[tuple[str | None, dict[str, Any]]]:
    """(variant, {key: value}) of every setting, in a stable order: variants as listed, then the grid's
    combinations in parameter order (or the random draws, seeded by `sample_seed` and the variant's name)."""
    found = []
    for variant in _variants(sweep):
        parameters = _parameters(sweep, variant, path)
        if sweep.method == "grid":
            chosen: list[dict] = [{}]
            for p in parameters:  # a parameter whose condition fails leaves that combination as it is
                chosen = [grown for c in chosen
                          for grown in ([{**c, p.key: v} for v in p.values] if p.applies(c) else [c])]
        else:
            rng = random.Random(f"{sweep.sample_seed}:{variant}")  # a variant's draws ignore the others
            chosen = []
            for _ in range(sweep.trials):
                draw: dict[str, Any] = {}
                for p in parameters:
                    if p.applies(draw):
                        draw[p.key] = p.sample(rng)
                if draw not in chosen:  # drawn twice: one setting
                    chosen.append(draw)
        found += [(variant, c) for c in chosen]
    return found


def override(key: str, value: Any) -> str:
    """`key=value` whose value the config loader (YAML) reads back as `value`."""
    text = value if isinstance(value, str) else json.dumps(value)
    if isinstance(value, str) and yaml.safe_load(value) != value:
        text = json.dumps(value)
    return f"{key}={text}"


def name_template(variant: str | None, keys: list[str]) -> str:
    """The trial's directory name as `output_dir` placeholders, filled by the config loader:
    `cppo_balance-kr_coef={cppo.kr_coef}-seed{seed}` (a key's last part, or all of it where two would clash)."""
    leaves = [k.split(".")[-1] for k in keys]
    parts = [variant] if variant else []
    parts += [f"{leaf if leaves.count(leaf) == 1 else key}={{{key}}}" for key, leaf in zip(keys, leaves, strict=True)]
    return "-".join([*parts, "seed{seed}"])


def sweep_dir(sweep: SweepConfig, path: Path) -> Path:
    return Path(sweep.output_dir) if sweep.output_dir else Path("runs/sweeps") / path.stem


def num_processes(launcher: str | None) -> int:
    words = shlex.split(launcher or "")
    for i, word in enumerate(words):
        for flag in ("--num_processes", "--nproc_per_node", "--nproc-per-node"):
            if word == flag and i + 1 < len(words) and words[i + 1].isdigit():
                return int(words[i + 1])
            if word.startswith(flag + "=") and word.split("=", 1)[1].isdigit():
                return int(word.split("=", 1)[1])
    return 1


def resolve(sweep: SweepConfig, path: Path, chosen: list[tuple[str | None, dict]], seeds: list[int],
            stage: Literal["search", "confirm"]) -> list[Trial]:
    """Each setting on each seed as a Trial with its validated, resolved training config. A config error
    stops here, naming the setting, before any trial runs."""
    out = sweep_dir(sweep, path)
    group = [] if read_yaml_mapping(sweep.base, f"{path}: base").get("run_group") else [
        f"run_group={path.stem}"]  # the sweep's trials share one tracker group
    trials, names = [], {}
    for variant, params in chosen:
        own = [*(sweep.variants[variant].overrides if variant else []),
               *(override(k, v) for k, v in params.items())]
        for seed in seeds or [None]:
            mine = [*own, f"seed={seed}"] if seed is not None else own
            where = f"output_dir={out / 'trials' / name_template(variant, list(params))}"
            try:
                config = load_config(sweep.base, [*group, *sweep.overrides, *mine, where],
                                     num_processes=num_processes(sweep.launcher))
            except UserError as e:
                what = " ".join([f"variant {variant}"] * bool(variant) + [*map(str, own)]) or "the base config"
                raise UserError(f"{path}: {what}: {e}") from None
            name = Path(config.output_dir).name
            if name in names:
                raise UserError(f"{path}: two trials would share the directory trials/{name} "
                                f"({names[name]} and {mine}); make the values differ in their names")
            names[name] = mine
            trials.append(Trial(name, stage, variant, dict(params), config.seed, mine, config.to_dict()))
    return trials


def _check_not_stale(out: Path, trials: list[Trial]) -> None:
    """A trial on disk that ran another config (the base or the overrides changed since) is not reused."""
    for trial in trials:
        saved = out / "trials" / f"{trial.name}.yaml"
        if saved.is_file():
            changed = config_differences(read_yaml_mapping(saved, "the trial's config"), trial.config)
            if changed:
                raise UserError(f"trial {trial.name} in {out} ran with other values of {', '.join(changed[:4])}: "
                                f"give the sweep another output_dir, or remove {out}/trials/{trial.name}* to rerun it")


# ---------------------------------------------------------------------------------------------------
# The sweep's directory: its own, and nothing in it written before everything has been checked.

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


# ---------------------------------------------------------------------------------------------------
# The command.


def run_sweep(path: str | Path, jobs: int | None = None, report_only: bool = False, dry_run: bool = False,
              wandb: bool = False, create: bool = False, new_sweep: bool = False) -> int:
    from . import sweep_report
    from .sweep_run import Runner, hold_lock

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
    _check_not_stale(out, search)
    sweep_report.check_metric(sweep, sweep_report.collect(sweep, out, search))
    if report_only:
        print(sweep_report.write(sweep, path, out, search, confirm_trials(sweep, path, out, search)),
              file=sys.stderr)
        return 0
    runner = Runner(sweep, out, sweep.jobs)  # checks the devices before anything is written
    refused: list[UserError] = []

    def settled(trials: list[Trial]) -> None:
        """After each trial: the results so far; a metric the first finished trial lacks stops the sweep."""
        try:
            sweep_report.check_metric(sweep, sweep_report.write_jsonl(sweep, out, trials))
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
        _check_not_stale(out, confirm)
        if confirm:
            runner.run(confirm, lambda: settled(search + confirm))
        if refused:  # the running trials have saved a checkpoint and stopped
            raise refused[0]
        summary = sweep_report.write(sweep, path, out, search, confirm)
    print(summary, file=sys.stderr)
    if runner.stopped_by is not None:  # the results above are partial: say so, and to a script by the exit code
        print("sweep: stopped before every trial finished; run the same command again to finish", file=sys.stderr)
        return 128 + runner.stopped_by
    return 0


def confirm_trials(sweep: SweepConfig, path: Path, out: Path, search: list[Trial]) -> list[Trial]:
    """Each confirmed variant's best setting (every seed finished; mean metric) on the held-out seeds."""
    from .sweep_report import best_settings, collect

    if not sweep.confirm_seeds:
        return []
    rows = collect(sweep, out, search)
    confirmed = {v for v in _variants(sweep) if v is None or sweep.variants[v].confirm}
    best = best_settings(sweep, [r for r in rows if r["variant"] in confirmed])
    return resolve(sweep, path, [(variant, params) for variant, params in best.values()], sweep.confirm_seeds,
                   "confirm")


# ---------------------------------------------------------------------------------------------------
# wandb: the same trials driven by `wandb agent`.


def wandb_metric(name: str) -> str:
    """The key a trial logs `name` under in wandb: the last step's stats as themselves (`reward/mean`),
    the rest of summary.json as `summary/reward/final_average` (cppo.tracking.Tracker.log_summary)."""
    if name.startswith("final_stats."):
        return name.removeprefix("final_stats.")
    return "summary/" + name.replace(".", "/") if "." in name else name


def wandb_definitions(sweep: SweepConfig, path: Path, out: Path) -> dict[str, dict]:
    """One wandb sweep definition per variant: the variant's overrides go into the command, its parameters
    and the seeds into `parameters`; each run's output_dir is the native trial's."""
    found = {}
    for variant in _variants(sweep):
        parameters = _parameters(sweep, variant, path)
        conditional = [p.key for p in parameters if p.when]
        if conditional:
            raise UserError(f"--wandb: parameter '{conditional[0]}' has a condition (when), which a wandb sweep "
                            "cannot express; use variants instead")
        spec = {}
        for p in parameters:
            if p.values is not None:
                spec[p.key] = {"values": list(p.values)}
            else:
                kind = {"log_uniform": "log_uniform_values"}.get(p.distribution, p.distribution)
                spec[p.key] = {"distribution": kind, "min": p.low, "max": p.high}
        if sweep.seeds:
            spec["seed"] = {"values": list(sweep.seeds)}
        where = f"output_dir={out / 'trials' / name_template(variant, [p.key for p in parameters])}"
        base = read_yaml_mapping(sweep.base, f"{path}: base")
        group = [] if base.get("run_group") else [f"run_group={path.stem}"]
        command = ["cppo", "train", sweep.base, *group, *sweep.overrides,
                   *(sweep.variants[variant].overrides if variant else []), where, "report_to=[wandb]",
                   "${args_no_hyphens}"]
        name = f"{path.stem}-{variant}" if variant else path.stem
        found[variant or path.stem] = {
            "name": name, "method": sweep.method, "command": command, "parameters": spec,
            "metric": {"name": wandb_metric(sweep.metric.name), "goal": sweep.metric.goal}}
    return found


def write_wandb(sweep: SweepConfig, path: Path, out: Path, create: bool) -> int:
    definitions = wandb_definitions(sweep, path, out)
    (out / "wandb").mkdir(parents=True, exist_ok=True)
    project = load_config(sweep.base, list(sweep.overrides)).project
    for name, definition in definitions.items():
        target = out / "wandb" / f"{name}.yaml"
        target.write_text(yaml.safe_dump(definition, sort_keys=False))
        if create:
            import wandb

            sweep_id = wandb.sweep(sweep=definition, project=project)
            print(f"created wandb sweep {definition['name']}: wandb agent {project}/{sweep_id}")
        else:
            print(f"wrote {target}: create it with `wandb sweep --project {project} {target}`")
    if sweep.confirm_seeds:
        print("note: wandb sweeps have no held-out stage; run `cppo sweep` for confirm_seeds", file=sys.stderr)
    return 0

