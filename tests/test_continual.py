"""Task streams, the continual runner, the evaluation matrix and its metrics, the baselines."""

import json
import math
import re
import textwrap

import pytest
import torch
from conftest import CONTINUAL, error_lines, read_metrics, run_cppo, run_in_process
from conftest import tiny_continual as quick

from cppo.cli import main
from cppo.continual import metrics
from cppo.errors import UserError

# ------------------------------------------------------------------------------------------ metrics

def test_metrics_by_hand():
    # rows: initial, after task 1, after task 2, after task 3; columns: tasks 1..3
    S = [[0.1, 0.2, 0.0],
         [0.8, 0.1, 0.1],
         [0.6, 0.9, 0.3],
         [0.3, 0.5, 0.7]]
    assert metrics.final_average(S) == pytest.approx((0.3 + 0.5 + 0.7) / 3)
    # task 1: max(0.8, 0.6) − 0.3 = 0.5; task 2: max(0.9) − 0.5 = 0.4
    assert metrics.forgetting(S) == pytest.approx((0.5 + 0.4) / 2)
    # task 1: 0.3 − 0.8; task 2: 0.5 − 0.9
    assert metrics.backward_transfer(S) == pytest.approx((-0.5 - 0.4) / 2)
    # task 2: S[1][2] − S[0][2] = 0.1 − 0.2; task 3: S[2][3] − S[0][3] = 0.3 − 0.0
    assert metrics.forward_transfer(S) == pytest.approx((-0.1 + 0.3) / 2)
    # 0.8 − 0.1, 0.9 − 0.1, 0.7 − 0.3
    assert metrics.plasticity(S) == pytest.approx((0.7 + 0.8 + 0.4) / 3)
    single = [[0.2], [0.6]]
    assert metrics.summarize(single) == {"final_average": 0.6, "forgetting": None, "bwt": None, "fwt": None,
                                         "plasticity": pytest.approx(0.4)}
    joint = [[0.1, 0.2], [0.5, 0.7]]
    assert metrics.summarize(joint)["forgetting"] is None and metrics.summarize(joint)["final_average"] == 0.6


# ------------------------------------------------------------------------------------ the runner

def recompute(S):
    T = len(S[0])
    return {
        "final_average": sum(S[T]) / T,
        "forgetting": sum(max(S[i][j] for i in range(j + 1, T)) - S[T][j] for j in range(T - 1)) / (T - 1),
        "bwt": sum(S[T][j] - S[j + 1][j] for j in range(T - 1)) / (T - 1),
        "fwt": sum(S[j][j] - S[0][j] for j in range(1, T)) / (T - 1),
        "plasticity": sum(S[j + 1][j] - S[j][j] for j in range(T)) / T,
    }


@pytest.mark.slow
def test_continual_tiny_end_to_end(tmp_path):
    out = tmp_path / "run"
    result = run_cppo("train", CONTINUAL, f"output_dir={out}")
    matrix = json.loads((out / "eval_matrix.json").read_text())
    assert matrix["tasks"] == ["vowels", "digits"]
    assert matrix["rows"] == ["initial", "after vowels", "after digits"]
    S = matrix["scores"]["reward"]
    assert len(S) == 3 and all(len(row) == 2 for row in S)
    summary = json.loads((out / "summary.json").read_text())["reward"]
    for key, value in recompute(S).items():
        assert summary[key] == pytest.approx(value, abs=1e-9), key
    # each task was learnt when trained on, and the conflicting second task erased the first
    assert S[1][0] > S[0][0] + 0.3 and S[2][1] > S[1][1] + 0.3
    assert summary["forgetting"] > 0.3
    assert "evaluation matrix S" in result.stdout and "forgetting" in result.stdout
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 61))
    assert [r["task"] for r in rows] == ["vowels"] * 30 + ["digits"] * 30
    for name in ("task_1_vowels", "task_2_digits"):
        assert (out / name / "policy" / "config.json").is_file()
        assert (out / name / "value_model" / "config.json").is_file()
    assert (out / "policy").resolve() == (out / "task_2_digits" / "policy").resolve()


RLOO = {"ppo.advantage": "rloo", "generation.num_generations": 2, "ppo.kl_in": "reward"}


