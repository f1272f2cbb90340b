"""Nothing a user had is lost, and every bad input is one line: earlier runs are refused or replaced only
after the new run's first step, errors in the user's code and data are one `cppo: error:` line (the
traceback kept in a log), failed writes leave whole checkpoints, non-finite values never reach the
weights, and a signalled two-process launch stops everywhere at the same step."""

import contextlib
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import textwrap
import time

import pytest
import torch
from conftest import (
    PYTHON,
    RANK_EXIT_SCRIPT,
    ROOT,
    TINY,
    TWO_PROCESSES,
    one_error_line,
    quick_overrides,
    read_metrics,
    run_cppo,
    run_in_process,
    snapshot,
    subprocess_env,
)
from safetensors.torch import load_file

from cppo.checkpoint import checkpoints, verify
from cppo.cli import main
from cppo.launch import with_own_port
from cppo.session import reset_accelerate_state


def train(args, capfd) -> tuple[int, str]:
    """`cppo train` in this process: its exit code and everything written to the stderr descriptor."""
    return run_in_process(["train", *args], capfd)


@pytest.fixture(scope="module")
def earlier_run(tmp_path_factory, cppo_cache):
    """A finished two-step run with a checkpoint per step: what a user must never lose."""
    out = tmp_path_factory.mktemp("earlier") / "run"
    assert main(["train", TINY, *quick_overrides(out, save_steps=1)]) == 0
    reset_accelerate_state()
    return out


@pytest.fixture
def used_dir(tmp_path, earlier_run):
    """A copy of the earlier run and its snapshot."""
    out = tmp_path / "run"
    shutil.copytree(earlier_run, out, symlinks=True)
    return out, snapshot(out)


def write(path, text: str) -> str:
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_a_fresh_run_refuses_a_used_directory(used_dir, tmp_path, capfd):
    out, before = used_dir
    line = one_error_line(*train([TINY, *quick_overrides(out)], capfd), "holds an earlier run (2 checkpoint(s)")
    assert "--resume" in line and "--overwrite" in line
    assert snapshot(out) == before
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("mine")
    one_error_line(*train([TINY, *quick_overrides(other)], capfd), "is not empty (todo.txt)")
    assert (other / "todo.txt").read_text() == "mine"
    one_error_line(*train([TINY, *quick_overrides(out), "--resume", "--overwrite"], capfd), "give one")


def test_overwrite_refuses_to_remove_what_the_run_reads(used_dir, capfd):
    out, before = used_dir
    one_error_line(*train([TINY, *quick_overrides(out), f"model.policy={out / 'policy'}", "--overwrite"], capfd),
                   f"model.policy: {out / 'policy'} lies inside output_dir {out}, which --overwrite would remove")
    assert snapshot(out) == before


def test_overwrite_replaces_only_after_the_first_step(used_dir, capfd):
    out, before = used_dir
    (out / "notes.txt").write_text("replaced too: --overwrite takes the whole directory")
    code, err = train([TINY, *quick_overrides(out, steps=3), "--overwrite"], capfd)
    assert code == 0, err
    assert "replaced the earlier contents" in err
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert not (out / "notes.txt").exists() and [p.name for p in checkpoints(out)] == ["step_00000003"]


REWARDS = {
    "raises": ("def score(prompts, completions):\n    raise RuntimeError('reward server down')\n",
               "reward function {path}:score raised RuntimeError: reward server down"),
    "wrong_count": ("def score(prompts, completions):\n    return [1.0]\n", "returned 1 scores for 8 completions"),
    "not_numbers": ("def score(prompts, completions):\n    return ['high'] * len(completions)\n",
                    "must return a list of numbers"),
    "inf_at_step_1": ("def score(prompts, completions):\n    return [float('inf')] + [0.0] * (len(completions) - 1)\n",
                      "step 1: reward function {path}:score returned a non-finite score for 1 of 8 rollouts"),
}


