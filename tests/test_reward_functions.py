"""`score --reward MODULE:FUNCTION`: Python reward functions (TRL's signature) through every part of `score`
that a reward model goes through: formats, trajectories -> `data build`, --best-of-n, the summary; and the
one-line errors (import, wrong length, non-number, NaN, an exception inside), with nothing written."""

from pathlib import Path

import pytest

from diffpo_jax import score as score_cli
from diffpo_jax.reward.functions import FunctionScorer, RewardFunctionError, load_reward_function
from tests.files import read_jsonl, write_jsonl

ROOT = Path(__file__).resolve().parent.parent
REWARDS = """
import math

def vowels(prompts, completions, **kwargs):
    return [sum(c in "aeiou" for c in t) / max(len(t), 1) for t in completions]

def by_prompt(prompts, completions):
    return [float(len(p if isinstance(p, str) else p[-1]["content"])) for p in prompts]

def raises(prompts, completions):
    if any("boom" in t for t in completions):
        raise RuntimeError("cannot score boom")
    return [1.0] * len(completions)

def short(prompts, completions):
    return [1.0] * (len(completions) - 1)

def text(prompts, completions):
    return ["high" if "boom" in t else 1.0 for t in completions]

def nan(prompts, completions):
    return [math.nan if "boom" in t else 0.5 for t in completions]
"""
RECORDS = [
    {"prompt": "Say hi.", "draft": "hmm", "refined": "Hello there, a fine day!"},
    {
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a prime."}],
        "draft": "boom",
        "refined": "Seven.",
    },
]


@pytest.fixture
def rewards(tmp_path):
    path = tmp_path / "rewards.py"
    path.write_text(REWARDS)
    return path


def run(rewards, function, src, out, *args) -> int:
    return score_cli.main(
        ["--reward", f"{rewards}:{function}", "--input", str(src), "--output", str(out), *map(str, args)]
    )


def test_jsonl_scores_are_the_functions_values_with_the_summary(rewards, tmp_path, capsys):
    src, out = write_jsonl(tmp_path / "in.jsonl", RECORDS), tmp_path / "out.jsonl"
    assert run(rewards, "vowels", src, out, "--batch-size", 3, "--report", tmp_path / "r.md") == 0
    fn = load_reward_function(f"{rewards}:vowels")
    rows = read_jsonl(out)
    for rec, row in zip(RECORDS, rows):
        assert {k: v for k, v in row.items() if k != "scores"} == rec
        assert row["scores"] == {f: fn(prompts=[None], completions=[rec[f]])[0] for f in ("draft", "refined")}
    wins = sum(r["scores"]["refined"] > r["scores"]["draft"] for r in rows) / len(rows)
    printed = capsys.readouterr().out
    assert f"win rate of refined over draft: {wins:.3f}" in printed and 0 < wins < 1
    assert f"by {rewards}:vowels" in (tmp_path / "r.md").read_text()
    # the prompt the function sees: the record's string, or its messages
    assert run(rewards, "by_prompt", src, tmp_path / "p.jsonl") == 0
    assert [r["scores"]["draft"] for r in read_jsonl(tmp_path / "p.jsonl")] == [7.0, 13.0]


def test_a_module_path_and_trajectories_into_data_build(tmp_path):
    """The shipped VADER reward, named as a module path, ranks trajectories for `data build`."""
    from diffpo_jax.data.trajectories import build
    from diffpo_jax.training.evaluation import read_records

    src = write_jsonl(
        tmp_path / "t.jsonl",
        [
            {
                "prompt": "How was the trip?",
                "all_generated_responses": [
                    "It was terrible and I hated it.",
                    "It was wonderful, thank you!",
                    "It was a trip.",
                ],
            }
        ],
    )
    out = tmp_path / "scored.jsonl"
    assert (
        score_cli.main(
            [
                "--reward",
                "examples/rewards/vader.py:compound",
                "--format",
                "trajectories",
                "--input",
                str(src),
                "--output",
                str(out),
            ]
        )
        == 0
    )
    scores = read_jsonl(out)[0]["all_rm_scores"]
    assert scores[1] > scores[2] > scores[0]
    build([str(out)], tmp_path / "data")
    (record,) = read_records(tmp_path / "data")
    assert record["best"] == "It was wonderful, thank you!" and record["others"][0] == "It was terrible and I hated it."


def test_best_of_n_picks_the_functions_best(rewards, tmp_path):
    src = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "x", "samples": ["zzz", "aaa", "bab"]}])
    out = tmp_path / "b.jsonl"
    assert run(rewards, "vowels", src, out, "--fields", "samples", "--best-of-n") == 0
    assert read_jsonl(out)[0]["best_of_n"] == {"field": "samples", "index": 1, "score": 1.0, "response": "aaa"}


@pytest.mark.parametrize(
    "function,message",
    [
        ("raises", "in.jsonl:2: field 'draft': reward function {R}:raises raised RuntimeError: cannot score boom"),
        ("short", "in.jsonl:1: field 'draft': reward function {R}:short returned 3 values for 4 answers"),
        ("text", "in.jsonl:2: field 'draft': reward function {R}:text returned 'high' (str), not a number"),
        ("nan", "in.jsonl:2: field 'draft': reward function {R}:nan returned nan"),
        ("missing", "--reward {R}:missing: {R} has no function 'missing'"),
    ],
)
def test_bad_functions_fail_in_one_line_naming_the_record_and_write_nothing(
    rewards, tmp_path, capsys, function, message
):
    src, out = write_jsonl(tmp_path / "in.jsonl", RECORDS), tmp_path / "out.jsonl"
    assert run(rewards, function, src, out, "--batch-size", 4) == 2
    errors = [
        line.split("error: ", 1)[1]
        for line in capsys.readouterr().err.replace("\r", "\n").splitlines()
        if "error: " in line
    ]
    assert len(errors) == 1 and errors[0].endswith(message.replace("{R}", str(rewards))), errors
    assert not out.exists()


def test_import_errors_name_the_spec(tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("import no_such_module_here\n")
    for spec, message in [
        ("no_such_pkg.mod:f", "importing no_such_pkg.mod failed: ModuleNotFoundError"),
        (f"{broken}:f", f"importing {broken} failed: ModuleNotFoundError"),
        (f"{tmp_path}/absent.py:f", "no file"),
        ("nocolon", "expected MODULE:FUNCTION"),
    ]:
        with pytest.raises(RewardFunctionError, match=message):
            FunctionScorer(spec, batch_size=2)


def test_reward_and_model_are_exclusive(tmp_path, capsys):
    with pytest.raises(SystemExit):
        score_cli.parse_args(["--reward", "a:b", "--model", "m", "--input", "i", "--output", "o"])
    with pytest.raises(SystemExit):
        score_cli.parse_args(["--input", "i", "--output", "o"])
