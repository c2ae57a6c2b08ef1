"""Smoke tests of the benchmarks on tiny configs: each main() runs in-process and its own checks hold.

Not timed: the figures themselves are in bench/results/ (summary: bench/RESULTS.md).
"""

import pytest

from bench import common, memory_plan, refine_speed, serve_load, train_speed


@pytest.mark.slow
def test_refine_speed_tiny(tiny_llama_dir, tmp_path):
    results = tmp_path / "results"
    out = refine_speed.main(
        [
            "--model",
            str(tiny_llama_dir),
            "--prompts",
            "2",
            "--max-new-tokens",
            "8",
            "--block-sizes",
            "8",
            "--official-block",
            "8",
            "--results",
            str(results),
        ]
    )
    assert out["mismatches"] == 0  # every method reached jax_ar's greedy answers
    r = out["results"]
    assert sorted(k for k in r if k[0] == "jacobi") == [
        ("jacobi", kind, 8, realign) for kind in ("greedy", "sampled") for realign in (False, True)
    ]
    assert {k[0] for k in r} == {"jax_ar", "hf_generate", "jacobi", "official"}
    tokens = r[("jax_ar", "-", "-", "-")]["tokens"]
    assert r[("jax_ar", "-", "-", "-")]["forwards"] == r[("hf_generate", "-", "-", "-")]["forwards"] == tokens
    # A draft equal to the answer, in one window: one prefill and one pass per prompt.
    assert r[("jacobi", "greedy", 8, True)]["forwards"] == 2 * 2
    text = (results / "refine_speed.md").read_text()
    assert text.startswith("## Refine speed (bench/refine_speed.py, run refine_speed)\n")
    assert "| official | sampled | 8 |" in text


def test_train_speed_tiny(tiny_llama_dir, tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "train_speed.md").write_text("the previous run\n<!-- end train_speed -->\n")
    out = train_speed.main(
        [
            "--model",
            str(tiny_llama_dir),
            "--batch",
            "2",
            "--prompt-len",
            "8",
            "--response-len",
            "8",
            "--steps",
            "1",
            "--profile",
            "--results",
            str(results),
        ]
    )
    assert out["loss_rel"] < 1e-4  # same weights and batch: the two steps compute the same loss
    assert out["results"]["jax"]["first_loss"] > 0
    # The profiles name the compiled step's XLA ops (no python frames or runtime internals) and aten ops.
    jax_ops, torch_ops = ([k for k, _, _ in out["profiles"][name]] for name in ("jax", "torch"))
    assert any(k.startswith(("dot", "ynn_fusion", "xnn_fusion")) for k in jax_ops), jax_ops
    assert not any(k.startswith("$") or "::" in k for k in jax_ops), jax_ops
    assert "aten::mm" in torch_ops or "aten::addmm" in torch_ops, torch_ops
    assert all(out["profiles"][name][0][1] > 0 for name in ("jax", "torch"))  # largest first, timed
    text = (results / "train_speed.md").read_text()  # replaced whole
    assert text.startswith("## Train-step speed (bench/train_speed.py, run train_speed)\n") and "previous" not in text
    assert "One profiled step each" in text and "| `aten::" in text


def test_memory_plan_tiny(tmp_path):
    results = tmp_path / "results"
    out = memory_plan.main(
        [
            "--models",
            "tiny-llama",
            "--meshes",
            "1x2x2",
            "--prompt-len",
            "8",
            "--response-len",
            "8",
            "--chunk",
            "4",
            "--results",
            str(results),
        ]
    )
    r = out[("tiny-llama", (1, 2, 2))]
    # Donated state: output aliases the arguments; the per-device state is the fp32 params plus two moments.
    assert r["alias"] > 0 and r["argument"] >= r["alias"]
    assert r["argument"] >= 3 * 4 * r["params"] / 4 * 0.9
    assert r["flops"] > 0 and r["rows"] == 2
    assert "| tiny-llama | 1x2x2 |" in (results / "memory_plan.md").read_text()


def test_score_speed_tiny(smol_tokenizer, tmp_path):
    from bench import score_speed
    from tests import tiny

    config = tiny.llama_config(tie=True)
    config.vocab_size = len(smol_tokenizer)
    lm = tiny.save(config, tmp_path / "lm")
    smol_tokenizer.save_pretrained(lm)
    results = tmp_path / "results"
    out = score_speed.main(
        ["--model", str(lm), "--answers", "10", "--batch-size", "4", "--repeats", "1", "--results", str(results)]
    )
    assert out["max_abs_diff"] < score_speed.TOLERANCE and out["tokens"] > 10 * 20
    assert "| diffpo-jax Scorer | 10 |" in (results / "score_speed.md").read_text()


