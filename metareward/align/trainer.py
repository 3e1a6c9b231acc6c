"""Train a model as a judge toward human label distributions, with transformers' ``Trainer``.

    result = align_judge(seed_dir, cfg.align, out_dir=Path("runs/x/align/model"),
                         work_dir=Path("runs/x/align"))

``metareward-align-judge`` and the EFT step of a run (``judge_alignment.enabled``) call this. The
items (align_data.py) are encoded as the judge's chat prompt with its answer begun by the cue; the
model's distribution over an item's labels is the probability of each label's first token after the
cue, renormalised over the labels, and only those positions carry gradient (align_loss.py has the
objectives). Items longer than ``align.max_length`` tokens are left out and counted.

The held-out items are measured before and after training (:func:`heldout_metrics`). Checkpoints go to
``work_dir/checkpoints`` every ``align.save_steps`` optimiser steps; a killed alignment, run again with
the same settings, resumes from the last one and ends with the weights an uninterrupted one would have.
The model is saved atomically to ``out_dir`` (safetensors, tokenizer, chat template; LoRA merged), so
``model=hf model.path=OUT_DIR`` or a role can load it. The result (the JSON of ``metareward-align-judge``)::

    {"heldout": {"before": M, "after": M}, "train": {"rows", "items", "steps", "seconds",
     "resumed_at_step", "loss_first", "loss_last", "too_long", "no_majority"}, "objective", "model_dir"}

(``seconds`` over every run of a resumed alignment; ``resumed_at_step`` the checkpoint's, or null.)

with M = ``{"accuracy", "kl", "jsd", "ece", "brier", "items"}``: accuracy of the model's most probable
label against the majority label and ECE / Brier (sum over labels of (q - one-hot majority)^2) over
items with a unique majority; mean KL(human || model) in nats and Jensen-Shannon divergence in bits
over all items.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback
from transformers.trainer_utils import get_last_checkpoint

from metareward.align import loss as align_loss
from metareward.align.data import AlignItem
from metareward.config import AlignConfig
from metareward.generation.tokens import encode
from metareward.judging.judge_metrics import expected_calibration_error, jensen_shannon, mean_or_none
from metareward.store import faults, layout
from metareward.store.records import RecordError, read_json, write_json
from metareward.training import autocasts_bf16, lora_config, release_memory, save_atomically

log = logging.getLogger("metareward")

CHECKPOINTS = layout.CHECKPOINTS
# Beside the checkpoints: the settings they were made with (a resume must use the same ones) and the
# untrained model's held-out metrics (measured once).
CHECKPOINT_SETTINGS = layout.CHECKPOINT_SETTINGS
BEFORE = layout.ALIGN_BEFORE


@dataclass(frozen=True)
class Encoded:
    """An item as token ids: ``positions[i]`` is where the logits predict label i's first token,
    ``tokens[i]`` that token."""

    input_ids: list[int]
    positions: list[int]
    tokens: list[int]
    target: tuple[float, ...]
    majority: int


def encode_item(tokenizer, item: AlignItem) -> Encoded:
    """The item's judge prompt (chat template, generation prompt) + cue, and where each label starts.

    BPE may merge a label with the cue's last characters (" 4" is one token), so each label's first
    token is read after the longest common token prefix of the text with and without it."""
    text = tokenizer.apply_chat_template(list(item.messages), tokenize=False, add_generation_prompt=True)
    text += item.cue
    base = encode(tokenizer, text)
    positions, tokens, seen = [], [], {}
    for label in item.labels:
        full = encode(tokenizer, text + label)
        common = 0
        while common < min(len(base), len(full)) and base[common] == full[common]:
            common += 1
        if common == 0 or common == len(full):
            raise RecordError(f"{item.where}: label {label!r} adds no token after the cue {item.cue!r}")
        key = (common - 1, full[common])
        if key in seen:
            raise RecordError(
                f"{item.where}: labels {seen[key]!r} and {label!r} begin with the same token after the cue "
                f"({tokenizer.decode([full[common]])!r}); give labels whose first tokens differ"
            )
        seen[key] = label
        positions.append(common - 1)
        tokens.append(full[common])
    majority = item.majority()
    return Encoded(
        base[: max(positions) + 1], positions, tokens, item.target, -1 if majority is None else majority
    )


def encode_items(tokenizer, items: list[AlignItem], max_length: int) -> tuple[list[Encoded], int]:
    """The items that fit in ``max_length`` tokens, and how many did not."""
    encoded = [encode_item(tokenizer, item) for item in items]
    kept = [e for e in encoded if len(e.input_ids) <= max_length]
    return kept, len(encoded) - len(kept)


def collate(batch: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ids and attention mask; labels padded to the batch's largest label count."""
    width = max(len(e.input_ids) for e in batch)
    k = max(len(e.tokens) for e in batch)

    def padded(values: list, size: int, fill) -> list:
        return list(values) + [fill] * (size - len(values))

    return {
        "input_ids": torch.tensor([padded(e.input_ids, width, pad_id) for e in batch]),
        "attention_mask": torch.tensor([padded([1] * len(e.input_ids), width, 0) for e in batch]),
        "positions": torch.tensor([padded(e.positions, k, 0) for e in batch]),
        "tokens": torch.tensor([padded(e.tokens, k, 0) for e in batch]),
        "label_mask": torch.tensor([padded([True] * len(e.tokens), k, False) for e in batch]),
        "target": torch.tensor([padded(e.target, k, 0.0) for e in batch], dtype=torch.float32),
        "majority": torch.tensor([e.majority for e in batch]),
    }


