"""A sweep as wandb sweep definitions (`cppo sweep --wandb`): the same trials, driven by `wandb agent`."""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from ..config_loading import load_config, read_yaml_mapping
from ..errors import UserError
from .spec import SweepConfig, name_template, variant_names, variant_parameters


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
    for variant in variant_names(sweep):
        parameters = variant_parameters(sweep, variant, path)
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
