"""The documentation against the code: the generated references are complete and in sync, every citation of
the algorithm has its section, the README's quickstart and the Python API example run as written."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CONTINUAL, CPPO_TINY, PYTHON, ROOT, TINY, quick_overrides, subprocess_env, tiny_continual

DOCS = ROOT / "docs"


def test_the_reference_pages_are_generated_from_the_current_code(tmp_path):
    result = subprocess.run([PYTHON, "scripts/docs_reference.py", "--check"], cwd=ROOT, capture_output=True,
                            text=True, env=subprocess_env())
    assert result.returncode == 0, result.stderr
    # and the check sees a page that has fallen behind
    stale = tmp_path / "ref"
    subprocess.run([PYTHON, "scripts/docs_reference.py", "--out", str(stale)], cwd=ROOT, check=True,
                   env=subprocess_env())
    (stale / "config.md").write_text((stale / "config.md").read_text().replace("`learning_rate`", "`lr`"))
    result = subprocess.run([PYTHON, "scripts/docs_reference.py", "--check", "--out", str(stale)], cwd=ROOT,
                            capture_output=True, text=True, env=subprocess_env())
    assert result.returncode == 1 and "config.md" in result.stderr


def test_every_config_and_sweep_field_is_in_the_reference():
    from cppo.config_loading import field_names
    from cppo.sweep.spec import SweepConfig

    page = (DOCS / "reference" / "config.md").read_text()
    rows = set(re.findall(r"^\| `([^`]+)` \|", page, flags=re.M))
    sections = set(re.findall(r"^## `([^`]+)`", page, flags=re.M)) | {""}
    for name in field_names():
        section, _, leaf = name.replace(".0.", "[i].").rpartition(".")
        shown = {"tasks[i].eval_prompts": "tasks[i].prompts", "eval_reward": "tasks[i].reward"}.get(section, section)
        assert leaf in rows and shown in sections, name
    sweep = (DOCS / "reference" / "sweep.md").read_text()
    for name in field_names(SweepConfig):
        assert f"`{name.rpartition('.')[2]}`" in sweep, name


def test_every_command_line_flag_is_in_the_reference():
    from cppo.cli import build_parser

    page = (DOCS / "reference" / "cli.md").read_text()
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    assert "--version" in page
    for name, sub in subparsers.choices.items():
        assert f"## `cppo {name}`" in page
        for action in sub._actions:
            for flag in action.option_strings:
                assert flag in page, (name, flag)


def test_every_metric_a_run_logs_is_documented(tmp_path, monkeypatch):
    """A CPPO stream with the rollout memory and a baseline's penalty, and a critic-free GRPO run with its KL
    as a loss, each a step a task: every key of metrics.jsonl and every key sent to the trackers."""
    from accelerate import Accelerator

    from cppo.cli import main
    from cppo.metric_docs import METRICS, documented

    sent = []
    monkeypatch.setattr(Accelerator, "log", lambda self, values, step=None, log_kwargs=None: sent.append(values))
    runs = {
        "memory": [CONTINUAL, *tiny_continual(tmp_path / "memory", steps=1), "algo=cppo", "cppo.kr_source=both",
                   "memory.build_prompts=4", "report_to=[tensorboard]"],
        "lwf": [CONTINUAL, *tiny_continual(tmp_path / "lwf", steps=1), "continual.regularizer=lwf"],
        "grpo": [CPPO_TINY, *quick_overrides(tmp_path / "grpo", steps=1), "ppo.advantage=grpo", "ppo.kl_in=loss",
                 "generation.num_generations=2", "report_to=[tensorboard]"],
    }
    logged = set()
    for args in runs.values():
        assert main(["train", *args]) == 0
        out = Path(next(a.split("=", 1)[1] for a in args if a.startswith("output_dir=")))
        logged |= {key for line in (out / "metrics.jsonl").read_text().splitlines() for key in json.loads(line)}
    assert {"loss/memory", "loss/reg", "loss/kl", "cppo/frac_r1", "memory/retrieved/vowels"} <= logged
    missing = sorted(key for key in logged if not documented(key))
    assert not missing, missing
    tracked = {key for values in sent for key in values}
    kinds = {key: next(m.where for m in METRICS if documented(key, m.where)) for key in tracked
             if any(documented(key, m.where) for m in METRICS)}
    assert sorted(tracked - set(kinds)) == []
    assert {"extra", "eval", "summary"} <= set(kinds.values())


def test_every_citation_of_the_algorithm_has_its_section():
    page = (DOCS / "algorithm.md").read_text()
    sections = {int(n) for n in re.findall(r"^## (\d+)\. .* \{#section-\1\}$", page, flags=re.M)}
    assert sections == set(range(1, 11))
    files = [p for pattern in ("cppo/**/*.py", "tests/**/*.py", "scripts/**/*.py", "configs/**/*.yaml",
                               "docs/**/*.md", "README.md") for p in ROOT.glob(pattern)]
    cited, outside = 0, "SP" + "EC"  # the name of a document the repository does not hold
    for path in files:
        text = path.read_text()
        assert not re.search(rf"\b{outside}\b", text), f"{path.relative_to(ROOT)} cites {outside}, not held here"
        for first, last in re.findall(r"algorithm\.md §(\d+)(?:[–-]§(\d+))?", text):
            cited += 1
            assert {int(first), int(last or first)} <= sections, f"{path.relative_to(ROOT)}: §{first}"
        for number in re.findall(r"algorithm\.md#section-(\d+)", text):
            cited += 1
            assert int(number) in sections, f"{path.relative_to(ROOT)}: #section-{number}"
    assert cited > 50


def test_the_site_builds_strict_and_offline(tmp_path):
    result = subprocess.run([str(Path(sys.executable).parent / "mkdocs"), "build", "--strict", "-d", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, env=subprocess_env(NO_MKDOCS_2_WARNING="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    home = (tmp_path / "index.html").read_text()
    assert "fonts.googleapis" not in home and "Continual Proximal Policy Optimization" in home
    assert (tmp_path / "reference" / "config" / "index.html").is_file()


def test_the_python_api_example_runs(tmp_path, monkeypatch, capsys):
    page = (DOCS / "guides" / "python-api.md").read_text()
    example = re.search(r"```python\n(.*?)```", page, flags=re.S)[1]
    monkeypatch.chdir(tmp_path)
    exec(compile(example, "python-api.md", "exec"), {})
    final_average, reward = map(float, capsys.readouterr().out.strip().splitlines()[-1].split())
    assert (tmp_path / "runs" / "api_example" / "summary.json").is_file() and reward == reward
    summary = json.loads((tmp_path / "runs" / "api_example" / "summary.json").read_text())
    assert summary["reward"]["final_average"] == pytest.approx(final_average)


def readme_quickstart() -> str:
    text = (ROOT / "README.md").read_text()
    block = text.split("[start:quickstart] -->\n", 1)[1].split("<!-- --8<-- [end:quickstart]", 1)[0]
    return re.search(r"```bash\n(.*?)```", block, flags=re.S)[1]


def test_the_readme_is_a_page_with_the_two_commands_first():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 150
    assert lines[0] == "```bash" and lines[1].startswith("bash scripts/demo.sh") and \
        lines[2].startswith("bash scripts/test.sh") and lines[3] == "```"
    assert len(readme_quickstart().splitlines()) <= 30


@pytest.mark.slow
def test_the_readme_quickstart_trains_as_written(tmp_path):
    """The README's commands in a new directory, SmolLM2-135M-Instruct standing in for the reader's model; only
    the set-up line is this checkout's (its .venv is already set up)."""
    script = readme_quickstart()
    first, rest = script.split("\n", 1)
    assert first == "bash scripts/setup.sh && . .venv/bin/activate"
    env = subprocess_env(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", rest], cwd=tmp_path, capture_output=True, text=True,
                            env=env, timeout=1500)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "runs" / "my_run"
    for name in ("task_1_polite/policy/config.json", "task_2_brief/policy/config.json", "policy", "metrics.jsonl",
                 "eval_matrix.json", "summary.json"):
        assert (out / name).exists(), name
    matrix = json.loads((out / "eval_matrix.json").read_text())
    assert matrix["tasks"] == ["polite", "brief"] and len(matrix["scores"]["reward"]) == 3
    summary = json.loads((out / "summary.json").read_text())
    assert {"final_average", "forgetting", "bwt", "fwt", "plasticity"} <= set(summary["reward"])
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 6


