"""Does DiffPO align? SmolLM2-135M refiners trained on reward-ranked answers vs their drafts and Best-of-N
(the paper's Fig. 3 in miniature), with a rule-based reward: VADER's tone (examples/rewards/vader.py).

    python -m bench.alignment [--work out/alignment] [--runs NAME ...] [--steps-paper 32] [key=value ...]

Every stage keeps its outputs in WORK and a rerun reuses them (a killed run resumes: the CLIs resume
their .partial files, training resumes from its checkpoints), so the benchmark can span sessions.
1. Prompts: bench/data/alignment_prompts.jsonl (320 everyday requests written for this benchmark). The
   held-out 64 are the trainer's split (eval.holdout_prompts = 64: the prompts with the smallest hash of
   their id, training/evaluation.py), so the trainer's held-out eval and this benchmark use the same ones.
2. Base setups ("several base models"): SmolLM2 with its default system prompt at temperature 1.0, and
   with a grumpy system prompt at 0.7 (SETUPS). `generate --num-samples`: 3 answers per setup per prompt
   (6 pooled per prompt), 8 per setup for the held-out prompts (draft = sample 0, Best-of-k = the best of
   samples 0..k-1); MAX_NEW_TOKENS tokens each. The refiner never sees the system prompt.
3. `score --reward examples/rewards/vader.py:compound --format trajectories` on the 6 pooled answers
   of every prompt (user text only), then `data build`: y(T) = the best-toned answer.
4. Training (RUNS): the smollm2-135m preset's objective (w = 1 on the draft's positions), w = 0 (AR only)
   and the paper's (w = 1e3 on all positions), same data, order, learning rate (LR, 5x the preset's so a
   135M model moves within one epoch of 32 steps) and steps (the paper's setting: `--steps-paper`, 16 by
   default: it collapsed within 40 steps before); held-out eval (L_AR on the held-out y(T), Jacobi
   refinement) at step 0 and the end. One more: AR only for 3 epochs (96 steps), to see whether longer
   training on the same data closes the gap to Best-of-4; and the same as LoRA (rank 8 on every
   projection, lora.py) at 10x and 40x the lr: the embedded refiner's training. TIMED: the full and the
   LoRA train step measured back to back in this process (TIMING_STEPS steps each), with their Adam state.
5. Evaluation on the held-out prompts, per base setup: the reward of the draft; Best-of-2/4/8; the draft
   refined (Jacobi, window BLOCK, batch BATCH with row refill) by the untrained SmolLM2 and each trained
   refiner, holding R = 0 draft tokens and the official script's random 0..12 (`refine --hold-draft-prefix
   random:12`). Per method: mean reward, paired win rate over the draft with a 95% bootstrap interval,
   wall time per answer, passes per token, distinct tokens per answer, answer length. Times are measured
   in this run, after a warm-up, at BATCH rows: a draft is one sampled row, Best-of-k costs k rows plus k
   reward calls, refinement costs the draft plus its Jacobi decode.
Writes bench/results/alignment.md (tables, 5 held-out examples side by side, the trainer's L_AR) and
bench/figures/alignment.png (mean reward against time per answer, one panel per setup).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from bench.common import command, machine, table

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ROOT / "bench" / "data" / "alignment_prompts.jsonl"  # 320 {"prompt"} records
REWARD = "examples/rewards/vader.py:compound"
RESULTS_FILE = ROOT / "bench" / "results" / "alignment.md"
FIGURE = ROOT / "bench" / "figures" / "alignment.png"
SETUPS = {  # name: (file stem, system prompt or None for the model's default, temperature)
    "neutral, t=1.0": ("neutral", None, 1.0),
    "grumpy, t=0.7": (
        "grumpy",
        "You are a grumpy, impatient assistant. You answer curtly, complain, and point out what is wrong or annoying.",
        0.7,
    ),
}
TRAIN_SAMPLES, HELD_SAMPLES, HOLDOUT = 3, 8, 64
MAX_NEW_TOKENS, BATCH, BLOCK, EPOCHS, LR = 48, 16, 16, 1, 5e-5
TIMING_STEPS = 6  # train steps per run of the LoRA vs full fine-tuning timing (time_steps)
GEN_ROWS = 32  # rows per decode while sampling the answers (not timed; the timed drafts use BATCH)
BEST_OF = (2, 4, 8)
HOLDS = {"R=0": 0, "R=random 0..12": "random:12"}
RUNS = {  # name: (run dir under WORK/runs, overrides of the smollm2-135m preset)
    "presets (w=1, draft)": ("presets", ["loss.con_weight=1", "loss.con_positions=draft"]),
    "AR only (w=0)": ("ar-only", ["loss.con_weight=0"]),
    "paper (w=1e3, all)": ("paper", ["loss.con_weight=1000", "loss.con_positions=all"]),
    "paper at its scale (w=1e3/V, all)": (  # PyTorch KLDivLoss(reduction="mean"): w / V per token (loss.py)
        "paper-vocab",
        ["loss.con_weight=1000", "loss.con_norm=vocab", "loss.con_positions=all"],
    ),
    "AR only (w=0), 3 epochs": ("ar-only-3ep", ["loss.con_weight=0", "num_epochs=3"]),
    # LoRA: rank-8 adapters on every projection (lora.py), 10x and 40x the full runs' lr
    "LoRA r8, AR only (w=0), 3 epochs, lr 5e-4": (
        "lora-ar-3ep",
        ["loss.con_weight=0", "num_epochs=3", "lora.rank=8", "lora.alpha=16", "optimizer.learning_rate=5e-4"],
    ),
    "LoRA r8, AR only (w=0), 3 epochs, lr 2e-3": (
        "lora-ar-3ep-lr2e-3",
        ["loss.con_weight=0", "num_epochs=3", "lora.rank=8", "lora.alpha=16", "optimizer.learning_rate=2e-3"],
    ),
}
UNTRAINED = "untrained SmolLM2"
TIMED = ("AR only (w=0), 3 epochs", "LoRA r8, AR only (w=0), 3 epochs, lr 2e-3")  # full vs LoRA step (time_steps)
EXAMPLES = 5


def read_prompts(path: Path = PROMPTS) -> list[str]:
    """The `prompt` of each record of a JSONL prompt set (bench/data/)."""
    return [json.loads(line)["prompt"] for line in path.read_text().splitlines() if line.strip()]


def held_out(prompts: list[str]) -> list[int]:
    """Indices of the held-out prompts: the trainer's split of the dataset these prompts build."""
    from diffpo_jax.data.trajectories import record_id
    from diffpo_jax.training.evaluation import holdout_split

    return holdout_split([{"id": record_id(p)} for p in prompts], HOLDOUT)[1]


