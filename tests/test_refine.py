"""The refine / generate CLIs: error paths without a model, a finished output kept, decoding on a tiny model
or the session's SmolLM2 (slow: refine text == transformers' greedy text), byte-identical files on any mesh.
The formats and the resumable output: tests/test_records.py."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from diffpo_jax import generate as generate_cli
from diffpo_jax import refine as refine_cli
from diffpo_jax.decoding.batching import Decoder, bucket
from diffpo_jax.records.cli import run_options
from diffpo_jax.records.formats import FormatError, read_records
from diffpo_jax.records.output import ResumableOutput
from tests.files import read_jsonl, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


def test_bucket():
    assert [bucket(n) for n in (1, 32, 33, 64, 65, 300)] == [32, 32, 64, 64, 128, 512]


def test_cli_bad_input_exits_2(tmp_path):
    """One subprocess per CLI: bad input is a one-line message and exit status 2, no traceback."""
    bad = tmp_path / "in.jsonl"
    bad.write_text('{"prompt": "a"}\n')
    for module, message in (
        ("refine", f"error: {bad}:1: field 'draft' (a string) is missing"),
        ("generate", f"error: {bad}:1: field 'prompt' (a string) or 'messages'"),
    ):
        args = [sys.executable, "-m", f"diffpo_jax.{module}", "--input", str(bad), "--output", str(tmp_path / "o")]
        if module == "generate":
            bad.write_text('{"promt": "a"}\n')
        p = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
        assert p.returncode == 2 and p.stderr.strip().startswith(message) and len(p.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "o").exists()


def test_output_equal_to_input_is_refused_unless_overwrite(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "a", "draft": "b"}\n')
    for cli in (refine_cli, generate_cli):
        assert cli.main(["--input", str(src), "--output", str(tmp_path / "." / "in.jsonl")]) == 2
        err = capsys.readouterr().err
        assert (
            err
            == f"error: {tmp_path / '.' / 'in.jsonl'}: is the input file; pass --overwrite to replace it with the results\n"
        )
        assert cli.parse_args(["--input", str(src), "--output", str(src), "--overwrite"]).overwrite
    assert src.read_text() == '{"prompt": "a", "draft": "b"}\n'


class Loading(Exception):
    """Raised by a load_model patched in: the run got past its output checks."""


def refuse_to_load(*_args, **_kwargs):
    raise Loading


def test_refine_on_a_finished_output_decodes_nothing_and_other_options_are_refused(tmp_path, capsys, monkeypatch):
    """Issue 38: a finished --max-new-tokens 8 output. The same command again: 'already complete', exit 0,
    before the model loads, the file untouched; --max-new-tokens 16 (once silently redone), and each option
    the resume check once missed, or another input / --questions file: exit 2 naming what differs, nothing
    written; --overwrite goes on to decode."""
    monkeypatch.setattr("diffpo_jax.sources.load_model", refuse_to_load)
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "a", "draft": "b"}, {"prompt": "c", "draft": "d"}])
    out = tmp_path / "out.jsonl"
    command = ["--input", str(src), "--output", str(out), "--max-new-tokens", "8"]
    options = run_options(refine_cli.parse_args(command), refine_cli.RESUME_OPTIONS)
    finished = ResumableOutput(out, "jsonl", read_records(src, "jsonl", with_drafts=True), options)
    for i in finished.todo:
        finished.append(i, {"refined": str(i)})
    finished.finish()
    files, text = sorted(tmp_path.iterdir()), out.read_text()
    capsys.readouterr()
    assert refine_cli.main(command) == 0
    assert (
        capsys.readouterr().out
        == f"{out}: already complete (the same options and input); pass --overwrite to redo it\n"
    )
    for extra, differs in (
        (["--max-new-tokens", "16"], "max_new_tokens 8, now 16"),
        (["--block-size", "16"], "block_size 32, now 16"),
        (["--no-realign"], "realign true, now false"),
        (["--max-iterations", "3"], "max_iterations null, now 3"),
        (["--hold-draft-prefix", "random:2"], 'hold_draft_prefix 0, now "random:2"'),
    ):
        assert refine_cli.main(command + extra) == 2
        assert capsys.readouterr().err == (
            f"error: {out}: written with other options ({differs}); pass --overwrite to replace it\n"
        )
    assert sorted(tmp_path.iterdir()) == files and out.read_text() == text
    with pytest.raises(Loading):
        refine_cli.main(command + ["--max-new-tokens", "16", "--overwrite"])
    assert out.read_text() == text and not out.with_name("out.jsonl.done").exists()  # replaced at the end

    # --questions by its content: the same file name with other questions is another run
    questions = write_jsonl(tmp_path / "q.jsonl", [{"question_id": 5, "turns": ["Name a fruit."]}])
    answers = write_jsonl(
        tmp_path / "a.jsonl",
        [{"question_id": 5, "model_id": "m", "answer_id": "x", "choices": [{"index": 0, "turns": ["Apple."]}]}],
    )
    mt = tmp_path / "mt.jsonl"
    command = ["--input", str(answers), "--output", str(mt), "--format", "mt_bench", "--questions", str(questions)]
    args = refine_cli.parse_args(command)
    recs = read_records(answers, "mt_bench", with_drafts=True, questions=questions)
    finished = ResumableOutput(mt, "mt_bench", recs, run_options(args, refine_cli.RESUME_OPTIONS))
    finished.append(0, {"question_id": 5})
    finished.finish()
    capsys.readouterr()
    assert refine_cli.main(command) == 0 and "already complete" in capsys.readouterr().out
    write_jsonl(questions, [{"question_id": 5, "turns": ["Name a vegetable."]}])
    assert refine_cli.main(command) == 2
    err = capsys.readouterr().err
    assert err.startswith(f'error: {mt}: written with other options (questions "sha1:') and err.count("\n") == 1


@pytest.mark.parametrize("cli", [refine_cli, generate_cli])
def test_an_output_folder_or_unreachable_url_fails_before_the_model_loads(cli, tmp_path, capsys, monkeypatch):
    """Once found only when the finished output was renamed into place, after all decoding: now one line,
    exit 2, before the model loads, nothing written (gs:// without gcsfs: the package and the requirements)."""
    monkeypatch.setattr("diffpo_jax.sources.load_model", refuse_to_load)
    monkeypatch.setitem(sys.modules, "gcsfs", None)  # not installed
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "a", "draft": "b"}])
    folder = tmp_path / "folder"
    folder.mkdir()
    assert cli.main(["--input", str(src), "--output", str(folder)]) == 2
    assert capsys.readouterr().err == f"error: {folder}: is a folder; --output names the file to write\n"
    assert cli.main(["--input", str(src), "--output", "gs://bucket/out.jsonl"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: gs://bucket/out.jsonl: cannot be reached: ") and err.count("\n") == 1
    assert "gcsfs" in err and err.endswith("; pip install -r requirements-gcs.txt\n")
    assert sorted(tmp_path.iterdir()) == [folder, src] and not list(folder.iterdir())


# ------------------------------------------------------------------------------------------ SmolLM2 (slow)

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    [{"role": "user", "content": "Name a primary color."}],
    "How do I reverse a list in Python?",
]


def reference_greedy(loaded, reference, prompt, max_new_tokens):
    import torch

    from diffpo_jax.chat import prompt_ids

    ids = torch.tensor([prompt_ids(loaded.tokenizer, prompt)])
    with torch.no_grad():
        out = reference.generate(
            ids, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=loaded.tokenizer.pad_token_id
        )
    new = out[0, ids.shape[1] :].tolist()
    if new and new[-1] in loaded.stop_tokens:
        new = new[:-1]
    return new, loaded.tokenizer.decode(new, skip_special_tokens=True)


@pytest.fixture(scope="module")
def greedy_refs(smollm2, smollm2_reference):
    return [reference_greedy(smollm2, smollm2_reference, p, 32) for p in PROMPTS]


@pytest.mark.slow
def test_smollm2_refine_equals_transformers_greedy(smollm2, greedy_refs):
    """Four real prompts (one a chat list), drafts: a wrong answer, empty, the greedy text itself, the greedy
    text with its first word dropped. Each refined text == transformers' greedy text."""
    assert 2 in smollm2.stop_tokens  # <|im_end|>
    dec = Decoder(smollm2, batch_size=4, max_new_tokens=32)
    texts = [t for _, t in greedy_refs]
    drafts = ["Berlin is the capital of Germany, a large city.", "", texts[2], texts[3].split(" ", 1)[1]]
    outs = dec.refine([dec.prompt_tokens(p) for p in PROMPTS], [dec.draft_tokens(d) for d in drafts], block_size=8)
    assert [o.text for o in outs] == texts
    assert [o.tokens for o in outs] == [ids for ids, _ in greedy_refs]
    assert all(o.stats["converged"] for o in outs)
    assert outs[2].stats["passes"] <= 2 * -(-outs[2].stats["tokens"] // 8)


@pytest.mark.slow
def test_refine_cli_jsonl_resume_and_mt_bench(smollm2, tmp_path):
    """jsonl: fields kept, order kept, a record already in OUT.partial is not redone; mt_bench: turn by
    turn, +diffpo, drafts kept; a prompt past the context is an error naming the record."""
    rows = [{"id": i, "prompt": p, "draft": "Sure."} for i, p in enumerate(PROMPTS[:3])]
    rows[2] = {"id": 2, "messages": PROMPTS[2], "draft": ""}
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    common = ["--max-new-tokens", "8", "--block-size", "4", "--batch-size", "2"]
    args = refine_cli.parse_args(["--input", str(inp), "--output", str(tmp_path / "out.jsonl"), *common])
    recs = read_records(inp, "jsonl", with_drafts=True)
    partial = ResumableOutput(tmp_path / "out.jsonl", "jsonl", recs, run_options(args, refine_cli.RESUME_OPTIONS))
    partial.append(0, rows[0] | {"refined": "FROM PARTIAL", "stats": {}})
    summary = refine_cli.run(args, smollm2)
    out = read_jsonl(tmp_path / "out.jsonl")
    assert [o["id"] for o in out] == [0, 1, 2] and out[0]["refined"] == "FROM PARTIAL"
    assert all({k: o[k] for k in r} == r for o, r in zip(out, rows))
    assert out[1]["stats"]["tokens"] <= 8 and out[1]["stats"]["passes"] >= 1 and out[2]["refined"]
    assert summary["records"] == 3 and summary["turns_refined"] == 2

    questions = write_jsonl(tmp_path / "q.jsonl", [{"question_id": 5, "turns": ["Name a fruit.", "And a vegetable?"]}])
    answers = write_jsonl(
        tmp_path / "a.jsonl",
        [
            {
                "question_id": 5,
                "model_id": "base",
                "answer_id": "x",
                "choices": [{"index": 0, "turns": ["Apple.", "Carrot."]}],
            }
        ],
    )
    for history in ("refined", "draft"):
        mt = tmp_path / f"mt_{history}.jsonl"
        refine_cli.run(
            refine_cli.parse_args(
                [
                    "--input",
                    str(answers),
                    "--output",
                    str(mt),
                    "--format",
                    "mt_bench",
                    "--questions",
                    str(questions),
                    "--history",
                    history,
                    *common,
                ]
            ),
            smollm2,
        )
        (rec,) = read_jsonl(mt)
        assert rec["model_id"] == "base+diffpo" and rec["answer_id"] == "x"
        assert rec["choices"][0]["draft_turns"] == ["Apple.", "Carrot."] and len(rec["choices"][0]["turns"]) == 2

    long = write_jsonl(
        tmp_path / "long.jsonl", [{"prompt": "hi", "draft": ""}, {"prompt": "word " * 9000, "draft": ""}]
    )
    with pytest.raises(FormatError, match=r"long.jsonl:2: turn 1: prompt is \d+ tokens; .* context of 8192"):
        refine_cli.run(
            refine_cli.parse_args(["--input", str(long), "--output", str(tmp_path / "l.jsonl"), *common]), smollm2
        )


@pytest.mark.slow
def test_generate_cli_alpaca_eval_greedy(smollm2, greedy_refs, tmp_path):
    """alpaca_eval drafts at temperature 0 are the greedy answers; output and generator are set, fields kept."""
    inp = tmp_path / "in.json"
    inp.write_text(json.dumps([{"instruction": p, "dataset": "x"} for p in PROMPTS[:2]]))
    args = generate_cli.parse_args(
        [
            "--input",
            str(inp),
            "--output",
            str(tmp_path / "out.json"),
            "--format",
            "alpaca_eval",
            "--temperature",
            "0",
            "--max-new-tokens",
            "32",
            "--batch-size",
            "4",
            "--model-id",
            "smol",
        ]
    )
    generate_cli.run(args, smollm2)
    out = json.loads((tmp_path / "out.json").read_text())
    assert out == [
        {"instruction": p, "dataset": "x", "output": t, "generator": "smol"}
        for p, (_, t) in zip(PROMPTS[:2], greedy_refs)
    ]


def test_a_bad_record_fails_before_any_decoding_or_is_skipped(tiny_init_dir, tmp_path, monkeypatch):
    """10,000 records, the last one past the context: the run stops naming its line before any forward
    (the decoder is never called). With --on-error skip a bad record goes out in its place with `error`,
    the others are refined, and the summary counts it."""
    from diffpo_jax.decoding.batching import Decoder
    from diffpo_jax.sources import load_model

    model = load_model(str(tiny_init_dir))  # SmolLM2's tokenizer, a tiny random model
    rows = [{"id": i, "prompt": f"Say {i}.", "draft": "Sure."} for i in range(9999)] + [
        {"prompt": "word " * 9000, "draft": ""}
    ]
    big = write_jsonl(tmp_path / "big.jsonl", rows)
    common = ["--max-new-tokens", "8", "--block-size", "4", "--batch-size", "2"]

    def no_decoding(*_a, **_k):
        raise AssertionError("decoded before every record was checked")

    with monkeypatch.context() as m:
        m.setattr(Decoder, "refine", no_decoding)
        with pytest.raises(FormatError, match=r"big.jsonl:10000: turn 1: prompt is \d+ tokens"):
            refine_cli.run(
                refine_cli.parse_args(["--input", str(big), "--output", str(tmp_path / "b.jsonl"), *common]), model
            )
    assert not (tmp_path / "b.jsonl").exists()

    small = write_jsonl(tmp_path / "small.jsonl", [rows[0], rows[-1], rows[1]])
    out = tmp_path / "s.jsonl"
    summary = refine_cli.run(
        refine_cli.parse_args(["--input", str(small), "--output", str(out), "--on-error", "skip", *common]), model
    )
    got = read_jsonl(out)
    assert [g.get("id") for g in got] == [0, None, 1] and "refined" in got[0] and "refined" in got[2]
    assert got[1]["prompt"] == rows[-1]["prompt"] and "refined" not in got[1]
    assert got[1]["error"].startswith(f"{small}:2: turn 1: prompt is ")
    assert summary["skipped"] == 1 and summary["turns_refined"] == 2


# ------------------------------------------------------------------------------------------ devices


@pytest.mark.slow
@pytest.mark.parametrize("cli", [refine_cli, generate_cli], ids=["refine", "generate"])
def test_outputs_are_byte_identical_on_any_mesh(cli, tiny_init_dir, tmp_path):
    """Rows data-parallel over 8 devices, fsdp- and tensor-sharded weights (the KV cache sharded with the
    heads): the same output file as one device; the summary names the devices and mesh."""
    rows = [
        {"id": i, "prompt": f"Question {i}: why" + " and why" * (i % 5), "draft": "Because" + " so" * (i % 7)}
        for i in range(12)
    ]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    outputs = {}
    for mesh, described in [
        ("1,1,1", "1 (cpu), mesh data=1 fsdp=1 tensor=1"),
        ("8,1,1", "8 (cpu), mesh data=8 fsdp=1 tensor=1"),
        ("2,2,2", "8 (cpu), mesh data=2 fsdp=2 tensor=2"),
        ("1,1,2", "2 (cpu), mesh data=1 fsdp=1 tensor=2"),
    ]:
        out = tmp_path / f"out-{mesh}.jsonl"
        args = cli.parse_args(
            [
                "--input",
                str(inp),
                "--output",
                str(out),
                "--model",
                str(tiny_init_dir),
                "--mesh",
                mesh,
                "--max-new-tokens",
                "12",
                "--batch-size",
                "8",
            ]
            + (["--block-size", "4"] if cli is refine_cli else ["--temperature", "0.7"])
        )
        assert cli.run(args)["devices"] == described
        outputs[mesh] = out.read_bytes()
    assert len(outputs["1,1,1"].splitlines()) == len(rows)
    assert all(o == outputs["1,1,1"] for o in outputs.values())


def test_a_mesh_the_batch_or_devices_cannot_make_is_one_line(tmp_path, capsys):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "a", "draft": "b"}])
    for mesh, message in [
        ("3,1,1", "error: batch size 8 does not split over the mesh's 3 data x fsdp devices"),
        ("16,1,1", "error: --mesh: mesh shape [16, 1, 1] needs 16 devices, have 8"),
    ]:
        rc = refine_cli.main(
            ["--input", str(inp), "--output", str(tmp_path / "o.jsonl"), "--mesh", mesh, "--model", "preset-free"]
        )
        err = capsys.readouterr().err.strip()
        assert rc == 2 and err.startswith(message), err


