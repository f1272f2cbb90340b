"""Back ends: single process, DDP, DeepSpeed ZeRO-2 / ZeRO-3 and FSDP2, all through accelerate.

Every difference between them lives here, behind the names the loop calls: `prepare` (wrap the
trainable policy + critic and the optimiser), `whole` (the models with whole weights, for rollouts,
evaluation and saving: gathered once, so that every process makes the same collective calls however
long its generations run), `backward` / `step_unless` (gradient accumulation and the update),
`whole_on_every_process` (frozen models: reference, π_{t−1}, reward, evaluation are loaded whole on
every process), and `save_training_state` / `load_training_state` (every process's shard of a checkpoint).

The back end comes from the accelerate config (`accelerate launch --config_file ...`). One that does
not take effect is an error, never a silent fallback to DDP.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from safetensors.torch import load_file, save_file

from .config import Config
from .errors import UserError

# Test-only: accelerate runs DeepSpeed and FSDP on GPUs only (on a CPU it silently runs DDP). With this
# set, a CPU launch with a DeepSpeed/FSDP accelerate config builds that back end on gloo, so that the
# back ends' code paths can be tested on machines without GPUs. Never set it for real runs.
FORCE_ON_CPU_ENV = "CPPO_TEST_FORCE_BACKEND_ON_CPU"


def requested_backend() -> str:
    """The back end the accelerate launch asks for (its config reaches the processes as environment)."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return f"deepspeed-zero{os.environ.get('ACCELERATE_DEEPSPEED_ZERO_STAGE', '2')}"
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return f"fsdp{os.environ.get('FSDP_VERSION', '1')}"
    return "ddp" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "single"


def tell_deepspeed_the_device() -> None:
    """DeepSpeed, when installed, is imported by transformers and accelerate to unwrap or save any model; at import it
    guesses the device and, finding no GPU, prints that it falls back to the CPU. Without a GPU it is told so
    first (a run that asks for a DeepSpeed back end on a CPU is refused in `make_accelerator` anyway)."""
    if not torch.accelerator.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def make_accelerator(config: Config) -> Accelerator:
    """The run's Accelerator, on the back end asked for, or a one-line error."""
    cpu = not torch.accelerator.is_available()
    requested = requested_backend()
    sharded = requested.startswith(("deepspeed", "fsdp"))
    forced = cpu and sharded and os.environ.get(FORCE_ON_CPU_ENV) == "1"
    if sharded and requested not in ("deepspeed-zero2", "deepspeed-zero3", "fsdp2"):
        raise UserError(f"accelerate config: back end {requested} is not supported; use DeepSpeed zero_stage 2 or 3, "
                        "or FSDP with fsdp_version 2 (configs/accelerate/)")
    if sharded and cpu and not forced:
        raise UserError(f"accelerate config: {requested} needs GPUs and none is visible (accelerate would silently run "
                        "plain DDP instead); run on GPUs, or use configs/accelerate/multi_gpu.yaml")
    if requested == "fsdp2" and os.environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING", "false").lower() == "true":
        # transformers would then load every model (frozen ones too) on the meta device outside rank 0.
        raise UserError("accelerate config: fsdp_cpu_ram_efficient_loading true leaves every model but rank 0's empty "
                        "at load time, the frozen reference and reward models too; set it to false "
                        "(configs/accelerate/fsdp2.yaml)")
    if requested.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        raise UserError(f"accelerate config: {requested} needs DeepSpeed, which is not installed: "
                        'DS_BUILD_OPS=0 pip install --no-build-isolation "cppo[deepspeed]"')
    # mixed_precision null: accelerate's own setting (its config file or --mixed_precision) applies.
    accelerator = Accelerator(cpu=cpu, mixed_precision=config.mixed_precision,
                              log_with=config.report_to or None, project_dir=config.output_dir)
    if forced:
        _force_on_cpu(accelerator, requested)
    effective = backend_name(accelerator)
    if sharded and effective != requested:
        raise UserError(f"accelerate config asks for {requested} but accelerate set up {effective}; check the "
                        "accelerate config and the installed DeepSpeed / torch")
    return accelerator


