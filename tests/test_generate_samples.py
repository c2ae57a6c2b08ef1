"""`generate --num-samples K`: K answers per prompt, each drawn with its own key
fold_in(fold_in(fold_in(key(seed), record), turn), sample), so the outputs depend neither on --batch-size
nor on resuming, and sample 0 is the K = 1 draft. The random tiny-llama (tiny_init_dir), loaded once;
every decode call here has 12 or 4 rows of 32-token prompts, so the sampler compiles twice."""

import json

import pytest

from diffpo_jax import generate as generate_cli
from diffpo_jax.records import cli
from diffpo_jax.records.formats import FormatError, read_records
from diffpo_jax.records.output import ResumableOutput
from tests.files import read_jsonl, write_jsonl

PROMPTS = ["Name a colour.", "Say hello.", "Count to three.", "Why is the sky blue?", "Name a fruit."]
TOKENS = "4"  # near-uniform draws over 49152 tokens: two samples of 4 tokens never coincide


@pytest.fixture(scope="module")
def loaded(tiny_init_dir):
    from diffpo_jax.sources import load_model

    return load_model(str(tiny_init_dir))


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    write_jsonl(path, ({"id": i, "prompt": p} for i, p in enumerate(PROMPTS)))
    return path


def _args(prompts, out, *extra):
    return generate_cli.parse_args(["--input", str(prompts), "--output", str(out), "--max-new-tokens", TOKENS, *extra])


def _generate(loaded, prompts, out, *extra):
    generate_cli.run(_args(prompts, out, *extra), loaded)
    return read_jsonl(out)


@pytest.mark.slow
def test_samples_are_distinct_reproducible_and_independent_of_batch_size_and_resume(loaded, prompts, tmp_path):
    hot = ("--temperature", "1.0", "--num-samples", "4")
    out = _generate(loaded, prompts, tmp_path / "b3.jsonl", *hot, "--batch-size", "3")  # 12 rows, last call 8
    assert [{"id": o["id"], "prompt": o["prompt"]} for o in out] == [
        {"id": i, "prompt": p} for i, p in enumerate(PROMPTS)
    ]
    for i, o in enumerate(out):
        assert "draft" not in o and len(set(o["samples"])) == 4, o
        assert o["sample_keys"] == [[0, i, 0, k] for k in range(4)]
    text = (tmp_path / "b3.jsonl").read_text()
    assert _generate(loaded, prompts, tmp_path / "b3.jsonl", *hot, "--batch-size", "3", "--overwrite") == out
    assert (tmp_path / "b3.jsonl").read_text() == text
    assert _generate(loaded, prompts, tmp_path / "b1.jsonl", *hot, "--batch-size", "1") == out  # 4 rows

    # resumed after record 0: the calls now hold records 1-3 and 4, the samples are the same
    resumed = tmp_path / "resumed.jsonl"
    args = _args(prompts, resumed, *hot, "--batch-size", "3")
    partial = ResumableOutput(
        resumed,
        "jsonl",
        read_records(prompts, "jsonl", with_drafts=False),
        cli.run_options(args, generate_cli.RESUME_OPTIONS),
    )
    partial.append(0, out[0] | {"samples": ["FROM PARTIAL"] * 4})
    generate_cli.run(args, loaded)
    lines = resumed.read_text().splitlines()
    assert json.loads(lines[0])["samples"] == ["FROM PARTIAL"] * 4 and lines[1:] == text.splitlines()[1:]

    # sample 0 is the K = 1 draft of the same seed; another seed draws other drafts
    drafts = _generate(loaded, prompts, tmp_path / "k1.jsonl", "--temperature", "1.0", "--batch-size", "4")  # 4 rows
    assert [d["draft"] for d in drafts] == [o["samples"][0] for o in out] and "samples" not in drafts[0]
    other = _generate(
        loaded, prompts, tmp_path / "s1.jsonl", "--temperature", "1.0", "--batch-size", "4", "--seed", "1"
    )
    assert all(a["draft"] not in b["samples"] for a, b in zip(other, out))


def test_greedy_samples_are_the_greedy_draft(loaded, prompts, tmp_path):
    greedy = _generate(loaded, prompts, tmp_path / "g.jsonl", "--temperature", "0", "--batch-size", "4")  # 4 rows
    twice = _generate(
        loaded, prompts, tmp_path / "g2.jsonl", "--temperature", "0", "--num-samples", "2", "--batch-size", "2"
    )
    assert [o["samples"] for o in twice] == [[g["draft"]] * 2 for g in greedy]


def test_num_samples_needs_jsonl_and_is_checked_on_resume(loaded, prompts, tmp_path, capsys):
    for extra, message in (
        (("--num-samples", "2", "--format", "alpaca_eval"), "--num-samples > 1 needs --format jsonl"),
        (("--num-samples", "0"), "--num-samples must be >= 1"),
    ):
        with pytest.raises(SystemExit) as e:
            _args(prompts, tmp_path / "o.json", *extra)
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert e.value.code == 2 and message in err, err
    ResumableOutput(
        tmp_path / "o.jsonl",
        "jsonl",
        read_records(prompts, "jsonl", with_drafts=False),
        cli.run_options(_args(prompts, tmp_path / "o.jsonl"), generate_cli.RESUME_OPTIONS),
    ).append(0, {"draft": "from the partial file"})
    with pytest.raises(FormatError, match="other options"):
        generate_cli.run(_args(prompts, tmp_path / "o.jsonl", "--num-samples", "2"), loaded)


def test_a_finished_output_is_complete_and_another_seed_is_refused(loaded, prompts, tmp_path, capsys, monkeypatch):
    """The same command on a finished output (any --batch-size: the outputs do not depend on it): 'already
    complete', exit 0, before the model loads, the file untouched; another --seed: exit 2 naming it."""
    out = tmp_path / "g.jsonl"
    greedy = ("--temperature", "0", "--batch-size", "4")
    _generate(loaded, prompts, out, *greedy)  # 4 rows, as in test_greedy_samples_are_the_greedy_draft
    files, text = sorted(tmp_path.iterdir()), out.read_text()

    def refuse_to_load(*_args, **_kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("diffpo_jax.sources.load_model", refuse_to_load)
    argv = ["--input", str(prompts), "--output", str(out), "--max-new-tokens", TOKENS, *greedy]
    capsys.readouterr()
    for extra in ((), ("--batch-size", "2")):
        assert generate_cli.main([*argv, *extra]) == 0
        assert (
            capsys.readouterr().out
            == f"{out}: already complete (the same options and input); pass --overwrite to redo it\n"
        )
    assert generate_cli.main([*argv, "--seed", "1"]) == 2
    assert (
        capsys.readouterr().err
        == f"error: {out}: written with other options (seed 0, now 1); pass --overwrite to replace it\n"
    )
    assert sorted(tmp_path.iterdir()) == files and out.read_text() == text
