"""DiffPO's efficiency half: does a consistency stage (stage B) make the embedded refiner (stage A, AR only) refine
real drafts in fewer passes while keeping its answers?

    python -m bench.efficiency [--work out/efficiency] [--runs NAME ...] [--states 4] [--epochs 3] [--name efficiency]

One command, every stage cached in WORK (a killed run resumes: the decoding stages resume their .partial files,
training its checkpoints):
1. Drafts (bench/alignment.py's prompts, held-out split and base setups): per setup, sample 0 of each of the 256
   training prompts and of each of the 64 held-out ones, MAX_NEW_TOKENS tokens: the drafts bench.alignment
   draws with the same seeds (records/loop.py sample_keys), so its Best-of-2/4/8 rewards (the best of samples
   0..k-1) stand beside these rows; their time is k x the drafter's time per answer measured here.
2. Stage B data: `data distill --drafts` with the stage A refiner (STAGE_A, the shipped embedded refiner) on the
   training prompts: y(T) = its greedy answer (the fixed point at R = 0), y(t) = each setup's draft and up to
   `--states` of the Jacobi states the refiner passes through from it, spread over noise levels; prompts whose
   fixed point repeats itself dropped.
3. Stage B training (RUNS): a new rank-8 LoRA adapter on the merged stage A model, AR on the fixed point +
   w x KL over the frontier after the first mismatch (con_window BLOCK), w warmed up from 0 over WARMUP steps;
   the KL's teacher the live model (stop-gradient) or the frozen stage A (`loss.teacher=frozen`).
4. Stage A retrained by rejection sampling (`--stage-a-prompts N`, off by default): the first N prompts of
   bench/data/stage_a_prompts.jsonl (written for this, none of the held-out ones), BEST_OF_TRAIN answers each from
   the neutral setup, y(T) = the best by VADER; LoRA r8, AR only, on that data with each of `--stage-a-recipes`
   (STAGE_A_RECIPES; the first is the embedded refiner's);
   evaluated like stage A, with the SMALL_BLOCK window, and on the second held-out set.
5. Held-out evaluation, R = 0, both setups, BATCH rows with row refill: mean reward (VADER), win rate over the
   draft, passes per token, refine tokens/s against the drafter's tokens/s at the same batch (this run),
   share of answers identical to stage A's, distinct tokens per answer, seconds per answer; stage A also with a
   SMALL_BLOCK-token window (the same answers: Jacobi decoding is exact; a CPU pass costs its positions).
Writes bench/results/NAME.md and bench/figures/NAME.png (reward against seconds per answer).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from bench.alignment import (
    BATCH,
    BLOCK,
    MAX_NEW_TOKENS,
    ROOT,
    SETUPS,
    _stats,
    build_data,
    evaluate_model,
    generate_samples,
    held_out,
    read_prompts,
    time_drafts,
    train_cached,
    vader,
)
from bench.common import command, machine, table

STAGE_A = "embedded-refiner"
STYLE2 = ROOT / "bench" / "data" / "heldout_style2_prompts.jsonl"  # 64 held-out prompts written in another style
DRAFTS_HELD = 1  # the draft only: Best-of-k of these drafts' seeds is bench.alignment's (module doc)
# bench/results/alignment.md (2026-12): draft and Best-of-k mean reward per setup, the same seeds as these drafts
ALIGNMENT_REWARDS = {
    "neutral, t=1.0": {"draft": 0.465, 2: 0.697, 4: 0.798, 8: 0.882},
    "grumpy, t=0.7": {"draft": 0.350, 2: 0.621, 4: 0.788, 8: 0.860},
}
WARMUP = 8
STAGE_A_PROMPTS = ROOT / "bench" / "data" / "stage_a_prompts.jsonl"  # 1,133 training prompts, none held out
BEST_OF_TRAIN = 8  # answers sampled per stage A prompt (neutral setup); y(T) = the best-toned one
STAGE_A_RECIPES = {  # name: (run dir suffix, overrides of the preset besides LoRA r8 and AR only)
    "3 epochs, lr 2e-3": ("", ["num_epochs=3", "optimizer.learning_rate=2e-3"]),  # the embedded refiner's recipe
    "4 epochs, lr 4e-3": ("-4ep-lr4e-3", ["num_epochs=4", "optimizer.learning_rate=4e-3"]),
}
SMALL_BLOCK = 4  # stage A again with a 4-token Jacobi window: the same answers, a pass of 4 positions, not 16
HOLD = {"R=0": 0}
LORA = ["lora.rank=8", "lora.alpha=16"]
RUNS = {  # name: (run dir under WORK/runs, overrides of the smollm2-135m preset)
    "stage B, w=1 frontier": (
        "b-w1",
        ["loss.con_weight=1", "optimizer.learning_rate=5e-4"],
    ),
    "stage B, w=1 frontier, frozen teacher": (
        "b-w1-frozen",
        ["loss.con_weight=1", "loss.teacher=frozen", "optimizer.learning_rate=5e-4"],
    ),
    "stage B, w=0.1 frontier, frozen teacher": (  # CLLM's AR x 10 : consistency x 1
        "b-w0.1-frozen",
        ["loss.con_weight=0.1", "loss.teacher=frozen", "optimizer.learning_rate=5e-4"],
    ),
}


def build_stage_b(work: Path, prompts: list[str], held: list[int], samples: dict, states: int) -> Path:
    """The stage B dataset (module doc, step 2) in WORK/data-b."""
    from diffpo_jax.pipelines.self_distill import distill

    data = work / "data-b"
    if data.exists():
        return data
    train = [i for i in range(len(prompts)) if i not in set(held)]
    src = work / "train-prompts.jsonl"
    src.write_text("".join(json.dumps({"prompt": prompts[i]}) + "\n" for i in train))
    drafts = []
    for setup, (stem, _, _) in SETUPS.items():
        path = work / f"drafts-{stem}.jsonl"
        path.write_text(
            "".join(json.dumps({"prompt": prompts[i], "draft": samples[setup][i][0]}) + "\n" for i in train)
        )
        drafts.append(path)
    manifest = distill(
        src,
        data,
        model=STAGE_A,
        drafts=drafts,
        jacobi_states=states,
        jacobi_block=BLOCK,
        max_new_tokens=MAX_NEW_TOKENS,
        batch_size=BATCH,
        drop_repetitive=True,
    )
    print(f"stage B data: {manifest['kept']} prompts, {manifest['responses_per_prompt']['total']} responses")
    return data


def train_stage_b(work: Path, data: Path, name: str, epochs: int) -> Path:
    """Train RUNS[name] into WORK/runs/DIR on top of stage A (resumed, or reused when done); the run dir."""
    sub, overrides = RUNS[name]
    setup = [
        f"model={STAGE_A}",
        f"data={data}",
        f"num_epochs={epochs}",
        "eval.holdout_prompts=0",
        "loss.con_positions=frontier",
        f"loss.con_window={BLOCK}",
        f"loss.con_warmup_steps={WARMUP}",
        *LORA,
    ]
    return train_cached(work / "runs" / sub, name, [*setup, *overrides])


def train_stage_a(work: Path, loaded, count: int, recipe: str) -> tuple[str, Path]:
    """Stage A by rejection sampling (module doc, step 4) in WORK/stage-a-COUNT with STAGE_A_RECIPES[recipe]: (the
    run's name, its run dir)."""
    prompts = read_prompts(STAGE_A_PROMPTS)
    if not 0 < count <= len(prompts):
        raise SystemExit(f"--stage-a-prompts {count}: {STAGE_A_PROMPTS} holds {len(prompts)} prompts")
    prompts, sub = prompts[:count], work / f"stage-a-{count}"
    setup = next(iter(SETUPS))  # neutral
    samples = generate_samples(
        sub, prompts, [], loaded, train_samples=BEST_OF_TRAIN, held_samples=0, setups={setup: SETUPS[setup]}
    )[setup]
    data = build_data(sub, prompts, [samples[i] for i in range(count)])
    name = f"stage A, best of {BEST_OF_TRAIN} on {count} new prompts, {recipe}"
    suffix, overrides = STAGE_A_RECIPES[recipe]
    common = [f"data={data}", "eval.holdout_prompts=0", "eval.every=0", "loss.con_weight=0", *LORA]
    return name, train_cached(sub / f"run{suffix}", name, [*common, *overrides])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.efficiency", description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=ROOT / "out" / "efficiency")
    ap.add_argument("--runs", nargs="*", choices=list(RUNS), default=list(RUNS), help="stage B runs (none: --runs)")
    ap.add_argument("--states", type=int, default=4, help="Jacobi states per draft in the stage B data")
    ap.add_argument("--epochs", type=int, default=3, help="stage B epochs")
    ap.add_argument(
        "--stage-a-prompts", type=int, default=0, help="retrain stage A on this many new prompts (best of 8); 0: not"
    )
    ap.add_argument("--stage-a-recipes", nargs="+", choices=list(STAGE_A_RECIPES), default=list(STAGE_A_RECIPES)[:1])
    ap.add_argument(
        "--name", default="efficiency", help="the report's name: bench/results/NAME.md, bench/figures/NAME.png"
    )
    args = ap.parse_args(argv)
    from diffpo_jax.sources import load_model

    reward = vader()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    prompts = read_prompts()
    held = held_out(prompts)
    loaded = load_model(None, dtype="float32")
    samples = generate_samples(work, prompts, held, loaded, train_samples=1, held_samples=DRAFTS_HELD)
    drafter = time_drafts(work, prompts, held, loaded)
    data = build_stage_b(work, prompts, held, samples, args.states) if args.runs else None
    refiners = {
        "stage A (embedded refiner)": evaluate_model(work, "stage A", STAGE_A, prompts, held, samples, reward, HOLD),
        f"stage A, window {SMALL_BLOCK}": evaluate_model(
            work, f"stage A, window {SMALL_BLOCK}", STAGE_A, prompts, held, samples, reward, HOLD, SMALL_BLOCK
        ),
    }
    report(args.name, argv, prompts, held, samples, reward, drafter, refiners, data, args.states)
    sources = {"stage A (embedded refiner)": STAGE_A}
    for name in args.runs:
        run = train_stage_b(work, data, name, args.epochs)
        sources[name] = str(run)
        refiners[name] = evaluate_model(work, name, str(run), prompts, held, samples, reward, HOLD)
        report(args.name, argv, prompts, held, samples, reward, drafter, refiners, data, args.states)
    for recipe in args.stage_a_recipes if args.stage_a_prompts else ():
        name, run = train_stage_a(work, loaded, args.stage_a_prompts, recipe)
        sources[name] = str(run)
        name = f"{name}, window {SMALL_BLOCK}"
        refiners[name] = evaluate_model(work, name, str(run), prompts, held, samples, reward, HOLD, SMALL_BLOCK)
        report(args.name, argv, prompts, held, samples, reward, drafter, refiners, data, args.states)
    style2 = second_held_out(work / "style2", loaded, sources, reward)
    report(args.name, argv, prompts, held, samples, reward, drafter, refiners, data, args.states, style2)


def second_held_out(work: Path, loaded, sources: dict[str, str], reward) -> dict:
    """The second held-out set (STYLE2): per setup, the drafts' rewards and each refiner's rewards (R = 0)."""
    prompts = read_prompts(STYLE2)
    idx = list(range(len(prompts)))
    samples = generate_samples(work, prompts, idx, loaded, train_samples=0, held_samples=1)
    out = {setup: {"draft": reward([samples[setup][i][0] for i in idx])} for setup in SETUPS}
    for name, source in sources.items():
        result = evaluate_model(work, name, source, prompts, idx, samples, reward, HOLD)
        for setup in SETUPS:
            out[setup][name] = result[setup + " | R=0"]["rewards"]
    return out


def report(report_name, argv, prompts, held, samples, reward, drafter, refiners, data, states, style2=None) -> None:
    """bench/results/NAME.md and its figure, from what has run so far."""
    key = " | R=0"
    stage_a = refiners["stage A (embedded refiner)"]
    lines = [
        "# efficiency: stage B (consistency on the refiner's own Jacobi states) on top of the embedded refiner",
        "",
        f"{machine()}",
        "",
        f"Command: `{command('bench.efficiency', argv)}`",
        "",
    ]
    if data is not None:
        manifest = json.loads((data / "manifest.json").read_text())
        lines += [
            f"Stage B data: {manifest['kept']} prompts, {manifest['responses_per_prompt']['total']} responses "
            f"(y(T) = stage A's greedy answer; drafts of {len(SETUPS)} setups and up to {states} Jacobi states each); "
            f"repetitive fixed points dropped: {manifest['self_distill']['dropped_repetitive_fixed_points']['count']}.",
            "",
        ]
    points = {}
    for setup in SETUPS:
        drafts = [reward([samples[setup][i][0]])[0] for i in held]
        rows = [
            [
                "draft",
                f"{np.mean(drafts):.3f}",
                "",
                "",
                f"{drafter[setup]['tokens_per_s']:.1f}",
                "",
                "",
                f"{drafter[setup]['seconds_per_answer']:.2f}",
            ]
        ]
        points[setup] = {"draft": (drafter[setup]["seconds_per_answer"], float(np.mean(drafts)))}
        for k in (2, 4, 8):  # bench.alignment's rewards of the same samples; k drafts' time measured here
            seconds = k * drafter[setup]["seconds_per_answer"]
            reward_k = ALIGNMENT_REWARDS[setup][k]
            rows.append(
                [f"Best-of-{k} (reward: bench.alignment)", f"{reward_k:.3f}", "", "", "", "", "", f"{seconds:.2f}"]
            )
            points[setup][f"Best-of-{k}"] = (seconds, reward_k)
        for name, result in refiners.items():
            r = result[setup + key]
            s = _stats(r["rewards"], drafts, r["seconds_per_answer"])
            tokens = sum(r["tokens"])
            same = np.mean([a == b for a, b in zip(r["texts"], stage_a[setup + key]["texts"])])
            seconds = drafter[setup]["seconds_per_answer"] + r["seconds_per_answer"]
            rows.append(
                [
                    name,
                    f"{s['reward']:.3f}",
                    f"{s['win']:.2f} ({s['ci'][0]:.2f}-{s['ci'][1]:.2f})",
                    f"{r['passes'] / max(tokens, 1):.3f}",
                    f"{tokens / (r['seconds_per_answer'] * len(r['texts'])):.1f}",
                    f"{same:.2f}",
                    f"{np.mean(r['distinct']):.2f}",
                    f"{seconds:.2f}",
                ]
            )
            points[setup][name] = (seconds, s["reward"])
        lines += [
            f"## {setup} (held-out {len(held)} prompts, R = 0, batch {BATCH}, window {BLOCK})",
            "",
            f"Drafts' mean reward here {np.mean(drafts):.3f}, in bench.alignment {ALIGNMENT_REWARDS[setup]['draft']:.3f} "
            "(the same seeds).",
            "",
            table(
                [
                    "method",
                    "reward",
                    "win over draft (95% CI)",
                    "passes / token",
                    "tokens/s",
                    "= stage A",
                    "distinct",
                    "s / answer (draft + refine)",
                ],
                rows,
            ),
            "",
        ]
    if style2:
        rows = []
        for setup, methods in style2.items():
            drafts = methods["draft"]
            rows.append([setup, "draft", f"{np.mean(drafts):.3f}", ""])
            for name, rewards in methods.items():
                if name != "draft":
                    s = _stats(rewards, drafts, None)
                    rows.append(["", name, f"{s['reward']:.3f}", f"{s['win']:.2f} ({s['ci'][0]:.2f}-{s['ci'][1]:.2f})"])
        lines += [
            f"## Second held-out set ({STYLE2.name}: 64 casual chat messages, another style), R = 0",
            "",
            table(["setup", "method", "reward", "win over draft (95% CI)"], rows),
            "",
        ]
    results = ROOT / "bench" / "results" / f"{report_name}.md"
    results.write_text("\n".join(lines) + "\n")
    _plot(points, ROOT / "bench" / "figures" / f"{report_name}.png")
    print(f"wrote {results}", flush=True)


def _plot(points: dict[str, dict[str, tuple[float, float]]], figure: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(points), figsize=(6 * len(points), 4.5), squeeze=False)
    for ax, (setup, methods) in zip(axes[0], points.items()):
        for name, (x, y) in methods.items():
            ax.scatter(x, y)
            ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set(title=setup, xlabel="seconds per answer (2-core CPU)", ylabel="mean VADER reward")
    fig.tight_layout()
    figure.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(figure, dpi=110)


if __name__ == "__main__":
    main()
