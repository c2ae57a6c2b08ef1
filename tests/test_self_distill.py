"""`python -m diffpo_jax.data distill`: a model's greedy answers become y(T), its samples y(0..T-1),
through `generate`; reruns resume from the work directory; bad options and inputs are one-line errors."""

import json

import pytest

from diffpo_jax import generate as generate_cli
from diffpo_jax.data.__main__ import main
from diffpo_jax.pipelines.self_distill import noise, repeats, spread_states
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
        # y(0) the sample (score -1), then up to 6 distinct intermediate states, noisiest first (score -noise),
        # then y(T): every state one the refinement passed through, the fixed point never among them
        others = by_prompt[prompt]["others"]
        assert by_prompt[prompt]["best"] == g and (h == g or others[0] == h), (prompt, others)
        states = others[1:] if h != g else others
        assert set(states) <= set(trajectory[:-1]) and g not in states and len(states) <= 6, (prompt, trajectory)
        counts.append(len(states))
    assert max(counts) > 1  # rows with intermediate states, rows with fewer than asked


def test_states_spread_over_noise_levels():
    # noise: the share of the fixed point's tokens a state does not hold at their positions
    assert noise([1, 2, 3, 4], [1, 2, 3, 4]) == 0.0
    assert noise([1, 9, 3], [1, 2, 3, 4]) == 0.5  # position 1 differs, position 3 is missing
    states = ["a", "b", "b", "c", "d", "e"]
    noises = [0.9, 0.5, 0.5, 0.0, 0.7, 0.2]  # "c" holds the fixed point's tokens: never a y(t)
    # distinct states with noise > 0 from the noisiest: a 0.9, d 0.7, b 0.5, e 0.2; picks spread over that order
    assert spread_states(states, noises, 2) == [("a", 0.9), ("e", 0.2)]
    assert spread_states(states, noises, 3) == [("a", 0.9), ("b", 0.5), ("e", 0.2)]
    assert spread_states(states, noises, 9) == [("a", 0.9), ("d", 0.7), ("b", 0.5), ("e", 0.2)]
    assert spread_states(["c"], [0.0], 4) == []


def test_repetitive_fixed_points():
    assert repeats([5, 5, 5, 5])  # one token four times
    assert repeats([1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3, 7])  # a 3-token run four times
    assert not repeats([1, 2, 3, 1, 2, 3, 1, 2, 3])  # three times only
    assert not repeats([5, 5, 5, 6, 5, 5, 5])
    assert not repeats(list(range(40)))