@pytest.mark.parametrize("case", list(REWARDS))
def test_a_failing_reward_function_is_one_line_and_changes_nothing(used_dir, tmp_path, capfd, case):
    out, before = used_dir
    body, expected = REWARDS[case]
    path = write(tmp_path / "my_reward.py", body)
    line = one_error_line(*train([TINY, *quick_overrides(out), f"tasks.0.reward.function={path}:score", "--overwrite"],
                                 capfd), expected.format(path=path))
    assert snapshot(out) == before  # --overwrite removes nothing before the first step has finished
    if case == "raises":  # the traceback is kept, outside the untouched output directory
        log = line.split("(traceback: ")[1].rstrip(")")
        assert not log.startswith(str(out))
        text = open(log).read()
        assert "Traceback" in text and "reward server down" in text and "my_reward.py" in text


def test_debug_switch_raises_with_the_whole_traceback(tmp_path, monkeypatch):
    path = write(tmp_path / "my_reward.py", REWARDS["raises"][0])
    monkeypatch.setenv("CPPO_DEBUG", "1")
    with pytest.raises(Exception, match="reward server down") as raised:
        main(["train", TINY, *quick_overrides(tmp_path / "out"), f"tasks.0.reward.function={path}:score"])
    assert isinstance(raised.value.__cause__, RuntimeError)


def chat_tokenizer(tmp_path):
    """The tiny tokenizer with a custom chat template that refuses system turns, as some checkpoints' do."""
    from cppo.models import load_tokenizer, resolve_model_source

    source = resolve_model_source("builtin:tiny-gpt2", "model.policy")
    shutil.copytree(source, tmp_path / "chat_tokenizer")
    tokenizer = load_tokenizer(source)
    tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                               "{{ raise_exception('System role not supported') }}{% endif %}"
                               "{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}assistant:")
    tokenizer.save_pretrained(tmp_path / "chat_tokenizer")
    return str(tmp_path / "chat_tokenizer")


DATA = {
    "empty_file": ("empty.jsonl", "", [], "tasks[0].prompts.path: {path} is empty"),
    "blank_lines_only": ("blank.jsonl", "\n\n  \n", [], "is empty"),
    "not_utf8": ("latin1.jsonl", b'{"prompt": "a caf\xe9"}\n', [], "is not UTF-8 text (byte 0xe9 on line 1)"),
    "prompt_not_text": ("numbers.jsonl", '{"prompt": "fine"}\n{"prompt": 5}\n', [],
                        "tasks[0].prompts.prompt_field: row 2 of {path}: 'prompt' is 5 (int)"),
    "message_without_content": ("chat.jsonl", '{"prompt": [{"role": "user"}]}\n', [], "row 1 of {path}"),
    "reference_not_text": ("refs.jsonl", '{"prompt": "a", "ref": 3}\n', ["tasks.0.prompts.reference_field=ref"],
                           "tasks[0].prompts.reference_field: row 1 of {path}: 'ref' is 3 (int)"),
    "malformed_json": ("broken.jsonl", '{"prompt": "a"\n', [], "tasks[0].prompts.path: cannot load"),
    "all_filtered": ("split.jsonl", '{"prompt": "a", "split": "train"}\n',
                     ["tasks.0.prompts.filter_field=split", "tasks.0.prompts.filter_value=test"],
                     "has no non-empty prompts in column 'prompt' with split = 'test'"),
    "all_dropped": ("long.jsonl", '{"prompt": "a long prompt"}\n',
                    ["tasks.0.prompts.max_prompt_length=4", "tasks.0.prompts.long_prompts=drop"],
                    "every prompt is longer than max_prompt_length=4"),
    "longer_than_context": ("ok.jsonl", '{"prompt": "a"}\n', ["tasks.0.prompts.max_prompt_length=250"],
                            "tasks[0].prompts.max_prompt_length + generation.max_new_tokens = 250 + 8 exceeds "
                            "the 256-token context of model.policy"),
    "chat_template_raises": ("system.jsonl", '{"prompt": [{"role": "system", "content": "be brief"}, '
                                             '{"role": "user", "content": "hi"}]}\n', ["model.tokenizer={tokenizer}"],
                             "the tokenizer's chat template raised TemplateError: System role not supported"),
}


