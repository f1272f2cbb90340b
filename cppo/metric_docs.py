"""Every key `cppo` logs, with its meaning and unit: docs/reference/metrics.md is generated from this table,
and a test checks that every key a run logs is in it. `<task>` stands for a task's name, `<kind>` for a
score kind of the evaluation matrix (`reward`, `rouge_l`), `<source>` for a reward source's name.

Where: `step` lines go to metrics.jsonl and the trackers (wandb, tensorboard) once per PPO step; `extra` keys go
to the trackers at a task's end (the rollout memory's build); `eval` keys to the trackers after each task;
`summary` keys to the trackers once, at the end of the run (summary.json holds the same values)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    key: str
    where: str  # step, extra, eval or summary
    unit: str
    meaning: str


_STEP = [
    ("step", "steps", "the global PPO step (over every task of the run)"),
    ("task", "name", "the task being trained"),
    ("task_step", "steps", "the step within the task"),
    ("reward/mean", "reward", "mean raw score of the step's rollouts (before clipping, normalisation and KL; "
                              "several sources: their weighted sum), over the global batch"),
    ("reward/std", "reward", "standard deviation of the raw scores over the global batch"),
    ("reward/score_mean", "reward", "mean score after the reward's clipping, normalisation and missing-EOS penalty"),
    ("reward/shaped_mean", "reward", "mean score less c_kl × the sequence KL: what the KL-shaped rewards add up to"),
    ("reward/<source>", "reward", "mean raw score of the reward source named <source> over the rollouts it scored "
                                  "(a task's reward is the weighted sum of its sources'; reward/mean is that sum's)"),
    ("kl/mean", "nats", "mean sequence KL of the rollouts to the KL reference (sum over response tokens); not "
                        "logged where no KL is measured before the update (ppo.kl_coef 0, or GRPO's KL as a loss "
                        "term on one on-policy update: loss/kl measures it)"),
    ("kl/coef", "coefficient", "the KL coefficient c_kl used this step (adaptive with ppo.target_kl)"),
    ("loss/policy", "loss", "the clipped policy loss (α-weighted with CPPO), mean over the step's updates"),
    ("loss/value", "loss", "the clipped value loss (with a critic)"),
    ("loss/kl", "loss", "GRPO's k3 KL term (ppo.kl_in: loss)"),
    ("loss/entropy", "loss", "token mean of the policy's entropy, the bonus of ppo.entropy_coef (enters the loss "
                             "as −entropy_coef × it)"),
    ("loss/kr", "loss", "CPPO's knowledge-retention term KR on the current rollouts"),
    ("loss/memory", "loss", "the rollout memory's term KR_mem (or its replay loss)"),
    ("loss/reg", "loss", "the continual baseline's penalty (L2, EWC, MAS, LwF)"),
    ("loss/total", "loss", "the whole minimised loss, coefficients applied"),
    ("policy/clipfrac", "fraction", "share of response tokens where the clipped branch of the policy loss is taken"),
    ("policy/approx_kl", "nats", "k3 estimate of KL(π_roll ‖ π_θ) per token over the updates"),
    ("policy/entropy", "nats", "mean entropy of the rollout policy per response token (from the training forward "
                               "when the rollout's own log-prob pass is skipped)"),
    ("policy/grad_norm", "norm", "total gradient norm before clipping, mean over the updates"),
    ("value/clipfrac", "fraction", "share of response tokens where the value loss takes the clipped branch"),
    ("response/length_mean", "tokens", "mean response length (up to and including the stop token)"),
    ("response/stopped_frac", "fraction", "share of responses that ended with a stop token"),
    ("response/tokens", "tokens", "response tokens of the step over every process"),
    ("lr", "learning rate", "the policy's learning rate after the step"),
    ("dynamic_sampling/rounds", "rounds", "rounds of sampling the step took (generation.dynamic_sampling)"),
    ("dynamic_sampling/filtered", "groups", "prompt groups drawn whose raw rewards all agreed, over the rounds"),
    ("dynamic_sampling/filled", "groups", "of them, groups that filled a batch still short after the last round"),
    ("cppo/frac_r1", "fraction", "share of the batch of type r1 (high-performance)"),
    ("cppo/frac_r2", "fraction", "share of type r2 (overfitting)"),
    ("cppo/frac_r3", "fraction", "share of type r3 (high-variance)"),
    ("cppo/frac_r4", "fraction", "share of type r4 (noisy)"),
    ("cppo/frac_r5", "fraction", "share of type r5 (normal)"),
    ("cppo/alpha_mean", "weight", "mean policy weight α over the batch"),
    ("cppo/alpha_std", "weight", "standard deviation of α"),
    ("cppo/beta_mean", "weight", "mean retention weight β over the batch"),
    ("cppo/beta_std", "weight", "standard deviation of β"),
    ("cppo/logprob_mu", "nats", "μ_ℓ: mean of the rollouts' mean token log-probs"),
    ("cppo/logprob_sigma", "nats", "σ_ℓ: their standard deviation"),
    ("cppo/reward_mu", "reward", "μ_R: mean of the rewards the types are drawn from"),
    ("cppo/reward_sigma", "reward", "σ_R: their standard deviation"),
    ("cppo/degenerate", "0 or 1", "1 when the batch is degenerate (every rollout type r5)"),
    ("memory/size", "entries", "entries the rollout memory holds"),
    ("memory/size/<task>", "entries", "entries of task <task> it holds"),
    ("memory/retrieved/<task>", "entries", "entries of task <task> drawn for this step"),
    ("memory/tokens", "tokens", "response tokens of the step's memory batch"),
    ("nonfinite/skipped_step", "0 or 1", "1 when the step was dropped for a non-finite value (ppo.on_nonfinite: skip)"),
    ("nonfinite/skipped_updates", "updates", "updates of the step dropped for a non-finite value"),
    ("vllm/logprob_diff_mean", "nats", "mean |log π_roll − log π_vllm| per response token: how far the engine's "
                                       "sampling log-probs are from the trainer's"),
    ("vllm/logprob_diff_max", "nats", "the largest such difference over the batch"),
    ("vllm/is_weight_mean", "weight", "mean truncated importance weight (vllm.importance_sampling_cap)"),
    ("vllm/load_s", "seconds", "loading the policy's weights into the vLLM engine"),
    ("time/step_s", "seconds", "the whole step"),
    ("time/generate_s", "seconds", "sampling the responses (loading the engine's weights included)"),
    ("time/train_s", "seconds", "the PPO epochs"),
    ("time/memory_retrieve_s", "seconds", "drawing the step's memory batch"),
    ("tokens_per_s", "tokens/s", "response tokens generated per second of the step"),
    ("perf/throughput", "tokens/s", "tokens of the step's sequences, prompt and response, over every process, per "
                                    "second of the step and per process (cppo.perf)"),
    ("perf/mfu", "fraction", "model FLOPs of the training update per second over the device's dense peak, where "
                             "the device is in cppo.perf.PEAK_TFLOPS (a GPU)"),
]
_EXTRA = [
    ("memory/built", "responses", "responses sampled for the memory at the end of a task"),
    ("memory/kept", "responses", "of them, kept by memory.select"),
    ("memory/kept_reward_mean", "reward", "mean reward of the kept responses"),
    ("memory/build_reward_mean", "reward", "mean reward of every response sampled for the memory"),
    ("memory/build_s", "seconds", "building the task's memory entries"),
    ("memory/evicted", "entries", "entries evicted to stay within memory.capacity"),
    ("memory/size", "entries", "entries the memory holds after the task"),
    ("memory/size/<task>", "entries", "entries of task <task> it holds after the task"),
]
_EVAL = [("eval/<task>/<kind>", "score", "the evaluation score of task <task> after the task just trained "
                                         "(a row of the matrix S)"),
         ("eval/<task>/reward/<source>", "score", "with several reward sources: source <source>'s mean raw score "
                                                  "on task <task>'s evaluation set")]
_SUMMARY = [(f"summary/<kind>/{name}", "score", meaning) for name, meaning in (
    ("final_average", "final average of S's last row"), ("forgetting", "forgetting (docs/algorithm.md §7)"),
    ("bwt", "backward transfer"), ("fwt", "forward transfer"), ("plasticity", "plasticity"))] + [
    (f"summary/reward/<source>/{name}", "score", f"{name} of the matrix of one reward source (several sources)")
    for name in ("final_average", "forgetting", "bwt", "fwt", "plasticity")]

METRICS = [Metric(key, where, unit, meaning) for where, rows in (("step", _STEP), ("extra", _EXTRA),
                                                                  ("eval", _EVAL), ("summary", _SUMMARY))
           for key, unit, meaning in rows]


def documented(key: str, where: str = "step") -> bool:
    """Whether `key`, as logged at `where`, is in the table (a task's name matching `<task>`, a kind `<kind>`)."""
    parts = key.split("/")
    for metric in METRICS:
        pattern = metric.key.split("/")
        if metric.where == where and len(pattern) == len(parts) and all(
                p == k or p in ("<task>", "<kind>", "<source>") for p, k in zip(pattern, parts, strict=True)):
            return True
    return False