def test_accelerator_check_dry_run_prints_every_step():
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    script = root / "bench" / "accelerator_check.sh"
    run = lambda *a: subprocess.run(["bash", str(script), *a], capture_output=True, text=True, cwd=root)
    out = run("--dry-run", "--python", "py", "--install", "cuda12", "--model", "my model")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "+ py -m pip install -q -r requirements.txt -r requirements-test.txt 'jax[cuda12]'",
        "+ py -m pip install -q --no-deps -e .",
        "+ py -c 'import jax; d = jax.devices(); print(d); assert d[0].platform != '\\''cpu'\\'', "
        "'\\''no accelerator: jax sees only the CPU'\\'''",
        "+ py -m diffpo_jax.verify --model 'my model' --dtype float32",
        "+ py -m diffpo_jax.verify --model 'my model' --dtype bfloat16",
        "+ py -m bench.refine_speed --model 'my model'",
        "+ py -m bench.train_speed --model 'my model'",
        "+ py -m bench.score_speed --model 'my model'",
        "+ py -m bench.bf16_agreement --model 'my model'",
        "+ py -m bench.refine_speed --model 'my model' --mixed",
        "+ py -m bench.pass_cost --model 'my model' --profile",
        "+ py -m bench.decode_memory",
        "accelerator_check: done; each run's file in bench/results/ names the device",
    ]
    assert run("--install", "rocm").returncode == 2
    # every module it names runs here (their --help), so a renamed benchmark fails this test
    for module in (
        "diffpo_jax.verify",
        "bench.refine_speed",
        "bench.train_speed",
        "bench.score_speed",
        "bench.bf16_agreement",
        "bench.pass_cost",
        "bench.decode_memory",
    ):
        subprocess.run([sys.executable, "-m", module, "--help"], check=True, capture_output=True, cwd=root)
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    lint = subprocess.run([shellcheck, "-x", "bench/accelerator_check.sh"], cwd=root, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout


@pytest.mark.slow
def test_pass_cost_smollm2(tmp_path):
    """Every refined answer equals AR greedy (checked inside), and both tables come out."""
    from bench import pass_cost

    results = tmp_path / "results"
    out = pass_cost.main(
        [
            "--prompts",
            "1",
            "--max-new-tokens",
            "4",
            "--windows",
            "1,3",
            "--rows",
            "1,2",
            "--profile",
            "--results",
            str(results),
        ]
    )
    assert [r[0] for r in out["windows"]] == [1, 3] and out["windows"][0][1] == 1.0  # W = 1: one pass per token
    assert sorted(out["matmul"]) == [1, 2] and out["step"] > 0 and out["bound"] > 0
    text = (results / "pass_cost.md").read_text()
    assert "run pass_cost)" in text and "| window W | passes / token |" in text and "| M rows |" in text
    for name in ("AR decode", "refine, window 3"):  # where a step's time goes: XLA's ops (dots: `dot` or YNNPACK's)
        ops = [op for op, _, _ in out["profiles"][name][0]]
        assert any("dot" in op or op.startswith("ynn") for op in ops) and "while" in ops, ops
        assert f"Profile of one {name} of prompt 1" in text


@pytest.mark.slow
def test_refine_mixed_schedules_write_the_same_file(tiny_init_dir, tmp_path):
    """--mixed: both schedules run twice and write byte-identical files (SystemExit inside if not; the report says so)."""
    results = tmp_path / "results"
    refine_speed.main(
        [
            "--mixed",
            "--model",
            str(tiny_init_dir),
            "--mixed-records",
            "16",
            "--max-new-tokens",
            "8",
            "--results",
            str(results),
        ]
    )
    text = (results / "refine_mixed.md").read_text()
    assert "(bench/refine_speed.py, run refine_mixed)" in text and "| row refill (default) |" in text
    assert "output files byte-identical: **yes**" in text


def test_loop_passes_counts_each_batch_at_its_slowest_row():
    """The refine_mixed table's estimate: a batch costs its most passes; row refill is bounded by all / slots."""
    loop = refine_speed.loop_passes([1, 5, 1, 5], draft_chars=[1, 3, 2, 4], buckets=[0, 0, 0, 0], batch=2)
    assert loop == {
        "input order": 10,
        "batches sorted by prompt bucket and draft length": 6,  # shortest drafts first: [1, 1], [5, 5]
        "oracle: sorted by the refined passes": 6,
        "row refill bound: all passes / 2 slots": 6.0,
    }


@pytest.mark.slow
def test_bf16_agreement_smollm2(tmp_path):
    """fp32 Jacobi equals fp32 AR (the control); every pair of the table comes out."""
    from bench import bf16_agreement

    results = tmp_path / "results"
    out = bf16_agreement.main(
        ["--prompts", "8", "--max-new-tokens", "6", "--block-size", "4", "--results", str(results)]
    )
    assert out["float32 Jacobi vs float32 AR"] == (1.0, 1.0) and len(out) == 4
    assert (results / "bf16_agreement.md").is_file()


def test_agreement_counts_the_prefix_before_the_first_difference():
    from bench.bf16_agreement import agreement

    assert agreement([[1, 2, 3], [1, 9, 3, 4]], [[1, 2, 3], [1, 2, 3, 4]]) == (0.5, (1.0 + 0.25) / 2)


def test_settled_tokens_count_what_agrees_with_the_answer_from_then_on():
    from bench.jacobi_acceptance import settled

    class Pieces:  # token i decodes to PIECES[i]
        PIECES = ["The", " cat", " sat", " down", "."]

        def decode(self, ids, skip_special_tokens):
            return "".join(self.PIECES[i] for i in ids)

    answer = [0, 1, 2, 3, 4]  # "The cat sat down.", 6 tokens with the stop token
    states = ["The dog ran", "The cat sat up", "The cat ran down.", "The cat sat down.", "The cat sat down."]
    # pass 2 agrees to " sat" by chance; pass 3 changes it, so only "The cat" is settled after pass 2
    assert settled(Pieces(), answer, 6, states) == [1, 2, 2, 5, 6]


def test_export_memory_tiny(tiny_llama_dir, tmp_path):
    """One process: no device holds more than its shards plus a layer's shard, where the replicated gather
    holds a whole tensor on every device; both files equal the one-device export (checked inside)."""
    from bench import export_memory

    results = tmp_path / "results"
    out = export_memory.main(
        ["--model", str(tiny_llama_dir), "--mesh", "1,8,1", "--max-shard-size", "1MB", "--results", str(results)]
    )
    (shards, *_), (replicated, *_) = out.values()
    assert shards < replicated / 4 and all(r[-1] for r in out.values())
    assert (results / "export_memory.md").read_text().startswith("## Export memory (bench/export_memory.py, run")


def test_loop_passes_of_the_schedules():
    from bench.refine_speed import loop_passes

    got = loop_passes([1, 9, 1, 9], draft_chars=[1, 2, 3, 4], buckets=[64, 64, 64, 64], batch=2)
    assert got == {
        "input order": 18,
        "batches sorted by prompt bucket and draft length": 18,
        "oracle: sorted by the refined passes": 10,
        "row refill bound: all passes / 2 slots": 10.0,
    }


def test_each_run_writes_its_own_file_and_its_figure_beside_the_folder(tmp_path, capsys):
    results = tmp_path / "results"
    head = common.header("A title", "run-1", "bench.some_bench", ["--x", "a b"], "a machine")
    assert head.startswith("## A title (bench/some_bench.py, run run-1)\n")
    assert "- command: `python -m bench.some_bench --x 'a b'`" in head
    common.report(results, "run-1", head + "first\n")
    common.report(results, "run-1", head + "second\n")  # a rerun replaces the whole file
    common.report(results, "run-2", "other\n")
    assert (results / "run-1.md").read_text() == head + "second\n"
    assert (results / "run-2.md").read_text() == "other\n"
    common.report("-", "run-3", "printed only\n")
    assert "printed only" in capsys.readouterr().out
    assert sorted(p.name for p in results.iterdir()) == ["run-1.md", "run-2.md"]
    curves = {"a run": [{"step": 0, "eval_passes_per_token": 1.0, "eval_ar": 2.0}]}
    link = common.figure(results, "run-1", curves, "passes", "L_AR")
    assert link.endswith("(../figures/run_1.png)") and (tmp_path / "figures" / "run_1.png").is_file()
    assert common.figure("-", "run-4", curves, "passes", "L_AR").endswith("(../figures/run_4.png)")
    assert not (tmp_path / "figures" / "run_4.png").exists()


@pytest.mark.slow
def test_serve_load_tiny(tiny_init_dir, tmp_path):
    """Both services (2 slots, 1 slot) in subprocesses on a tiny model, a closed loop of 2 clients and Poisson
    arrivals: every response well formed and each request's answer the same in every run."""
    model = str(tiny_init_dir)
    out = serve_load.main(
        ["--model", model, "--draft-model", model, "--batch-size", "2", "--clients", "2", "--rates", "4",
         "--requests", "3", "--max-new-tokens", "8", "--block-size", "4", "--results", str(tmp_path / "results")]
    )  # fmt: skip
    assert out["bad"] == 0 and out["mismatches"] == 0
    assert [(r[0], r[1], r[2]) for r in out["rows"]] == [
        (name, load, 3) for name in ("2 slots", "1 slot") for load in ("closed 2", "poisson 4/s")
    ]
    assert (tmp_path / "figures" / "serve_load.png").is_file()