@pytest.mark.parametrize("extra", [
    {"algo": "ppo"},
    {"algo": "ppo", "continual.regularizer": "l2"},
    {"algo": "ppo", "continual.regularizer": "ewc", "continual.importance_samples": 4},
    {"algo": "ppo", "continual.regularizer": "ewc", "continual.importance_samples": 4, **RLOO},
    {"algo": "cppo", "continual.regularizer": "mas", "continual.importance_samples": 4},
    {"algo": "ppo", "continual.regularizer": "mas", "continual.importance_samples": 4, **RLOO},
    {"algo": "cppo", "continual.regularizer": "lwf"},
    {"algo": "ppo", "continual.regularizer": "lwf", **RLOO},
    {"algo": "cppo", "cppo.kl_reference": "initial", "cppo.weighting": "learned"},
    {"algo": "cppo", "cppo.weighting": "learned", "cppo.kr_anchor": "rollout", **RLOO},
    {"algo": "cppo", "cppo.ablation": "alpha_one", "cppo.kr_source": "memory", "memory.build_prompts": 4,
     "memory.build_samples": 2, "memory.retrieve": "similar", **RLOO},
    {"algo": "cppo", "continual.schedule": "joint"},
    {"algo": "ppo", "continual.schedule": "joint", **RLOO},
], ids=["ppo", "l2", "ewc", "ewc-rloo", "mas-cppo", "mas-rloo", "lwf-cppo", "lwf-rloo", "cppo-initial-reference",
        "cppo-learned-rloo", "memory-rloo", "joint", "joint-rloo"])
def test_every_baseline_runs_the_stream(tmp_path, capsys, extra):
    """Each continual method over the two-task stream, with GAE and without a critic (RLOO): the evaluation
    matrix has a row per task (one for the joint run), every logged loss is finite, a regularizer logs its term
    and pulls once task 2 has an anchor, a critic-free run never builds a value model."""
    out = tmp_path / "out"
    code, err = run_in_process(["train", CONTINUAL, *quick(out, **extra)], capsys)
    assert code == 0, err
    matrix = json.loads((out / "eval_matrix.json").read_text())
    joint = extra.get("continual.schedule") == "joint"
    assert len(matrix["rows"]) == (2 if joint else 3)
    rows = read_metrics(out)
    assert len(rows) == 4 and all(math.isfinite(r["loss/total"]) for r in rows)
    critic_free = "ppo.advantage" in extra
    assert all(("loss/value" in r) != critic_free for r in rows)
    assert bool(list(out.rglob("value_model"))) != critic_free
    regularizer = extra.get("continual.regularizer")
    if regularizer is not None:
        assert all("loss/reg" in r for r in rows)
        assert rows[-1]["loss/reg"] > 0  # task 2 moved the policy away from θ_{t−1}, where the penalty is 0
    if extra.get("cppo.kr_source") == "memory":
        assert rows[-1]["loss/memory"] > 0