def generate_samples(
    work: Path,
    prompts: list[str],
    held: list[int],
    loaded,
    train_samples: int = TRAIN_SAMPLES,
    held_samples: int = HELD_SAMPLES,
    setups: dict = SETUPS,
) -> dict[str, dict[int, list[str]]]:
    """{setup: {prompt index: samples}}: train_samples per training prompt, held_samples per held-out one (sample
    k of a prompt does not depend on how many are drawn: records/loop.py sample_keys)."""
    from diffpo_jax import generate

    held_set = set(held)
    out = {}
    for setup, (stem, system, temperature) in setups.items():
        out[setup] = {}
        for part, idx, k in (
            ("train", [i for i in range(len(prompts)) if i not in held_set], train_samples),
            ("held", held, held_samples),
        ):
            if not idx or not k:
                continue
            path = work / "samples" / f"{stem}-{part}.jsonl"
            if not path.exists():
                src = path.with_name(path.stem + ".input.jsonl")
                src.parent.mkdir(parents=True, exist_ok=True)
                src.write_text("".join(json.dumps(_messages(prompts[i], system)) + "\n" for i in idx))
                print(f"generate: {setup}, {part} ({len(idx)} prompts x {k})", flush=True)
                generate.run(
                    generate.parse_args(
                        [
                            "--input",
                            str(src),
                            "--output",
                            str(path),
                            "--temperature",
                            str(temperature),
                            "--max-new-tokens",
                            str(MAX_NEW_TOKENS),
                            "--num-samples",
                            str(k),
                            "--batch-size",
                            str(GEN_ROWS // k),
                            "--seed",
                            "0",
                        ]
                    ),
                    loaded=loaded,
                )
            recs = [json.loads(line) for line in path.read_text().splitlines()]
            out[setup] |= {i: r["samples"] if k > 1 else [r["draft"]] for i, r in zip(idx, recs)}  # generate's fields
    return out


def _messages(prompt: str, system: str | None) -> dict:
    if system is None:
        return {"prompt": prompt}
    return {"messages": [{"role": "system", "content": system}, {"role": "user", "content": prompt}]}


def build_data(work: Path, prompts: list[str], responses: list[list[str]]) -> Path:
    """WORK/data: the ranked dataset of each prompt's `responses`, scored by `score --reward` (y(T) = the best)."""
    from diffpo_jax import score
    from diffpo_jax.data.trajectories import build

    data = work / "data"
    if data.exists():
        return data
    source, scored = work / "trajectories.jsonl", work / "trajectories.scored.jsonl"
    source.write_text(
        "".join(json.dumps({"prompt": p, "all_generated_responses": r}) + "\n" for p, r in zip(prompts, responses))
    )
    if not scored.exists():
        score.run(
            score.parse_args(
                [
                    "--reward",
                    str(ROOT / REWARD),
                    "--input",
                    str(source),
                    "--output",
                    str(scored),
                    "--format",
                    "trajectories",
                    "--batch-size",
                    "64",
                ]
            )
        )
    build([str(scored)], data)
    return data


def train_cached(out: Path, name: str, overrides: list[str]) -> Path:
    """Train the smollm2-135m preset with `overrides` into the run dir `out` (resumed, or reused once done)."""
    from diffpo_jax.training.config import load_config
    from diffpo_jax.training.trainer import train

    done = out / "done"
    if not done.exists():
        print(f"train: {name}", flush=True)
        common = [f"output_dir={out}", "prompt_len=64", f"response_len={MAX_NEW_TOKENS}", "save_every=16"]
        cfg = load_config(
            ROOT / "configs" / "train" / "smollm2-135m.yaml", [*common, "tensorboard=false", "log_every=4", *overrides]
        )
        result = train(cfg, log=lambda line: print(f"  {line}", flush=True))
        if result.stopped or result.step < result.total_steps:
            raise SystemExit(f"{name}: stopped at step {result.step}; rerun to resume")
        done.write_text(json.dumps({"step": result.step}) + "\n")
    return out


def train_run(work: Path, data: Path, name: str, steps: int | None) -> Path:
    """Train RUNS[name] into WORK/runs/DIR (resumed or reused when done); the run dir."""
    sub, overrides = RUNS[name]
    setup = [
        f"data={data}",
        f"num_epochs={EPOCHS}",
        f"optimizer.learning_rate={LR}",
        f"eval.holdout_prompts={HOLDOUT}",
        "eval.every=0",
        "eval.max_rows=64",
        f"eval.batch_size={BATCH}",
        f"eval.block_size={BLOCK}",
        *([f"max_steps={steps}"] if steps else []),
    ]
    return train_cached(work / "runs" / sub, name, [*setup, *overrides])


def evaluate_model(
    work: Path,
    name: str,
    source: str | None,
    prompts: list[str],
    held: list[int],
    samples: dict,
    reward,
    holds: dict = HOLDS,
    block: int = BLOCK,
) -> dict:
    """Per setup and hold: refine the held-out drafts with the model `source` (Jacobi window `block`): texts,
    rewards, stats, seconds (cached in WORK/eval)."""
    from diffpo_jax.decoding.batching import Decoder
    from diffpo_jax.refine import hold_lens, hold_max
    from diffpo_jax.sources import load_model

    cache = work / "eval" / f"{name.replace(' ', '_').replace('/', '_')}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    print(f"refine: {name}", flush=True)
    decoder = Decoder(load_model(source, dtype="float32"), batch_size=BATCH, max_new_tokens=MAX_NEW_TOKENS)
    prompt_ids = [decoder.prompt_tokens(prompts[i]) for i in held]
    result = {}
    for setup in SETUPS:
        drafts = [decoder.draft_tokens(samples[setup][i][0]) for i in held]
        for hold_name, spec in holds.items():
            lens = hold_lens(spec, list(range(len(held))))  # per answer under random:R, else None
            kw = dict(block_size=block, hold_draft_prefix=hold_max(spec))
            decoder.refine(prompt_ids[:BATCH], drafts[:BATCH], hold_lens=lens and lens[:BATCH], **kw)  # warm-up
            start = time.perf_counter()
            outs = decoder.refine(prompt_ids, drafts, hold_lens=lens, **kw)
            seconds = time.perf_counter() - start
            texts = [o.text for o in outs]
            result[f"{setup} | {hold_name}"] = {
                "texts": texts,
                "rewards": reward(texts),
                "seconds_per_answer": seconds / len(outs),
                "passes": sum(o.stats["passes"] for o in outs),
                "tokens": [len(o.tokens) for o in outs],
                "committed": sum(o.stats["tokens_per_pass"] * o.stats["passes"] for o in outs),
                "distinct": [len(set(o.tokens)) / max(len(o.tokens), 1) for o in outs],
            }
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(result))
    return result


