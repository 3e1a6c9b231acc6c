"""Judge alignment measured in one run: the point objective, the distribution objective and the
distribution objective without its adversarial term, each trained from the same seed on the same
bundled PandaLM rows (three annotators per pair), against the untrained model on held-out rows.

    make align-bench                      # the embedded SmolLM2-135M, sizes that fit ~20 min on 2 cores
    python scripts/align_bench.py --model tiny --train-rows 12 --heldout-rows 6 --out align_bench.json

Rows are split by instruction (no instruction on both sides), then whole instructions of each side
are kept, in a seeded order, until the row count is reached. Every run uses the same settings
(``align.*`` defaults, or the flags below) but its objective.
Prints a table of held-out accuracy against the majority label, KL(human || model), Jensen-Shannon
divergence, ECE and Brier score, and writes everything, with wall times, to the JSON file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import tempfile
import time
from pathlib import Path

from metareward.align.data import load_align_items, split_by_prompt
from metareward.align.trainer import align_judge
from metareward.compute.models import resolve_model
from metareward.config import AlignConfig, ModelConfig
from metareward.judging.prompts import Templates

RUNS = (
    ("point", {"objective": "point"}),
    ("distribution", {"objective": "distribution"}),
    ("distribution, eps=0", {"objective": "distribution", "adversarial_epsilon": 0.0}),
)
METRICS = ("accuracy", "kl", "jsd", "ece", "brier", "items")


def sample_rows(items: list, rows: int, seed: int) -> list:
    """The items of about ``rows`` rows: whole prompts (a PandaLM instruction has several rows) in a
    seeded order, until ``rows`` rows are in."""
    by_group: dict[str, list] = {}
    for item in items:
        by_group.setdefault(item.group, []).append(item)
    groups = sorted(by_group)
    random.Random(seed).shuffle(groups)
    kept: list = []
    for group in groups:
        if len({item.where for item in kept}) >= rows:
            break
        kept.extend(by_group[group])
    return kept


def table(before: dict, results: dict) -> str:
    head = f"| {'judge':<22} | " + " | ".join(f"{m:>8}" for m in METRICS) + " | train s |"
    lines = [head, "|" + "---|" * (len(METRICS) + 2)]

    def row(name: str, metrics: dict, seconds: str) -> str:
        cells = " | ".join(f"{'—' if metrics[m] is None else format(metrics[m], '.4g'):>8}" for m in METRICS)
        return f"| {name:<22} | {cells} | {seconds:>7} |"

    lines.append(row("untrained", before, "—"))
    for name, result in results.items():
        lines.append(row(name, result["heldout"]["after"], f"{result['train']['seconds']:.0f}"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2_135m", help="model kind: smollm2_135m or tiny")
    parser.add_argument("--train-rows", type=int, default=24, help="PandaLM rows to train on (2 items each)")
    parser.add_argument("--heldout-rows", type=int, default=20, help="PandaLM rows held out")
    parser.add_argument("--learning-rate", type=float, default=2e-5)
    parser.add_argument("--num-epochs", type=float, default=1.0)
    parser.add_argument("--max-length", type=int, default=768, help="longer items are left out, counted")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("align_bench.json"))
    args = parser.parse_args(argv)

    started = time.perf_counter()
    seed_dir = resolve_model(ModelConfig(kind=args.model))
    items = load_align_items("pandalm", Templates())
    train_pool, heldout_pool = split_by_prompt(items, 0.5, args.seed)
    train = sample_rows(train_pool, args.train_rows, args.seed)
    heldout = sample_rows(heldout_pool, args.heldout_rows, args.seed)
    base = AlignConfig(
        learning_rate=args.learning_rate,
        num_epochs=args.num_epochs,
        max_length=args.max_length,
        seed=args.seed,
        progress=False,
        save_steps=10_000,  # a bench is not resumed
    )
    results, before = {}, None
    for name, changes in RUNS:
        settings = dataclasses.replace(base, **changes)
        with tempfile.TemporaryDirectory(prefix="metareward-align-bench-") as work:
            result = align_judge(
                seed_dir, settings, train, heldout, out_dir=Path(work) / "model", work_dir=Path(work)
            )
        results[name] = result
        before = result["heldout"]["before"]
        print(
            f"{name}: {result['train']['steps']} steps, {result['train']['seconds']:.0f} s", file=sys.stderr
        )
    report = {
        "model": args.model,
        "train_items": len(train),
        "heldout_items": len(heldout),
        "settings": dataclasses.asdict(base),
        "before": before,
        "runs": results,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    args.out.write_text(json.dumps(report, indent=2))
    print(table(before, results))
    print(f"wall time {report['wall_seconds']:.0f} s; JSON in {args.out}")


if __name__ == "__main__":
    main()