def test_reward_model_evaluation_and_rouge_with_references(tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from cppo.models import resolve_model_source

    tiny = resolve_model_source("builtin:tiny-gpt2", "p")
    reward_dir = tmp_path / "models" / "rm"
    AutoModelForSequenceClassification.from_pretrained(tiny, num_labels=1).save_pretrained(reward_dir)
    AutoTokenizer.from_pretrained(tiny).save_pretrained(reward_dir)
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("".join(json.dumps({"q": f"tell me about the cat {i}:", "answer": "a cat", "lang": lang})
                                 + "\n" for i, lang in enumerate(["en", "fr"] * 5)))
    out = tmp_path / "out"
    code = main(["train", CONTINUAL, *quick(out), f"eval_reward.model={reward_dir}",
                 f"tasks.0.eval_prompts.path={eval_file}", "tasks.0.eval_prompts.prompt_field=q",
                 "tasks.0.eval_prompts.reference_field=answer", "tasks.0.eval_prompts.filter_field=lang",
                 "tasks.0.eval_prompts.filter_value=en"])
    assert code == 0, capsys.readouterr().err
    matrix = json.loads((out / "eval_matrix.json").read_text())
    assert matrix["eval_reward"] == str(reward_dir)
    rouge = matrix["scores"]["rouge_l"]
    assert all(0.0 <= row[0] <= 1.0 for row in rouge) and all(row[1] is None for row in rouge)
    assert "rouge_l" not in json.loads((out / "summary.json").read_text())  # not every task has references


# --------------------------------------------------------------------------------- bad task configs

def write_config(tmp_path, tasks_yaml):
    path = tmp_path / "c.yaml"
    header = "model: {policy: builtin:tiny-gpt2}\nppo: {rollout_batch_size: 8, mini_batch_size: 4}\ntasks:\n"
    path.write_text(header + textwrap.indent(textwrap.dedent(tasks_yaml), "  "))
    return str(path)


@pytest.mark.parametrize("case, tasks_yaml, message", [
    ("duplicate", """\
        - {name: a, reward: {function: cppo.toy:vowel_fraction}}
        - {name: a, reward: {function: cppo.toy:digit_fraction}}
        """, "tasks[1].name must be unique (another task has it), got 'a'"),
    ("missing_reward", """\
        - {name: a, reward: {function: cppo.toy:vowel_fraction}}
        - {name: b, reward: {function: null}}
        """, "tasks[1].reward: set exactly one of tasks[1].reward.model"),
    ("zero_budget", """\
        - {name: a, reward: {function: cppo.toy:vowel_fraction}, steps: 0}
        """, "tasks[0].steps must be > 0 or null, got 0"),
    ("zero_episodes", """\
        - {name: a, reward: {function: cppo.toy:vowel_fraction}, episodes: 0}
        """, "tasks[0].episodes must be > 0 or null, got 0"),
    ("eval_without_prompts", """\
        - {name: a, reward: {function: cppo.toy:vowel_fraction}, eval_prompts: {path: EMPTY}}
        """, "tasks[0].eval_prompts.path: "),
    ("eval_missing_column", """\
        - {name: a, reward: {function: cppo.toy:vowel_fraction}, eval_prompts: {path: NOCOLUMN}}
        """, "tasks[0].eval_prompts.prompt_field: column 'prompt' not in"),
    ("eval_missing_file", """\
        - {name: a, reward: {function: cppo.toy:vowel_fraction}, eval_prompts: {path: /no/such/file.jsonl}}
        """, "tasks[0].eval_prompts.path: file not found"),
])
def test_bad_task_configs_fail_before_any_model_loads(tmp_path, capsys, monkeypatch, case, tasks_yaml, message):
    empty, no_column = tmp_path / "empty.jsonl", tmp_path / "nocolumn.jsonl"
    empty.write_text(json.dumps({"prompt": "   "}) + "\n")
    no_column.write_text(json.dumps({"text": "hello"}) + "\n")
    tasks_yaml = tasks_yaml.replace("EMPTY", str(empty)).replace("NOCOLUMN", str(no_column))
    import cppo.models

    def no_model_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the config was rejected")

    monkeypatch.setattr(cppo.models, "_from_pretrained", no_model_loading)
    out = tmp_path / "out"
    code = main(["train", write_config(tmp_path, tasks_yaml), f"output_dir={out}"])
    err = capsys.readouterr().err
    lines = error_lines(err)
    assert code == 2 and len(lines) == 1 and message in lines[0], err
    assert not out.exists()


def test_chat_template_formats_conversational_prompts(tmp_path):
    from cppo.config import DataConfig
    from cppo.data import build_prompt_set
    from cppo.models import load_tokenizer, resolve_model_source

    tokenizer = load_tokenizer(resolve_model_source("builtin:tiny-gpt2", "p"))
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi there"}]}) + "\n")
    cfg = DataConfig(path=str(data), prompt_field="messages")
    with pytest.raises(UserError, match="need a chat template and the tokenizer has none"):
        build_prompt_set(cfg, tokenizer, 0, "tasks[0].prompts")
    tokenizer.chat_template = "{% for m in messages %}<{{ m.role }}> {{ m.content }}\n{% endfor %}" \
                              "{% if add_generation_prompt %}<assistant> {% endif %}"
    prompts = build_prompt_set(cfg, tokenizer, 0, "tasks[0].prompts")
    assert prompts.texts == ["<user> hi there\n<assistant> "]
    plain = build_prompt_set(DataConfig(path="builtin:toy-prompts", chat_template="always", max_samples=1),
                             tokenizer, 0, "p")
    assert plain.texts[0].startswith("<user> ") and plain.texts[0].endswith("<assistant> ")


def test_long_prompts_truncate_or_drop():
    from cppo.config import DataConfig
    from cppo.data import build_prompt_set
    from cppo.models import load_tokenizer, resolve_model_source

    tokenizer = load_tokenizer(resolve_model_source("builtin:tiny-gpt2", "p"))
    truncated = build_prompt_set(DataConfig(max_prompt_length=10), tokenizer, 0, "p")
    assert max(len(ids) for ids in truncated.ids) == 10 and truncated.counts["truncated"] > 0
    dropped = build_prompt_set(DataConfig(max_prompt_length=14, long_prompts="drop"), tokenizer, 0, "p")
    assert max(len(ids) for ids in dropped.ids) <= 14 and dropped.counts["dropped"] > 0
    assert len(dropped) + dropped.counts["dropped"] == 512


# ------------------------------------------------------------------------------------- baselines

def trainer_with(tmp_path, regularizer, **extra):
    from cppo.config_loading import load_config
    from cppo.continual import build_trainer

    config = load_config(CONTINUAL, quick(tmp_path / "o", **{"algo": "ppo", "continual.regularizer": regularizer,
                                                              "continual.importance_samples": 6, **extra}))
    return build_trainer(config)


def perturb(policy, scale=0.05, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))