def time_drafts(work: Path, prompts: list[str], held: list[int], loaded) -> dict[str, dict[str, float]]:
    """Per setup: the drafter's seconds per sampled answer and tokens/s, BATCH rows with row refill, after a
    warm-up (cached)."""
    import jax

    from diffpo_jax.decoding.batching import Decoder

    cache = work / "eval" / "drafter.json"
    if cache.exists():
        return json.loads(cache.read_text())
    decoder = Decoder(loaded, batch_size=BATCH, max_new_tokens=MAX_NEW_TOKENS)
    out = {}
    for setup, (_, system, temperature) in SETUPS.items():
        ids = [decoder.prompt_tokens(_messages(prompts[i], system).get("messages") or prompts[i]) for i in held]
        keys = jax.random.split(jax.random.key(1), len(ids))
        decoder.sample(ids[:BATCH], keys[:BATCH], temperature=temperature, top_p=1.0)  # warm-up
        start = time.perf_counter()
        outs = decoder.sample(ids, keys, temperature=temperature, top_p=1.0)
        seconds = time.perf_counter() - start
        out[setup] = {
            "seconds_per_answer": seconds / len(ids),
            "tokens_per_s": sum(len(o.tokens) for o in outs) / seconds,
        }
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(out))
    return out


def vader():
    """The benchmark's reward (REWARD) as a function of a list of answer texts."""
    from diffpo_jax.reward.functions import load_reward_function

    fn = load_reward_function(str(ROOT / REWARD))
    return lambda texts: [float(x) for x in fn(prompts=[""] * len(texts), completions=texts)]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.alignment", description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=ROOT / "out" / "alignment")
    ap.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS))
    ap.add_argument("--steps-paper", type=int, default=16, help="steps of the paper's setting (w = 1e3, all)")
    args = ap.parse_args(argv)
    from diffpo_jax.sources import load_model

    reward = vader()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    # what the kept samples depend on (a run dir's training settings are checked by the trainer on resume)
    settings = {
        "setups": SETUPS,
        "samples": [TRAIN_SAMPLES, HELD_SAMPLES, HOLDOUT],
        "max_new_tokens": MAX_NEW_TOKENS,
        "prompts": PROMPTS.read_text(),
    }
    kept = work / "settings.json"
    if kept.exists() and json.loads(kept.read_text()) != json.loads(json.dumps(settings)):
        raise SystemExit(f"{work} holds a run with other settings: use another --work or delete it")
    kept.write_text(json.dumps(settings))
    prompts = read_prompts()
    held = held_out(prompts)
    loaded = load_model(None, dtype="float32")
    args.tokenizer = loaded.tokenizer
    samples = generate_samples(work, prompts, held, loaded)
    pooled = [[a for setup in SETUPS for a in samples[setup][i][:TRAIN_SAMPLES]] for i in range(len(prompts))]
    data = build_data(work, prompts, pooled)  # every prompt's pooled TRAIN_SAMPLES answers per setup
    draft_seconds = time_drafts(work, prompts, held, loaded)
    start = time.perf_counter()
    reward(["warm-up"])
    sample_rewards = {s: [reward(samples[s][i]) for i in held] for s in SETUPS}
    score_seconds = (time.perf_counter() - start) / (len(SETUPS) * len(held) * HELD_SAMPLES)
    refiners = {UNTRAINED: evaluate_model(work, UNTRAINED, None, prompts, held, samples, reward)}
    runs = {}
    for name in args.runs:
        report(args, work, prompts, held, samples, sample_rewards, draft_seconds, score_seconds, refiners, runs)
        runs[name] = train_run(work, data, name, args.steps_paper if name.startswith("paper") else None)
        refiners[name] = evaluate_model(work, name, str(runs[name]), prompts, held, samples, reward)
    pair = [n for n in TIMED if n in runs]
    timing = time_steps(work, data, pair) if len(pair) == len(TIMED) else {}
    report(args, work, prompts, held, samples, sample_rewards, draft_seconds, score_seconds, refiners, runs, timing)


