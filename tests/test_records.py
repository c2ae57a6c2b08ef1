"""The answer files of generate / refine / score: reading the formats (every problem one line naming the file,
line and field), what refine writes and reads back, the resumable output over processes."""

import json

import pytest

from diffpo_jax.records.formats import FormatError, read_records, turn_prompt
from diffpo_jax.records.output import ResumableOutput
from tests.files import read_jsonl, write_jsonl

# ------------------------------------------------------------------------------------------ formats


def test_read_jsonl_prompt_or_messages(tmp_path):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    path = write_jsonl(
        tmp_path / "in.jsonl", [{"prompt": "A", "draft": "a", "id": 7}, "", {"messages": msgs, "draft": "b"}]
    )
    recs = read_records(path, "jsonl", with_drafts=True)
    assert [(r.prompt, r.drafts, r.where) for r in recs] == [("A", ["a"], f"{path}:1"), (msgs, ["b"], f"{path}:3")]
    assert recs[0].raw == {"prompt": "A", "draft": "a", "id": 7}


@pytest.mark.parametrize(
    "fmt,content,message",
    [
        ("jsonl", '{"prompt": "a", "draft": "b"}\n{"prompt": "a", draft: 1}\n', "in:2: not valid JSON"),
        ("jsonl", '{"prompt": "a", "draft": "b"}\n{"prompt": "a"}\n', "in:2: field 'draft' (a string) is missing"),
        ("jsonl", '{"draft": "b"}\n', "in:1: field 'prompt' (a string) or 'messages'"),
        ("jsonl", '{"messages": [{"role": "user"}], "draft": "b"}\n', "in:1: field 'prompt' (a string) or 'messages'"),
        ("jsonl", "[1, 2]\n", "in:1: expected a JSON object"),
        ("jsonl", "\n", "in: no records"),
        ("alpaca_eval", '[{"instruction": "a", "output": "b"},\n{"instruction": "c"}]', "in: record 1: field 'output'"),
        ("alpaca_eval", '[{"instruction": "a",\n "output": }]', "in:2: not valid JSON"),
        ("alpaca_eval", '{"instruction": "a"}', "in: expected a JSON list"),
        (
            "mt_bench",
            '{"question_id": 9, "model_id": "m", "choices": [{"index": 0, "turns": ["x", "y"]}]}\n',
            "in:1: question_id 9 has no question in",
        ),
        (
            "mt_bench",
            '{"question_id": 1, "model_id": "m", "choices": [{"index": 0, "turns": ["x"]}]}\n',
            "in:1: choices[0].turns has 1 answers but question 1 has 2 turns",
        ),
        ("mt_bench", '{"question_id": 1, "model_id": "m", "choices": []}\n', "in:1: field 'choices'"),
    ],
)
def test_bad_input_names_file_line_and_field(tmp_path, fmt, content, message):
    (tmp_path / "in").write_text(content)
    questions = write_jsonl(tmp_path / "q.jsonl", [{"question_id": 1, "turns": ["q1", "q2"]}])
    with pytest.raises(FormatError) as e:
        read_records(tmp_path / "in", fmt, with_drafts=True, questions=questions)
    assert message.replace("in", str(tmp_path / "in"), 1) in str(e.value) and "\n" not in str(e.value)


def test_mt_bench_turns_and_history(tmp_path):
    questions = write_jsonl(
        tmp_path / "q.jsonl", [{"question_id": 1, "turns": ["q1", "q2"]}, {"question_id": 2, "turns": ["p1"]}]
    )
    answers = write_jsonl(
        tmp_path / "a.jsonl",
        [
            {"question_id": 2, "model_id": "m", "choices": [{"index": 0, "turns": ["d1"]}]},
            {"question_id": 1, "model_id": "m", "choices": [{"index": 0, "turns": ["a1", "a2"]}]},
        ],
    )
    recs = read_records(answers, "mt_bench", with_drafts=True, questions=questions)
    assert [(r.prompt, r.followups, r.drafts) for r in recs] == [("p1", [], ["d1"]), ("q1", ["q2"], ["a1", "a2"])]
    assert turn_prompt(recs[1], 1, ["R1"]) == [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "R1"},
        {"role": "user", "content": "q2"},
    ]
    gen = read_records(questions, "mt_bench", with_drafts=False)
    assert [(r.prompt, r.followups, r.drafts) for r in gen] == [("q1", ["q2"], []), ("p1", [], [])]
    with pytest.raises(FormatError, match="--questions"):
        read_records(answers, "mt_bench", with_drafts=True)