def flat(params):
    return torch.cat([p.detach().flatten() for p in params])


def check_points_back(trainer, penalty_fn):
    """Zero at θ_{t−1}; positive after a change; −∇ points from θ back toward θ_{t−1}."""
    policy = trainer.unwrapped.policy
    anchor = flat(policy.parameters())
    assert penalty_fn().item() == pytest.approx(0.0, abs=1e-6)
    perturb(policy)
    value = penalty_fn()
    assert value.item() > 0
    policy.zero_grad()
    value.backward()
    gradient = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                          for p in policy.parameters()])
    toward_anchor = anchor - flat(policy.parameters())
    cosine = torch.nn.functional.cosine_similarity(-gradient, toward_anchor, dim=0)
    assert cosine > 0, cosine
    return value


@pytest.mark.parametrize("name", ["l2", "ewc", "mas"])
def test_parameter_penalties_are_zero_at_the_anchor_and_pull_back(tmp_path, name, monkeypatch):
    trainer = trainer_with(tmp_path, name)
    regularizer = trainer.regularizer
    if name != "l2":
        calls = []
        real_generate = trainer.engine.generate

        def spy(prompts, decoding, key):
            out = real_generate(prompts, decoding, key)
            calls.append((len(prompts), out.response_mask.sum().item(), key.purpose))
            return out

        monkeypatch.setattr(trainer.engine, "generate", spy)
        regularizer.task_end(trainer)  # importance of the current (task-end) weights
        # estimated on responses the rollout engine sampled for 6 prompts, not on a pass over the prompts
        assert len(calls) == 1 and calls[0][0] == 6 and calls[0][1] >= 6 and calls[0][2] == "importance"
        everything = torch.cat([v.flatten() for v in regularizer.importance.values()])
        assert everything.mean().item() == pytest.approx(1.0, rel=1e-4) and (everything >= 0).all()
        assert everything.std() > 0  # some weights matter more than others
        regularizer.task_start(trainer)  # the next task starts here: θ_{t−1} = these weights
    dummy = torch.zeros(1, 1, 1)
    value = check_points_back(trainer, lambda: regularizer.penalty(trainer, None, dummy, None, True))
    assert regularizer.penalty(trainer, None, dummy, None, False).item() == 0.0  # once per optimiser step
    if name == "l2":
        change = flat(trainer.unwrapped.policy.parameters()) - torch.cat(
            [a.flatten() for a in regularizer.anchor.values()])
        assert value.item() == pytest.approx(0.5 * (change ** 2).sum().item(), rel=1e-5)
    state = regularizer.state_dict()
    assert "anchor" not in state and (state["importance"] is None) == (name == "l2")


