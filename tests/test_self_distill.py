"""`python -m diffpo_jax.data distill`: a model's greedy answers become y(T), its samples y(0..T-1),
through `generate`; reruns resume from the work directory; bad options and inputs are one-line errors."""

import json

import numpy as np
import pytest

from diffpo_jax import generate as generate_cli
from diffpo_jax.data.__main__ import main
from diffpo_jax.data.trajectories import rank
from diffpo_jax.training.evaluation import read_records
from tests.files import read_jsonl, write_jsonl

PROMPTS = ["What is the capital of France?", "Name a colour.", "Count to three.", "Say hello.", "Why is the sky blue?"]


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    write_jsonl(path, ({"id": str(i), "prompt": p} for i, p in enumerate(PROMPTS)))
    return path


def _distill(prompts, out, model, *extra):
    return main(
        [
            "distill",
            "--prompts",
            str(prompts),
            "--out",
            str(out),
            "--model",
            str(model),
            "--max-new-tokens",
            "6",
            "--batch-size",
            "4",
            *extra,
        ]
    )


def _answers(path):
    return [json.loads(line)["draft"] for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_greedy_answer_is_best_and_samples_are_ranked_hottest_first(tmp_path, prompts, tiny_init_dir, capsys):
    out = tmp_path / "data"
    assert _distill(prompts, out, tiny_init_dir, "--temperatures", "1.0,0.7") == 0
    assert f"{out}: {len(PROMPTS)} prompts" in capsys.readouterr().out
    work = tmp_path / "data.work"
    greedy, hot, warm = (_answers(work / n) for n in ("greedy.jsonl", "t1-s0.jsonl", "t0.7-s0.jsonl"))

    # y(T) is what `generate --temperature 0` writes for the same prompt
    reference = tmp_path / "greedy.jsonl"
    generate_cli.run(
        generate_cli.parse_args(
            [
                "--model",
                str(tiny_init_dir),
                "--input",
                str(prompts),
                "--output",
                str(reference),
                "--temperature",
                "0",
                "--max-new-tokens",
                "6",
            ]
        )
    )
    assert _answers(reference) == greedy

    by_prompt = {r["prompt"]: r for r in read_records(out)}
    assert sorted(by_prompt) == sorted(PROMPTS)
    for prompt, g, h, w in zip(PROMPTS, greedy, hot, warm):
        rec = by_prompt[prompt]
        assert rec["best"] == g
        # score = -temperature: the 1.0 sample before the 0.7 one; a sample equal to the greedy answer merges into it
        expected = [s for s in ([h, w] if h != w else [h]) if s != g]
        assert rec["others"] == expected, (prompt, rec)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["self_distill"]["runs"] == [
        {"file": "greedy.jsonl", "temperature": 0.0, "seed": 0},
        {"file": "t1-s0.jsonl", "temperature": 1.0, "seed": 1},
        {"file": "t0.7-s0.jsonl", "temperature": 0.7, "seed": 2},
    ]
    assert len(set(hot)) > 1  # a random model's samples differ: the test sees distinct y(t)

    # a rerun reuses every finished generate run and builds the same dataset, byte for byte
    data = (out / "trajectories-train.array_record-00000-of-00001").read_bytes()
    assert _distill(prompts, out, tiny_init_dir, "--temperatures", "1.0,0.7", "--overwrite") == 0
    assert capsys.readouterr().out.count(": done") == 3
    assert (out / "trajectories-train.array_record-00000-of-00001").read_bytes() == data

    # other options against the same work directory: refused, nothing rewritten
    assert _distill(prompts, out, tiny_init_dir, "--temperatures", "0.5", "--overwrite") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "other options" in err and "\n" not in err
    assert (out / "trajectories-train.array_record-00000-of-00001").read_bytes() == data
    assert _answers(work / "greedy.jsonl") == greedy and not list(work.glob("t0.5*"))


def test_errors_are_one_line(tmp_path, prompts, tiny_init_dir, capsys):
    out = tmp_path / "data"
    out.mkdir()
    assert _distill(prompts, out, tiny_init_dir) == 2
    assert "already exists" in capsys.readouterr().err
    assert _distill(prompts, tmp_path / "d2", tiny_init_dir, "--temperatures", "0.7,x") == 2
    assert "--temperatures '0.7,x'" in capsys.readouterr().err
    assert _distill(prompts, tmp_path / "d3", tiny_init_dir, "--temperatures", "0") == 2
    assert "temperatures > 0" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"text": "no prompt"}\n')
    assert _distill(bad, tmp_path / "d4", tiny_init_dir) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {bad}:2") and "\n" not in err, err
    assert not (tmp_path / "d4.work").exists()  # the prompts are checked before anything is written


def test_jacobi_states_join_the_samples(tmp_path, prompts, tiny_init_dir):
    out = tmp_path / "data"
    assert (
        _distill(prompts, out, tiny_init_dir, "--temperatures", "1.0", "--jacobi-states", "6", "--jacobi-block", "2")
        == 0
    )
    work = tmp_path / "data.work"
    greedy, hot = _answers(work / "greedy.jsonl"), _answers(work / "t1-s0.jsonl")
    refined = read_jsonl(work / "t1-s0.jacobi.jsonl")
    by_prompt = {r["prompt"]: r for r in read_records(out)}
    counts = []
    for prompt, g, h, rec in zip(PROMPTS, greedy, hot, refined):
        trajectory = rec["stats"]["trajectory"]
        assert len(trajectory) == rec["stats"]["passes"] >= 1
        assert rec["draft"] == h and rec["refined"] == trajectory[-1] == g  # Jacobi reaches the greedy answer
        passes = len(trajectory)
        # scores: sample -1, state after pass p of P: -1 + (p + 1) / P for 6 passes p spread over
        # 0 .. P - 2 (fewer when they round to the same pass), greedy 0
        picks = {round(x) for x in np.linspace(0, passes - 2, 6)} if passes >= 2 else set()
        counts.append(len(picks))
        pairs = [(g, 0.0), (h, -1.0)] + [(trajectory[p], -1 + (p + 1) / passes) for p in picks]
        expected = [text for text, _ in rank(pairs)]
        assert by_prompt[prompt]["best"] == g and by_prompt[prompt]["others"] == expected[:-1], (prompt, trajectory)
    assert max(counts) > 1 and min(counts) < 6  # rows with intermediate states, rows with fewer than asked
