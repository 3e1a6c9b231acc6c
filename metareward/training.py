"""One DPO iteration: train M_t from M_{t-1} on preference pairs with TRL.

This is the only module that imports ``trl`` (so TRL's version drift stays in one file, slightly over 400
lines). The run's engines (:mod:`metareward.engines`) call::

    result = train_dpo(str(prev_model_dir), pair_rows, cfg.train.dpo, next_model_dir, seed=cfg.seed,
                       on_log=lambda row: ...)

``pair_rows`` are TRL conversational preference rows (``prompt`` / ``chosen`` / ``rejected`` message
lists, plus provenance keys that are dropped here). The reference policy is M_{t-1} itself, the
directory being trained from. ``out_dir`` receives a plain, full (LoRA-merged) safetensors model
with its tokenizer and chat template, written atomically; the returned dict (TRL's log history,
pair count, optimiser steps, seconds per step) is JSON-serialisable and saved beside the model as
``training_log.json``. ``on_log`` receives each optimiser step's row as it is logged (see
:func:`step_rows`, which gives the same rows from a finished training log).

Across GPUs (``train.launcher=accelerate``) they call :func:`launch_dpo` instead, which writes
the pairs and settings into a job directory and runs this module under ``accelerate launch``
(``CONFIG``: ``train.accelerate_config``, by default ``metareward/accelerate_configs/deepspeed_zero3.yaml``)::

    accelerate launch --config_file CONFIG -m metareward.training JOB_DIR

With ``cluster=ray`` the same job directory (:func:`write_job`) is run by Ray Train's workers
(``engines.cluster.train_job``), each calling :func:`run_job`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from transformers.integrations.deepspeed import unset_hf_deepspeed_config
from trl import DPOConfig, DPOTrainer

from metareward.compute.hardware import bf16_is_native
from metareward.compute.master_weights import StartMasterFromCheckpoint, apply_trained, gather_trained
from metareward.config import DEFAULT_ACCELERATE_CONFIG, DPOSettings, FineTuning
from metareward.report.tracking import flatten
from metareward.store import faults, layout, records
from metareward.store.layout import TRAINING_LOG

PAIR_KEYS = ("prompt", "chosen", "rejected")


@contextlib.contextmanager
def _completions_only_on_cpu() -> Iterator[None]:
    """While our trainer is built and trained, let TRL's fused LM head score only completion positions
    on CPU too.

    TRL (1.16, ``trl.trainer.utils``) projects only the completion positions where Triton runs and
    every position (prompt and padding too) elsewhere, to keep tile shapes fixed for compilers we do
    not use; on CPU that is about a quarter of a DPO step for nothing, with the same results. It
    decides through the module global ``_use_triton``, looked up on each forward, so the only switch
    is that global: replaced here for the trainer's lifetime (the reference log-probs are precomputed
    when it is built) and restored afterwards, whatever happens, so nothing else in the process sees it.
    """
    import trl.trainer.utils as trl_utils

    original = getattr(trl_utils, "_use_triton", None)
    if original is None:  # a TRL without this switch: nothing to do
        yield
        return

    def use_compact(device: torch.device) -> bool:
        return device.type == "cpu" or original(device)

    trl_utils._use_triton = use_compact
    try:
        yield
    finally:
        trl_utils._use_triton = original


def launched_with_deepspeed() -> bool:
    """Whether this process is one of a DeepSpeed training job (``accelerate launch`` with a DeepSpeed
    config, or a Ray Train worker given its settings)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"