@pytest.mark.parametrize("case", list(DATA))
def test_bad_data_is_one_line_before_any_model_loads(used_dir, tmp_path, capfd, monkeypatch, case):
    out, before = used_dir
    name, content, extra, expected = DATA[case]
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    tokenizer = chat_tokenizer(tmp_path) if case == "chat_template_raises" else None
    import cppo.trainer

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(cppo.trainer, "load_policy", no_model)
    args = [TINY, *quick_overrides(out), f"tasks.0.prompts.path={path}",
            *(e.format(tokenizer=tokenizer) for e in extra), "--overwrite"]
    one_error_line(*train(args, capfd), expected.format(path=path))
    assert snapshot(out) == before


def test_output_dir_that_is_a_file_or_not_writable(tmp_path, capfd, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("keep")
    one_error_line(*train([TINY, *quick_overrides(afile)], capfd), f"output_dir: {afile} is a file, not a directory")
    one_error_line(*train([TINY, *quick_overrides(afile / "run")], capfd), f"{afile} is a file, not a directory")
    assert afile.read_text() == "keep"
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    # Root may write anywhere, so the read-only directory is simulated at the permission check.
    monkeypatch.setattr(os, "access",
                        lambda p, mode, **kw: False if str(p) == str(locked) else real_access(p, mode, **kw))
    one_error_line(*train([TINY, *quick_overrides(locked / "run")], capfd), f"{locked / 'run'} is not writable")
    assert list(locked.iterdir()) == []


def read_only_mount(path):
    """A read-only tmpfs at `path`, or None where this process may not mount."""
    path.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(path)], capture_output=True)
    return path if made.returncode == 0 else None


def test_output_dir_on_a_read_only_file_system(tmp_path, capfd):
    mount = read_only_mount(tmp_path / "ro")
    if mount is None:
        pytest.skip("cannot mount a tmpfs here (not root)")
    try:
        one_error_line(*train([TINY, *quick_overrides(mount / "run")], capfd), "is not writable")
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_leaves_whole_checkpoints_and_one_line(tmp_path, capfd, monkeypatch):
    import cppo.distributed

    out, calls = tmp_path / "run", []
    real_save_file = cppo.distributed.save_file

    def full_on_the_second_checkpoint(tensors, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_save_file(tensors, path, *args, **kwargs)

    monkeypatch.setattr(cppo.distributed, "save_file", full_on_the_second_checkpoint)
    line = one_error_line(*train([TINY, *quick_overrides(out, steps=3, save_steps=1)], capfd),
                          "cannot write checkpoint")
    assert "step_00000002: No space left on device" in line
    assert [p.name for p in checkpoints(out)] == ["step_00000001"] and verify(checkpoints(out)[0]) is None
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".staging")]
    assert "(traceback: " + str(out / "error.log") in line  # the run had written there: its log sits with it


def tmpfs(path, size: str):
    path.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return path if made.returncode == 0 else None