def label_log_probs(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[B, K] log-distribution over each item's labels, renormalised over them."""
    # Only the label positions need the LM head (the vocabulary projection of every position would
    # dominate memory): keep the logits of the positions any item of the batch reads.
    keep = torch.unique(batch["positions"])
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        logits_to_keep=keep,
        use_cache=False,
    )
    where = torch.searchsorted(keep, batch["positions"])  # [B, K] index into the kept positions
    rows = torch.arange(where.shape[0]).unsqueeze(-1)
    logits = out.logits[rows, where].float()  # [B, K, V]
    token_log_probs = torch.log_softmax(logits, -1).gather(-1, batch["tokens"].unsqueeze(-1)).squeeze(-1)
    return align_loss.renormalised(token_log_probs, batch["label_mask"])


class _AlignTrainer(Trainer):
    """``Trainer`` with our loss: the objective on the label positions' distribution."""

    def __init__(self, *args, settings: AlignConfig, **kwargs):
        super().__init__(*args, **kwargs)
        self.settings = settings
        # Our loss is a per-item mean: let Trainer scale it over gradient accumulation.
        self.model_accepts_loss_kwargs = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        log_q = label_log_probs(model, inputs)
        s = self.settings
        if s.objective == "point":
            loss = align_loss.point_loss(log_q, inputs["majority"])
        else:
            loss = align_loss.distribution_loss(
                log_q,
                inputs["target"],
                inputs["label_mask"],
                inputs["majority"],
                s.ce_weight,
                s.adversarial_epsilon,
            )
        return (loss, {"log_q": log_q}) if return_outputs else loss


class _KillPoint(TrainerCallback):
    """The ``align_step`` kill point after each optimiser step, for fault-injection tests (faults.py)."""

    def on_step_end(self, args, state, control, **kwargs):
        faults.point("align_step")


# Kept in each checkpoint: the training seconds spent up to it, so a resumed alignment reports them all.
TRAINING_SECONDS = "training_seconds.json"


class _TrainingTime(TrainerCallback):
    """Writes into each checkpoint the seconds trained up to it: ``before`` (those of the checkpoint
    resumed from) and this process's since ``started``."""

    def __init__(self, before: float):
        self.before, self.started = before, time.perf_counter()

    def seconds(self) -> float:
        return self.before + time.perf_counter() - self.started

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            write_json(checkpoint / TRAINING_SECONDS, {"seconds": self.seconds()})


def _seconds_before(checkpoint: str | None) -> float:
    """The training seconds a checkpoint records (0 without one, or for one saved without them)."""
    path = Path(checkpoint) / TRAINING_SECONDS if checkpoint else None
    return float(read_json(path)["seconds"]) if path and path.is_file() else 0.0