def test_ewc_penalty_is_zero_on_the_first_task(tmp_path):
    trainer = trainer_with(tmp_path, "ewc")
    perturb(trainer.unwrapped.policy)
    assert trainer.regularizer.penalty(trainer, None, torch.zeros(1), None, True).item() == 0.0


def test_lwf_is_zero_at_the_previous_policy_and_pulls_back(tmp_path):
    trainer = trainer_with(tmp_path, "lwf")
    batch, _ = trainer.make_rollout()
    mask = batch.response_mask

    def penalty():
        *_, logits, _ = trainer.model(batch.input_ids, batch.attention_mask, batch.response_ids, 1.0, logits=True)
        return trainer.regularizer.penalty(trainer, batch, logits, mask.sum().float(), True)

    check_points_back(trainer, penalty)


@pytest.mark.parametrize("algo, kl_reference, regularizer, expect_anchor", [
    ("cppo", "previous_task", "none", False),  # π_{t−1} is the KL reference and the KR anchor: one model
    ("cppo", "initial", "none", True),  # KL to π_0, KR to π_{t−1}: a second frozen model from task 2 on
    ("ppo", "initial", "none", False),  # kl_reference is CPPO's option; PPO's reference is π_{t−1}
    ("ppo", "previous_task", "lwf", False),
])
def test_stage_lineage(tmp_path, algo, kl_reference, regularizer, expect_anchor):
    from cppo.config_loading import load_config
    from cppo.continual.runner import stages
    from cppo.session import open_session, task_prompts

    config = load_config(CONTINUAL, quick(tmp_path / "o", algo=algo, **{"cppo.kl_reference": kl_reference,
                                                                        "continual.regularizer": regularizer}))
    session = open_session(config)
    first, second = stages(session, [task_prompts(session, i) for i in range(2)])
    assert first.policy == first.reference == session.initial_policy and first.anchor is None
    assert first.output_dir == tmp_path / "o" / "task_1_vowels"
    assert second.policy == str(first.output_dir / "policy")
    assert second.value_model == str(first.output_dir / "value_model")
    assert second.step_offset == 2
    if expect_anchor:
        assert second.reference == session.initial_policy and second.anchor == second.policy
    else:
        assert second.reference == second.policy and second.anchor is None


@pytest.mark.long
def test_demo_quick_runs_the_whole_pipeline(tmp_path):
    out = tmp_path / "demo"
    result = run_cppo("demo", "--quick", "--output-dir", str(out))
    for name in ("sky", "ledger", "forest", "reference"):
        assert f"reward model {name}: held-out pairwise accuracy" in result.stdout
    report = (out / "report" / "report.md").read_text()
    for png in ("reward_curves.png", "eval_matrices.png", "forgetting_plasticity.png", "types_cppo.png",
                "weight_surfaces.png"):
        assert (out / "report" / png).stat().st_size > 1000 and png in report
    for method in ("ppo", "cppo", "cppo_memory"):
        matrix = json.loads((out / "runs" / method / "eval_matrix.json").read_text())
        assert len(matrix["scores"]["reward"]) == 4 and len(matrix["scores"]["reward"][0]) == 3
        assert f"| {method} |" in result.stdout
    for task in ("task_1_sky", "task_2_ledger"):  # the memory is built after every task another follows
        assert (out / "runs" / "cppo_memory" / task / "memory.jsonl").stat().st_size > 0
    assert not (out / "runs" / "cppo_memory" / "task_3_forest" / "memory.jsonl").exists()
    assert "types_cppo_memory.png" in report
    # a second run reuses the data, the SFT model and the reward models
    again = run_cppo("demo", "--quick", "--output-dir", str(tmp_path / "demo2"))
    assert again.stdout.count(": cached (") == 6