def test_a_really_full_disk(tmp_path, capfd):
    """A 3 MiB file system: the first step's checkpoint fits, the second does not."""
    mount = tmpfs(tmp_path / "small", "3m")
    if mount is None:
        pytest.skip("cannot mount a tmpfs here (not root)")
    try:
        out = mount / "run"
        line = one_error_line(*train([TINY, *quick_overrides(out, steps=4, save_steps=1, save_total_limit="null")],
                                     capfd), "cannot write")
        assert "No space left on device" in line
        assert all(verify(p) is None for p in checkpoints(out)) and checkpoints(out)
        assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".staging")]
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_disk_full_at_the_first_write_of_a_resume_changes_nothing(earlier_run, tmp_path, capfd):
    """The earlier run on a tmpfs with no space left: the resumed run's first write (metrics.jsonl cut
    back to the checkpoint, config.yaml) fails whole, and every file is as it was."""
    used = sum(p.stat().st_size for p in earlier_run.rglob("*") if p.is_file() and not p.is_symlink())
    mount = tmpfs(tmp_path / "full", f"{used // 1024 + 1024}k")
    if mount is None:
        pytest.skip("cannot mount a tmpfs here (not root)")
    try:
        out = mount / "run"
        shutil.copytree(earlier_run, out, symlinks=True)
        with open(mount / "filler", "wb", buffering=0) as filler, contextlib.suppress(OSError):
            while True:  # take every byte that is left
                filler.write(b"\0" * 4096)
        before = snapshot(out)
        first = out / "checkpoints" / "step_00000001"
        one_error_line(*train([TINY, *quick_overrides(out), "--resume", str(first)], capfd),
                       "No space left on device")
        assert snapshot(out) == before
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_failed_resume_keeps_the_metrics_it_would_replay(used_dir, tmp_path, capfd):
    out, before = used_dir
    path = write(tmp_path / "my_reward.py", REWARDS["raises"][0])
    first = out / "checkpoints" / "step_00000001"
    code, err = train([TINY, *quick_overrides(out), f"tasks.0.reward.function={path}:score", "--resume", str(first),
                       "--force"], capfd)
    one_error_line(code, err, "raised RuntimeError: reward server down")
    assert snapshot(out) == before  # step 2's metrics line is dropped only when step 2 is run again


INF_AT_CALL_3 = """
    calls = []
    def score(prompts, completions):
        calls.append(1)
        return [float("inf") if len(calls) == 3 and i == 0 else 0.5 for i in range(len(completions))]
"""


def test_a_non_finite_reward_stops_before_the_update_and_keeps_the_last_checkpoint(tmp_path, capfd):
    path = write(tmp_path / "inf_reward.py", INF_AT_CALL_3)
    out = tmp_path / "run"
    one_error_line(*train([TINY, *quick_overrides(out, steps=4, save_steps=1),
                           f"tasks.0.reward.function={path}:score"], capfd),
                   f"step 3: reward function {path}:score returned a non-finite score for 1 of 8 rollouts; "
                   "stopped before the optimiser step")
    assert [p.name for p in checkpoints(out)] == ["step_00000001", "step_00000002"]
    assert all(verify(p) is None for p in checkpoints(out))
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


def test_skip_drops_the_step_counts_it_and_stops_past_the_limit(tmp_path, capfd):
    path = write(tmp_path / "inf_reward.py", INF_AT_CALL_3)
    out = tmp_path / "run"
    args = [TINY, *quick_overrides(out, steps=4), f"tasks.0.reward.function={path}:score", "ppo.on_nonfinite=skip"]
    code, err = train(args, capfd)
    assert code == 0, err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["nonfinite/skipped_step"] for r in rows] == [0, 0, 1, 0]
    assert "reward/mean" not in rows[2] and rows[3]["reward/mean"] == 0.5
    assert "step 3: reward function" in err and "skipped (1 of at most 10)" in err
    reset_accelerate_state()
    one_error_line(*train([*args, "output_dir=" + str(tmp_path / "strict"), "ppo.max_nonfinite_skips=0"], capfd),
                   "(0 skipped before); stopped before the optimiser step")