def _force_on_cpu(accelerator: Accelerator, requested: str) -> None:
    """Switch a CPU (gloo) accelerator to the requested sharded back end (FORCE_ON_CPU_ENV)."""
    from accelerate.state import PartialState
    from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin

    state = accelerator.state
    precision = state.mixed_precision
    if requested.startswith("deepspeed"):
        plugin = DeepSpeedPlugin()
        plugin.set_mixed_precision(precision)
        plugin.select(_from_accelerator_state=True)
        state.deepspeed_plugins = plugin
        kind = DistributedType.DEEPSPEED
        state._mixed_precision = "no"  # DeepSpeed casts itself, from its config
        accelerator.deepspeed_engine_wrapped = None
    else:
        plugin = FullyShardedDataParallelPlugin()
        if precision != "no":
            plugin.set_mixed_precision(precision)
        state.fsdp_plugin = plugin
        kind = DistributedType.FSDP
    # Every new AcceleratorState() copies the process state's type over its own: both change.
    state.distributed_type = PartialState().distributed_type = kind


@contextlib.contextmanager
def whole_on_every_process():
    """Around loading a frozen model (reference, π_{t−1}, reward, evaluation): whole on every process.
    Under ZeRO-3 transformers would partition it at `from_pretrained`, and a bare forward on partitioned
    weights fails."""
    from transformers.integrations import deepspeed as hf_deepspeed

    if not hf_deepspeed.is_deepspeed_zero3_enabled():
        yield
        return
    # accelerate's zero3_init_context_manager(enable=False) leaves transformers' ZeRO-3 switch on (it reads
    # the stage from the config): the switch itself is cleared and put back.
    switch = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = switch


def backend_name(accelerator: Accelerator) -> str:
    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        return f"deepspeed-zero{accelerator.state.deepspeed_plugin.zero_stage}"
    if kind == DistributedType.FSDP:
        return f"fsdp{accelerator.state.fsdp_plugin.fsdp_version}"
    return "single" if accelerator.num_processes == 1 else "ddp"


