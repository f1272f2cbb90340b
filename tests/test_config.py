"""Config loading: YAML + dotted overrides into typed dataclasses, one-line errors for bad values."""

import pytest

from cppo.config import Config
from cppo.config_loading import load_config
from cppo.errors import UserError


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_yaml_and_overrides_are_typed(tmp_path):
    path = write(tmp_path, "ppo:\n  learning_rate: 1e-5\n  steps: 3\ntasks:\n  - name: a\n    reward:\n"
                           "      function: m:f\n      clip: 2\n")
    config = load_config(path, ["ppo.steps=7", "generation.top_p=0.9", "report_to=[wandb]", "tasks.0.reward.clip=null"])
    assert isinstance(config, Config)
    assert config.ppo.learning_rate == 1e-5  # YAML 1.1 reads 1e-5 as a string: converted
    assert config.ppo.steps == 7 and config.generation.top_p == 0.9
    assert config.report_to == ["wandb"] and config.tasks[0].reward.clip is None


@pytest.mark.parametrize("overrides, message", [
    (["ppo.stepz=3"], "unknown config key 'ppo.stepz'"),
    (["nonsense=1"], "unknown config key 'nonsense'"),
    (["ppo.steps=many"], "ppo.steps must be an integer, got 'many'"),
    (["ppo.steps=2.5"], "ppo.steps must be an integer, got 2.5"),
    (["ppo.clip=-1"], "ppo.clip must be > 0, got -1.0"),
    (["ppo.clip=abc"], "ppo.clip must be a number, got 'abc'"),
    (["ppo.kl_estimator=k2"], "ppo.kl_estimator must be one of k1, k3, got 'k2'"),
    (["ppo.whiten_advantages=maybe"], "ppo.whiten_advantages must be true or false, got 'maybe'"),
    (["generation.top_p=1.5"], "generation.top_p must be in (0, 1], got 1.5"),
    (["ppo.rollout_batch_size=10", "ppo.mini_batch_size=4"], "ppo.rollout_batch_size must be a multiple"),
    (["report_to=[mlflow]"], "report_to must be wandb or tensorboard, got 'mlflow'"),
    (["tasks.0.reward.function=null"], "tasks[0].reward: set exactly one of tasks[0].reward.model"),
    (["tasks.0.reward.model=x"], "tasks[0].reward: set exactly one of"),
    (["tasks.0.reward.function=nocolon"], "tasks[0].reward.function must be of the form module:function"),
    (["tasks.1.steps=3"], "override tasks.1.steps: tasks.1 is not an existing list item"),
    (["tasks.0.steps=0"], "tasks[0].steps must be > 0 or null, got 0"),
    (["tasks.0.episodes=0"], "tasks[0].episodes must be > 0 or null, got 0"),
    (["tasks.0.name=a b"], "tasks[0].name must be a non-empty name"),
    (["tasks=[]"], "tasks must be a non-empty list"),
    (["continual.regularizer=ewc", "model.lora_r=8"], "continual.regularizer must be none or lwf with LoRA"),
    (["continual.schedule=joint", "continual.regularizer=l2"], "continual.regularizer must be none with schedule"),
    (["ppo=3"], "ppo must be a mapping"),
    (["algo=trpo"], "algo must be one of ppo, cppo, got 'trpo'"),
    (["cppo.k=0"], "cppo.k must be > 0, got 0.0"),
    (["cppo.lb=0"], "cppo.lb must be in (0, 1], got 0.0"),
    (["cppo.lb=1.5"], "cppo.lb must be in (0, 1], got 1.5"),
    (["cppo.ub=0.5"], "cppo.ub must be >= 1, got 0.5"),
    (["cppo.weighting=linear"], "cppo.weighting must be one of heuristic, balance, learned"),
    (["cppo.kr_anchor=initial"], "cppo.kr_anchor must be one of previous_task, rollout"),
    (["cppo.ablation=alpha_two"], "cppo.ablation must be one of none, alpha_one, beta_one, beta_zero"),
    (["cppo.ablation=beta_one+beta_zero"], "cppo.ablation must be one of"),
    (["cppo.coef_steps=0"], "cppo.coef_steps must be > 0, got 0"),
    (["ppo"], "override 'ppo' must look like key=value"),
])
def test_bad_values_give_one_line_errors(tmp_path, overrides, message):
    path = write(tmp_path, "tasks:\n  - name: a\n    reward:\n      function: m:f\n")
    with pytest.raises(UserError) as error:
        load_config(path, overrides)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_batch_sizes_are_checked_against_the_process_count(tmp_path):
    path = write(tmp_path, "ppo:\n  rollout_batch_size: 8\n  mini_batch_size: 2\n")
    load_config(path, [], num_processes=2)
    with pytest.raises(UserError, match=r"ppo.mini_batch_size must be a multiple of processes"):
        load_config(path, [], num_processes=4)


def test_missing_or_malformed_config_file(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(UserError, match="must hold a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(write(tmp_path, "a: [\n"))


def test_every_field_is_documented():
    import ast
    import inspect

    from cppo import config as module

    tree = ast.parse(inspect.getsource(module))
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name.endswith("Config"):
            body = node.body
            for i, stmt in enumerate(body):
                if isinstance(stmt, ast.AnnAssign):
                    doc = body[i + 1] if i + 1 < len(body) else None
                    assert isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant), (
                        f"{node.name}.{stmt.target.id} has no docstring")


def test_a_bare_no_in_yaml_is_the_string_no(tmp_path):
    """YAML 1.1 reads `mixed_precision: no` as false; it means the choice `no`."""
    path = tmp_path / "c.yaml"
    path.write_text("mixed_precision: no\n")
    assert load_config(path, []).mixed_precision == "no"
    assert load_config(path, ["mixed_precision=no"]).mixed_precision == "no"
    assert load_config(tmp_path / "c.yaml", ["mixed_precision=bf16"]).mixed_precision == "bf16"
    path.write_text("{}\n")
    assert load_config(path, []).mixed_precision is None  # follows the accelerate config


def test_a_field_added_since_a_config_was_saved_differs_only_when_set_away_from_its_default():
    """A checkpoint or a sweep trial written before a field existed ran as that field's default does: resuming
    it, or reusing the trial, is refused only when the field is now set to something else."""
    import copy

    from cppo.config_loading import config_differences

    tiny = "configs/continual_tiny.yaml"
    current = load_config(tiny).to_dict()
    saved = copy.deepcopy(current)
    del saved["ppo"]["whiten_advantages"]  # fields, a task's field and a whole section the writer did not have
    del saved["tasks"][1]["reward"]["missing_eos_penalty"]
    del saved["memory"]
    assert config_differences(saved, current) == []
    changed = load_config(tiny, ["ppo.whiten_advantages=false", "memory.capacity=5"]).to_dict()
    assert config_differences(saved, changed) == ["memory.capacity", "ppo.whiten_advantages"]
    saved["ppo"]["retired_knob"] = 1  # a field cppo no longer has still counts
    assert "ppo.retired_knob" in config_differences(saved, current)