@pytest.mark.parametrize("fault", ["loss", "gradient"])
@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_a_non_finite_loss_or_gradient_never_reaches_the_weights(tmp_path, fault, mode):
    from cppo.config_loading import load_config
    from cppo.continual import build_trainer
    from cppo.errors import UserError

    config = load_config(TINY, quick_overrides(tmp_path / "out", **{"ppo.on_nonfinite": mode}))
    trainer = build_trainer(config)
    batch, _ = trainer.make_rollout()
    batch.scores = trainer.process_scores(batch)
    kl = batch.old_logprobs - batch.ref_logprobs
    batch.advantages, batch.returns = torch.randn_like(kl), torch.randn_like(kl)
    trainer.prepare_losses(batch, kl)
    if fault == "loss":  # the critic's loss term turns NaN (e.g. a value head that overflowed)
        original = trainer.micro_batch_loss

        def nan_value_loss(*args, **kwargs):
            loss, stats = original(*args, **kwargs)
            nan_value = stats["loss/value"] * float("nan")
            return loss + nan_value, {**stats, "loss/value": nan_value}

        trainer.micro_batch_loss = nan_value_loss
    else:  # finite losses, an infinite gradient
        next(trainer.unwrapped.policy.parameters()).register_hook(lambda grad: grad * float("inf"))
    before = {k: v.clone() for k, v in trainer.unwrapped.state_dict().items()}
    if mode == "stop":
        expected = "step 1, update 1: loss term value is non-finite" if fault == "loss" else \
            "step 1, update 1: the gradient norm is non-finite"
        with pytest.raises(UserError, match=expected):
            trainer.optimise(batch)
    else:
        stats = trainer.optimise(batch)
        assert stats["nonfinite/skipped_updates"] == 2 and trainer.guard.skips == 2
        assert "loss/value" not in stats  # no mean over updates that never happened
    after = trainer.unwrapped.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    if mode == "skip":  # nothing left to leak into a later update
        assert all(p.grad is None for p in trainer.unwrapped.parameters())


