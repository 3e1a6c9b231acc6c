"""A model's held-out answers in the formats other evaluators read, so M_t can be scored elsewhere:

- alpaca_eval ``model_outputs`` (``alpaca_eval --model_outputs FILE``; AlpacaEval 2 length-controlled
  win rate is the Meta-Rewarding paper's headline metric): a JSON list of
  ``{"instruction", "output", "generator", "dataset"}``;
- FastChat answer rows (MT-Bench's ``gen_judgment.py`` reads ``data/<bench>/model_answer/<model>.jsonl``):
  ``{"question_id", "answer_id", "model_id", "choices": [{"index": 0, "turns": [output]}], "tstamp"}``.

    write_heldout_exports(run_dir / "heldout" / "M_2", prompts, responses, model_name="demo-M_2")
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from metareward.store import layout
from metareward.store.records import write_json, write_jsonl

ALPACA_EVAL_OUTPUTS = layout.ALPACA_EVAL_OUTPUTS
FASTCHAT_ANSWERS = layout.FASTCHAT_ANSWERS


def _question(prompt: dict) -> str:
    return prompt["messages"][-1]["content"]


def _question_id(prompt_id: str) -> int | str:
    # FastChat's question files number their questions; keep the number where the id is one.
    return int(prompt_id) if str(prompt_id).isdigit() else prompt_id


def alpaca_eval_outputs(prompts: list[dict], responses: list[dict], model_name: str) -> list[dict]:
    by_id = {r["prompt_id"]: r for r in responses}
    return [
        {
            "instruction": _question(p),
            "output": by_id[p["prompt_id"]]["text"],
            "generator": model_name,
            "dataset": "metareward-heldout",
        }
        for p in prompts
    ]


def fastchat_answers(
    prompts: list[dict], responses: list[dict], model_name: str, tstamp: float
) -> list[dict]:
    by_id = {r["prompt_id"]: r for r in responses}
    rows = []
    for p in prompts:
        text = by_id[p["prompt_id"]]["text"]
        # A stable answer id: the same model and answer give the same id on every export.
        answer_id = hashlib.sha1(f"{model_name}/{p['prompt_id']}/{text}".encode()).hexdigest()[:22]
        rows.append(
            {
                "question_id": _question_id(p["prompt_id"]),
                "answer_id": answer_id,
                "model_id": model_name,
                "choices": [{"index": 0, "turns": [text]}],
                "tstamp": tstamp,
            }
        )
    return rows


def write_heldout_exports(
    directory: Path, prompts: list[dict], responses: list[dict], model_name: str, tstamp: float = 0.0
) -> None:
    """Both files in ``directory`` (each written whole)."""
    write_json(Path(directory) / ALPACA_EVAL_OUTPUTS, alpaca_eval_outputs(prompts, responses, model_name))
    write_jsonl(Path(directory) / FASTCHAT_ANSWERS, fastchat_answers(prompts, responses, model_name, tstamp))
