"""The engines behind the rollouts and the evaluation (cppo.engine, cppo.vllm_engine), as the Session builds
them. vLLM itself runs in its own suite (tests/test_vllm.py); here a stand-in for its `LLM` records what the
engine asks of it."""

import contextlib
import importlib.machinery
import sys
import types

import pytest
import torch
from conftest import TINY, quick_overrides

from cppo.config_loading import load_config
from cppo.engine import Decoding, HFEngine, SeedKey, request_seed
from cppo.errors import UserError
from cppo.session import open_session


class RecordingLLM:
    """vLLM's `LLM` as far as building the engine and shutting it down go."""

    built: list[dict] = []

    def __init__(self, **kwargs):
        RecordingLLM.built.append(kwargs)
        self.shutdowns = 0
        client = types.SimpleNamespace(_finalizer=self._shutdown)
        self.llm_engine = types.SimpleNamespace(engine_core=client)

    def _shutdown(self):
        self.shutdowns += 1


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    module.LLM = RecordingLLM
    RecordingLLM.built = []
    monkeypatch.setitem(sys.modules, "vllm", module)
    return RecordingLLM


def session_with(tmp_path, *overrides):
    return open_session(load_config(TINY, [*quick_overrides(tmp_path / "out"), *overrides]))


def test_with_mixed_precision_null_the_vllm_engine_computes_in_the_accelerate_configs_precision(
        tmp_path, monkeypatch, fake_vllm):
    # The accelerate config's precision reaches the processes as this variable (`accelerate launch`).
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    session = session_with(tmp_path, "generation.engine=vllm", "mixed_precision=null")
    assert session.backend.precision == "bf16"
    session.engine("generation")
    assert [built["dtype"] for built in fake_vllm.built] == ["bfloat16"]


@pytest.mark.parametrize(("precision", "vllm_dtype", "expected"), [
    ("no", "auto", "float32"), ("fp16", "auto", "float16"), ("bf16", "float32", "float32")])
def test_the_vllm_engine_takes_the_run_precision_unless_vllm_dtype_says(tmp_path, fake_vllm, precision, vllm_dtype,
                                                                        expected):
    session = session_with(tmp_path, "generation.engine=vllm", f"mixed_precision={precision}",
                           f"vllm.dtype={vllm_dtype}")
    session.engine("generation")
    assert fake_vllm.built[-1]["dtype"] == expected


def test_one_vllm_engine_serves_rollouts_and_evaluation_and_is_shut_down_once(tmp_path, fake_vllm):
    session = session_with(tmp_path, "generation.engine=vllm", "eval.engine=vllm")
    rollout, evaluation = session.engine("generation"), session.engine("eval")
    assert rollout is evaluation and len(fake_vllm.built) == 1
    assert rollout.holds == session.initial_policy  # built from π_0: the first evaluation needs no load
    session.close()
    assert rollout.llm.shutdowns == 1 and not session.engines


def test_hf_engines_chunk_rollouts_by_generation_batch_size_and_evaluation_by_its_own(tmp_path):
    session = session_with(tmp_path, "generation.batch_size=2")
    rollout, evaluation = session.engine("generation"), session.engine("eval")
    assert isinstance(rollout, HFEngine) and isinstance(evaluation, HFEngine) and rollout is not evaluation
    assert (rollout.batch_size, evaluation.batch_size) == (2, None) and rollout.holds is None


def test_a_decoding_vllm_cannot_apply_is_one_line_naming_the_field(tmp_path, fake_vllm):
    session = session_with(tmp_path, "eval.engine=vllm")
    engine = session.engine("eval")
    assert engine.decoding({"do_sample": True, "top_k": 5}, 8, "eval.engine").settings == {"do_sample": True,
                                                                                            "top_k": 5}
    with pytest.raises(UserError, match=r"^eval.engine: vllm cannot decode with the generation setting\(s\) "
                                        r"min_p, no_repeat_ngram_size; use eval.engine: hf$"):
        engine.decoding({"do_sample": True, "no_repeat_ngram_size": 3, "min_p": 0.1}, 8, "eval.engine")


def test_the_hf_engine_samples_from_the_loaded_policy_and_stops_at_the_stop_token(tmp_path):
    session = session_with(tmp_path)
    from cppo.models import load_policy

    policy = load_policy(session.initial_policy, session.config.model, session.tokenizer.pad_token_id).eval()
    eos = session.tokenizer.eos_token_id
    engine = HFEngine(torch.device("cpu"), contextlib.nullcontext, None, [eos], session.tokenizer.pad_token_id)
    engine.load(policy)
    prompts = [session.tokenizer("hello there")["input_ids"], session.tokenizer("a b")["input_ids"]]
    key = SeedKey.contiguous(0, "rollout", 0, 0, 2)
    greedy = engine.generate(prompts, Decoding(6, {"do_sample": False}), key)
    again = engine.generate(prompts, Decoding(6, {"do_sample": False}), key)
    assert torch.equal(greedy.response_ids, again.response_ids) and greedy.logprobs is None
    assert greedy.response_ids.shape == (2, greedy.response_mask.shape[1]) and greedy.response_mask.shape[1] <= 6
    for row in range(2):
        n = int(greedy.response_mask[row].sum())
        assert bool(greedy.stopped[row]) == (greedy.response_ids[row, n - 1].item() == eos)
        assert (greedy.response_ids[row, n:] == session.tokenizer.pad_token_id).all()
    engine.release()
    assert engine.policy is None


def test_seed_keys_seed_each_response_by_its_global_row():
    key = SeedKey(3, "eval/sky", 0, (4, 6, 8))
    assert key.seeds() == [request_seed(3, "eval/sky", 0, row) for row in (4, 6, 8)]
    assert SeedKey.contiguous(3, "rollout", 2, 10, 3).rows == (10, 11, 12)
    assert len({request_seed(0, "rollout", step, row) for step in range(50) for row in range(64)}) == 50 * 64
