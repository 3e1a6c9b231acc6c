"""Judge alignment toward human label distributions: the objectives against hand-computed values, the
rows it reads, training and resuming on the tiny model, the EFT step of a run, and its refusals."""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from metareward.align import loss as align_loss
from metareward.align.data import load_align_items, split_by_prompt
from metareward.align.trainer import TRAINING_SECONDS, align_judge, collate, encode_item, label_log_probs
from metareward.cli import align_judge_main
from metareward.config import load_config
from metareward.judging.prompts import PAIRWISE_CUE, SCORE_CUE, Templates
from metareward.store import layout, records
from tests.helpers import TINY_RUN, cli_env, pandalm_row, run_cli, small_settings, small_split, write_rows


def pointwise_row(i: int) -> dict:
    return {"prompt": f"Say hello number {i}.", "response": "hello", "ratings": [4, 5, 5]}


# ------------------------------------------------------------------ the objectives, by hand


def test_distribution_loss_equals_hand_computed_kl_plus_weighted_ce():
    # Two items: three labels (unique majority: label 0), and two labels of a tie (no majority) padded.
    log_q = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.6, 0.4, 1.0]]))
    log_q[1, 2] = float("-inf")
    target = torch.tensor([[0.6, 0.3, 0.1], [0.5, 0.5, 0.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    majority = torch.tensor([0, -1])
    kl_0 = 0.6 * math.log(0.6 / 0.5) + 0.3 * math.log(0.3 / 0.3) + 0.1 * math.log(0.1 / 0.2)
    kl_1 = 0.5 * math.log(0.5 / 0.6) + 0.5 * math.log(0.5 / 0.4)
    expected = ((kl_0 + 0.25 * -math.log(0.5)) + kl_1) / 2
    loss = align_loss.distribution_loss(log_q, target, mask, majority, ce_weight=0.25, epsilon=0.0)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert align_loss.point_loss(log_q[:1], majority[:1]).item() == pytest.approx(-math.log(0.5), rel=1e-6)
    with pytest.raises(ValueError, match="unique majority"):
        align_loss.point_loss(log_q, majority)


def test_worst_case_target_moves_epsilon_onto_the_least_probable_label_from_the_most_probable():
    log_q = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    target = torch.tensor([[0.1, 0.6, 0.3]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    # Sink: label 2 (q = 0.2). Donors, most probable first: label 0 gives all its 0.1, label 1 the rest.
    worst = align_loss.worst_case_target(target, log_q, mask, epsilon=0.25)
    assert worst.tolist()[0] == pytest.approx([0.0, 0.45, 0.55])
    # The budget is capped by what the sink can still take.
    almost_sure = torch.tensor([[0.05, 0.0, 0.95]])
    worst = align_loss.worst_case_target(almost_sure, log_q, mask, epsilon=0.5)
    assert worst.tolist()[0] == pytest.approx([0.0, 0.0, 1.0])


@settings(max_examples=200, deadline=None)
@given(
    p=st.lists(st.floats(0.0, 1.0), min_size=2, max_size=6),
    logits=st.lists(st.floats(-5.0, 5.0), min_size=6, max_size=6),
    epsilon=st.floats(0.0, 1.0),
)
def test_adversarial_kl_is_never_below_the_plain_kl_and_equals_it_at_zero(p, logits, epsilon):
    if sum(p) == 0:
        p[0] = 1.0
    target = torch.tensor([p], dtype=torch.float64) / sum(p)
    k = target.shape[1]
    log_q = torch.log_softmax(torch.tensor([logits[:k]], dtype=torch.float64), -1)
    mask = torch.ones(1, k, dtype=torch.bool)
    none = torch.tensor([-1])
    plain = align_loss.kl_divergence(target, log_q).item()
    adversarial = align_loss.distribution_loss(log_q, target, mask, none, 0.0, epsilon).item()
    at_zero = align_loss.distribution_loss(log_q, target, mask, none, 0.0, 0.0).item()
    assert adversarial >= plain - 1e-9
    assert at_zero == pytest.approx(plain, abs=1e-12)
    worst = align_loss.worst_case_target(target, log_q, mask, epsilon)
    assert worst.sum().item() == pytest.approx(1.0)
    assert (worst >= -1e-12).all()
    assert 0.5 * (worst - target).abs().sum().item() <= epsilon + 1e-9


# ------------------------------------------------------------------ the rows


def test_pairwise_rows_are_items_in_both_orders_with_the_distribution_swapped(tmp_path):
    path = write_rows(
        tmp_path / "pairs.jsonl",
        [pandalm_row(1, (1, 1, 0)), {"prompt": "Hi?", "chosen": "Hello!", "rejected": "No."}],
    )
    items = load_align_items(str(path), Templates())
    assert len(items) == 4
    first, second = items[0], items[1]
    assert first.cue == second.cue == PAIRWISE_CUE and first.labels == ("A", "B")
    # Votes 1, 1, tie: A has 2.5 of 3 votes' mass.
    assert first.target == pytest.approx((2.5 / 3, 0.5 / 3)) and second.target == pytest.approx(
        (0.5 / 3, 2.5 / 3)
    )
    text_1, text_2 = first.messages[-1]["content"], second.messages[-1]["content"]
    assert text_1.index("It is 2.") < text_1.index("Maybe 1.")
    assert text_2.index("Maybe 1.") < text_2.index("It is 2.")
    # A chosen/rejected row: one-hot, chosen shown first, then second.
    assert items[2].target == (1.0, 0.0) and items[3].target == (0.0, 1.0)
    assert first.group == second.group != items[2].group


def test_pointwise_and_generic_rows(tmp_path):
    rows = [
        pointwise_row(0),
        {"prompt": "Rate it.", "response": "ok", "distribution": [0, 0, 0.25, 0.25, 0.5, 0]},
        {"prompt": "Is the sky green?", "labels": ["yes", "no"], "votes": [1, 3], "cue": "Verdict: "},
        {
            "messages": [{"role": "user", "content": "Pick."}],
            "labels": ["x", "y", "z"],
            "distribution": [0.2, 0.3, 0.5],
        },
    ]
    items = load_align_items(str(write_rows(tmp_path / "rows.jsonl", rows)), Templates())
    assert [item.kind for item in items] == ["pointwise", "pointwise", "generic", "generic"]
    assert items[0].cue == SCORE_CUE and items[0].labels == tuple("012345")
    assert items[0].target == pytest.approx((0, 0, 0, 0, 1 / 3, 2 / 3)) and items[0].majority() == 5
    assert items[1].majority() == 4
    assert items[2].cue == "Verdict: " and items[2].target == (0.25, 0.75)
    assert items[3].cue == "Answer: " and items[3].labels == ("x", "y", "z")
    assert "<response>ok</response>" in items[1].messages[0]["content"]


def test_a_heldout_fraction_splits_by_prompt(tmp_path):
    rows = [pandalm_row(i, (1, 2, 2)) for i in range(20)]
    items = load_align_items(str(write_rows(tmp_path / "p.jsonl", rows)), Templates())
    train, heldout = split_by_prompt(items, 0.25, seed=3)
    assert len(heldout) == 10 and len(train) == 30  # 5 of 20 prompts, two items each
    assert not {i.group for i in train} & {i.group for i in heldout}
    assert split_by_prompt(items, 0.25, seed=3) == (train, heldout)


def test_label_positions_read_the_first_token_after_the_cue(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    (item,) = load_align_items_from([pointwise_row(0)])
    encoded = encode_item(tokenizer, item)
    for position, token, label in zip(encoded.positions, encoded.tokens, item.labels, strict=True):
        prefix = tokenizer.decode(encoded.input_ids[: position + 1] + [token])
        assert prefix.endswith(SCORE_CUE.rstrip() + " " + label) or prefix.endswith(SCORE_CUE + label)


def load_align_items_from(rows: list[dict]):
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        return load_align_items(str(write_rows(Path(d) / "rows.jsonl", rows)), Templates())


# ------------------------------------------------------------------ training on the tiny model


def test_a_step_moves_the_label_distribution_toward_the_target(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    items = load_align_items_from([pandalm_row(3, (2, 2, 2))])  # all for B in the first order
    batch = collate([encode_item(tokenizer, items[0])], tokenizer.pad_token_id or 0)
    before = label_log_probs(model, batch).exp()[0, 1].item()
    optimiser = torch.optim.SGD(model.parameters(), lr=0.5)
    loss = align_loss.distribution_loss(
        label_log_probs(model, batch), batch["target"], batch["label_mask"], batch["majority"], 0.1, 0.05
    )
    loss.backward()
    optimiser.step()
    with torch.no_grad():
        after = label_log_probs(model, batch).exp()[0, 1].item()
    assert after > before


def test_align_judge_trains_saves_a_loadable_model_and_reports_both_sides(tmp_path, tiny_model_dir):
    train, heldout = small_split(tmp_path)
    out = tmp_path / "aligned"
    result = align_judge(
        tiny_model_dir, small_settings(), train, heldout, out_dir=out, work_dir=tmp_path / "w"
    )
    assert result["objective"] == "distribution"
    assert result["train"]["items"] == len(train) == 18 and result["train"]["steps"] == 9
    assert result["train"]["rows"] == 9
    for when in ("before", "after"):
        metrics = result["heldout"][when]
        assert set(metrics) == {"accuracy", "kl", "jsd", "ece", "brier", "items"}
        assert metrics["items"] == len(heldout) == 6
    assert result["heldout"]["after"]["kl"] != result["heldout"]["before"]["kl"]
    assert not (tmp_path / "w" / "checkpoints").exists()
    seed = load_file(Path(tiny_model_dir) / "model.safetensors")
    aligned = load_file(out / "model.safetensors")
    assert any(not torch.equal(seed[k], aligned[k]) for k in seed)
    # Loadable as any model: the hf model kind resolves it, with its tokenizer and chat template.
    from metareward.compute.models import resolve_model

    config = load_config(None, ["model=hf", f"model.path={out}"])
    assert resolve_model(config.model) == str(out)
    assert (
        "chat_template" in (out / "tokenizer_config.json").read_text()
        or (out / "chat_template.jinja").is_file()
    )


def test_point_objective_leaves_out_items_without_a_majority(tmp_path, tiny_model_dir):
    rows = [pandalm_row(i, (1, 2, 0) if i % 2 else (1, 1, 2)) for i in range(8)]
    items = load_align_items(str(write_rows(tmp_path / "a.jsonl", rows)), Templates())
    train, heldout = items[:12], items[12:]
    result = align_judge(
        tiny_model_dir,
        small_settings(objective="point"),
        train,
        heldout,
        out_dir=tmp_path / "m",
        work_dir=tmp_path / "w",
    )
    assert result["train"]["no_majority"] == 6 and result["train"]["items"] == 6


def test_checkpoints_of_other_settings_are_not_resumed(tmp_path, tiny_model_dir):
    from metareward.store.records import RecordError

    train, heldout = small_split(tmp_path)
    work = tmp_path / "w"
    (work / "checkpoints").mkdir(parents=True)
    other = dataclasses.asdict(small_settings(learning_rate=0.5))
    for key in ("progress", "eval_batch_size", "model_dir"):
        other.pop(key)
    (work / "checkpoints" / "settings.json").write_text(
        json.dumps({"settings": other, "seed_model": tiny_model_dir})
    )
    with pytest.raises(RecordError, match=r"other settings \(align.learning_rate\)"):
        align_judge(tiny_model_dir, small_settings(), train, heldout, out_dir=tmp_path / "m", work_dir=work)


ALIGN_SCRIPT = """
import sys
from pathlib import Path
from metareward.align.data import load_align_items, split_by_prompt
from metareward.align.trainer import align_judge
from metareward.config import AlignConfig
from metareward.judging.prompts import Templates
model, data, work = sys.argv[1:4]
train, heldout = split_by_prompt(load_align_items(data, Templates()), 0.25, seed=0)
settings = AlignConfig(batch_size=2, save_steps=2, learning_rate=1e-3, progress=False, max_length=1024)
align_judge(model, settings, train, heldout, out_dir=Path(work) / "model", work_dir=Path(work))
"""


def run_align_script(model: str, data: Path, work: Path, kill_at: str | None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", ALIGN_SCRIPT, model, str(data), str(work)],
        env=cli_env(kill_at),
        capture_output=True,
        text=True,
    )


@pytest.mark.slow
def test_a_killed_alignment_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path, tiny_model_dir):
    rows = [pandalm_row(i, ((1, 1, 2), (2, 2, 1), (1, 0, 1))[i % 3]) for i in range(12)]
    data = write_rows(tmp_path / "align.jsonl", rows)
    whole = run_align_script(tiny_model_dir, data, tmp_path / "whole", None)
    assert whole.returncode == 0, whole.stderr[-3000:]
    # Killed after step 5: the checkpoint of step 4 is on disk, step 5's work is lost.
    killed = run_align_script(tiny_model_dir, data, tmp_path / "killed", "align_step:5")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert (tmp_path / "killed" / "checkpoints" / "checkpoint-4").is_dir()
    assert not (tmp_path / "killed" / "model").exists()
    resumed = run_align_script(tiny_model_dir, data, tmp_path / "killed", None)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = load_file(tmp_path / "whole" / "model" / "model.safetensors")
    b = load_file(tmp_path / "killed" / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


# ------------------------------------------------------------------ the command and its refusals


def cli(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        align_judge_main(argv)
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": "q", "labels": ["a", "b"], "distribution": [0.5, 0.6]}, "must sum to 1, but sums to 1.1"),
        ({"prompt": "q", "labels": ["a", "b"], "votes": [2, -1]}, "negative count"),
        ({"prompt": "q", "response": "r", "ratings": [6]}, "whole scores 0..5"),
        ({"question": "q", "answer": "a"}, "is no alignment row"),
    ],
)
def test_bad_rows_are_one_line_naming_file_and_line(tmp_path, capsys, row, message):
    path = write_rows(tmp_path / "bad.jsonl", [pointwise_row(0), row])
    code, _, err = cli([f"runs_dir={tmp_path}", "model=tiny", f"align.train={path}"], capsys)
    assert code == 1
    assert err.count("\n") == 1 and f"{path}:2: " in err and message in err


def test_an_empty_file_and_clashing_labels_are_refused_in_one_line(tmp_path, capsys, tiny_model_dir):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    code, _, err = cli([f"runs_dir={tmp_path}", "model=tiny", f"align.train={empty}"], capsys)
    assert code == 1 and err.count("\n") == 1 and f"{empty}: no rows" in err
    # "yes" and "yes, surely" begin with the same token after the cue: refused, nothing trained.
    clash = [{"prompt": f"q{i}", "labels": ["yes", "yes, surely"], "votes": [1, 1]} for i in range(3)]
    path = write_rows(tmp_path / "clash.jsonl", clash)
    code, _, err = cli([f"runs_dir={tmp_path}", "model=tiny", f"align.train={path}"], capsys)
    assert code == 1 and err.count("\n") == 1
    assert "begin with the same token" in err and "'yes'" in err and "'yes, surely'" in err
    assert not (tmp_path / "default" / "align" / "model").exists()


def test_the_command_is_refused_while_a_run_holds_the_run_directory(tmp_path, capsys, tiny_model_dir):
    from metareward.store import runlock

    data = write_rows(tmp_path / "align.jsonl", [pandalm_row(i, (1, 2, 2)) for i in range(8)])
    with runlock.hold(tmp_path / "default"):  # a metareward run on the same run_name
        code, _, err = cli([f"runs_dir={tmp_path}", "model=tiny", f"align.train={data}"], capsys)
    assert code == 1 and err.count("\n") == 1 and "is in use by another metareward run" in err
    assert not (tmp_path / "default" / "align").exists()


def test_a_bad_setting_names_its_key(tmp_path, capsys):
    code, _, err = cli([f"runs_dir={tmp_path}", "align.objective=median"], capsys)
    assert code == 2 and "align.objective='median'" in err
    code, _, err = cli([f"runs_dir={tmp_path}", "align.heldout_fraction=0"], capsys)
    assert code == 2 and "align.heldout_fraction=0" in err


def test_the_command_writes_the_model_and_the_json(tmp_path, capsys, tiny_model_dir):
    rows = [pandalm_row(i, (1, 2, 2)) for i in range(8)]
    data = write_rows(tmp_path / "a.jsonl", rows)
    out = tmp_path / "result.json"
    code, stdout, err = cli(
        [
            f"--out={out}",
            f"runs_dir={tmp_path}",
            "run_name=r",
            "model=tiny",
            f"align.train={data}",
            "align.progress=false",
            "align.batch_size=4",
            "align.max_length=1024",
        ],
        capsys,
    )
    assert code == 0, err
    result = json.loads(out.read_text())
    assert set(result) >= {"heldout", "train", "objective"}
    assert set(result["train"]) >= {"rows", "steps", "seconds", "loss_first", "loss_last"}
    assert (tmp_path / "r" / "align" / "model" / "model.safetensors").is_file()
    assert "before" in stdout and "after" in stdout


# ------------------------------------------------------------------ the EFT step of a run


@pytest.mark.slow
def test_the_eft_step_aligns_the_seed_once_and_iteration_1_trains_from_it(tmp_path, tiny_model_dir):
    from metareward.engines import Engines
    from metareward.loop.run import Run

    data = write_rows(tmp_path / "align.jsonl", [pandalm_row(i, (1, 1, 2)) for i in range(8)])
    config = load_config(
        None,
        [
            *TINY_RUN,
            f"runs_dir={tmp_path}",
            "run_name=eft",
            "iterations=1",
            "judge_alignment.enabled=true",
            f"align.train={data}",
            "align.progress=false",
            "align.batch_size=4",
            "align.max_length=1024",
            "align.learning_rate=1e-3",
        ],
    )
    trained_from = []

    class WatchedEngines(Engines):
        """Real engines that note what DPO trains from, and refuse a second alignment."""

        aligned = False

        def train_dpo(self, model_dir, *args, **kwargs):
            trained_from.append(model_dir)
            return super().train_dpo(model_dir, *args, **kwargs)

        def align(self, *args, **kwargs):
            if self.aligned:
                raise AssertionError("aligned twice")
            return super().align(*args, **kwargs)

    Run(config, engines=WatchedEngines(config, tmp_path / "eft")).run()
    align_dir = tmp_path / "eft" / "align"
    assert trained_from == [str(align_dir / "model")]
    seed = load_file(Path(tiny_model_dir) / "model.safetensors")
    aligned = load_file(align_dir / "model" / "model.safetensors")
    assert any(not torch.equal(seed[k], aligned[k]) for k in seed)
    metrics = json.loads((align_dir / "metrics.json").read_text())
    assert metrics["seed_model"] == tiny_model_dir and metrics["model_dir"] == str(align_dir / "model")
    assert load_config(tmp_path / "eft" / layout.CONFIG, []).judge_alignment.enabled

    # Run again: the alignment is found done and nothing is trained.
    WatchedEngines.aligned = True
    trained_from.clear()
    Run(config, engines=WatchedEngines(config, tmp_path / "eft")).run()
    assert trained_from == []


def test_the_dry_run_says_what_the_eft_step_trains_on(tmp_path, capsys):
    from metareward.cli import print_plan

    data = write_rows(tmp_path / "align.jsonl", [pandalm_row(i, (1, 1, 2)) for i in range(10)])
    config = load_config(
        None, ["dry_run=true", "judge_alignment.enabled=true", f"align.train={data}", "align.batch_size=4"]
    )
    print_plan(config)
    out = capsys.readouterr().out
    # 10 rows, 2 of 10 prompts held out: 16 training items, 4 held out, 4 steps of 4.
    assert f"on 16 items of {data}, 4 held out; about 4 optimiser steps an epoch, 1 epoch(s)" in out


@pytest.mark.slow
def test_align_judge_stopped_by_sigint_says_so_in_one_line_and_its_resume_reports_the_whole_training(
    tmp_path, tiny_model_dir
):
    rows = [pandalm_row(i, ((1, 1, 2), (2, 2, 1), (1, 0, 1))[i % 3]) for i in range(12)]
    data = write_rows(tmp_path / "align.jsonl", rows)
    args = [
        f"runs_dir={tmp_path}", "model=tiny", f"align.train={data}", "align.heldout_fraction=0.25",
        "align.batch_size=2", "align.save_steps=2", "align.learning_rate=1e-3", "align.progress=false",
        "align.max_length=1024",
    ]  # fmt: skip
    stopped = run_cli(*args, script="metareward-align-judge", kill_at="align_step:3", kill_with="SIGINT")
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr
    [line] = [row for row in stopped.stderr.splitlines() if row.startswith("metareward-align-judge:")]
    checkpoints = tmp_path / "default" / "align" / "checkpoints"
    assert f"stopped by SIGINT; its checkpoints are kept in {checkpoints}" in line
    saved = records.read_json(checkpoints / "checkpoint-2" / TRAINING_SECONDS)["seconds"]
    assert saved > 0

    resumed = run_cli(*args, script="metareward-align-judge")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # Its INFO lines are logged, as the Hydra app's are.
    assert f"alignment: resuming from {checkpoints / 'checkpoint-2'}" in resumed.stderr
    train = records.read_json(tmp_path / "default" / "align" / "metrics.json")["train"]
    assert train["resumed_at_step"] == 2 and train["steps"] > 3
    assert train["seconds"] > saved
    assert f"{train['steps']} steps in {train['seconds']} s (resumed at step 2)" in resumed.stdout


def test_align_judge_refuses_an_out_it_cannot_write_before_training(tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    rows = write_rows(tmp_path / "rows.jsonl", [pointwise_row(i) for i in range(4)])
    out = tmp_path / "afile" / "x.json"
    code, _, err = cli(
        [f"runs_dir={tmp_path}", "model=tiny", f"align.train={rows}", "--out", str(out)], capsys
    )
    assert code == 1 and err.count("\n") == 1
    assert f"--out {out} cannot be written: {tmp_path / 'afile'} is not a directory" in err
    assert not (tmp_path / "default").exists()
