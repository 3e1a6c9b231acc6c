"""The model card of each M_t (``iter_<t>/model/README.md``), in the format the Hugging Face Hub reads:
YAML metadata (``library_name``, ``tags``, ``base_model`` where the seed is a Hub model), then what made
the model and how well it judged, so the folder says what it is when it is copied or pushed alone
(``huggingface-cli upload <repo> runs/<name>/iter_<t>/model``)."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

from metareward.config import Config
from metareward.report.text import number
from metareward.store import layout, records

# A Hub model id: owner/name, nothing that reads as a local path.
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def _number(value, spec: str = ".3f") -> str:
    return number(value, spec, missing="-")


def model_card(cfg: Config, iteration: int, trained_from: str, metrics: dict) -> str:
    """M_``iteration``'s card from its iteration's ``metrics`` (metrics.json) and the model it was
    trained from."""
    seed = cfg.model.path if cfg.model.kind == "hf" else cfg.model.kind
    yaml = ["---", "library_name: transformers"]
    path = cfg.model.path
    if cfg.model.kind == "hf" and path and _HUB_ID.match(path) and not Path(path).expanduser().exists():
        yaml.append(f"base_model: {cfg.model.path}")
    yaml += ["tags:", "- dpo", "- trl", "- meta-rewarding", "- llm-as-a-judge", "---", ""]
    pairs, train = metrics.get("pairs", {}), metrics.get("train", {})
    # Every DPO setting, so the card reproduces the step (the LoRA ones only where LoRA was on).
    settings = dataclasses.asdict(cfg.train.dpo)
    if not settings["use_lora"]:
        settings = {k: v for k, v in settings.items() if not k.startswith("lora_")}
    settings["launcher"] = cfg.train.launcher
    body = [
        f"# {cfg.run_name}: M_{iteration}",
        "",
        f"Iteration {iteration} of a Meta-Rewarding run (metareward): the seed model `{seed}`, trained by "
        f"DPO from `{trained_from}` (also its reference) on its iteration's preference pairs: the dataset "
        "in the folder above this one (its `trained` config; its card says which model played each role).",
        "",
        "| | |",
        "| --- | --- |",
        f"| actor pairs | {pairs.get('actor', {}).get('pairs', '-')} |",
        f"| judge pairs | {pairs.get('judge', {}).get('pairs', '-')} |",
        f"| judge pairs trained on | {'yes' if pairs.get('trained_on_judge_pairs') else 'no'} |",
        f"| DPO steps | {train.get('steps', '-')} |",
        f"| last DPO loss | {_number(train.get('loss'), '.4f')} |",
        f"| actor win rate vs M_0 | {_number((metrics.get('eval_actor') or {}).get('win_rate'))} |",
        "",
    ]
    evaluated = metrics.get("eval") or {}
    if evaluated:
        body += [
            "Judge skill on preference suites (accuracy: a tie or no verdict is half a pair; official: the "
            "benchmark's own score, 0-100):",
            "",
            "| suite | protocol | accuracy | 95% interval | official |",
            "| --- | --- | --- | --- | --- |",
        ]
        for suite, protocols in evaluated.items():
            for protocol, m in protocols.items():
                official = m.get("official") or {}
                theirs = (
                    f"{official.get('metric')} {_number(official.get('score'), '.1f')}" if official else "-"
                )
                interval = f"[{_number(m.get('ci_low'))}, {_number(m.get('ci_high'))}]"
                body.append(
                    f"| {suite} | {protocol} | {_number(m.get('accuracy'))} | {interval} | {theirs} |"
                )
        body.append("")
    body += ["DPO settings:", "", "```json", json.dumps(settings, indent=2), "```", ""]
    return "\n".join(yaml + body)


def write_model_card(model_dir: Path, cfg: Config, iteration: int, trained_from: str, metrics: dict) -> None:
    records.write_text(model_dir / layout.MODEL_CARD, model_card(cfg, iteration, trained_from, metrics))
