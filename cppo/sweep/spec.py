"""A sweep file and what it expands to: its schema (`SweepConfig`), the settings of its grid or random
search, and the `Trial`s, each with its validated, resolved training config. Nothing here imports torch
or the trainer: a sweep only starts `cppo train` processes."""

from __future__ import annotations

import json
import math
import random
import re
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ..config_loading import config_differences, from_dict, load_config, read_yaml_mapping
from ..errors import UserError

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
    for variant in variant_names(sweep):
        variant_parameters(sweep, variant, path)  # every parameter's form checked before anything runs


def variant_names(sweep: SweepConfig) -> list[str | None]:
    return list(sweep.variants) or [None]


def variant_parameters(sweep: SweepConfig, variant: str | None, path: Path) -> list[Parameter]:
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
    for variant in variant_names(sweep):
        parameters = variant_parameters(sweep, variant, path)
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


def check_not_stale(out: Path, trials: list[Trial]) -> None:
    """A trial on disk that ran another config (the base or the overrides changed since) is not reused."""
    for trial in trials:
        saved = out / "trials" / f"{trial.name}.yaml"
        if saved.is_file():
            changed = config_differences(read_yaml_mapping(saved, "the trial's config"), trial.config)
            if changed:
                raise UserError(f"trial {trial.name} in {out} ran with other values of {', '.join(changed[:4])}: "
                                f"give the sweep another output_dir, or remove {out}/trials/{trial.name}* to rerun it")
