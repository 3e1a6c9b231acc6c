"""Each iteration directory is a Hugging Face dataset: its ``README.md`` is a dataset card whose YAML
``configs`` name the pair files, so that

    datasets.load_dataset("runs/<name>/iter_<t>", "judge")     # or "actor", or "trained"

loads them, and the folder pushes to the Hub as a browsable dataset (``huggingface-cli upload``).
``trained`` is exactly the rows DPO trained on (``train_job/pairs.jsonl``: actor pairs, and judge pairs
in the iterations of ``train.judge_iterations``, as ``prompt``/``chosen``/``rejected``). A file with no
rows is named in the card's text, not as a config (``datasets`` cannot load an empty JSON file). The
card says how the pairs were made: the model that made them, the sampling, the pair rules and counts.
"""

from __future__ import annotations

import json
from pathlib import Path

from metareward.config import Config
from metareward.judging.escalation import model_name
from metareward.store import layout, records

# (config name, file in the iteration directory, what its rows are)
CONFIGS = [
    ("actor", layout.ACTOR_PAIRS, "actor pairs: two responses to a prompt, the better by the judge's scores"),
    (
        "judge",
        layout.JUDGE_PAIRS,
        "judge pairs: two judgements of one response, the better by the meta-judge",
    ),
    ("trained", f"{layout.TRAIN_JOB}/{layout.JOB_PAIRS}", "the rows DPO trained M_t on"),
]


def _rows(path: Path) -> int | None:
    return len(records.read_jsonl(path)) if path.is_file() else None


def dataset_card(directory: Path, cfg: Config, iteration: int, model: str) -> str:
    """The card of iteration directory ``directory`` (iteration ``iteration`` of the run ``cfg``, whose
    roles without a model of their own were played by ``model``)."""
    counts = {name: _rows(directory / file) for name, file, _ in CONFIGS}
    yaml = ["---", "configs:"]
    for name, file, _ in CONFIGS:
        if counts[name]:
            yaml += [f"- config_name: {name}", "  data_files:", "  - split: train", f"    path: {file}"]
    yaml += ["tags:", "- dpo", "- preference", "- llm-as-a-judge", "- meta-rewarding", "---", ""]
    rows = [
        f"| `{name}` | `{file}` | {about} | {'-' if counts[name] is None else counts[name]} |"
        for name, file, about in CONFIGS
    ]
    pairs = cfg.pairs
    settings = {
        "actor": {"num_responses": cfg.actor.num_responses, "temperature": cfg.actor.temperature,
                  "top_p": cfg.actor.top_p, "max_new_tokens": cfg.actor.max_new_tokens},
        "judge": {"num_judgements": cfg.judge.num_judgements, "temperature": cfg.judge.temperature,
                  "score_from": cfg.judge.score_from, "max_new_tokens": cfg.judge.max_new_tokens},
        "meta_judge": {"temperature": cfg.meta_judge.temperature, "winner_from": cfg.meta_judge.winner_from},
        "pairs": {"rho": pairs.rho_for(iteration), "elo_l2": pairs.elo_l2,
                  "consistent_verdicts_only": pairs.consistent_verdicts_only,
                  "max_judgement_tokens": pairs.max_judgement_tokens,
                  "exclude_cut_off_responses": pairs.exclude_cut_off_responses,
                  "judge_chosen_score_cap": pairs.judge_chosen_score_cap},
        "train_judge_pairs": iteration in cfg.train.judge_iterations,
    }  # fmt: skip
    players = {role: _player(cfg, role, iteration, model) for role in ("actor", "judge", "meta_judge")}
    body = [
        f"# {cfg.run_name}, iteration {iteration}",
        "",
        "Preference pairs made by metareward's Meta-Rewarding loop. Actor: "
        f"{players['actor']}; judge: {players['judge']}; meta-judge: {players['meta_judge']}. The actor "
        "sampled responses, the judge scored each with the additive 5-point rubric, the meta-judge compared "
        "judgements of one response in both orders. Actor pairs follow the length-controlled rule (rho), "
        "judge pairs the position-weighted Elo of the meta-judge's battles. DPO trained "
        f"M_{iteration} from M_{iteration - 1} on the `trained` rows.",
        "",
        "| config | file | rows are | rows |",
        "| --- | --- | --- | --- |",
        *rows,
        "",
        "```python",
        "import datasets",
        f'pairs = datasets.load_dataset("{directory}", "judge")["train"]',
        "```",
        "",
        "The stage files beside them hold every prompt, response, judgement and verdict",
        f"(`{layout.PROMPTS}`, `{layout.RESPONSES}`, `{layout.JUDGEMENTS}`, `{layout.META_JUDGEMENTS}`); "
        f"`{layout.METRICS}` every number of the iteration.",
        "",
        "Settings:",
        "",
        "```json",
        json.dumps(settings, indent=2),
        "```",
        "",
    ]
    return "\n".join(yaml + body)


def _player(cfg: Config, role: str, iteration: int, model: str) -> str:
    """Who played ``role``: M_{t-1} (``model``), or the role's own fixed model."""
    spec = getattr(cfg.roles, role)
    if not spec.own_model:
        return f"M_{iteration - 1} (`{model}`)"
    where = ", behind an endpoint" if spec.generator.backend == "openai" else ""
    return f"`{model_name(spec)}` (a fixed model of its own{where})"


def played_by(cfg: Config, run_dir: Path, iteration: int) -> str:
    """The model that played the roles of ``iteration``: the seed for the first, else M_{t-1}'s folder."""
    if iteration == 1:
        return cfg.model.path or cfg.model.kind
    return str(layout.iter_dir(run_dir, iteration - 1) / layout.MODEL)


def write_dataset_card(directory: Path, cfg: Config, iteration: int, model: str) -> None:
    records.write_text(directory / layout.DATASET_CARD, dataset_card(directory, cfg, iteration, model))