def _stats(rewards, drafts, seconds, tokens=None, passes=None, committed=None, distinct=None) -> dict:
    from diffpo_jax.reward.summary import win_rate

    rate, lo, hi = win_rate(drafts, rewards)
    return {
        "reward": float(np.mean(rewards)),
        "win": rate,
        "ci": (lo, hi),
        "seconds": seconds,
        "passes_per_token": passes / committed if passes else None,
        "distinct": float(np.mean(distinct)) if distinct else None,
        "length": float(np.mean(tokens)) if tokens else None,
    }


def report(
    args, work, prompts, held, samples, sample_rewards, draft_seconds, score_seconds, refiners, runs, timing=None
) -> None:
    """Write bench/results/alignment.md and the figure from what is done so far."""
    from diffpo_jax.chat import response_ids

    tok = args.tokenizer
    ids = {}

    def answer_stats(texts):
        toks = [ids.setdefault(t, response_ids(tok, t)) for t in texts]
        return [len(t) for t in toks], [len(set(t)) / max(len(t), 1) for t in toks]

    rows, methods = [], {}
    for setup in SETUPS:
        rw = sample_rewards[setup]
        draft_r = [r[0] for r in rw]
        t_draft = draft_seconds[setup]["seconds_per_answer"]
        table_rows = []
        lens, dist = answer_stats([samples[setup][i][0] for i in held])
        entries = {"draft": _stats(draft_r, draft_r, t_draft, lens, distinct=dist)}
        for k in BEST_OF:
            best = [int(np.argmax(r[:k])) for r in rw]
            lens, dist = answer_stats([samples[setup][i][b] for i, b in zip(held, best)])
            entries[f"Best-of-{k}"] = _stats(
                [r[b] for r, b in zip(rw, best)], draft_r, k * (t_draft + score_seconds), lens, distinct=dist
            )
        for name, res in refiners.items():
            for hold_name in HOLDS:
                e = res[f"{setup} | {hold_name}"]
                entries[f"{name}, {hold_name}"] = _stats(
                    e["rewards"],
                    draft_r,
                    t_draft + e["seconds_per_answer"],
                    e["tokens"],
                    e["passes"],
                    e["committed"],
                    e["distinct"],
                )
        methods[setup] = entries
        for m, s in entries.items():
            table_rows.append(
                [
                    m,
                    f"{s['reward']:.3f}",
                    f"{s['win']:.2f} ({s['ci'][0]:.2f}-{s['ci'][1]:.2f})",
                    f"{s['seconds']:.2f}",
                    "-" if s["passes_per_token"] is None else f"{s['passes_per_token']:.3f}",
                    f"{s['distinct']:.2f}",
                    f"{s['length']:.1f}",
                ]
            )
        rows.append((setup, table_rows))
    lines = [
        f"# Does DiffPO align? ({len(prompts)} prompts, {len(held)} held out, VADER tone reward)",
        "",
        f"- machine: {machine()}",
        f"- command: `{command('bench.alignment', None)}`",
        f"- SmolLM2-135M-Instruct fp32; {MAX_NEW_TOKENS} new tokens; batch {BATCH}; Jacobi window {BLOCK}; "
        f"training: smollm2-135m preset, lr {LR}, {EPOCHS} epochs (paper setting: {args.steps_paper} steps)",
        "",
    ]
    for setup, table_rows in rows:
        lines += [
            f"## Held-out, base setup: {setup}",
            "",
            table(
                [
                    "method",
                    "mean reward",
                    "win rate over draft (95% CI)",
                    "s / answer",
                    "passes / token",
                    "distinct tokens",
                    "tokens",
                ],
                table_rows,
            ),
            "",
        ]
    lines += _training_lines(runs)
    if timing:
        lines += [
            "## LoRA vs full fine-tuning: the train step, measured back to back in this run",
            "",
            table(
                ["run", "s / step", "trained params", "Adam state (MiB)"],
                [
                    [n, f"{t['seconds']:.2f}", f"{t['trained_params']:,}", f"{t['adam_mib']:.1f}"]
                    for n, t in timing.items()
                ],
            ),
            "",
        ]
    lines += _examples(prompts, held, samples, sample_rewards, refiners)
    RESULTS_FILE.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_FILE.write_text("\n".join(lines) + "\n")
    (work / "summary.json").write_text(json.dumps(methods, indent=1))
    _plot(methods)
    print("\n".join(lines), flush=True)


