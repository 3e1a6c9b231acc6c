"""Held-out answers in alpaca_eval's and FastChat's formats, on crafted rows."""

from __future__ import annotations

import json

from metareward.judging.exports import ALPACA_EVAL_OUTPUTS, FASTCHAT_ANSWERS, write_heldout_exports

PROMPTS = [
    {"prompt_id": "81", "messages": [{"role": "user", "content": "Compose a travel blog post."}]},
    {"prompt_id": "q-2", "messages": [{"role": "user", "content": "Explain DPO."}]},
]
RESPONSES = [
    {"prompt_id": "q-2", "text": "It optimises preferences directly.", "num_tokens": 5},
    {"prompt_id": "81", "text": "Hawaii is lovely.", "num_tokens": 4},
]


def test_both_files_hold_each_answer_under_its_question(tmp_path):
    write_heldout_exports(tmp_path / "M_1", PROMPTS, RESPONSES, "run-M_1", tstamp=12.5)
    outputs = json.loads((tmp_path / "M_1" / ALPACA_EVAL_OUTPUTS).read_text())
    assert [(o["instruction"], o["output"]) for o in outputs] == [
        ("Compose a travel blog post.", "Hawaii is lovely."),
        ("Explain DPO.", "It optimises preferences directly."),
    ]
    assert all(o["generator"] == "run-M_1" and o["dataset"] == "metareward-heldout" for o in outputs)
    answers = [json.loads(line) for line in (tmp_path / "M_1" / FASTCHAT_ANSWERS).read_text().splitlines()]
    assert [a["question_id"] for a in answers] == [81, "q-2"]  # numbered ids stay numbers
    assert answers[0]["choices"] == [{"index": 0, "turns": ["Hawaii is lovely."]}]
    assert {a["model_id"] for a in answers} == {"run-M_1"} and answers[0]["tstamp"] == 12.5
    # The answer id is stable across exports of the same answers, and differs between answers.
    write_heldout_exports(tmp_path / "again", PROMPTS, RESPONSES, "run-M_1", tstamp=99.0)
    again = [json.loads(line) for line in (tmp_path / "again" / FASTCHAT_ANSWERS).read_text().splitlines()]
    assert [a["answer_id"] for a in again] == [a["answer_id"] for a in answers]
    assert answers[0]["answer_id"] != answers[1]["answer_id"]
