"""Actor prompts: read a prompt set, draw each iteration's share of it, fit prompts to a token budget.

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
from metareward.generation.context import ContextBudget, context_length, most_kept
from metareward.store.records import RecordError, read_jsonl_numbered

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
    prompts, seen = [], {}
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
            raise RecordError(
                f"{where}: duplicate prompt id {prompt_id!r}, already at {source}:{seen[prompt_id]}"
            )
        seen[prompt_id] = number
        prompts.append({"prompt_id": prompt_id, "messages": _messages(row, where)})
    if not prompts:
        raise RecordError(f"{source}: no prompts (nothing but blank lines, or empty)")
    return prompts


def read_prompt_file(path: Path) -> list[dict]:
    """The prompt rows of a JSONL file in any accepted shape; errors name the file and line."""
    numbered = read_jsonl_numbered(path)
    return to_prompt_rows([row for _, row in numbered], str(path), [number for number, _ in numbered])


def load_prompts(cfg: DataConfig) -> list[dict]:
    """The prompt set; for ``data=synthetic`` the seed set the pool is written from (synthesis.py)."""
    if cfg.kind == "hf":
        import datasets

        dataset = datasets.load_dataset(cfg.hf_name, split=cfg.hf_split)
        return to_prompt_rows(list(dataset), f"{cfg.hf_name}[{cfg.hf_split}]")
    if cfg.kind == "synthetic":
        seed_path = cfg.synthetic.seed_path
        return read_prompt_file(Path(seed_path) if seed_path else bundled_path(BUNDLED_PROMPTS))
    return read_prompt_file(Path(cfg.path) if cfg.path else bundled_path(BUNDLED_PROMPTS))


def prompts_for_iteration(prompts: list[dict], iteration: int, per_iteration: int, seed: int) -> list[dict]:
    """Iteration t's prompts: the t-th slice of one seeded shuffle, so iterations see new prompts
    while they last (then the order wraps around, see :func:`reuse_notice`)."""
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    start = (iteration - 1) * per_iteration
    count = min(per_iteration, len(prompts))
    return [prompts[order[(start + i) % len(order)]] for i in range(count)]


def reused_prompts(total: int, iteration: int, per_iteration: int) -> int:
    """How many of iteration t's prompts (:func:`prompts_for_iteration`) earlier iterations saw too."""
    count = min(per_iteration, total)
    drawn_before = (iteration - 1) * per_iteration
    return min(count, max(0, drawn_before + count - total))


def reuse_notice(total: int, iteration: int, per_iteration: int) -> str | None:
    """A sentence when iteration t's draw wraps around the prompt set; None while prompts are new."""
    reused = reused_prompts(total, iteration, per_iteration)
    if not reused:
        return None
    count = min(per_iteration, total)
    return (
        f"iteration {iteration}: the {total} prompts have run out; {reused} of its {count} prompts "
        "were drawn by earlier iterations too (a larger data.synthetic.pool_size or prompt set avoids it)"
    )


def _truncated(budget: ContextBudget, messages: list[dict]) -> list[dict] | None:
    """``messages`` with the last user turn cut (keeping its start) to fit the budget; None if even a
    few of its tokens do not fit beside the rest of the conversation."""
    original = messages[-1]["content"]

    def cut(keep: int) -> list[dict]:
        return [*messages[:-1], {**messages[-1], "content": budget.cut(original, keep)}]

    fitted = cut(most_kept(budget.text_tokens(original), lambda keep: budget.fits(cut(keep))))
    return fitted if fitted[-1]["content"].strip() else None


def fit_prompts(prompts: list[dict], tokenizer, max_tokens: int, mode: str) -> tuple[list[dict], dict]:
    """Prompts whose rendered chat (template and generation prompt included) fits ``max_tokens``.

    A longer prompt is left out (``mode="skip"``) or has its last user message cut to fit, keeping its
    start (``mode="truncate"``; left out after all when nothing of that message would fit). Returns
    the rows kept, in order (truncated ones included), and the counts
    ``{"kept", "skipped_too_long", "truncated"}``.
    """
    if mode not in ("skip", "truncate"):
        raise ValueError(f"mode={mode!r}: must be 'skip' or 'truncate'")
    budget = ContextBudget(tokenizer, max_tokens)
    kept, counts = [], {"kept": 0, "skipped_too_long": 0, "truncated": 0}
    for prompt in prompts:
        if budget.fits(prompt["messages"]):
            kept.append(prompt)
            continue
        fitted = _truncated(budget, prompt["messages"]) if mode == "truncate" else None
        if fitted is None:
            counts["skipped_too_long"] += 1
            continue
        kept.append({**prompt, "messages": fitted})
        counts["truncated"] += 1
    counts["kept"] = len(kept)
    return kept, counts


def fit_to_model(
    prompts: list[dict], model_dir: str, cfg: DataConfig, max_new_tokens: int, trust_remote_code: bool
) -> tuple[list[dict], dict]:
    """Leave out (or truncate, ``data.long_prompts``) prompts too long for the model in ``model_dir``:
    longer than ``data.max_prompt_tokens``, or than its context minus the actor's ``max_new_tokens``."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    limit = cfg.max_prompt_tokens
    if limit is None:
        context = context_length(model_dir, trust_remote_code)
        if context is None:  # the model states no context length: nothing to check against
            return prompts, {"kept": len(prompts), "skipped_too_long": 0, "truncated": 0}
        limit = max(context - max_new_tokens, 1)
    return fit_prompts(prompts, tokenizer, limit, cfg.long_prompts)
