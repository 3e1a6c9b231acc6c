"""Actor prompts: read a prompt set and draw each iteration's share of it.

Accepted rows (JSONL, or a Hugging Face dataset): ``messages`` (chat messages ending with a
user turn); or ``prompt`` (a string, or chat messages); or ``instruction`` with an optional
``input`` (also Self-Instruct's ``instances[0].input``). A row's id is its ``prompt_id``,
``id`` or ``question_id`` when present, else ``p<row number>``.
"""

from __future__ import annotations

import random
from importlib import resources
from pathlib import Path

from metareward.config import DataConfig
from metareward.records import RecordError, read_jsonl_numbered

BUNDLED_PROMPTS = "prompts_self_instruct_seed_tasks.jsonl"


def bundled_path(name: str) -> Path:
    """A data file shipped inside the package (see metareward/data/README.md)."""
    return Path(str(resources.files("metareward") / "data" / name))


def _messages(row: dict, where: str) -> list[dict]:
    if "messages" in row:
        messages = row["messages"]
    elif isinstance(row.get("prompt"), list):
        messages = row["prompt"]
    elif isinstance(row.get("prompt"), str):
        messages = [{"role": "user", "content": row["prompt"]}]
    elif isinstance(row.get("instruction"), str):
        extra = row.get("input") or next((i.get("input") for i in row.get("instances") or []), "")
        content = row["instruction"] + (f"\n\n{extra}" if extra else "")
        messages = [{"role": "user", "content": content}]
    else:
        raise RecordError(f"{where}: a prompt row needs `messages`, `prompt` or `instruction`")
    ok = (
        isinstance(messages, list)
        and messages
        and all(isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") for m in messages)
        and messages[-1]["role"] == "user"
    )
    if not ok:
        raise RecordError(
            f"{where}: messages must be a non-empty list of {{role, content}} ending with a user turn"
        )
    if not messages[-1]["content"].strip():
        raise RecordError(f"{where}: the prompt is empty")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def to_prompt_rows(rows: list[dict], source: str, line_numbers: list[int] | None = None) -> list[dict]:
    """Rows in any accepted shape -> ``{"prompt_id", "messages"}``; ids must be unique.

    Errors name ``source:<line>`` (the file's line numbers where given, else row numbers)."""
    prompts, seen = [], set()
    for index, row in enumerate(rows):
        number = line_numbers[index] if line_numbers else index + 1
        where = f"{source}:{number}"
        raw_id = next(
            (row[key] for key in ("prompt_id", "id", "question_id") if row.get(key) is not None), None
        )
        prompt_id = str(raw_id) if raw_id is not None else f"p{index}"
        if "/" in prompt_id:
            raise RecordError(f"{where}: prompt id {prompt_id!r} must not contain '/'")
        if prompt_id in seen:
            raise RecordError(f"{where}: duplicate prompt id {prompt_id!r}")
        seen.add(prompt_id)
        prompts.append({"prompt_id": prompt_id, "messages": _messages(row, where)})
    if not prompts:
        raise RecordError(f"{source}: no prompts")
    return prompts


def load_prompts(cfg: DataConfig) -> list[dict]:
    if cfg.kind == "hf":
        import datasets

        dataset = datasets.load_dataset(cfg.hf_name, split=cfg.hf_split)
        return to_prompt_rows(list(dataset), f"{cfg.hf_name}[{cfg.hf_split}]")
    path = Path(cfg.path) if cfg.path else bundled_path(BUNDLED_PROMPTS)
    numbered = read_jsonl_numbered(path)
    return to_prompt_rows([row for _, row in numbered], str(path), [number for number, _ in numbered])


def prompts_for_iteration(prompts: list[dict], iteration: int, per_iteration: int, seed: int) -> list[dict]:
    """Iteration t's prompts: the t-th slice of one seeded shuffle, so iterations see new prompts
    while they last (then the order wraps around)."""
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    start = (iteration - 1) * per_iteration
    count = min(per_iteration, len(prompts))
    return [prompts[order[(start + i) % len(order)]] for i in range(count)]