class Backend:
    """The back end of one run (see the module docstring)."""

    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator
        self.name = backend_name(accelerator)
        self.deepspeed = self.name.startswith("deepspeed")
        self.zero3 = self.name == "deepspeed-zero3"
        self.fsdp2 = self.name == "fsdp2"
        # Whether each process holds only a shard of the trainable weights between rollouts.
        self.sharded_weights = self.zero3 or self.fsdp2
        self.precision = self._precision()

    def _precision(self) -> str:
        if self.deepspeed:  # DeepSpeed casts from its own config, not through accelerate's autocast
            ds = self.accelerator.state.deepspeed_plugin.deepspeed_config
            return next((kind for kind in ("bf16", "fp16") if ds.get(kind, {}).get("enabled") is True), "no")
        return self.accelerator.mixed_precision

    def describe(self, config: Config) -> dict:
        """What the run actually runs on: printed at start and saved with the run."""
        acc, pcfg = self.accelerator, config.ppo
        mini = pcfg.mini_batch_size // acc.num_processes
        return {"backend": self.name, "processes": acc.num_processes, "device": str(acc.device.type),
                "mixed_precision": self.precision, "weights_dtype": config.model.dtype,
                "rollouts_per_process": pcfg.rollout_batch_size // acc.num_processes,
                "mini_batch_per_process": mini,
                "micro_batch_per_process": mini // pcfg.gradient_accumulation_steps,
                "gradient_accumulation_steps": pcfg.gradient_accumulation_steps}

    # ------------------------------------------------------------------ global (all-process) batches

    def gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """This process's rows → the global batch (every process's rows in rank order, columns padded
        with zeros to the widest). Every batch-level statistic is taken on this."""
        if self.accelerator.num_processes == 1:
            return x
        if x.dim() > 1:
            x = self.accelerator.pad_across_processes(x, dim=1, pad_index=0)
        return self.accelerator.gather(x)

    def local_rows(self, global_x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """This process's slice of a gathered tensor, cut back to the local shape of `like`."""
        rows = like.shape[0]
        start = self.accelerator.process_index * rows
        out = global_x[start:start + rows]
        return out[:, :like.shape[1]] if like.dim() > 1 else out

    # ---------------------------------------------------------------------------------- wrapping

    def place_frozen(self, model: torch.nn.Module) -> torch.nn.Module:
        """A frozen policy (reference, π_{t−1}, the initial model evaluated), whole on this process's device,
        computing as the trained policy does: DeepSpeed and FSDP2 run bf16 / fp16 on weights in that dtype
        (not through autocast), so the frozen copy takes it too; else the first step's KL to an identical
        reference would be rounding, not 0."""
        if self.deepspeed or self.fsdp2:
            dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
            if dtype is not None:
                model = model.to(dtype)  # before the move: the device never holds the float32 copy
        return model.to(self.accelerator.device)

    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: Config):
        """Wrap policy + critic and the optimiser for the back end. The learning-rate schedule stays ours
        (built on the plain optimiser: DeepSpeed's optimiser is not a torch one)."""
        acc, pcfg = self.accelerator, config.ppo
        model.sharded_weights = self.sharded_weights  # its training forward shares no prompt (ActorCritic)
        if self.deepspeed:
            ds = acc.state.deepspeed_plugin.deepspeed_config
            # cppo feeds the engine its own micro-batches: no dataloader to take the sizes from.
            micro = pcfg.mini_batch_size // acc.num_processes // pcfg.gradient_accumulation_steps
            ds["train_micro_batch_size_per_gpu"] = micro
            ds["gradient_accumulation_steps"] = pcfg.gradient_accumulation_steps
            ds["train_batch_size"] = micro * pcfg.gradient_accumulation_steps * acc.num_processes
            ds["gradient_clipping"] = pcfg.max_grad_norm or 0.0
            ds.setdefault("zero_allow_untested_optimizer", True)
            if self.zero3:
                ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
        if self.fsdp2 and acc.num_processes > 1:
            # fully_shard keeps each process's own slice of its own weights: weights initialised at load time
            # (LoRA adapters, a new value head) must first be the same everywhere, as DDP and DeepSpeed make them.
            with torch.no_grad():
                for tensor in [*model.parameters(), *model.buffers()]:
                    torch.distributed.broadcast(tensor.data, src=0)
        return acc.prepare(model, optimizer)

    # ------------------------------------------------------------------------------- whole weights

    @contextlib.contextmanager
    def whole(self, model: torch.nn.Module):
        """The unwrapped policy + critic with whole weights on every process, for forward passes that are
        not the training forward (generation, log-probs, values, evaluation, importance, saving).

        ZeRO-3 and FSDP2 gather every weight once here (as TRL does for ZeRO-3 generation), so the passes
        inside make no collective calls: processes may generate different lengths and numbers of batches.
        Every process must enter it together.
        """
        acc = self.accelerator
        unwrapped = acc.unwrap_model(model)
        if self.zero3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(model.parameters())):
                _remove_zero3_hooks(model)
                try:
                    yield unwrapped
                finally:
                    _add_zero3_hooks(model)
        elif self.fsdp2:
            from torch.distributed.fsdp import FSDPModule

            # The root decides its units' state at its first forward; a first forward through a sub-module
            # would make that one the root. Settled here, before any bare forward.
            model._get_fsdp_state()._lazy_init()
            units = [m for m in model.modules() if isinstance(m, FSDPModule)]
            for unit in units:
                unit.unshard()
                # Its own hooks would reshard it after each forward and gather it again for the next: a
                # collective per token. Kept whole until the end instead.
                unit.set_reshard_after_forward(False, recurse=False)
            try:
                yield unwrapped
            finally:
                for unit in units:
                    unit.reshard()
                    unit.set_reshard_after_forward(True, recurse=False)
        else:
            yield unwrapped

    @contextlib.contextmanager
    def whole_on_main(self, model: torch.nn.Module):
        """The unwrapped policy + critic with whole weights, plain tensors in its state_dict, on the main
        process (None on the others): for saving. Every process must enter it together."""
        if not self.fsdp2:
            with self.whole(model) as unwrapped:
                yield unwrapped if self.accelerator.is_main_process else None
            return
        # FSDP2's state_dict() gives shards (DTensors) even when unsharded: the whole state dict is
        # gathered to the main process and loaded into a CPU copy of the models built without weights.
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.accelerator.is_main_process:
            yield None
            return
        yield _cpu_copy(self.accelerator.unwrap_model(model), state)

    def release(self) -> None:
        """After a stage: accelerate forgets the stage's model and optimiser (and DeepSpeed its engine), so
        that the next task's are prepared afresh and nothing looks up the old ones."""
        self.accelerator.free_memory()

    # ------------------------------------------------------------------------------------ update

    def no_sync(self, model: torch.nn.Module, last_micro: bool):
        """Around one micro-batch's forward and backward: gradients are reduced on the last one only."""
        if self.deepspeed:
            model.set_gradient_accumulation_boundary(last_micro)
            return contextlib.nullcontext()
        return contextlib.nullcontext() if last_micro else self.accelerator.no_sync(model)

    def backward(self, model: torch.nn.Module, loss: torch.Tensor) -> None:
        """The loss is already the micro-batch's share of the mini-batch loss: no further division by
        the number of micro-batches (DeepSpeed's default), and no step inside backward (accelerate's)."""
        if self.deepspeed:
            model.backward(loss, scale_wrt_gas=False)
        else:
            self.accelerator.backward(loss)

    def step_unless(self, model: torch.nn.Module, optimizer, max_norm: float | None,
                    fault_of: Callable[[torch.Tensor | None], str | None]) -> tuple[torch.Tensor, str | None]:
        """The optimiser step on the accumulated gradients, clipped to `max_norm` when set, unless
        `fault_of(grad_norm)` names a non-finite value. Returns (the gradient norm before clipping, the fault or
        None). DeepSpeed's engine clips inside its own step, so its norm is known only after it: `fault_of`
        gets None there, and the norm is the engine's (NaN when no step was taken)."""
        if self.deepspeed:
            fault = fault_of(None)
            if fault is None:
                model.step()
            norm = None if fault is not None else model.get_global_grad_norm()
            return torch.as_tensor(float("nan") if norm is None else float(norm)), fault
        norm = self.grad_norm(model, max_norm)
        fault = fault_of(norm)
        if fault is None:
            self.optimizer_step(optimizer)
        return norm, fault

    def grad_norm(self, model: torch.nn.Module, max_norm: float | None) -> torch.Tensor:
        """The total gradient norm, the gradients clipped to `max_norm` when set (not under DeepSpeed)."""
        acc = self.accelerator
        if max_norm or self.fsdp2:
            norm = acc.clip_grad_norm_(model.parameters(), max_norm or math.inf)
            return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        acc.unscale_gradients()  # fp16: the loss scale out of the gradients, as clipping would do
        return torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])

    @property
    def can_skip_update(self) -> bool:
        """Whether an update can be dropped after its backward (DeepSpeed reduces gradients into its own
        buffers at the boundary; dropping them there is not supported)."""
        return not self.deepspeed

    def optimizer_step(self, optimizer) -> None:
        """The step itself (not under DeepSpeed, whose engine steps)."""
        optimizer.step()

    # --------------------------------------------------------------------------------- checkpoints

    def save_training_state(self, directory: Path, model: torch.nn.Module, optimizer) -> None:
        """Every process writes its shard of the trainable weights and the optimiser into `directory`
        (the checkpoint's staging directory, on a filesystem every process sees)."""
        if self.deepspeed:
            model.save_checkpoint(str(directory), tag="deepspeed", save_latest=False)
        elif self.fsdp2:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict

            model_state, optimizer_state = get_state_dict(model, optimizer)
            dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=directory / "fsdp")
        else:
            if self.accelerator.is_main_process:
                trainable = {name: p.detach().cpu().contiguous()
                             for name, p in self.accelerator.unwrap_model(model).named_parameters() if p.requires_grad}
                save_file(trainable, directory / "trainable.safetensors")
                torch.save(optimizer.state_dict(), directory / "optimizer.pt")

    def load_training_state(self, directory: Path, model: torch.nn.Module, optimizer) -> None:
        part = "deepspeed" if self.deepspeed else "fsdp" if self.fsdp2 else "trainable.safetensors"
        if not (directory / part).exists():
            raise UserError(f"checkpoint {directory} was not written by the {self.name} back end (no {part}); resume "
                            "with the accelerate config that wrote it")
        if self.deepspeed:
            model.load_checkpoint(str(directory), tag="deepspeed", load_optimizer_states=True,
                                  load_lr_scheduler_states=False)
        elif self.fsdp2:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

            model_state, optimizer_state = get_state_dict(model, optimizer)
            state = {"model": model_state, "optimizer": optimizer_state}
            dcp.load(state, checkpoint_id=directory / "fsdp")
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        else:
            weights = load_file(directory / "trainable.safetensors")
            with torch.no_grad():
                for name, p in self.accelerator.unwrap_model(model).named_parameters():
                    if p.requires_grad:
                        p.copy_(weights[name])
            # A CPU process of a multi-process launch has device cpu:<rank>, which torch.load cannot map to.
            device = self.accelerator.device
            device = "cpu" if device.type == "cpu" else device
            optimizer.load_state_dict(torch.load(directory / "optimizer.pt", map_location=device, weights_only=False))