def test_unknown_keys_are_answered_with_the_nearest_field():
    from cppo.config_loading import load_config, nearest_key
    from cppo.errors import UserError

    assert nearest_key("ppo.learning_rat") == "ppo.learning_rate"
    assert nearest_key("learning_rate") == "ppo.learning_rate"  # the right name in the wrong section
    assert nearest_key("tasks.1.stepz") == "tasks.1.steps"
    assert nearest_key("cppo.kr_cof") == "cppo.kr_coef"
    assert nearest_key("nonsense") is None
    with pytest.raises(UserError, match=r"^unknown config key 'ppo.learning_rat'; did you mean ppo.learning_rate\?"):
        load_config(TINY, ["ppo.learning_rat=1e-4"])


def test_version_config_and_long_overrides_on_the_command_line(tmp_path, capsys):
    from cppo import __version__
    from cppo.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"cppo {__version__}"
    assert main(["config", TINY, "--ppo.steps=7", "generation.temperature=0.5"]) == 0
    printed = capsys.readouterr().out
    from cppo.config_loading import load_config

    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(printed)
    config = load_config(resolved)
    assert config.ppo.steps == 7 and config.generation.temperature == 0.5 and "vllm:" in printed
    assert config.to_dict() == load_config(TINY, ["ppo.steps=7", "generation.temperature=0.5"]).to_dict()
    assert main(["config", "--doc"]) == 0
    documented = capsys.readouterr().out
    assert "ppo.learning_rate: float = 1e-05" in documented and "tasks[i].prompts.max_prompt_length" in documented
    with pytest.raises(SystemExit) as exit_:
        main(["train", TINY, "--ppo.steps", "3"])
    assert exit_.value.code == 2 and "ppo.steps=VALUE" in capsys.readouterr().err
