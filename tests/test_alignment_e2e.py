"""DiffPO aligns, end to end through the CLIs on a tiny model and a reward it can learn: `generate
--num-samples` -> `score --reward --format trajectories` -> `data build` -> `train` -> `refine` -> `score
--reward --fields draft,refined`: the refined answers score higher than their drafts on the training
prompts, and every score is the reward function's own value (bench/alignment.py is the real-model run)."""

import json
from pathlib import Path

import numpy as np
import pytest

from diffpo_jax import generate as generate_cli
from diffpo_jax import refine as refine_cli
from diffpo_jax import score as score_cli
from diffpo_jax import train as train_cli
from diffpo_jax.data import __main__ as data_cli
from diffpo_jax.reward.functions import load_reward_function
from tests.files import read_jsonl, write_jsonl

ROOT = Path(__file__).resolve().parent.parent
REWARD = "def vowels(prompts, completions, **kwargs):\n    return [sum(c in 'aeiou' for c in t) / max(len(t), 1) for t in completions]\n"
PROMPTS, SAMPLES, TOKENS = 16, 6, 8


@pytest.mark.slow
def test_refined_answers_beat_their_drafts_after_training_on_reward_ranked_samples(tmp_path, tiny_init_dir):
    rewards = tmp_path / "rewards.py"
    rewards.write_text(REWARD)
    spec = f"{rewards}:vowels"
    prompts = [
        json.loads(line)["prompt"] for line in (ROOT / "bench/data/alignment_prompts.jsonl").read_text().splitlines()
    ]
    src = tmp_path / "prompts.jsonl"
    write_jsonl(src, ({"prompt": p} for p in prompts[:PROMPTS]))
    samples = tmp_path / "samples.jsonl"
    assert (
        generate_cli.main(
            [
                "--model",
                str(tiny_init_dir),
                "--input",
                str(src),
                "--output",
                str(samples),
                "--num-samples",
                str(SAMPLES),
                "--temperature",
                "1.0",
                "--max-new-tokens",
                str(TOKENS),
                "--batch-size",
                "4",
            ]
        )
        == 0
    )
    scored = tmp_path / "scored.jsonl"
    assert (
        score_cli.main(
            [
                "--reward",
                spec,
                "--format",
                "trajectories",
                "--responses-field",
                "samples",
                "--input",
                str(samples),
                "--output",
                str(scored),
            ]
        )
        == 0
    )
    fn = load_reward_function(spec)
    for row in read_jsonl(scored):  # the ranking is the function's
        assert row["all_rm_scores"] == fn(prompts=[row["prompt"]] * SAMPLES, completions=row["samples"])
    data = tmp_path / "data"
    assert data_cli.main(["build", "--source", str(scored), "--responses-field", "samples", "--out", str(data)]) == 0

    config = tmp_path / "train.yaml"
    config.write_text(
        json.dumps(
            dict(
                model=str(tiny_init_dir),
                data=str(data),
                global_batch_size=8,
                prompt_len=48,
                response_len=TOKENS,
                seed=0,
                num_epochs=60,
                save_every=1000,
                log_every=40,
                tensorboard=False,
                loss={"con_weight": 1.0, "con_positions": "draft"},
                optimizer={"learning_rate": 3e-3, "warmup_ratio": 0.03},
            )
        )
    )
    run = tmp_path / "run"
    assert train_cli.main(["--config", str(config), f"output_dir={run}"]) == 0

    drafts = tmp_path / "drafts.jsonl"
    write_jsonl(drafts, ({"prompt": r["prompt"], "draft": r["samples"][0]} for r in read_jsonl(samples)))
    refined = tmp_path / "refined.jsonl"
    assert (
        refine_cli.main(
            [
                "--model",
                str(run),
                "--input",
                str(drafts),
                "--output",
                str(refined),
                "--max-new-tokens",
                str(TOKENS),
                "--block-size",
                "4",
                "--batch-size",
                "8",
            ]
        )
        == 0
    )
    final = tmp_path / "final.jsonl"
    assert (
        score_cli.main(["--reward", spec, "--fields", "draft,refined", "--input", str(refined), "--output", str(final)])
        == 0
    )
    rows = read_jsonl(final)
    for r in rows:
        assert r["scores"] == {f: fn(prompts=[r["prompt"]], completions=[r[f]])[0] for f in ("draft", "refined")}
    draft = np.mean([r["scores"]["draft"] for r in rows])
    refined_mean = np.mean([r["scores"]["refined"] for r in rows])
    wins = np.mean([r["scores"]["refined"] > r["scores"]["draft"] for r in rows])
    best = np.mean([max(r["all_rm_scores"]) for r in read_jsonl(scored)])
    print(f"draft {draft:.3f} refined {refined_mean:.3f} best-of-{SAMPLES} {best:.3f} wins {wins:.2f}")
    assert refined_mean > draft + 0.5 * (best - draft) and wins >= 0.6, (draft, refined_mean, best, wins)  # measured:
    # draft 0.315, refined 0.374 = best-of-6 0.374 (the refiner learned its y(T)), wins 0.88
