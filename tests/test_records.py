"""The answer files of generate / refine / score: reading the formats (every problem one line naming the file,
line and field), what refine writes and reads back, the resumable output over processes, a finished output
kept (OUT.done), and every CLI option either in the resume check or known not to change the output."""

import json

import pytest

from diffpo_jax.records import output
from diffpo_jax.records.formats import FormatError, read_records, turn_prompt
from diffpo_jax.records.output import OutputComplete, ResumableOutput
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


def _finished(out_path, recs, options):
    out = ResumableOutput(out_path, "jsonl", recs, options)
    for i in out.todo:
        out.append(i, {"n": i})
    out.finish()


def test_a_finished_output_is_complete_and_anything_else_there_is_refused_unless_overwrite(tmp_path):
    """The same options and input on a finished OUT: OutputComplete, nothing written. Other options, another
    input, OUT changed since, or an OUT with no OUT.done: refused with one line naming what differs, nothing
    written; `overwrite` redoes it, and the new OUT.done makes the new options the complete ones."""
    recs = read_records(
        write_jsonl(tmp_path / "in.jsonl", [{"prompt": str(i), "draft": "d"} for i in range(3)]),
        "jsonl",
        with_drafts=True,
    )
    other = read_records(
        write_jsonl(tmp_path / "other.jsonl", [{"prompt": "z", "draft": "d"}] * 3), "jsonl", with_drafts=True
    )
    out_path = tmp_path / "out.jsonl"
    _finished(out_path, recs, {"max_new_tokens": 8, "block_size": 32})
    files, text = sorted(p.name for p in tmp_path.iterdir()), out_path.read_text()
    assert files == ["in.jsonl", "other.jsonl", "out.jsonl", "out.jsonl.done"]
    with pytest.raises(OutputComplete) as e:
        ResumableOutput(out_path, "jsonl", recs, {"max_new_tokens": 8, "block_size": 32})
    assert str(e.value) == f"{out_path}: already complete (the same options and input); pass --overwrite to redo it"
    for records, options, message in (
        (recs, {"max_new_tokens": 16, "block_size": 32}, "written with other options (max_new_tokens 8, now 16)"),
        (recs, {"max_new_tokens": 8}, "written with other options (block_size 32, now unset)"),
        (other, {"max_new_tokens": 8, "block_size": 32}, "written from another input (3 records, now 3)"),
        (recs[:2], {"max_new_tokens": 8, "block_size": 32}, "written from another input (3 records, now 2)"),
    ):
        with pytest.raises(FormatError) as e:
            ResumableOutput(out_path, "jsonl", records, options)
        assert str(e.value).startswith(f"{out_path}: {message}") and "\n" not in str(e.value)
        assert str(e.value).endswith("; pass --overwrite to replace it")
    out_path.write_text(text.replace('"n": 2', '"n": 3'))
    with pytest.raises(FormatError, match="changed since it was written"):
        ResumableOutput(out_path, "jsonl", recs, {"max_new_tokens": 8, "block_size": 32})
    (tmp_path / "out.jsonl.done").unlink()
    with pytest.raises(FormatError, match="already exists, with no out.jsonl.done naming the options"):
        ResumableOutput(out_path, "jsonl", recs, {"max_new_tokens": 8, "block_size": 32})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "other.jsonl", "out.jsonl"]  # none written

    out_path.unlink()
    _finished(out_path, recs, {"max_new_tokens": 8})
    text = out_path.read_text()
    redo = ResumableOutput(out_path, "jsonl", recs, {"max_new_tokens": 16}, overwrite=True)
    assert redo.todo == [0, 1, 2] and not (tmp_path / "out.jsonl.done").exists()
    assert out_path.read_text() == text  # the old OUT stays until the new one replaces it
    for i in redo.todo:
        redo.append(i, {"m": i})
    redo.finish()
    assert read_jsonl(out_path) == [{"m": i} for i in range(3)]
    with pytest.raises(OutputComplete):
        ResumableOutput(out_path, "jsonl", recs, {"max_new_tokens": 16})
    with pytest.raises(OutputComplete):  # the input's name does not matter, its records do
        ResumableOutput(
            out_path,
            "jsonl",
            read_records(
                write_jsonl(tmp_path / "copy.jsonl", [{"prompt": str(i), "draft": "d"} for i in range(3)]),
                "jsonl",
                with_drafts=True,
            ),
            {"max_new_tokens": 16},
        )