def _dpo_config(
    settings: DPOSettings, work_dir: Path, seed: int, report_to: str, trust_remote_code: bool
) -> DPOConfig:
    on_gpu = torch.cuda.is_available()
    # DeepSpeed also runs on CPU processes (its CPU accelerator, over gloo); use_cpu would have
    # accelerate run them as plain multi-CPU processes, without DeepSpeed.
    with_deepspeed = launched_with_deepspeed()
    deepspeed_on_cpu = not on_gpu and with_deepspeed
    bf16 = autocasts_bf16(settings)
    if with_deepspeed:
        # The accelerate config's mixed_precision (bf16 in the shipped ZeRO-3 one) reaches DeepSpeed's
        # config through this variable, and DeepSpeed refuses a trainer whose bf16 differs from it:
        # train.dpo.precision decides, as on every other launcher.
        os.environ["ACCELERATE_MIXED_PRECISION"] = "bf16" if bf16 else "no"
    # Gradient checkpointing is `activation_checkpointing` from transformers 5.21 on (TRL defaults it
    # to on; we follow our settings); transformers 5.20, which vLLM 0.33 pins, has the older name.
    names = {f.name for f in dataclasses.fields(DPOConfig)}
    checkpointing = (
        "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    )
    # DPO's own options, passed through here only: RPO is TRL's "sft" term added at weight rpo_alpha.
    losses = [settings.loss_type] + (["sft"] if settings.rpo_alpha is not None else [])
    weights = [1.0, settings.rpo_alpha] if settings.rpo_alpha is not None else None
    config = DPOConfig(
        **{checkpointing: settings.gradient_checkpointing},
        output_dir=str(work_dir),
        beta=settings.beta,
        loss_type=losses,
        loss_weights=weights,
        label_smoothing=settings.label_smoothing,
        weight_decay=settings.weight_decay,
        max_grad_norm=settings.max_grad_norm,
        learning_rate=settings.learning_rate,
        num_train_epochs=settings.num_epochs,
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        max_length=settings.max_length,
        # transformers 5 has no warmup_ratio: a float in [0, 1) passed as warmup_steps is the ratio.
        warmup_steps=settings.warmup_ratio,
        lr_scheduler_type=settings.lr_scheduler_type,
        precompute_ref_log_probs=settings.precompute_ref_log_probs,
        seed=seed,
        trust_remote_code=trust_remote_code,
        logging_steps=1,
        save_strategy="no",
        report_to=report_to,
        push_to_hub=False,
        dataloader_num_workers=0,
        use_cpu=not on_gpu and not deepspeed_on_cpu,
        ddp_backend="gloo" if deepspeed_on_cpu else None,
        bf16=bf16 and not deepspeed_on_cpu,
    )
    if deepspeed_on_cpu:
        # TrainingArguments refuses bf16 off the GPU unless use_cpu; DeepSpeed needs it to match its own.
        config.bf16 = bf16
    return config


def autocasts_bf16(settings: FineTuning) -> bool:
    """Whether training autocasts to bf16 (TRL's default is yes, which is slow where bf16 is emulated)."""
    if settings.precision != "auto":
        return settings.precision == "bf16"
    return bf16_is_native(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def lora_config(settings: FineTuning):
    from peft import LoraConfig

    return LoraConfig(
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        # "all-linear" leaves out the LM head, which TRL refuses to put an adapter on.
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )


class _KillPoint(TrainerCallback):
    """The ``train_step`` kill point after each optimiser step, for fault-injection tests (faults.py)."""

    def on_step_end(self, args, state, control, **kwargs):
        faults.point("train_step")


class _StepClock(TrainerCallback):
    """Wall seconds of each optimiser step, from the end of the one before (the first from the start
    of training, so it includes what the first step sets up: optimiser state, gradient buffers)."""

    def __init__(self):
        self.seconds: list[float] = []
        self._last = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self._last = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        self.seconds.append(round(now - self._last, 4))
        self._last = now


def _step_row(entry: dict, step_seconds: list[float]) -> dict:
    row = dict(flatten(entry))
    step = int(entry["step"])
    row["step"] = step
    if 0 < step <= len(step_seconds):
        row["step_seconds"] = step_seconds[step - 1]
    return row


def step_rows(log: dict) -> list[dict]:
    """One row per optimiser step of a training log (:func:`train_dpo`'s result, ``training_log.json``):
    TRL's numbers for the step (``loss``, ``rewards/margins``, ...), ``step`` (1.. within this
    training) and ``step_seconds``; the rows ``on_log`` received while it trained."""
    seconds = log.get("step_seconds", [])
    return [_step_row(entry, seconds) for entry in log.get("log_history", []) if "loss" in entry]


class _OnLog(TrainerCallback):
    """Hands each optimiser step's row to ``on_log`` as TRL logs it, on the main process only
    (the end-of-training summary row, with ``train_runtime``, is not a step and is left out)."""

    def __init__(self, forward: Callable[[dict], None], clock: _StepClock):
        self.forward = forward
        self.clock = clock

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs and "loss" in logs and state.log_history:
            self.forward(_step_row(state.log_history[-1], self.clock.seconds))


def save_atomically(model, tokenizer, out_dir: Path, log: dict) -> None:
    """Write into a sibling temp dir, flush it to disk, then rename it into place: a killed run leaves no
    half model, and one stopped by Ctrl-C or a full disk not even the temp dir."""
    tmp = out_dir.parent / (out_dir.name + ".tmp")
    if tmp.exists():  # left by a run killed while saving
        shutil.rmtree(tmp)
    try:
        tmp.parent.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(tmp)
        faults.point("save_model")
        tokenizer.save_pretrained(tmp)
        (tmp / TRAINING_LOG).write_text(json.dumps(log, indent=2))
        records.share_tree(tmp)
        records.fsync_tree(tmp)
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(error, Exception) and records.is_no_space(error):  # safetensors' error is no OSError
            weights = sum(p.numel() * p.element_size() for p in model.parameters())
            raise records.NoSpace(out_dir, weights) from None
        raise
    if out_dir.exists():  # os.replace cannot replace a non-empty directory
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    records.fsync_dir(out_dir.parent)


def _save_gathered(
    trainer, model_dir: str, tokenizer, settings: DPOSettings, out_dir: Path, log: dict
) -> None:
    """Save from several processes (DDP, or DeepSpeed, which holds bf16 copies and shards them with
    ZeRO-3): every process takes part in gathering the trained weights in fp32
    (:func:`~metareward.compute.master_weights.gather_trained`); the main process puts them into M_{t-1}
    loaded in fp32 (LoRA: into its adapters, then merged) and writes the plain model atomically."""
    weights = gather_trained(trainer)
    if trainer.accelerator.is_main_process:
        # Loading while the trainer's DeepSpeed config is registered would partition the model
        # (zero.Init), a collective the other processes, waiting below, never join.
        unset_hf_deepspeed_config()
        model = AutoModelForCausalLM.from_pretrained(
            model_dir,
            dtype=torch.float32,
            trust_remote_code=trainer.args.trust_remote_code,
            use_safetensors=True,
        )
        if settings.use_lora:
            from peft import get_peft_model

            model = get_peft_model(model, lora_config(settings))
        apply_trained(model, weights)
        if settings.use_lora:
            model = model.merge_and_unload()
        save_atomically(model, tokenizer, out_dir, log)
    trainer.accelerator.wait_for_everyone()


def train_dpo(
    model_dir: str,
    rows: list[dict],
    settings: DPOSettings,
    out_dir: Path,
    *,
    seed: int,
    trust_remote_code: bool = False,
    work_dir: Path | None = None,
    report_to: str = "none",
    on_log: Callable[[dict], None] | None = None,
) -> dict:
    """DPO-train ``model_dir`` on ``rows`` with itself as the reference; save the result to ``out_dir``.

    ``on_log``, if given, is called on the main process with each optimiser step's row (see
    :func:`step_rows`) right after TRL logs it. ``report_to`` stays "none" for metareward runs: their
    W&B run gets these rows through ``on_log`` and the tracker, so TRL starts no run of its own."""
    if not rows:
        raise ValueError("train_dpo needs at least one preference pair; rows is empty")
    # Provenance columns (ids, scores) would be carried through TRL's dataset maps, and mixed types
    # in them can break Arrow; only the three pair columns are training data.
    dataset = Dataset.from_list([{key: row[key] for key in PAIR_KEYS} for row in rows])

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # fp32 master weights even on GPU: bf16 weights would round away updates at DPO learning rates
    # (~5e-7); DPOConfig.bf16 autocasts the compute instead.
    # Weights only from safetensors: a pickled checkpoint can run code when it is loaded. The frozen
    # reference TRL loads from the same directory then finds the same safetensors file.
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, trust_remote_code=trust_remote_code, use_safetensors=True
    )
    peft_config = lora_config(settings) if settings.use_lora else None

    with tempfile.TemporaryDirectory(prefix="metareward-dpo-") as default_work_dir:
        args = _dpo_config(settings, Path(work_dir or default_work_dir), seed, report_to, trust_remote_code)
        # ref_model=None: without LoRA, TRL loads a frozen copy of model.config._name_or_path (= model_dir,
        # i.e. M_{t-1}); with LoRA it disables the adapter, which is again M_{t-1}. With
        # precompute_ref_log_probs it scores the pairs with the untrained policy before step one.
        clock = _StepClock()
        callbacks = [_KillPoint(), clock] + ([_OnLog(on_log, clock)] if on_log is not None else [])
        if launched_with_deepspeed() and not settings.use_lora:
            callbacks.append(StartMasterFromCheckpoint(model_dir))
        with _completions_only_on_cpu():
            trainer = DPOTrainer(
                model=model,
                ref_model=None,
                args=args,
                train_dataset=dataset,
                processing_class=tokenizer,
                peft_config=peft_config,
                callbacks=callbacks,
            )
            trainer.train()

    log = {
        "log_history": list(trainer.state.log_history),
        "train_pairs": len(rows),
        "global_steps": int(trainer.state.global_step),
        "step_seconds": clock.seconds,
        "computes_in": "bfloat16" if args.bf16 else "float32",
        # Training processes (accelerate launch's or Ray Train's); each takes batch_size pairs a step.
        "processes": trainer.accelerator.num_processes,
    }
    if trainer.accelerator.num_processes > 1 or trainer.is_deepspeed_enabled:
        _save_gathered(trainer, model_dir, tokenizer, settings, Path(out_dir), log)
        return log
    trained = trainer.accelerator.unwrap_model(trainer.model)
    if settings.use_lora:
        # Later iterations, the judge and generation all load a plain model directory.
        trained = trained.merge_and_unload()
    if getattr(trained.config, "quantization_config", None) is not None:
        del trained.config.quantization_config
    save_atomically(trained, tokenizer, Path(out_dir), log)
    del trainer, model, trained
    release_memory()
    return log


def release_memory() -> None:
    """Free what training held (the trainer keeps reference cycles), so that the next iteration's
    generation engine, which reserves its share of GPU memory when it starts, finds it free."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


JOB = layout.JOB
JOB_PAIRS = layout.JOB_PAIRS


def trained_rows(rows: list[dict]) -> list[dict]:
    """Pair rows as DPO trains on them: ``prompt``, ``chosen``, ``rejected`` (actor and judge pairs in
    one schema)."""
    return [{key: row[key] for key in PAIR_KEYS} for row in rows]


def launch_dpo(
    model_dir: str,
    rows: list[dict],
    settings: DPOSettings,
    out_dir: Path,
    *,
    seed: int,
    job_dir: Path,
    accelerate_config: str | None = None,
    trust_remote_code: bool = False,
) -> dict:
    """:func:`train_dpo` in ``accelerate launch`` processes (one per GPU, as the config file says)."""
    write_job(
        model_dir, rows, settings, out_dir, seed=seed, job_dir=job_dir, trust_remote_code=trust_remote_code
    )
    config = accelerate_config or str(DEFAULT_ACCELERATE_CONFIG)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config]
    command += ["-m", "metareward.training", str(job_dir)]
    log_path = job_dir / "launch.log"
    with open(log_path, "w") as log:
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-15:]
        raise RuntimeError(
            f"accelerate launch exited with {done.returncode} (log: {log_path}):\n" + "\n".join(tail)
        )
    return json.loads((Path(out_dir) / TRAINING_LOG).read_text())


def write_job(
    model_dir: str,
    rows: list[dict],
    settings: DPOSettings,
    out_dir: Path,
    *,
    seed: int,
    job_dir: Path,
    trust_remote_code: bool = False,
) -> None:
    """The pairs and settings of a DPO job, for processes started elsewhere (``accelerate launch``, Ray
    Train workers) to run with :func:`run_job`; paths are made absolute, as those may start elsewhere."""
    from metareward.store.records import write_json, write_jsonl

    if not rows:
        raise ValueError("a DPO job needs at least one preference pair; rows is empty")
    local = Path(model_dir)
    job = {
        "model_dir": str(local.absolute()) if local.exists() else model_dir,
        "settings": asdict(settings),
        "out_dir": str(Path(out_dir).absolute()),
        "seed": seed,
        "trust_remote_code": trust_remote_code,
    }
    write_jsonl(job_dir / JOB_PAIRS, trained_rows(rows))
    write_json(job_dir / JOB, job)


def run_job(job_dir: str) -> None:
    """Entry point of each training process: the job written by :func:`write_job`."""
    from metareward.compute.allocator import keep_freed_memory
    from metareward.store.records import read_jsonl

    keep_freed_memory()
    job = json.loads((Path(job_dir) / JOB).read_text())
    train_dpo(
        job["model_dir"],
        read_jsonl(Path(job_dir) / JOB_PAIRS),
        DPOSettings(**job["settings"]),
        Path(job["out_dir"]),
        seed=job["seed"],
        trust_remote_code=job["trust_remote_code"],
    )


if __name__ == "__main__":
    run_job(sys.argv[1])
