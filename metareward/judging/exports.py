"""A model's held-out answers in the formats other evaluators read, so M_t can be scored elsewhere:

- alpaca_eval ``model_outputs`` (``alpaca_eval --model_outputs FILE``; AlpacaEval 2 length-controlled
  win rate is the Meta-Rewarding paper's headline metric): a JSON list of
  ``{"instruction", "output", "generator", "dataset"}``;
- FastChat answer rows in FastChat's layout, ``model_answer/<model_id>.jsonl`` (MT-Bench's
  ``gen_judgment.py`` reads ``data/<bench>/model_answer/<model_id>.jsonl`` and takes the model's name
  from the file's): ``{"question_id", "answer_id", "model_id", "choices": [{"index": 0, "turns":
  [answer to each turn]}], "tstamp"}``.

    write_heldout_exports(run_dir / "heldout" / "M_2", prompts, responses, model_name="demo-M_2")
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from metareward.store import layout
from metareward.store.records import write_json, write_jsonl

ALPACA_EVAL_OUTPUTS = layout.ALPACA_EVAL_OUTPUTS
FASTCHAT_ANSWER_DIR = layout.FASTCHAT_ANSWER_DIR


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
        response = by_id[p["prompt_id"]]
        turns = response.get("turns") or [response["text"]]
        # A stable answer id: the same model and answers give the same id on every export.
        answer_id = hashlib.sha1(f"{model_name}/{p['prompt_id']}/{turns}".encode()).hexdigest()[:22]
        rows.append(
            {
                "question_id": _question_id(p["prompt_id"]),
                "answer_id": answer_id,
                "model_id": model_name,
                "choices": [{"index": 0, "turns": turns}],
                "tstamp": tstamp,
            }
        )
    return rows


def write_heldout_exports(
    directory: Path, prompts: list[dict], responses: list[dict], model_name: str, tstamp: float = 0.0
) -> None:
    """Both files in ``directory`` (each written whole): the alpaca_eval outputs, and FastChat's
    ``model_answer/<model_name>.jsonl``."""
    write_json(Path(directory) / ALPACA_EVAL_OUTPUTS, alpaca_eval_outputs(prompts, responses, model_name))
    answers = fastchat_answers(prompts, responses, model_name, tstamp)
    write_jsonl(fastchat_path(directory, model_name), answers)


def fastchat_path(directory: Path, model_name: str) -> Path:
    """Where FastChat looks for ``model_name``'s answers below a bench's data folder."""
    return Path(directory) / FASTCHAT_ANSWER_DIR / f"{model_name}.jsonl"
