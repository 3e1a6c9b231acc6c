"""M_t in fp32 on every launcher: DeepSpeed's fp32 master weights, started from M_{t-1} and gathered whole.

Under DeepSpeed with bf16 (the shipped ``accelerate_configs/deepspeed_zero3.yaml``) each process holds
the weights in bf16 and the optimiser an fp32 master copy. Two things would round M_t to bf16: DeepSpeed
builds the master from the bf16-cast weights, so it starts from M_{t-1} rounded to bf16, and its 16-bit
gather (``zero3_save_16bit_model``) saves the bf16 copies. DPO's updates (about 1e-6 a step at learning
rate 5e-7) are far below bf16's resolution (about 4e-5 for a weight of 0.01), so either rounds most of
them away. ``training.train_dpo`` therefore sets the master to M_{t-1}'s exact weights before the first
step (:class:`StartMasterFromCheckpoint`) and saves M_t from the master (:func:`gather_trained`), with
ZeRO-1/2/3 alike; without DeepSpeed the parameters are themselves fp32.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import TrainerCallback

log = logging.getLogger(__name__)


def checkpoint_tensors(model_dir: str) -> dict[str, Path]:
    """Each tensor name in ``model_dir``'s safetensors files, with the file holding it."""
    where = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(path, framework="pt") as handle:
            where.update(dict.fromkeys(handle.keys(), path))
    return where


class StartMasterFromCheckpoint(TrainerCallback):
    """Before the first step, set DeepSpeed's fp32 master of each trainable weight to its exact value in
    ``model_dir`` (M_{t-1}). Each process sets its own partition (no collective); tensors are read one at
    a time from the safetensors files, so no process holds a second whole model. For full fine-tuning
    only: LoRA's trainable weights are new adapters, its base weights frozen and saved from M_{t-1}."""

    def __init__(self, model_dir: str):
        self.model_dir = model_dir

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from deepspeed.utils import safe_set_full_fp32_param

        tensors = checkpoint_tensors(self.model_dir)
        unmatched = []
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            if name not in tensors:
                unmatched.append(name)
                continue
            with safe_open(tensors[name], framework="pt") as handle:
                exact = handle.get_tensor(name).to(param.device, torch.float32)
            if hasattr(param, "ds_id"):
                _set_zero3_master(param, exact)
            else:
                safe_set_full_fp32_param(param, exact)
        if unmatched:
            log.warning(
                "%d trainable weights are not stored under their own names in %s (e.g. %s): they start "
                "from their bf16-rounded values",
                len(unmatched),
                self.model_dir,
                unmatched[0],
            )


def _set_zero3_master(param, value: torch.Tensor) -> None:
    """Set this process's partition of a ZeRO-3 weight's fp32 master to its slice of ``value``.

    DeepSpeed's own setter (``set_full_hp_param``, 0.19) takes every partition to be whole, but the last
    one is padded when the weight's size does not divide by the number of processes, and reading its
    slice then runs past the weight's end; here the slice is cut at the end and the padding left alone."""
    optimizer = param._z3_optimizer
    partition, group = optimizer._get_fp32_opt_state_partition(param, release_swap_buffers=False)
    start = partition.numel() * optimizer._get_param_partition_rank(param)
    piece = value.flatten()[start : start + partition.numel()]
    partition.data[: piece.numel()].copy_(piece)
    if optimizer._swappable_optimizer_subgroup(group):  # offloaded to NVMe: written back there
        optimizer._optimizer_states_and_gradient_swap_out(group)


def gather_trained(trainer) -> dict[str, torch.Tensor] | None:
    """The trainable weights as trained, whole and in fp32, on the main process (None on the others).

    Every process must call this, as gathering a ZeRO-3 partition is a collective; under DeepSpeed the
    values come from its fp32 master, otherwise from the parameters themselves."""
    accelerator = trainer.accelerator
    if trainer.is_deepspeed_enabled:
        from deepspeed.utils import safe_get_full_fp32_param as full_fp32
    else:

        def full_fp32(param):
            return param

    weights = {}
    for name, param in accelerator.unwrap_model(trainer.model).named_parameters():  # tied ones once
        if not param.requires_grad:  # LoRA's base: M_{t-1}'s, unchanged; it has no master either
            continue
        # DeepSpeed keeps no master where it trains the parameters themselves (ZeRO-0 in fp32).
        full = full_fp32(param)
        if full is None:
            full = param
        if accelerator.is_main_process:
            weights[name] = full.detach().to("cpu", torch.float32).clone()
    return weights if accelerator.is_main_process else None


def apply_trained(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Put the gathered ``weights`` into ``model`` (M_{t-1} in fp32, wrapped in the same LoRA adapters
    when there were any); refused unless they are exactly its trainable weights."""
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    if trainable != set(weights):
        missing, extra = sorted(trainable - set(weights)), sorted(set(weights) - trainable)
        raise RuntimeError(
            f"the gathered weights do not match the model's trainable ones: missing {missing[:3]}, "
            f"unexpected {extra[:3]}"
        )
    model.load_state_dict(weights, strict=False)