def test_a_first_ctrl_c_asks_for_a_stop_and_a_second_stops_at_once():
    from cppo.continual.runner import Checkpointer

    checkpointer = Checkpointer.__new__(Checkpointer)
    checkpointer.stop_requested = False
    with checkpointer.signal_handlers():
        os.kill(os.getpid(), signal.SIGINT)
        assert checkpointer.stop_requested  # the run finishes its step, saves and leaves
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.slow
def test_sigterm_to_a_two_process_launch_stops_every_rank_at_one_step_and_resumes_exactly(tmp_path):
    """The launcher forwards SIGTERM to both ranks; they agree on the step, save once, exit 0 (each
    rank's exit code is recorded by tests/rank_exit_script.py), and --resume ends bit-identical."""
    args = quick_overrides(tmp_path, steps=8)[1:]  # output_dir is given per launch

    def launch(out, *extra, wait=True):
        env = {**subprocess_env(), "RANK_EXIT_DIR": str(out.parent / f"{out.name}-exits")}
        command = with_own_port([PYTHON, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                                 str(ROOT / "tests" / "rank_exit_script.py"), "train", TINY, f"output_dir={out}",
                                 *args, *extra])
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True)
        return process.communicate(timeout=600) + (process.returncode,) if wait else process

    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    _, stderr, code = launch(straight)
    assert code == 0, stderr[-3000:]
    process = launch(stopped, wait=False)
    metrics = stopped / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 2):
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)  # to the launcher only, as a scheduler or `kill` does
    _, stderr = process.communicate(timeout=300)
    steps = len(metrics.read_text().splitlines())
    assert 2 <= steps < 8, stderr[-3000:]
    assert sorted(os.listdir(tmp_path / "stopped-exits")) == ["rank_0", "rank_1"]
    assert [(tmp_path / "stopped-exits" / f"rank_{r}").read_text() for r in (0, 1)] == ["0", "0"], stderr[-3000:]
    assert "Unable to shutdown process" not in stderr  # no rank needed SIGKILL
    assert [p.name for p in checkpoints(stopped)] == [f"step_{steps:08d}"]  # saved once, after the same step
    assert "Resume with: cppo train <config> --resume" in stderr
    _, stderr, code = launch(stopped, "--resume")
    assert code == 0, stderr[-3000:]
    for name in ("policy", "value_model"):
        a = load_file(straight / name / "model.safetensors")
        b = load_file(stopped / name / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert read_metrics(straight, timing=False) == read_metrics(stopped, timing=False)


def rank_1_fails(tmp_path) -> str:
    """A reward function that raises on rank 1 only."""
    return write(tmp_path / "rank1_reward.py", """
        import os
        def score(prompts, completions):
            if os.environ["RANK"] == "1":
                raise RuntimeError("reward server down")
            return [0.5] * len(completions)
    """)


@pytest.mark.slow
def test_a_reward_failing_on_one_rank_stops_both_with_one_line(tmp_path):
    """Each process scores its own share: when only rank 1's share makes the user's code raise, rank 1
    reports it and rank 0 stops with it, without waiting in a collective or printing a traceback."""
    path = rank_1_fails(tmp_path)
    result = run_cppo("train", TINY, *quick_overrides(tmp_path / "run"), f"tasks.0.reward.function={path}:score",
                      launcher=TWO_PROCESSES, program=RANK_EXIT_SCRIPT, env={"RANK_EXIT_DIR": str(tmp_path / "exits")},
                      check=False)
    lines = [line for line in result.stderr.splitlines() if line.startswith("cppo: error:")]
    assert len(lines) == 1 and lines[0].startswith(
        f"cppo: error: [rank 1] reward function {path}:score raised RuntimeError: reward server down"), result.stderr
    assert "[rank0]" not in result.stderr and "[rank1]" not in result.stderr  # no traceback from either process
    assert (tmp_path / "exits" / "rank_1").read_text() == "2"
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_process_that_does_not_report_the_error_leaves_after_the_one_that_does(tmp_path):
    """Under a launcher, every process meets an error in the config; the main process reports it. The others
    must not exit first: the launcher stops every process once one exits, and would stop the main process
    before its line is out (seen under load: the user got only the launcher's traceback). They wait for the
    launcher's SIGTERM, then exit 2 without a line of their own."""
    def start(rank: str) -> subprocess.Popen:
        env = {**subprocess_env(), "RANK": rank, "WORLD_SIZE": "2", "RANK_EXIT_DIR": str(tmp_path / "exits")}
        return subprocess.Popen([PYTHON, str(ROOT / "tests" / "rank_exit_script.py"), "train", TINY, "ppo.stepz=3"],
                                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    started = time.time()
    main_process = start("0")
    _, stderr = main_process.communicate(timeout=120)
    to_the_error = time.time() - started
    assert main_process.returncode == 2 and stderr.startswith("cppo: error: unknown config key 'ppo.stepz'"), stderr
    other = start("1")
    time.sleep(min(3 * to_the_error + 5, 45))  # it met the error long ago (the main process took `to_the_error`)
    assert other.poll() is None, "a process that did not report the error left before the reporter"
    other.send_signal(signal.SIGTERM)  # what the launcher does once the reporter has exited
    _, stderr = other.communicate(timeout=60)
    assert other.returncode == 2 and "cppo: error" not in stderr and "Traceback" not in stderr, stderr
    assert (tmp_path / "exits" / "rank_1").read_text() == "2"


@pytest.mark.slow
def test_a_launch_cppo_starts_ends_on_a_processs_error_with_its_one_line_and_exit_2(tmp_path):
    """`cppo train --accelerate-config`: rank 1's reward function fails; the user sees that one line and exit 2,
    not the launcher's traceback about the failed process (which `accelerate launch` by hand prints). Another
    job holds the default rendezvous port meanwhile, bound but not yet accepting (which `accelerate launch`'s own
    check, a connection attempt, does not see): the launch takes a free one."""
    path = rank_1_fails(tmp_path)
    with socket.socket() as other_job:
        with contextlib.suppress(OSError):  # already held by someone else: as good
            other_job.bind(("0.0.0.0", 29500))
        result = run_cppo("train", TINY, *quick_overrides(tmp_path / "run"), f"tasks.0.reward.function={path}:score",
                          "--accelerate-config", "multi_gpu", "--num-processes", "2", check=False)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("cppo: error:")]
    assert len(lines) == 1 and "[rank 1] reward function" in lines[0] and "reward server down" in lines[0]
    assert "Traceback" not in result.stderr and "ChildFailedError" not in result.stderr, result.stderr[-3000:]
    assert "cppo: launching 2 process(es)" in result.stderr
    assert not (tmp_path / "run").exists()