@torch.no_grad()
def predict(model, encoded: list[Encoded], pad_id: int, batch_size: int) -> list[list[float]]:
    """The model's distribution over each item's labels."""
    model.eval()
    device = next(model.parameters()).device
    # Similar lengths together pad less; the answers go back in item order.
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
    by_index: dict[int, list[float]] = {}
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = {k: v.to(device) for k, v in collate([encoded[i] for i in chunk], pad_id).items()}
        probs = label_log_probs(model, batch).exp().cpu().tolist()
        for i, row in zip(chunk, probs, strict=True):
            by_index[i] = row[: len(encoded[i].tokens)]
    return [by_index[i] for i in range(len(encoded))]


def heldout_metrics(encoded: list[Encoded], predicted: list[list[float]]) -> dict:
    """accuracy, kl, jsd, ece, brier, items (see the module docstring) of predictions on items."""
    kls, jsds, confidences, hits, briers = [], [], [], [], []
    for item, q in zip(encoded, predicted, strict=True):
        p = item.target
        kls.append(sum(a * math.log(a / max(b, 1e-12)) for a, b in zip(p, q, strict=True) if a > 0))
        jsds.append(jensen_shannon(tuple(p), tuple(q)))
        if item.majority >= 0:
            pick = max(range(len(q)), key=q.__getitem__)
            confidences.append(q[pick])
            hits.append(pick == item.majority)
            briers.append(sum((b - (i == item.majority)) ** 2 for i, b in enumerate(q)))
    return {
        "accuracy": mean_or_none([float(h) for h in hits]),
        "kl": mean_or_none(kls),
        "jsd": mean_or_none(jsds),
        "ece": expected_calibration_error(confidences, hits) if hits else None,
        "brier": mean_or_none(briers),
        "items": len(encoded),
    }


def _training_args(settings: AlignConfig, checkpoints: Path) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(checkpoints),
        learning_rate=settings.learning_rate,
        num_train_epochs=settings.num_epochs,
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        seed=settings.seed,
        logging_steps=1,
        save_strategy="steps",
        save_steps=settings.save_steps,
        # Two, so that a run killed while writing one still finds the one before it whole.
        save_total_limit=2,
        report_to="none",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=not settings.progress,
        use_cpu=not torch.cuda.is_available(),
        bf16=autocasts_bf16(settings),
    )


def _check_checkpoint_settings(checkpoints: Path, settings: AlignConfig, seed_dir: str) -> None:
    """Checkpoints are resumed only with the settings (and seed model) that made them."""
    # What only shows progress, measures or names the output does not change the weights.
    trained = {
        k: v for k, v in asdict(settings).items() if k not in ("progress", "eval_batch_size", "model_dir")
    }
    mine = {"settings": trained, "seed_model": seed_dir}
    path = checkpoints / CHECKPOINT_SETTINGS
    if path.is_file():
        theirs = read_json(path)
        if theirs != mine:
            changed = sorted(k for k in mine["settings"] if theirs["settings"].get(k) != mine["settings"][k])
            what = ", ".join(f"align.{k}" for k in changed) or "the seed model"
            raise RecordError(
                f"{checkpoints} holds the checkpoints of an alignment with other settings ({what}); "
                "run it with those settings to resume, or delete that directory to start over"
            )
    else:
        write_json(path, mine)


