"""python -m diffpo_jax.score end to end on a tiny reward model with the embedded SmolLM2 tokenizer: scores
equal transformers' sequence classifier on the same chat-templated text, every format, `data build` from
scored trajectories, errors."""

import json
import math

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from diffpo_jax import score as score_cli
from diffpo_jax.data.trajectories import DATA_FILE, build
from tests.files import read_jsonl, write_jsonl

ATOL = 1e-4


def reference_score(rm, messages) -> float:
    _, model, tok = rm
    ids = tok.apply_chat_template(messages, tokenize=True, return_dict=False)
    with torch.no_grad():
        return float(model(torch.tensor([ids])).logits[0, 0])


def score(rm, *args) -> int:
    return score_cli.main(["--model", str(rm[0]), *map(str, args)])


ANSWERS = [
    {
        "prompt": "What is the capital of France?",
        "draft": "Paris, I think.",
        "refined": "The capital of France is Paris.",
        "id": 1,
    },
    {
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a prime."}],
        "draft": "9",
        "refined": "7 is prime.",
    },
    {"prompt": "Say hi.", "draft": "Hi!", "refined": "Hello there, how can I help you today?"},
]


def test_jsonl_scores_equal_transformers_and_the_summary(smol_rm, tmp_path, capsys):
    src = write_jsonl(tmp_path / "refined.jsonl", ANSWERS)
    out = tmp_path / "scored.jsonl"
    assert score(smol_rm, "--input", src, "--output", out, "--batch-size", 2, "--report", tmp_path / "r.md") == 0
    rows = read_jsonl(out)
    assert [{k: v for k, v in r.items() if k != "scores"} for r in rows] == ANSWERS  # fields and order kept
    for rec, row in zip(ANSWERS, rows):
        prompt = rec.get("messages") or [{"role": "user", "content": rec["prompt"]}]
        for field in ("draft", "refined"):
            expect = reference_score(smol_rm, prompt + [{"role": "assistant", "content": rec[field]}])
            assert row["scores"][field] == pytest.approx(expect, abs=ATOL)
    wins = np.mean([r["scores"]["refined"] > r["scores"]["draft"] for r in rows])
    printed = capsys.readouterr().out
    assert f"win rate of refined over draft: {wins:.3f}" in printed
    assert "| draft | 3 |" in (tmp_path / "r.md").read_text()
    again = tmp_path / "again.jsonl"
    assert score(smol_rm, "--input", src, "--output", again, "--batch-size", 3) == 0
    assert again.read_text() == out.read_text()


def test_scores_over_8_devices_are_the_bytes_of_one_device(smol_rm, tmp_path, capsys):
    """The same rows per device (here 1): the same output file bit for bit; the summary names the mesh."""
    src = write_jsonl(tmp_path / "in.jsonl", ANSWERS * 3)
    files = []
    for mesh, batch in (("1,1,1", 1), ("8,1,1", 8)):
        files.append(tmp_path / f"{mesh}.jsonl")
        assert score(smol_rm, "--input", src, "--output", files[-1], "--mesh", mesh, "--batch-size", batch) == 0
        assert f'"devices": "{mesh[0]} (cpu), mesh data={mesh[0]} fsdp=1 tensor=1"' in capsys.readouterr().out
    assert files[0].read_bytes() == files[1].read_bytes()