def time_steps(work: Path, data: Path, names: list[str]) -> dict[str, dict]:
    """LoRA against full fine-tuning, measured back to back in this process: each run of `names` trained again
    for TIMING_STEPS steps (no evaluation) into WORK/timing; median seconds of the steps after the first
    (which compiles), the trained params and their Adam state (two fp32 moments each). Cached."""
    import shutil

    import jax
    from flax import nnx

    from diffpo_jax.lora import split_trainable
    from diffpo_jax.model import abstract_model
    from diffpo_jax.training.config import load_config
    from diffpo_jax.training.trainer import train
    from diffpo_jax.weights.checkpoint import read_orbax_config

    cache = work / "eval" / "step_seconds.json"
    if cache.exists():
        return json.loads(cache.read_text())
    out = {}
    for name in names:
        sub, overrides = RUNS[name]
        run_dir = work / "timing" / sub
        shutil.rmtree(run_dir, ignore_errors=True)
        cfg = load_config(
            ROOT / "configs" / "train" / "smollm2-135m.yaml",
            [
                f"data={data}",
                f"output_dir={run_dir}",
                f"optimizer.learning_rate={LR}",
                "prompt_len=64",
                f"response_len={MAX_NEW_TOKENS}",
                "eval.holdout_prompts=0",
                "save_every=1000",
                "tensorboard=false",
                "async_checkpoints=false",
                f"max_steps={TIMING_STEPS}",
                *overrides,
            ],
        )
        result = train(cfg, log=lambda line, name=name: print(f"  timing {name}: {line}", flush=True))
        steps = [m["step_time_s"] for m in result.history][1:]
        model_cfg = read_orbax_config(run_dir).replace(lora=cfg.lora if cfg.lora.rank else None)
        trained, _ = split_trainable(nnx.state(abstract_model(model_cfg)), model_cfg)
        n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.to_pure_dict(trained)))
        out[name] = {"seconds": float(np.median(steps)), "trained_params": n, "adam_mib": 8 * n / 2**20}
        shutil.rmtree(run_dir, ignore_errors=True)
    cache.write_text(json.dumps(out, indent=1))
    return out


