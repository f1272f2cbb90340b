"""Stands in for `python -m cppo` as a sweep's launcher: `train CONFIG [--resume|--overwrite]` writes the
outputs a finished run leaves (summary.json, metrics.jsonl) from its config, at once, and logs each call in
$FAKE_CALLS. A trial whose cppo.kr_coef is 0.666 fails the way `cppo train` does on a user's mistake."""

import json
import os
import sys
import time
from pathlib import Path

import yaml

_, command, config_path, *flags = sys.argv
config = yaml.safe_load(Path(config_path).read_text())
with open(os.environ["FAKE_CALLS"], "a") as f:
    f.write(json.dumps({"config": config_path, "flags": flags, "threads": os.environ.get("OMP_NUM_THREADS"),
                        "group": config["run_group"]}) + "\n")
time.sleep(float(os.environ.get("FAKE_SLEEP", "0")))
kr = config["cppo"]["kr_coef"] if config["algo"] == "cppo" else 0.0
if kr == 0.666:
    print("cppo: error: cppo.kr_coef must be a lucky number, got 0.666", file=sys.stderr)
    sys.exit(2)
out = Path(config["output_dir"])
out.mkdir(parents=True, exist_ok=True)
reg = config["continual"]["reg_coef"] if config["continual"]["regularizer"] != "none" else 0.0
score = config["seed"] + 10 * kr + reg
(out / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward/mean": score / 2}) + "\n")
if config["continual"]["schedule"] == "joint":
    S, reward = [[0.0, 0.0], [1.0, 1.0]], {"final_average": score}
else:
    S = [[0.0, 0.0], [2.0, -1.0], [1.0 - kr, 2.0]]
    reward = {"final_average": score, "forgetting": 1.0 - kr, "bwt": kr - 1.0, "plasticity": 2.0 - kr}
(out / "eval_matrix.json").write_text(json.dumps({"scores": {"reward": S}}))
(out / "summary.json").write_text(json.dumps({"final_stats": {"reward/mean": score / 2}, "reward": reward}))