def test_a_killed_run_resumes_to_the_same_file(smol_rm, tmp_path, monkeypatch, capsys):
    """Killed after two records: OUT.partial holds them, no OUT; the rerun scores only the rest and writes the
    same bytes as an uninterrupted run; a rerun with other options is refused, naming the partial file."""
    from diffpo_jax.records import output

    src = write_jsonl(tmp_path / "in.jsonl", ANSWERS)
    full, out = tmp_path / "full.jsonl", tmp_path / "out.jsonl"
    assert score(smol_rm, "--input", src, "--output", full) == 0
    append = output.ResumableOutput.append

    def killed_after_two(self, index, output):
        if len(self.done) == 2:
            raise KeyboardInterrupt
        append(self, index, output)

    monkeypatch.setattr(output.ResumableOutput, "append", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        score(smol_rm, "--input", src, "--output", out)
    monkeypatch.setattr(output.ResumableOutput, "append", append)
    partial = out.with_name(out.name + ".partial")
    assert not out.exists() and len(partial.read_text().splitlines()) == 1 + 2
    capsys.readouterr()
    assert score(smol_rm, "--input", src, "--output", out, "--fields", "draft") == 2
    assert f"{partial}: written by a run with other options" in capsys.readouterr().err
    assert score(smol_rm, "--input", src, "--output", out) == 0
    assert out.read_text() == full.read_text() and not partial.exists()


def test_a_finished_output_is_complete_and_other_options_are_refused_unless_overwrite(
    smol_rm, tmp_path, capsys, monkeypatch
):
    """The same command on a finished output: 'already complete', exit 0, before the model loads, the file
    untouched; another --label or --fields: exit 2 naming it; --overwrite rescores, and that is then complete."""
    from diffpo_jax.reward import loading

    src = write_jsonl(tmp_path / "in.jsonl", ANSWERS)
    out = tmp_path / "out.jsonl"
    assert score(smol_rm, "--input", src, "--output", out) == 0
    files, text = sorted(tmp_path.iterdir()), out.read_text()
    load = loading.load_reward_model

    def refuse_to_load(*_args, **_kwargs):
        raise AssertionError("the reward model was loaded")

    monkeypatch.setattr(loading, "load_reward_model", refuse_to_load)
    capsys.readouterr()
    assert score(smol_rm, "--input", src, "--output", out, "--batch-size", 3) == 0
    assert (
        capsys.readouterr().out
        == f"{out}: already complete (the same options and input); pass --overwrite to redo it\n"
    )
    for extra, differs in (
        (("--label", 1), "label 0, now 1"),
        (("--fields", "draft"), 'fields ["draft", "refined"], now ["draft"]'),
    ):
        assert score(smol_rm, "--input", src, "--output", out, *extra) == 2
        err = capsys.readouterr().err
        assert err == f"error: {out}: written with other options ({differs}); pass --overwrite to replace it\n"
    assert sorted(tmp_path.iterdir()) == files and out.read_text() == text
    monkeypatch.setattr(loading, "load_reward_model", load)
    assert score(smol_rm, "--input", src, "--output", out, "--fields", "draft", "--overwrite") == 0
    assert [set(r["scores"]) for r in read_jsonl(out)] == [{"draft"}] * 3
    monkeypatch.setattr(loading, "load_reward_model", refuse_to_load)
    capsys.readouterr()
    assert score(smol_rm, "--input", src, "--output", out, "--fields", "draft") == 0
    assert "already complete" in capsys.readouterr().out


def test_an_output_folder_or_unreachable_url_fails_before_the_model_loads(tmp_path, capsys, monkeypatch):
    import sys

    from diffpo_jax.reward import loading

    def refuse_to_load(*_args, **_kwargs):
        raise AssertionError("the reward model was loaded")

    monkeypatch.setattr(loading, "load_reward_model", refuse_to_load)
    monkeypatch.setitem(sys.modules, "gcsfs", None)  # not installed
    src = write_jsonl(tmp_path / "in.jsonl", ANSWERS)
    folder = tmp_path / "folder"
    folder.mkdir()
    assert score_cli.main(["--model", "rm", "--input", str(src), "--output", str(folder)]) == 2
    assert capsys.readouterr().err == f"error: {folder}: is a folder; --output names the file to write\n"
    assert score_cli.main(["--model", "rm", "--input", str(src), "--output", "gs://bucket/scored.jsonl"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: gs://bucket/scored.jsonl: cannot be reached: ") and "gcsfs" in err
    assert err.endswith("; pip install -r requirements-gcs.txt\n") and err.count("\n") == 1
    assert sorted(tmp_path.iterdir()) == [folder, src]


def test_alpaca_eval_and_mt_bench(smol_rm, tmp_path):
    alpaca = tmp_path / "a.json"
    alpaca.write_text(
        json.dumps([{"instruction": "Say hi.", "output": "Hello!", "draft": "Hi", "generator": "m+diffpo"}])
    )
    assert score(smol_rm, "--input", alpaca, "--output", tmp_path / "a.out.json", "--format", "alpaca_eval") == 0
    (rec,) = json.loads((tmp_path / "a.out.json").read_text())
    assert set(rec["scores"]) == {"draft", "output"} and rec["generator"] == "m+diffpo"
    assert rec["scores"]["output"] == pytest.approx(
        reference_score(smol_rm, [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hello!"}]),
        abs=ATOL,
    )

    questions = write_jsonl(
        tmp_path / "question.jsonl", [{"question_id": 81, "turns": ["Name a fruit.", "And a colour?"]}]
    )
    answers = write_jsonl(
        tmp_path / "answers.jsonl",
        [
            {
                "question_id": 81,
                "answer_id": "x",
                "model_id": "m+diffpo",
                "choices": [{"index": 0, "turns": ["Apple.", "Red."], "draft_turns": ["Pear", "Blue"]}],
            }
        ],
    )
    out = tmp_path / "mt.out.jsonl"
    assert score(smol_rm, "--input", answers, "--output", out, "--format", "mt_bench", "--questions", questions) == 0
    (rec,) = read_jsonl(out)
    conversation = [
        {"role": "user", "content": "Name a fruit."},
        {"role": "assistant", "content": "Apple."},
        {"role": "user", "content": "And a colour?"},
        {"role": "assistant", "content": "Red."},
    ]
    assert rec["scores"]["turns"] == pytest.approx(reference_score(smol_rm, conversation), abs=ATOL)
    assert set(rec["scores"]) == {"turns", "draft_turns"}


def test_scored_trajectories_build_the_ranking_transformers_gives(smol_rm, tmp_path):
    prompts = ["What is the capital of France?", "Name a prime number.", "Say hi."]
    responses = [
        ["Paris.", "Lyon.", "It is Paris, the largest city.", "Marseille"],
        ["7", "9", "Two is prime."],
        ["Hi!", "Hello there.", "Go away."],
    ]
    src = write_jsonl(
        tmp_path / "responses.jsonl", [{"prompt": p, "all_generated_responses": r} for p, r in zip(prompts, responses)]
    )
    scored = tmp_path / "scored.jsonl"
    assert score(smol_rm, "--input", src, "--output", scored, "--format", "trajectories") == 0
    rows = read_jsonl(scored)
    build([str(scored)], tmp_path / "data")
    from array_record.python.array_record_module import ArrayRecordReader

    reader = ArrayRecordReader(str(tmp_path / "data" / DATA_FILE))
    built = {r["prompt"]: r for r in (json.loads(b) for b in reader.read_all())}
    for p, rs, row in zip(prompts, responses, rows):
        ref = [
            reference_score(smol_rm, [{"role": "user", "content": p}, {"role": "assistant", "content": r}]) for r in rs
        ]
        np.testing.assert_allclose(row["all_rm_scores"], ref, atol=ATOL)
        ranked = [rs[i] for i in np.argsort(ref, kind="stable")]
        assert built[p]["best"] == ranked[-1] and built[p]["others"] == ranked[:-1]


def test_best_of_n_keeps_the_argmax(smol_rm, tmp_path):
    src = write_jsonl(
        tmp_path / "samples.jsonl",
        [
            {"prompt": "Say hi.", "samples": ["Hi!", "Hello there.", "Go away.", "Hey."]},
            {"prompt": "Name a prime.", "samples": ["7", "9", "Two is prime.", "4"]},
        ],
    )
    out = tmp_path / "bon.jsonl"
    assert score(smol_rm, "--input", src, "--output", out, "--fields", "samples", "--best-of-n") == 0
    for row in read_jsonl(out):
        scores = row["scores"]["samples"]
        assert len(scores) == 4 and row["best_of_n"]["index"] == int(np.argmax(scores))
        assert row["best_of_n"]["response"] == row["samples"][int(np.argmax(scores))]
        assert row["best_of_n"]["score"] == max(scores)


def test_bad_input_is_one_line_and_writes_nothing(smol_rm, tmp_path, capsys):
    def fails(*args, match):
        out = tmp_path / "out.jsonl"
        assert score(smol_rm, *args, "--output", out) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and match in err, err
        assert not out.exists()

    missing = write_jsonl(tmp_path / "missing.jsonl", [ANSWERS[0], {"prompt": "x", "draft": "y"}])
    fails(
        "--input", missing, match=f"{missing}:2: field 'refined' (a string or a non-empty list of strings) is missing"
    )
    fails("--input", missing, "--fields", "samples", "--best-of-n", match=f"{missing}:1: field 'samples' (a list")
    fails("--input", missing, "--best-of-n", match="--best-of-n scores one list field")
    none = write_jsonl(tmp_path / "none.jsonl", [{"prompt": "x", "answer": "y"}])
    fails("--input", none, match="none of the answer fields draft, refined is present")
    traj = write_jsonl(tmp_path / "traj.jsonl", [{"prompt": "x", "all_generated_responses": "y"}])
    fails("--input", traj, "--format", "trajectories", match=f"{traj}:1: field 'all_generated_responses'")
    long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "x " * 600, "draft": "y"}])
    fails("--input", long, match=f"{long}:1: field 'draft': ")


def test_a_non_finite_score_is_an_error(smol_rm, tmp_path, capsys):
    folder = tmp_path / "nan_rm"
    folder.mkdir()
    for f in smol_rm[0].iterdir():
        if f.name != "model.safetensors":
            (folder / f.name).write_bytes(f.read_bytes())
    tensors = load_file(smol_rm[0] / "model.safetensors")
    tensors["score.weight"] = np.full_like(tensors["score.weight"], math.inf)
    save_file(tensors, folder / "model.safetensors")
    src = write_jsonl(tmp_path / "in.jsonl", ANSWERS[:1])
    out = tmp_path / "out.jsonl"
    assert score_cli.main(["--model", str(folder), "--input", str(src), "--output", str(out)]) == 2
    assert f"{src}:1: field 'draft': the reward model gave a non-finite score" in capsys.readouterr().err
    assert not out.exists()


# ------------------------------------------------------------------------------------------ recipes

PROMPTS = [
    "Name a colour.",
    "Say hello.",
    "Count to three.",
    "Why is the sky blue?",
    "Name a fruit.",
    "What is two plus two?",
    "Give me a word that rhymes with cat.",
    "Name a planet.",
]


@pytest.mark.slow
def test_best_of_n_from_generated_samples(smol_rm, tiny_init_dir, tmp_path):
    from diffpo_jax import generate as generate_cli
    from diffpo_jax.sources import load_model

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS[:3]])
    samples = tmp_path / "samples.jsonl"
    generate_cli.run(
        generate_cli.parse_args(
            [
                "--input",
                str(prompts),
                "--output",
                str(samples),
                "--num-samples",
                "4",
                "--temperature",
                "1.0",
                "--max-new-tokens",
                "6",
            ]
        ),
        load_model(str(tiny_init_dir)),  # SmolLM2's tokenizer on a tiny random model
    )
    for row in read_jsonl(samples):
        assert len(set(row["samples"])) == 4  # K distinct samples per prompt
    bon, again = tmp_path / "bon.jsonl", tmp_path / "again.jsonl"
    for out in (bon, again):
        assert score(smol_rm, "--input", samples, "--output", out, "--fields", "samples", "--best-of-n") == 0
    assert bon.read_text() == again.read_text()
    for row in read_jsonl(bon):
        best = int(np.argmax(row["scores"]["samples"]))
        assert row["best_of_n"]["index"] == best and row["best_of_n"]["response"] == row["samples"][best]