def test_refined_pairs_read_back_what_refined_output_wrote(tmp_path):
    from diffpo_jax.records.formats import refined_output, refined_pairs

    jsonl = read_records(write_jsonl(tmp_path / "a.jsonl", [{"prompt": "P", "draft": "d"}]), "jsonl", with_drafts=True)[
        0
    ]
    assert refined_pairs("jsonl", refined_output("jsonl", jsonl, ["r"], [{}])) == ("P", [("d", "r")])
    assert refined_pairs("jsonl", dict(jsonl.raw, error="too long")) == ("P", [])
    (tmp_path / "b.json").write_text(json.dumps([{"instruction": "I", "output": "d"}]))
    alpaca = read_records(tmp_path / "b.json", "alpaca_eval", with_drafts=True)[0]
    assert refined_pairs("alpaca_eval", refined_output("alpaca_eval", alpaca, ["r"], [{}])) == ("I", [("d", "r")])
    mt = {"question_id": 3, "model_id": "m", "choices": [{"index": 0, "turns": ["d1", "d2"]}]}
    questions = write_jsonl(tmp_path / "q.jsonl", [{"question_id": 3, "turns": ["q1", "q2"]}])
    rec = read_records(write_jsonl(tmp_path / "m.jsonl", [mt]), "mt_bench", with_drafts=True, questions=questions)[0]
    assert refined_pairs("mt_bench", refined_output("mt_bench", rec, ["r1", "r2"], [{}, {}])) == (
        "question 3",
        [("d1", "r1"), ("d2", "r2")],
    )


def test_resumable_output(tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"prompt": str(i), "draft": "d"} for i in range(3)])
    recs = read_records(inp, "jsonl", with_drafts=True)
    out_path = tmp_path / "out.jsonl"
    out = ResumableOutput(out_path, "jsonl", recs, {"x": 1})
    assert out.todo == [0, 1, 2]
    out.append(0, {"n": 0})
    out.append(1, {"n": 1})
    with pytest.raises(FormatError, match="2 of 3 records done"):
        out.finish()
    assert not out_path.exists()
    with (tmp_path / "out.jsonl.partial").open("a") as f:
        f.write('{"index": 2, "source": "cut sh')  # a run killed mid-line: that record is redone
    with pytest.raises(FormatError, match="other options"):
        ResumableOutput(out_path, "jsonl", recs, {"x": 2})
    other = read_records(
        write_jsonl(tmp_path / "other.jsonl", [{"prompt": "z", "draft": "d"}] * 3), "jsonl", with_drafts=True
    )
    with pytest.raises(FormatError, match="record 0 does not match"):
        ResumableOutput(out_path, "jsonl", other, {"x": 1})
    with pytest.raises(FormatError, match="record index 1 is not in the input's 1 records"):
        ResumableOutput(out_path, "jsonl", recs[:1], {"x": 1})
    out = ResumableOutput(out_path, "jsonl", recs, {"x": 1})
    assert out.todo == [2] and out.done == {0: {"n": 0}, 1: {"n": 1}}
    assert "cut sh" not in (tmp_path / "out.jsonl.partial").read_text()  # the cut line is gone before appends
    out.append(2, {"n": 2})
    assert out.finish() == [{"n": i} for i in range(3)]
    assert read_jsonl(out_path) == [{"n": i} for i in range(3)]
    assert not (tmp_path / "out.jsonl.partial").exists()
    alpaca = ResumableOutput(tmp_path / "out.json", "alpaca_eval", recs[:1], {})
    alpaca.append(0, {"output": "x"})
    alpaca.finish()
    assert json.loads((tmp_path / "out.json").read_text()) == [{"output": "x"}]


def test_resumable_output_over_processes_resumes_with_any_count(tmp_path):
    """Processes take every P-th record left; each appends to its own partial file, in any order; a rerun with
    another process count reads them all and shares out the rest; process 0 writes OUT in input order. (The
    processes run one after another here, so the barriers are no-ops; tests/test_distributed.py runs them
    as real processes.)"""
    recs = read_records(
        write_jsonl(tmp_path / "in.jsonl", [{"prompt": str(i), "draft": "d"} for i in range(7)]),
        "jsonl",
        with_drafts=True,
    )
    out_path = tmp_path / "out.jsonl"

    def opened(process, processes):
        return ResumableOutput(out_path, "jsonl", recs, {}, process=process, processes=processes)

    first = [opened(p, 3) for p in range(3)]
    assert [o.todo for o in first] == [[0, 3, 6], [1, 4], [2, 5]]
    first[2].append(5, {"n": 5})  # process 2 wrote record 5, then every process was killed
    first[1].append(1, {"n": 1})
    assert sorted(f.name for f in tmp_path.glob("out.jsonl.partial*")) == [
        "out.jsonl.partial",
        "out.jsonl.partial.1",
        "out.jsonl.partial.2",
    ]
    second = [opened(p, 2) for p in range(2)]
    assert [o.todo for o in second] == [[0, 3, 6], [2, 4]]
    for o in reversed(second):
        for i in o.todo:
            o.append(i, {"n": i})
    assert second[0].finish() == [{"n": i} for i in range(7)]
    assert read_jsonl(out_path) == [{"n": i} for i in range(7)]
    assert list(tmp_path.glob("out.jsonl.partial*")) == []
    assert second[1].finish() == [{"n": i} for i in range(7)]  # the others read OUT once process 0 wrote it
