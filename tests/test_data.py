"""Behaviour tests for metareward.data: accepted row shapes, ids, errors that name the file, and the
per-iteration draw of prompts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from metareward.config import DataConfig
from metareward.data import BUNDLED_PROMPTS, bundled_path, load_prompts, prompts_for_iteration, to_prompt_rows
from metareward.store.records import RecordError
from tests.helpers import ASSETS


def user(content: str) -> list[dict]:
    return [{"role": "user", "content": content}]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------- row shapes


def test_messages_row():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Name a colour."},
    ]
    (row,) = to_prompt_rows([{"messages": messages, "extra": 1}], "src")
    assert row == {"prompt_id": "p0", "messages": messages}


def test_messages_keep_only_role_and_content():
    (row,) = to_prompt_rows([{"messages": [{"role": "user", "content": "Hi", "name": "x"}]}], "src")
    assert row["messages"] == user("Hi")


def test_prompt_string_row():
    (row,) = to_prompt_rows([{"prompt": "What is 2+2?"}], "src")
    assert row["messages"] == user("What is 2+2?")


def test_prompt_list_row():
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    (row,) = to_prompt_rows([{"prompt": messages}], "src")
    assert row["messages"] == messages


def test_instruction_row_without_input():
    (row,) = to_prompt_rows([{"instruction": "Write a haiku."}], "src")
    assert row["messages"] == user("Write a haiku.")


def test_instruction_with_input():
    (row,) = to_prompt_rows([{"instruction": "Translate to French.", "input": "Good morning"}], "src")
    assert row["messages"] == user("Translate to French.\n\nGood morning")


def test_instruction_with_self_instruct_instances():
    rows = [
        {
            "instruction": "Fix the grammar.",
            "instances": [{"input": "he go home", "output": "He goes home."}],
        },
        {"instruction": "Tell a joke.", "instances": [{"input": "", "output": "..."}]},
    ]
    first, second = to_prompt_rows(rows, "src")
    assert first["messages"] == user("Fix the grammar.\n\nhe go home")
    assert second["messages"] == user("Tell a joke.")


def test_ids_from_prompt_id_id_question_id_or_generated():
    rows = [
        {"prompt_id": "a", "prompt": "1"},
        {"id": "b", "prompt": "2"},
        {"question_id": 81, "prompt": "3"},
        {"prompt": "4"},
        {"prompt_id": "e", "id": "ignored", "prompt": "5"},
    ]
    ids = [row["prompt_id"] for row in to_prompt_rows(rows, "src")]
    assert ids == ["a", "b", "81", "p3", "e"]
    assert all(isinstance(i, str) for i in ids)


def test_row_order_is_kept():
    rows = [{"prompt": f"q{i}"} for i in range(5)]
    assert [r["messages"][0]["content"] for r in to_prompt_rows(rows, "src")] == [f"q{i}" for i in range(5)]


# ---------------------------------------------------------------- errors


def test_duplicate_ids_are_refused_naming_the_id():
    rows = [{"id": "dup", "prompt": "1"}, {"id": "other", "prompt": "2"}, {"id": "dup", "prompt": "3"}]
    with pytest.raises(RecordError, match="dup") as info:
        to_prompt_rows(rows, "prompts.jsonl")
    assert "prompts.jsonl:3" in str(info.value)


def test_generated_id_colliding_with_a_given_id_is_refused():
    with pytest.raises(RecordError, match="p1"):
        to_prompt_rows([{"id": "p1", "prompt": "a"}, {"prompt": "b"}], "src")


def test_id_with_slash_is_refused():
    # Response ids are "<prompt_id>/r<k>", so a slash would make them ambiguous.
    with pytest.raises(RecordError, match="a/b"):
        to_prompt_rows([{"id": "a/b", "prompt": "x"}], "src")


@pytest.mark.parametrize(
    "row",
    [
        {"prompt": "   "},
        {"prompt": ""},
        {"messages": user("\n\t")},
        {"instruction": ""},
    ],
)
def test_empty_prompt_is_refused(row):
    with pytest.raises(RecordError, match="src:1"):
        to_prompt_rows([row], "src")


@pytest.mark.parametrize(
    "row",
    [
        {"text": "no known key"},
        {"messages": []},
        {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]},
        {"messages": [{"content": "no role"}]},
        {"messages": [{"role": "user", "content": 3}]},
        {"prompt": 42},
    ],
)
def test_malformed_rows_are_refused(row):
    with pytest.raises(RecordError, match="src:2"):
        to_prompt_rows([{"prompt": "fine"}, row], "src")


def test_no_rows_is_refused():
    with pytest.raises(RecordError):
        to_prompt_rows([], "src")


def test_malformed_jsonl_line_names_file_and_line(tmp_path: Path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": oops}\n', encoding="utf-8")
    with pytest.raises(RecordError) as info:
        load_prompts(DataConfig(path=str(path)))
    assert f"{path}:3" in str(info.value)


def test_non_object_jsonl_line_is_refused(tmp_path: Path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "a"}\n["not", "an", "object"]\n', encoding="utf-8")
    with pytest.raises(RecordError, match=f"{path}:2"):
        load_prompts(DataConfig(path=str(path)))


def test_non_utf8_file_is_refused(tmp_path: Path):
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(b'{"prompt": "caf\xe9"}\n')
    with pytest.raises(RecordError, match="UTF-8") as info:
        load_prompts(DataConfig(path=str(path)))
    assert str(path) in str(info.value)


@pytest.mark.parametrize("text", ["", "\n\n  \n"])
def test_empty_file_is_refused(tmp_path: Path, text: str):
    path = tmp_path / "prompts.jsonl"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(RecordError, match="no prompts") as info:
        load_prompts(DataConfig(path=str(path)))
    assert str(path) in str(info.value)


def test_load_prompts_from_a_jsonl_file(tmp_path: Path):
    path = write_jsonl(
        tmp_path / "prompts.jsonl",
        [{"id": "x", "prompt": "one"}, {"messages": user("two")}, {"instruction": "three", "input": "3"}],
    )
    # Blank lines are skipped.
    path.write_text(path.read_text(encoding="utf-8") + "\n\n", encoding="utf-8")
    rows = load_prompts(DataConfig(path=str(path)))
    assert rows == [
        {"prompt_id": "x", "messages": user("one")},
        {"prompt_id": "p1", "messages": user("two")},
        {"prompt_id": "p2", "messages": user("three\n\n3")},
    ]


# ---------------------------------------------------------------- real prompt sets


def test_bundled_prompts_load():
    assert bundled_path(BUNDLED_PROMPTS).is_file()
    rows = load_prompts(DataConfig())
    assert len(rows) == 175
    assert len({r["prompt_id"] for r in rows}) == 175
    assert rows[0]["prompt_id"] == "seed_task_0"
    for row in rows:
        assert row["messages"][-1]["role"] == "user"
        assert row["messages"][-1]["content"].strip()


def test_bundled_prompt_includes_its_instance_input():
    raw = [
        json.loads(line) for line in bundled_path(BUNDLED_PROMPTS).read_text(encoding="utf-8").splitlines()
    ]
    with_input = next(r for r in raw if r["instances"][0]["input"])
    rows = {r["prompt_id"]: r for r in load_prompts(DataConfig())}
    content = rows[with_input["id"]]["messages"][0]["content"]
    assert content == f"{with_input['instruction']}\n\n{with_input['instances'][0]['input']}"


def test_self_instructs_user_oriented_prompts_load():
    path = ASSETS / "prompts_self_instruct_user_oriented.jsonl"
    raw = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = load_prompts(DataConfig(path=str(path)))
    assert len(rows) == len(raw)
    assert [r["prompt_id"] for r in rows] == [str(r["id"]) for r in raw]
    first = raw[0]
    extra = first["instances"][0]["input"]
    assert rows[0]["messages"] == user(first["instruction"] + (f"\n\n{extra}" if extra else ""))


# ---------------------------------------------------------------- per-iteration draws


def numbered(count: int) -> list[dict]:
    return [{"prompt_id": f"q{i}", "messages": user(f"question {i}")} for i in range(count)]


def ids(rows: list[dict]) -> list[str]:
    return [r["prompt_id"] for r in rows]


def test_prompts_for_iteration_is_deterministic_for_a_seed():
    prompts = numbered(50)
    first = ids(prompts_for_iteration(prompts, 1, 10, seed=3))
    assert first == ids(prompts_for_iteration(prompts, 1, 10, seed=3))
    assert len(first) == 10 and len(set(first)) == 10
    assert first != ids(prompts_for_iteration(prompts, 1, 10, seed=4))
    # A shuffle, not the first rows in file order.
    assert first != ids(prompts[:10])


def test_iterations_see_new_prompts_while_they_last():
    prompts = numbered(50)
    draws = [set(ids(prompts_for_iteration(prompts, t, 10, seed=0))) for t in (1, 2, 3, 4, 5)]
    assert all(len(d) == 10 for d in draws)
    assert set().union(*draws) == set(ids(prompts))  # 5 x 10 covers all 50 exactly once
    assert not draws[0] & draws[1]


def test_iterations_wrap_around_when_prompts_run_out():
    prompts = numbered(7)
    first = ids(prompts_for_iteration(prompts, 1, 5, seed=1))
    second = ids(prompts_for_iteration(prompts, 2, 5, seed=1))
    assert len(first) == len(second) == 5
    assert len(set(second)) == 5
    # The 2 unused prompts come first in iteration 2, then the order starts again.
    assert set(first) | set(second) == set(ids(prompts))
    assert second[2:] == first[:3]


def test_fewer_prompts_than_asked_gives_each_once():
    prompts = numbered(3)
    drawn = ids(prompts_for_iteration(prompts, 1, 10, seed=0))
    assert sorted(drawn) == ["q0", "q1", "q2"]


def test_prompts_for_iteration_returns_the_rows_themselves():
    prompts = numbered(4)
    for row in prompts_for_iteration(prompts, 1, 4, seed=0):
        assert row in prompts


def test_row_errors_name_the_file_line_even_after_blank_lines(tmp_path: Path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"id": "a", "prompt": "x"}\n\n{"id": "a", "prompt": "y"}\n', encoding="utf-8")
    with pytest.raises(RecordError, match="duplicate") as info:
        load_prompts(DataConfig(path=str(path)))
    assert f"{path}:3" in str(info.value)


# ---------------------------------------------------------------- data=synthetic and running out


def test_reuse_is_counted_once_the_draw_wraps_around():
    from metareward.data import reuse_notice, reused_prompts

    # 10 prompts, 4 per iteration: iterations 1 and 2 are new, 3 wraps (8, 9, then 0, 1), 4 reuses all.
    assert [reused_prompts(10, t, 4) for t in (1, 2, 3, 4)] == [0, 0, 2, 4]
    assert reuse_notice(10, 2, 4) is None
    assert reuse_notice(10, 3, 4) == (
        "iteration 3: the 10 prompts have run out; 2 of its 4 prompts were drawn by earlier iterations too "
        "(a larger data.synthetic.pool_size or prompt set avoids it)"
    )
    prompts = [{"prompt_id": f"s{i}", "messages": user(f"q{i}")} for i in range(10)]
    drawn = [{p["prompt_id"] for p in prompts_for_iteration(prompts, t, 4, seed=0)} for t in (1, 2, 3)]
    assert not drawn[0] & drawn[1] and len(drawn[2] & (drawn[0] | drawn[1])) == 2
    # A set smaller than one iteration's share is used whole, every iteration after the first again.
    assert [reused_prompts(3, t, 4) for t in (1, 2)] == [0, 3]


def test_synthetic_data_loads_its_seed_set(tmp_path):
    seeds = write_jsonl(
        tmp_path / "seeds.jsonl", [{"instruction": "Write a haiku."}, {"prompt": "Name a colour."}]
    )
    rows = load_prompts(DataConfig(kind="synthetic"))
    assert len(rows) == 175  # the bundled Self-Instruct seed tasks
    from metareward.config import SynthesisConfig

    rows = load_prompts(DataConfig(kind="synthetic", synthetic=SynthesisConfig(seed_path=str(seeds))))
    assert [r["messages"] for r in rows] == [user("Write a haiku."), user("Name a colour.")]


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("data.synthetic.max_rouge_l=0", "data.synthetic.max_rouge_l"),
        ("data.synthetic.pool_size=0", "data.synthetic.pool_size"),
        ("data.synthetic.seed_path=/no/such/seeds.jsonl", "data.synthetic.seed_path"),
        ("data.synthetic.max_words=2", "data.synthetic.max_words"),
        ("pairs.judge_chosen_score_cap=0", "pairs.judge_chosen_score_cap"),
        ("pairs.max_judgement_tokens=0", "pairs.max_judgement_tokens"),
    ],
)
def test_bad_synthesis_and_pair_settings_are_refused_by_their_full_key(override, key):
    from metareward.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=f"^{key.replace('.', '[.]')}="):
        load_config(None, ["data=synthetic", override])