@pytest.mark.slow
def test_trajectories_from_own_base_models_train(smol_rm, smollm2, tiny_init_dir, tmp_path):
    """README's recipe offline: samples of two base models -> score -> data build (pooled by prompt) -> train."""
    from diffpo_jax import generate as generate_cli
    from diffpo_jax import train as train_cli
    from diffpo_jax.data import __main__ as data_cli
    from diffpo_jax.sources import load_model

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])
    scored = []
    for name, base in (("smollm2", smollm2), ("tiny", load_model(str(tiny_init_dir)))):
        samples, out = tmp_path / f"{name}.jsonl", tmp_path / f"{name}.scored.jsonl"
        generate_cli.run(
            generate_cli.parse_args(
                [
                    "--input",
                    str(prompts),
                    "--output",
                    str(samples),
                    "--num-samples",
                    "2",
                    "--temperature",
                    "1.0",
                    "--max-new-tokens",
                    "6",
                ]
            ),
            base,
        )
        assert (
            score(
                smol_rm, "--input", samples, "--output", out, "--format", "trajectories", "--responses-field", "samples"
            )
            == 0
        )
        scored.append(out)
    data = tmp_path / "data"
    assert (
        data_cli.main(
            [
                "build",
                "--source",
                str(scored[0]),
                "--source",
                str(scored[1]),
                "--responses-field",
                "samples",
                "--out",
                str(data),
            ]
        )
        == 0
    )
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["kept"] == len(PROMPTS) and manifest["responses_per_prompt"]["total"] == 4 * len(PROMPTS)
    run = tmp_path / "run"
    config = write_jsonl(
        tmp_path / "train.yaml",
        [
            dict(
                model=str(tiny_init_dir),
                data=str(data),
                output_dir=str(run),
                global_batch_size=8,
                prompt_len=32,
                response_len=8,
                num_epochs=1,
                save_every=1,
                log_every=1,
                loss={"con_weight": 1.0},
            )
        ],
    )
    assert train_cli.main(["--config", str(config)]) == 0
    (metrics,) = read_jsonl(run / "metrics.jsonl")
    assert metrics["step"] == 1 and math.isfinite(metrics["loss"])