def _cpu_copy(model: torch.nn.Module, state: dict) -> torch.nn.Module:
    """policy + critic (an ActorCritic, LoRA adapters included; no critic for docs/algorithm.md §9's estimators) rebuilt
    on the CPU from `state`."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from .modules import ActorCritic

    policy, value_model = model.policy, model.value_model

    def empty_like(original, auto_class):
        lora = getattr(original, "peft_config", None)
        built = auto_class.from_config(original.get_base_model().config if lora else original.config)
        if lora:
            from peft import get_peft_model

            built = get_peft_model(built, lora["default"])
        return built

    with torch.device("meta"):
        copy = ActorCritic(empty_like(policy, AutoModelForCausalLM), None if value_model is None else
                           empty_like(value_model, AutoModelForSequenceClassification), model.share_prompts)
    copy.load_state_dict(state, assign=True)
    for new, old in ((copy.policy, policy), (copy.value_model, value_model)):
        if new is None:
            continue
        new.tie_weights()  # assign=True replaced tied parameters one by one
        if getattr(old, "generation_config", None) is not None:
            new.generation_config = old.generation_config
    for name, buffer in list(copy.named_buffers()):  # non-persistent buffers are not in a state dict
        if buffer.is_meta:
            original = model.get_buffer(name)
            owner, _, leaf = name.rpartition(".")
            copy.get_submodule(owner).register_buffer(leaf, original.detach().cpu().clone(), persistent=False)
    return copy


def _zero3_offload(engine):
    optimizer = engine.optimizer
    return getattr(optimizer, "parameter_offload", optimizer)


def _remove_zero3_hooks(engine) -> None:
    """ZeRO-3 fetches and releases each sub-module's weights in hooks around its forward; with every
    weight gathered, they would release them after the first layer."""
    offload = _zero3_offload(engine)
    for param in offload.module.parameters(recurse=True):
        param.ds_active_sub_modules.clear()
    for hook in [*offload.forward_hooks, *offload.backward_hooks]:
        hook.remove()
    offload.forward_hooks, offload.backward_hooks = [], []


def _add_zero3_hooks(engine) -> None:
    offload = _zero3_offload(engine)
    coordinator = getattr(offload, "param_coordinator", None)
    if coordinator is not None and not coordinator.is_invalid_trace():
        coordinator._invalidate_trace()  # the passes above were not the training forward it recorded
    offload._register_deepspeed_module(offload.module)
