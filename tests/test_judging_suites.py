"""Preference suites (metareward/suites.py): each format's rows by hand, the bundled suites, refusals."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from metareward.data import bundled_path
from metareward.judging.suites import BUNDLED_SUITES, SuitePair, load_suite
from metareward.store.records import RecordError


def write(path: Path, rows: list) -> Path:
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8"
    )
    return path


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def refused(entry, *needles: str) -> str:
    with pytest.raises(RecordError) as caught:
        load_suite(entry)
    message = str(caught.value)
    for needle in needles:
        assert needle in message, message
    return message


# ------------------------------------------------------------------ formats


def test_pairs_strings_turns_and_subset(tmp_path):
    path = write(
        tmp_path / "rb.jsonl",
        [
            {"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go away.", "subset": "chat", "id": 7},
            {
                "prompt": [
                    {"role": "user", "content": "a"},
                    {"role": "assistant", "content": "b"},
                    {"role": "user", "content": "c"},
                ],
                "chosen": [{"role": "assistant", "content": "good"}],
                "rejected": [{"role": "assistant", "content": ""}],
            },
        ],
    )
    name, rows = load_suite(str(path))
    assert name == "rb"
    assert rows[0] == SuitePair("7", user("Hi?"), "Hello!", "Go away.", "A", None, "chat", "rb")
    assert rows[1].pair_id == "p1"
    assert rows[1].prompt[-1] == {"role": "user", "content": "c"} and len(rows[1].prompt) == 3
    assert (rows[1].response_a, rows[1].response_b, rows[1].label, rows[1].subset) == ("good", "", "A", None)


def test_pairs_trl_implicit_prompt(tmp_path):
    head = [{"role": "user", "content": "2+2?"}]
    path = write(
        tmp_path / "trl.jsonl",
        [
            {
                "chosen": head + [{"role": "assistant", "content": "4"}],
                "rejected": head + [{"role": "assistant", "content": "5"}],
            }
        ],
    )
    _, [row] = load_suite(path)
    assert (row.prompt, row.response_a, row.response_b, row.label) == (head, "4", "5", "A")
    other = [{"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "6"}]
    write(path, [{"chosen": head + [{"role": "assistant", "content": "4"}], "rejected": other}])
    refused(path, f"{path}:1", "differ before their last turn")
    write(path, [{"chosen": head + [{"role": "user", "content": "x"}], "rejected": head + head}])
    refused(path, f"{path}:1", "assistant turn")
    write(path, [{"chosen": "4", "rejected": "5"}])
    refused(path, f"{path}:1", "without `prompt`")


def test_ab_labels(tmp_path):
    labels = ["A>B", "A>>B", "B>A", "B>>A", "A=B"]
    path = write(
        tmp_path / "judgebench.jsonl",
        [
            {
                "pair_id": f"j{i}",
                "question": "q",
                "response_A": "x",
                "response_B": "y",
                "label": label,
                "source": "math",
            }
            for i, label in enumerate(labels)
        ],
    )
    _, rows = load_suite(path)
    assert [r.label for r in rows] == ["A", "A", "B", "B", "tie"]
    assert [r.pair_id for r in rows] == ["j0", "j1", "j2", "j3", "j4"]
    assert {r.subset for r in rows} == {"math"} and {r.human for r in rows} == {None}
    write(path, [{"question": "q", "response_A": "x", "response_B": "y", "label": "A>C"}])
    refused(path, f"{path}:1", "'A>C'")


def test_llmbar_integer_and_string_labels(tmp_path):
    path = write(
        tmp_path / "llmbar.jsonl",
        [
            {"input": "q1", "output_1": "o1", "output_2": "o2", "label": 1},
            {"input": "q2", "output_1": "o1", "output_2": "o2", "label": "2"},
            {"input": "q3", "output_1": "o1", "output_2": "o2", "label": 2},
        ],
    )
    _, rows = load_suite(path)
    assert [r.label for r in rows] == ["A", "B", "B"]
    assert rows[1].prompt == user("q2") and (rows[1].response_a, rows[1].response_b) == ("o1", "o2")
    for bad in (3, "x", 1.0, True, None, "A"):
        write(
            path,
            [
                {"input": "q", "output_1": "a", "output_2": "b", "label": 1},
                {"input": "q", "output_1": "a", "output_2": "b", "label": bad},
            ],
        )
        message = refused(path, f"{path}:2")
        assert ("needs `label`" in message) if bad is None else (repr(bad) in message), message


def test_autoj_labels_and_scenario(tmp_path):
    path = write(
        tmp_path / "autoj.jsonl",
        [
            {"prompt": "p", "response 1": "r1", "response 2": "r2", "label": label, "scenario": "code"}
            for label in (0, "1", 2, "2")
        ],
    )
    _, rows = load_suite(path)
    assert [r.label for r in rows] == ["A", "B", "tie", "tie"]
    assert rows[0].subset == "code" and (rows[0].response_a, rows[0].response_b) == ("r1", "r2")
    write(path, [{"prompt": "p", "response 1": "r1", "response 2": "r2", "label": 3}])
    refused(path, f"{path}:1", "3")


@pytest.mark.parametrize(
    "votes, label, human",
    [
        ([1, 1, 2], "A", (2 / 3, 1 / 3)),
        ([2, 2, 2], "B", (0.0, 1.0)),
        (["1", "2", "0"], "tie", (0.5, 0.5)),  # one vote each: no majority
        ([0, 0, 2], "tie", (1 / 3, 2 / 3)),  # majority 0 = tie; the tie votes split half/half
        ([1, 0, 0], "tie", (2 / 3, 1 / 3)),
        ([1, 1, 0, 0], "tie", (0.75, 0.25)),  # 1 and 0 share the most votes
        ([2, 0, 2, 1], "B", (0.375, 0.625)),
    ],
)
def test_pandalm_annotators(tmp_path, votes, label, human):
    row = {"idx": 0, "instruction": "Do it.", "input": "this", "response1": "r1", "response2": "r2"}
    row.update({f"annotator{i + 1}": vote for i, vote in enumerate(votes)})
    _, [pair] = load_suite(write(tmp_path / "p.jsonl", [row]))
    assert pair.label == label
    assert pair.human == pytest.approx(human, abs=1e-12)
    assert sum(pair.human) == pytest.approx(1.0)
    assert pair.prompt == user("Do it.\n\nthis")
    assert (pair.pair_id, pair.response_a, pair.response_b, pair.subset) == ("0", "r1", "r2", None)


def test_pandalm_prompt_single_annotator_and_refusals(tmp_path):
    base = {"instruction": "Do it.", "response1": "r1", "response2": True}
    path = write(
        tmp_path / "p.jsonl",
        [{**base, "input": "", "annotator1": 2}, {**base, "instruction": " ", "input": "x", "annotator1": 0}],
    )
    _, rows = load_suite(path)
    assert rows[0].prompt == user("Do it.") and rows[0].human is None and rows[0].label == "B"
    assert rows[0].response_b == "True"
    assert rows[1].prompt == user("x") and rows[1].label == "tie"
    write(path, [{**base, "input": "", "annotator1": 1, "annotator3": 1}])
    refused(path, f"{path}:1", "annotator1..annotatorK", "annotator3")
    write(path, [{**base, "input": ""}])
    refused(path, f"{path}:1", "annotator1..annotatorK")
    write(path, [{**base, "input": "", "annotator1": 1, "annotator2": 3}])
    refused(path, f"{path}:1", "annotator2", "3")


# ------------------------------------------------------------------ bundled suites


@pytest.mark.parametrize(
    "name, count, labels, with_human",
    [
        ("hh_rlhf", 1038, {"A": 1038}, 0),
        ("llmbar_natural", 100, {"A": 42, "B": 58}, 0),
        ("pandalm", 999, {"A": 422, "B": 472, "tie": 105}, 999),
    ],
)
def test_bundled_suites(name, count, labels, with_human):
    suite, rows = load_suite(name)
    assert suite == name
    assert len(rows) == count
    assert dict(Counter(r.label for r in rows)) == labels
    assert sum(r.human is not None for r in rows) == with_human
    assert len({r.pair_id for r in rows}) == count
    assert all(
        r.suite == name and r.prompt[-1]["role"] == "user" and r.prompt[-1]["content"].strip() for r in rows
    )
    assert all(isinstance(r.response_a, str) and isinstance(r.response_b, str) for r in rows)


def test_bundled_files_installed_with_licences():
    for file in BUNDLED_SUITES.values():
        assert bundled_path(file).is_file()
    readme = bundled_path("README.md").read_text(encoding="utf-8")
    for name in (
        "llmbar_natural_100.jsonl",
        "pandalm_testset_v1_3annotators.jsonl",
        "LICENSE-LLMBar.txt",
        "LICENSE-PandaLM.txt",
    ):
        assert name in readme
    assert bundled_path("LICENSE-LLMBar.txt").read_text(encoding="utf-8").startswith("MIT License")
    assert "Apache License" in bundled_path("LICENSE-PandaLM.txt").read_text(encoding="utf-8")


def test_bundled_pandalm_matches_raw_votes():
    raw = [
        json.loads(line)
        for line in bundled_path(BUNDLED_SUITES["pandalm"]).read_text(encoding="utf-8").splitlines()
    ]
    _, rows = load_suite("pandalm")
    for source, pair in zip(raw, rows, strict=True):
        votes = [source["annotator1"], source["annotator2"], source["annotator3"]]
        assert pair.human == pytest.approx(
            ((votes.count(1) + votes.count(0) / 2) / 3, (votes.count(2) + votes.count(0) / 2) / 3)
        )
        assert pair.pair_id == str(source["idx"])


def test_sample_is_seeded_and_in_file_order():
    _, every = load_suite("llmbar_natural")
    _, first = load_suite("llmbar_natural", num_pairs=10, seed=3)
    _, again = load_suite("llmbar_natural", num_pairs=10, seed=3)
    _, other = load_suite("llmbar_natural", num_pairs=10, seed=4)
    assert first == again and first != other and len(first) == 10
    positions = [every.index(pair) for pair in first]
    assert positions == sorted(positions)
    assert load_suite("llmbar_natural", num_pairs=1000)[1] == every
    with pytest.raises(ValueError):
        load_suite("llmbar_natural", num_pairs=0)


# ------------------------------------------------------------------ entries


def test_dict_entries_name_and_format(tmp_path):
    path = write(tmp_path / "mine.jsonl", [{"input": "q", "output_1": "a", "output_2": "b", "label": 2}])
    assert load_suite({"path": str(path)})[0] == "mine"
    name, [row] = load_suite({"path": str(path), "name": "bench", "format": "llmbar"})
    assert (name, row.suite, row.label) == ("bench", "bench", "B")
    refused({"path": str(path), "format": "pairs"}, f"{path}:1", "declares format pairs", "format llmbar")
    refused({"path": str(path), "format": "nope"}, "unknown format 'nope'")
    refused({"path": str(path), "fmt": "llmbar"}, "unknown keys fmt")
    refused({"name": "x"}, "`path`")
    refused(str(tmp_path / "absent.jsonl"), "neither a bundled suite")


def test_declared_format_accepts_ambiguous_rows(tmp_path):
    row = {"prompt": "p", "chosen": "c", "rejected": "r", "response 1": "c", "response 2": "r", "label": 1}
    path = write(tmp_path / "both.jsonl", [row])
    refused(path, f"{path}:1", "several suite formats", "autoj", "pairs")
    assert load_suite({"path": path, "format": "autoj"})[1][0].label == "B"
    assert load_suite({"path": path, "format": "pairs"})[1][0].label == "A"


# ------------------------------------------------------------------ refusals name file:line


def test_mixed_formats_refused(tmp_path):
    path = write(
        tmp_path / "mixed.jsonl",
        [
            {"prompt": "p", "chosen": "c", "rejected": "r"},
            "",
            {"input": "q", "output_1": "a", "output_2": "b", "label": 1},
        ],
    )
    refused(path, f"{path}:3", "format llmbar", "format pairs", "line 1")


def test_unknown_row_refused(tmp_path):
    path = write(tmp_path / "x.jsonl", [{"prompt": "p", "chosen": "c", "rejected": "r"}, {"text": "hello"}])
    refused(path, f"{path}:2", "matches no suite format", "text")


@pytest.mark.parametrize(
    "row, needle",
    [
        ({"prompt": "p", "chosen": "c"}, "`rejected`"),
        ({"prompt": "", "chosen": "c", "rejected": "r"}, "`prompt`"),
        ({"prompt": "p", "chosen": 3, "rejected": "r"}, "`chosen`"),
        ({"question": "q", "response_A": "a", "response_B": "b"}, "`label`"),
        ({"question": "  ", "response_A": "a", "response_B": "b", "label": "A>B"}, "`question`"),
        ({"input": "q", "output_1": None, "output_2": "b", "label": 1}, "`output_1`"),
        ({"prompt": "p", "response 1": "a", "response 2": ["b"], "label": 0}, "`response 2`"),
        ({"prompt": "p", "chosen": "c", "rejected": "r", "subset": ""}, "`subset`"),
        ({"instruction": "", "input": "", "response1": "a", "response2": "b", "annotator1": 1}, "both empty"),
    ],
)
def test_missing_or_empty_fields_refused(tmp_path, row, needle):
    path = write(tmp_path / "bad.jsonl", [row])
    refused(path, f"{path}:1", needle)


def test_duplicate_ids_refused(tmp_path):
    rows = [
        {"id": 5, "prompt": "p", "chosen": "c", "rejected": "r"},
        {"id": "5", "prompt": "q", "chosen": "c", "rejected": "r"},
    ]
    path = write(tmp_path / "dup.jsonl", rows)
    refused(path, f"{path}:2", "duplicate pair id '5'", "line 1")


def test_empty_and_broken_files_refused(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n", encoding="utf-8")
    refused(empty, str(empty), "no pairs")
    broken = write(tmp_path / "broken.jsonl", [{"prompt": "p", "chosen": "c", "rejected": "r"}, "{not json"])
    refused(broken, f"{broken}:2", "not valid JSON")


# ------------------------------------------------------------------ rows with several candidates


def test_a_rewardbench2_row_is_one_pair_per_chosen_and_rejected_grouped_by_its_id(tmp_path):
    path = write(
        tmp_path / "rb2.jsonl",
        [
            {"id": "12", "prompt": "2+2?", "chosen": ["4"], "rejected": ["5", "3", "22"], "num_correct": 1,
             "num_incorrect": 3, "total_completions": 4, "subset": "Math"},
            {"id": "tied:3", "prompt": "A color?", "chosen": ["red", "blue"], "rejected": ["7"],
             "num_correct": 2, "subset": "Ties"},
        ],
    )  # fmt: skip
    _, rows = load_suite(str(path))
    assert [(r.pair_id, r.response_a, r.response_b, r.slot) for r in rows[:3]] == [
        ("12/c0r0", "4", "5", (0, 0)),
        ("12/c0r1", "4", "3", (0, 1)),
        ("12/c0r2", "4", "22", (0, 2)),
    ]
    assert {(r.group, r.format, r.label, r.subset) for r in rows[:3]} == {("12", "rewardbench2", "A", "Math")}
    assert [r.slot for r in rows[3:]] == [(0, 0), (1, 0)] and rows[3].group == "tied:3"
    bad = {
        "id": "1",
        "prompt": "q",
        "chosen": ["a", "b"],
        "rejected": ["c"],
        "num_correct": 1,
        "subset": "Math",
    }
    write(tmp_path / "bad.jsonl", [bad])
    refused(str(tmp_path / "bad.jsonl"), "bad.jsonl:1:", "`num_correct` is 1 but `chosen` holds 2")


def test_an_rmbench_row_is_its_3x3_style_matrix_and_a_sample_keeps_rows_whole(tmp_path):
    rows = [
        {"id": i, "prompt": f"Q{i}?", "chosen": [f"c{i}-{s}" for s in range(3)],
         "rejected": [f"r{i}-{s}" for s in range(3)], "domain": "safety-refuse"}
        for i in range(5)
    ]  # fmt: skip
    path = write(tmp_path / "rmb.jsonl", rows)
    _, pairs = load_suite(str(path))
    assert len(pairs) == 45 and {p.format for p in pairs} == {"rmbench"}
    assert [p.slot for p in pairs[:9]] == [(i, j) for i in range(3) for j in range(3)]
    assert (pairs[5].response_a, pairs[5].response_b, pairs[5].subset) == ("c0-1", "r0-2", "safety-refuse")
    _, sample = load_suite(str(path), num_pairs=2, seed=1)
    assert Counter(p.group for p in sample) == {group: 9 for group in {p.group for p in sample}}
    assert len({p.group for p in sample}) == 2
    write(tmp_path / "short.jsonl", [{**rows[0], "chosen": ["a", "b"]}])
    refused(str(tmp_path / "short.jsonl"), "short.jsonl:1:", "three `chosen` and three `rejected`")


# ------------------------------------------------------------------ Parquet files and Hugging Face datasets


def _rb2_rows() -> list[dict]:
    return [
        {"id": str(i), "prompt": f"{i}+1?", "chosen": [str(i + 1)], "rejected": ["0", "x", "-1"],
         "num_correct": 1, "subset": "Math"}
        for i in range(3)
    ]  # fmt: skip


def test_a_parquet_suite_reads_like_its_jsonl_twin(tmp_path):
    import pyarrow
    import pyarrow.parquet

    rows = _rb2_rows()
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), tmp_path / "rb2.parquet")
    _, from_parquet = load_suite(str(tmp_path / "rb2.parquet"))
    _, from_jsonl = load_suite(str(write(tmp_path / "rb2.jsonl", rows)))
    assert from_parquet == from_jsonl and len(from_parquet) == 9
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    refused(str(tmp_path / "broken.parquet"), "broken.parquet: not a Parquet file")


def test_a_hugging_face_dataset_entry_loads_through_datasets_and_an_absent_one_is_one_line(
    tmp_path, monkeypatch
):
    import pyarrow
    import pyarrow.parquet

    # A dataset repository on disk, as the hub serves one: a data folder of Parquet shards per split.
    repo = tmp_path / "acme-rb2"
    (repo / "data").mkdir(parents=True)
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(_rb2_rows()), repo / "data" / "test-00000.parquet")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    name, pairs = load_suite({"hf": str(repo), "split": "test"})
    assert name == "acme-rb2" and len(pairs) == 9 and pairs[0].format == "rewardbench2"
    named, again = load_suite({"hf": str(repo), "name": "rb2"})  # its one split
    assert named == "rb2" and [p.pair_id for p in again] == [p.pair_id for p in pairs]
    message = refused(
        {"hf": "acme/no-such-dataset", "split": "test"}, "acme/no-such-dataset", "local datasets cache"
    )
    assert "\n" not in message