def test_partial_files_of_other_options_are_refused_unless_overwrite(tmp_path):
    recs = read_records(
        write_jsonl(tmp_path / "in.jsonl", [{"prompt": "a", "draft": "d"}] * 2), "jsonl", with_drafts=True
    )
    out_path = tmp_path / "out.jsonl"
    ResumableOutput(out_path, "jsonl", recs, {"block_size": 32, "realign": True}).append(0, {"n": 0})
    with pytest.raises(FormatError) as e:
        ResumableOutput(out_path, "jsonl", recs, {"block_size": 16, "realign": False})
    assert str(e.value) == (
        f"{out_path}.partial: written by a run with other options (block_size 32, now 16; realign true, now false); "
        "pass --overwrite to start over"
    )
    redo = ResumableOutput(out_path, "jsonl", recs, {"block_size": 16, "realign": False}, overwrite=True)
    assert redo.todo == [0, 1] and redo.done == {}
    assert read_jsonl(tmp_path / "out.jsonl.partial") == [{"options": {"block_size": 16, "realign": False}}]
    # a partial file with no record yet (a run stopped before its first, e.g. by a wrong --model): replaced
    assert ResumableOutput(out_path, "jsonl", recs, {"block_size": 8}).todo == [0, 1]
    assert read_jsonl(tmp_path / "out.jsonl.partial") == [{"options": {"block_size": 8}}]


def test_a_run_killed_between_out_and_its_done_file_finishes_on_rerun(tmp_path, monkeypatch):
    """OUT is written before OUT.done: killed between the two, the partial files are still there, so the rerun
    is this run going on (not an OUT of unknown origin): it writes OUT.done, and the next rerun is complete."""
    recs = read_records(
        write_jsonl(tmp_path / "in.jsonl", [{"prompt": "a", "draft": "d"}] * 2), "jsonl", with_drafts=True
    )
    out_path = tmp_path / "out.jsonl"
    out = ResumableOutput(out_path, "jsonl", recs, {})
    out.append(0, {"n": 0})
    out.append(1, {"n": 1})
    write_whole = output._write_whole

    def killed_at_the_done_file(path, text):
        if path.name.endswith(".done"):
            raise KeyboardInterrupt
        write_whole(path, text)

    monkeypatch.setattr(output, "_write_whole", killed_at_the_done_file)
    with pytest.raises(KeyboardInterrupt):
        out.finish()
    monkeypatch.setattr(output, "_write_whole", write_whole)
    assert read_jsonl(out_path) == [{"n": 0}, {"n": 1}] and not (tmp_path / "out.jsonl.done").exists()
    again = ResumableOutput(out_path, "jsonl", recs, {})
    assert again.todo == []
    assert again.finish() == [{"n": 0}, {"n": 1}]
    with pytest.raises(OutputComplete):
        ResumableOutput(out_path, "jsonl", recs, {})


def test_reopening_never_cuts_the_partial_file_short(tmp_path, monkeypatch):
    """Each start rewrites the partial file (the cut last line dropped, parts merged): through a new file
    renamed over it, so a kill during that write leaves every record done before."""
    from etils import epath

    recs = read_records(
        write_jsonl(tmp_path / "in.jsonl", [{"prompt": "a", "draft": "d"}] * 3), "jsonl", with_drafts=True
    )
    out_path = tmp_path / "out.jsonl"
    first = ResumableOutput(out_path, "jsonl", recs, {})
    first.append(0, {"n": 0})
    first.append(1, {"n": 1})
    path_type, write_text = type(epath.Path(tmp_path)), type(epath.Path(tmp_path)).write_text

    def killed_while_writing(self, data, *args, **kwargs):  # the file opened (emptied), half written, killed
        write_text(self, data[: len(data) // 2], *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(path_type, "write_text", killed_while_writing)
    with pytest.raises(KeyboardInterrupt):
        ResumableOutput(out_path, "jsonl", recs, {})
    monkeypatch.setattr(path_type, "write_text", write_text)
    assert ResumableOutput(out_path, "jsonl", recs, {}).done == {0: {"n": 0}, 1: {"n": 1}}


@pytest.mark.parametrize("module", ["generate", "refine", "score"])
def test_every_option_is_in_the_resume_check_or_cannot_change_the_output(module):
    """Walks every option of the CLI's parser: each is in RESUME_OPTIONS (a rerun with another value is refused
    or redone) or on NEUTRAL_OPTIONS (commented: why it cannot change the output), never both; a new option
    fails here until it is placed."""
    import importlib

    cli = importlib.import_module(f"diffpo_jax.{module}")
    options = {action.dest for action in cli.parser()._actions}
    resume, neutral = set(cli.RESUME_OPTIONS), set(cli.NEUTRAL_OPTIONS)
    assert not resume & neutral
    assert options - resume - neutral == set(), "place each new option in RESUME_OPTIONS or NEUTRAL_OPTIONS"
    assert resume | neutral <= options  # no stale names
    if module == "refine":
        assert {"block_size", "realign", "questions", "max_iterations", "hold_draft_prefix"} <= resume