def align_judge(
    seed_dir: str,
    settings: AlignConfig,
    train_items: list[AlignItem],
    heldout_items: list[AlignItem],
    *,
    out_dir: Path,
    work_dir: Path,
    trust_remote_code: bool = False,
) -> dict:
    """Train ``seed_dir`` on ``train_items`` with ``settings`` and save it to ``out_dir``; returns the
    result dict (module docstring). Resumes from ``work_dir/checkpoints`` when a killed run left some."""
    tokenizer = AutoTokenizer.from_pretrained(seed_dir, trust_remote_code=trust_remote_code)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # Every item is encoded (and every label clash refused) before the model loads.
    train, too_long = encode_items(tokenizer, train_items, settings.max_length)
    no_majority = 0
    if settings.objective == "point":
        no_majority = sum(e.majority < 0 for e in train)
        train = [e for e in train if e.majority >= 0]
    heldout, heldout_too_long = encode_items(tokenizer, heldout_items, settings.max_length)
    if not train:
        raise RecordError(
            f"no training item is left ({too_long} longer than align.max_length={settings.max_length}, "
            f"{no_majority} without a unique majority label)"
        )
    if not heldout:
        raise RecordError(f"no held-out item fits in align.max_length={settings.max_length}")

    checkpoints = work_dir / CHECKPOINTS
    # Under several training processes (Ray Train's workers) the first writes what is written once.
    main = not dist.is_initialized() or dist.get_rank() == 0
    if main:
        checkpoints.mkdir(parents=True, exist_ok=True)
        _check_checkpoint_settings(checkpoints, settings, seed_dir)
    _barrier()
    model = AutoModelForCausalLM.from_pretrained(
        seed_dir, dtype=torch.float32, trust_remote_code=trust_remote_code, use_safetensors=True
    )
    if torch.cuda.is_available():
        model = model.to("cuda")
    before_path = checkpoints / BEFORE
    if main and not before_path.is_file():
        write_json(
            before_path, heldout_metrics(heldout, predict(model, heldout, pad_id, settings.eval_batch_size))
        )
    _barrier()
    before = read_json(before_path)

    if settings.use_lora:
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(settings))
    trainer = _AlignTrainer(
        model=model,
        args=_training_args(settings, checkpoints),
        train_dataset=train,
        data_collator=lambda batch: collate(batch, pad_id),
        callbacks=[_KillPoint()],
        settings=settings,
    )
    if not settings.progress:  # no bar, and no log line per step either
        trainer.remove_callback(PrinterCallback)
    resume = get_last_checkpoint(str(checkpoints))
    if resume:
        log.info("alignment: resuming from %s", resume)
    clock = _TrainingTime(_seconds_before(resume))
    trainer.add_callback(clock)
    trainer.train(resume_from_checkpoint=resume)
    seconds = clock.seconds()

    trained = trainer.accelerator.unwrap_model(trainer.model)
    if settings.use_lora:
        trained = trained.merge_and_unload()
    after = heldout_metrics(heldout, predict(trained, heldout, pad_id, settings.eval_batch_size))
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    result = {
        "heldout": {"before": before, "after": after},
        "train": {
            "rows": len({item.where for item in train_items}),
            "items": len(train),
            "steps": int(trainer.state.global_step),
            # Over every run of it: the seconds before a kill are those up to the checkpoint resumed from.
            "seconds": round(seconds, 2),
            "resumed_at_step": int(Path(resume).name.rpartition("-")[2]) if resume else None,
            "loss_first": losses[0] if losses else None,
            "loss_last": losses[-1] if losses else None,
            "too_long": too_long,
            "heldout_too_long": heldout_too_long,
            "no_majority": no_majority,
        },
        "objective": settings.objective,
        "model_dir": str(out_dir),
    }
    if main:
        save_atomically(trained.to("cpu"), tokenizer, out_dir, {"alignment": result})
        shutil.rmtree(checkpoints)  # the model is whole: nothing left to resume
    _barrier()
    del trainer, model, trained
    release_memory()
    return result


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def result_lines(result: dict) -> list[str]:
    """The held-out table before and after, for the console."""
    names = ("accuracy", "kl", "jsd", "ece", "brier", "items")
    rows = [f"{'':8}" + "".join(f"{n:>10}" for n in names)]
    for when in ("before", "after"):
        metrics = result["heldout"][when]
        cells = "".join(f"{'—' if metrics[n] is None else format(metrics[n], '.4g'):>10}" for n in names)
        rows.append(f"{when:8}{cells}")
    train = result["train"]
    resumed = f" (resumed at step {train['resumed_at_step']})" if train.get("resumed_at_step") else ""
    rows.append(
        f"objective {result['objective']}: {train['items']} items, {train['steps']} steps in "
        f"{train['seconds']} s{resumed}, loss {train['loss_first']} -> {train['loss_last']}"
    )
    return rows