def test_demo_data_follows_the_hidden_rules():
    from cppo.demo import DOMAINS, DemoSizes, make_data

    sizes = DemoSizes.quick()
    data = make_data(sizes, seed=0)
    for domain in DOMAINS:
        pairs = data["pairs"][domain.name]["train"]
        agree = sum(domain.score(p["chosen"]) > domain.score(p["rejected"]) for p in pairs) / len(pairs)
        assert 0.85 < agree < 1.0  # the rule, with a little annotator noise
        assert all(abs(domain.score(p["chosen"]) - domain.score(p["rejected"])) >= sizes.min_margin for p in pairs)
        assert all(p["prompt"].startswith(f"{domain.name}: ") for p in pairs)
        # pairs reach the lopsided answers an optimised policy produces, which the SFT corpus hardly holds
        answers = [p[key] for p in pairs for key in ("chosen", "rejected")]
        assert sum(domain.score(a) >= 0.8 for a in answers) / len(answers) > 0.05
        sft_answers = [row["completion"] for row in data["sft"]]
        assert sum(domain.score(a) >= 0.8 for a in sft_answers) / len(sft_answers) < 0.02
    assert len(data["sft"]) == sizes.sft_examples
    assert make_data(sizes, seed=0) == data  # deterministic


@pytest.mark.parametrize("cuda", [False, True], ids=["cpu", "cuda"])
def test_the_demo_trains_its_models_in_fp32_without_checkpointing_whatever_trls_defaults(tmp_path, cuda):
    """trl's SFTConfig and RewardConfig default to bf16 autocast and activation checkpointing; the demo's ~100 k
    parameter models are trained in fp32 without either, on a CPU and on a GPU, because the demo says so."""
    from trl import RewardConfig, SFTConfig

    from cppo.demo import device_training_args

    args = device_training_args(cuda)
    assert args["bf16"] is False and args["fp16"] is False and args["gradient_checkpointing"] is False
    assert args["use_cpu"] is not cuda and args.get("tf32", False) is False
    if cuda:  # TrainingArguments checks tf32 and pinned memory against a GPU that is not here: the values only
        return
    for config_class in (SFTConfig, RewardConfig):
        config = config_class(output_dir=str(tmp_path), report_to=[], **args)
        assert config.bf16 is False and config.fp16 is False and config.gradient_checkpointing is False
        assert getattr(config, "activation_checkpointing", False) is False


@pytest.mark.parametrize(("regularizer", "lora_r", "refused"), [
    ("l2", 0, True), ("ewc", 0, True), ("mas", 0, True), ("lwf", 0, False), ("lwf", 4, True), ("none", 4, False)])
def test_a_regularizer_a_sharded_back_end_cannot_compute_is_one_line(regularizer, lora_r, refused):
    import types

    from cppo.config import Config
    from cppo.continual.regularizers import build_regularizer

    config = Config()
    config.continual.regularizer, config.model.lora_r = regularizer, lora_r
    sharded = types.SimpleNamespace(sharded_weights=True, name="fsdp2")
    whole = types.SimpleNamespace(sharded_weights=False, name="ddp")
    built = build_regularizer(config, whole)
    assert (built is None) == (regularizer == "none")
    if refused:
        with pytest.raises(UserError, match=f"^continual.regularizer {regularizer} .*fsdp2"):
            build_regularizer(config, sharded)
    else:
        assert type(build_regularizer(config, sharded)) is type(built)


def test_prompts_that_max_prompt_length_changed_are_counted_in_the_log(tmp_path, capsys):
    from cppo.config_loading import load_config
    from cppo.continual.evaluation import Evaluator
    from cppo.session import open_session, task_prompts

    config = load_config(CONTINUAL, quick(tmp_path / "o", **{"tasks.0.prompts.max_prompt_length": 14,
                                                             "tasks.0.prompts.long_prompts": "drop",
                                                             "tasks.1.eval_prompts.max_prompt_length": 10}))
    session = open_session(config)
    prompts = task_prompts(session, 0)
    Evaluator(session)
    err = capsys.readouterr().err
    dropped = prompts.counts["dropped"]
    assert dropped > 0 and (f"cppo: tasks[0].prompts: {dropped} dropped of {len(prompts) + dropped} prompts longer "
                            "than max_prompt_length 14 tokens (long_prompts: drop)") in err
    assert re.search(r"cppo: tasks\[1\]\.eval_prompts: \d+ truncated of \d+ prompts longer than max_prompt_length 10 "
                     r"tokens \(long_prompts: truncate\)", err), err
    assert "tasks[1].prompts" not in err  # a set nothing changed is not mentioned