@pytest.mark.slow
@pytest.mark.parametrize("cli", [refine_cli, generate_cli], ids=["refine", "generate"])
def test_sorted_windows_batch_by_bucket_and_keep_the_output(cli, tiny_init_dir, tmp_path, monkeypatch):
    """--sort-window: both CLIs hand the whole window to the decoder, whose 4 slots decode it with row
    refill; the file equals the one decoded in input order (--sort-window 1: batches of consecutive
    records, as they come)."""
    rows = [
        {"id": i, "prompt": f"Question {i}: why" + " and why" * (18 * (i % 2)), "draft": "So" + " so" * (5 * (i % 4))}
        for i in range(16)
    ]  # two prompt buckets, alternating
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    method = "refine" if cli is refine_cli else "sample"
    original = getattr(Decoder, method)
    buckets = []

    def recording(self, prompts, *args, **kwargs):
        buckets.append({bucket(len(p)) for p in prompts})
        return original(self, prompts, *args, **kwargs)

    monkeypatch.setattr(Decoder, method, recording)
    outputs = {}
    for window in ("1", "256"):
        buckets.clear()
        out = tmp_path / f"out-{window}.jsonl"
        cli.run(
            cli.parse_args(
                [
                    "--input",
                    str(inp),
                    "--output",
                    str(out),
                    "--model",
                    str(tiny_init_dir),
                    "--sort-window",
                    window,
                    "--max-new-tokens",
                    "8",
                    "--batch-size",
                    "4",
                ]
                + (["--block-size", "4"] if cli is refine_cli else [])
            )
        )
        outputs[window] = out.read_bytes()
        mixed = sum(len(b) > 1 for b in buckets)
        if window == "1":
            assert mixed and len(buckets) == 4, buckets
        else:
            assert buckets == [{64, 128}], buckets  # one call: the window through the slots
    assert [json.loads(line)["id"] for line in outputs["256"].splitlines()] == list(range(16))
    assert outputs["256"] == outputs["1"]