def _training_lines(runs: dict[str, Path]) -> list[str]:
    if not runs:
        return []
    out = ["## Training (held-out L_AR on y(T), the trainer's eval)", ""]
    body = []
    for name, run in runs.items():
        evals = [m for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "eval_ar" in m]
        step_s = np.median(
            [
                m["step_time_s"]
                for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                if "step_time_s" in m
            ][1:]
        )  # the first step compiles
        body.append(
            [
                name,
                evals[-1]["step"],
                f"{evals[0]['eval_ar']:.3f}",
                f"{evals[-1]['eval_ar']:.3f}",
                f"{evals[-1]['eval_distinct']:.2f}",
                f"{evals[-1]['eval_passes_per_token']:.3f}",
                f"{step_s:.1f}",
            ]
        )
    return out + [
        table(
            ["run", "steps", "L_AR untrained", "L_AR trained", "distinct (eval)", "passes / token (eval)", "s / step"],
            body,
        ),
        "",
    ]


def _examples(prompts, held, samples, sample_rewards, refiners) -> list[str]:
    """EXAMPLES held-out prompts of the last setup: draft, Best-of-4 and each refiner's answer at R = 0."""
    setup = list(SETUPS)[-1]
    out = [f"## {EXAMPLES} held-out examples ({setup}; refiners at R=0, reward in brackets)", ""]
    for j in range(min(EXAMPLES, len(held))):
        i, rw = held[j], sample_rewards[setup][j]
        b4 = int(np.argmax(rw[:4]))
        cells = [f"{_cell(samples[setup][i][0])} ({rw[0]:.2f})", f"{_cell(samples[setup][i][b4])} ({rw[b4]:.2f})"]
        for res in refiners.values():
            e = res[f"{setup} | R=0"]
            cells.append(f"{_cell(e['texts'][j])} ({e['rewards'][j]:.2f})")
        out += [f"**{prompts[i]}**", "", table(["draft", "Best-of-4", *refiners], [cells]), ""]
    return out


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "/")


