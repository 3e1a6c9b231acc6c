"""Held-out answers in alpaca_eval's and FastChat's formats, on crafted rows."""

from __future__ import annotations

import json

from metareward.judging.exports import ALPACA_EVAL_OUTPUTS, fastchat_path, write_heldout_exports

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
    # FastChat's layout: model_answer/<model_id>.jsonl, the model named by the file.
    path = fastchat_path(tmp_path / "M_1", "run-M_1")
    assert path == tmp_path / "M_1" / "model_answer" / "run-M_1.jsonl"
    answers = [json.loads(line) for line in path.read_text().splitlines()]
    assert [a["question_id"] for a in answers] == [81, "q-2"]  # numbered ids stay numbers
    assert answers[0]["choices"] == [{"index": 0, "turns": ["Hawaii is lovely."]}]
    assert {a["model_id"] for a in answers} == {"run-M_1"} and answers[0]["tstamp"] == 12.5
    # The answer id is stable across exports of the same answers, and differs between answers.
    write_heldout_exports(tmp_path / "again", PROMPTS, RESPONSES, "run-M_1", tstamp=99.0)
    again = [
        json.loads(line) for line in fastchat_path(tmp_path / "again", "run-M_1").read_text().splitlines()
    ]
    assert [a["answer_id"] for a in again] == [a["answer_id"] for a in answers]
    assert answers[0]["answer_id"] != answers[1]["answer_id"]


def test_an_mt_bench_question_is_answered_turn_by_turn_and_exported_with_both_turns(tmp_path):
    from metareward.generation import Completion
    from metareward.judging.heldout import generate_responses, load_heldout_prompts

    questions = tmp_path / "question.jsonl"
    rows = [
        {"question_id": 81, "category": "writing", "turns": ["Write a haiku.", "Now make it rhyme."]},
        {"question_id": 82, "category": "math", "turns": ["2+2?"]},
    ]
    questions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompts = load_heldout_prompts(str(questions), None)
    assert prompts[0]["later_turns"] == ["Now make it rhyme."] and "later_turns" not in prompts[1]

    seen: list[list[dict]] = []

    class Echo:  # stand-in generator: answers with the number of messages it was shown
        def generate(self, requests, params, desc=""):
            seen.extend(requests)
            return [[Completion(f"answer after {len(r)} message(s)", 4, "stop")] for r in requests]

    responses = generate_responses(Echo(), prompts, max_new_tokens=8, seed=0)
    # The second turn sees the question, the model's own first answer, then the follow-up.
    assert seen[-1] == [
        {"role": "user", "content": "Write a haiku."},
        {"role": "assistant", "content": "answer after 1 message(s)"},
        {"role": "user", "content": "Now make it rhyme."},
    ]
    assert responses[0]["turns"] == ["answer after 1 message(s)", "answer after 3 message(s)"]
    assert responses[0]["text"] == "answer after 1 message(s)" and responses[1]["turns"] == [
        "answer after 1 message(s)"
    ]
    write_heldout_exports(tmp_path / "M_2", prompts, responses, "run-M_2")
    [first, second] = [
        json.loads(line) for line in fastchat_path(tmp_path / "M_2", "run-M_2").read_text().splitlines()
    ]
    assert first["question_id"] == 81 and len(first["choices"][0]["turns"]) == 2
    assert len(second["choices"][0]["turns"]) == 1