def _plot(methods: dict[str, dict[str, dict]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(methods), figsize=(6 * len(methods), 4.5), squeeze=False)
    for ax, (setup, entries) in zip(axes[0], methods.items()):
        bon = ["draft"] + [f"Best-of-{k}" for k in BEST_OF]
        ax.plot(
            [entries[m]["seconds"] for m in bon], [entries[m]["reward"] for m in bon], "k-o", label="draft / Best-of-N"
        )
        for m in bon[1:]:
            ax.annotate(m.replace("Best-of-", "BoN-"), (entries[m]["seconds"], entries[m]["reward"]), fontsize=7)
        refiners = list(dict.fromkeys(m.rsplit(", R=", 1)[0] for m in entries if m not in bon))
        for m, s in entries.items():
            if m not in bon:  # one colour per refiner: a square at R = 0, a triangle at the random hold
                color = plt.cm.tab10(refiners.index(m.rsplit(", R=", 1)[0]) % 10)
                ax.plot(s["seconds"], s["reward"], "^" if "random" in m else "s", color=color, label=m)
        ax.set(xlabel="wall time per answer (s, 2-core CPU)", ylabel="mean VADER reward (held-out)", title=setup)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    FIGURE.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(FIGURE, dpi=100)


if __name__ == "__main__":
    main()
