"""Refine speed, side by side in one run: diffpo-jax Jacobi refinement against the official DiffPO loop,
transformers' greedy `generate` and diffpo-jax's own AR greedy decoder, on the same model and prompts.

  python -m bench.refine_speed [--model SPEC] [--prompts 8] [--max-new-tokens 128]
      [--block-sizes 16,32,64,128,256] [--official-block 256] [--results DIR]

Methods (all batch 1, one prompt at a time, fp32, the same prompt tokens):
  jacobi      diffpo-jax `jacobi_decode` (KV cache, window = block size), with and without re-alignment
  official    a PyTorch re-implementation of the official loop (zjuruizhechen/DiffPO,
              DiffuPO/eval/mt-bench/gen_DiffuPO_answer.py, `get_jacobian_trajectory`): the draft padded
              (pad id) / cut to one `--official-block` block after the prompt; every iteration is a full
              forward over prompt + block with no KV cache, `argmax(softmax(logits))`, the block becomes
              [greedy next token, argmax of block[:-1]] (shift by one), until the sequence is unchanged;
              the answer is cut after the first stop token. The script's random `reserve` prefix (0..12
              draft tokens held fixed) is 0 here, so every method has the same greedy fixed point.
  hf_generate transformers `generate(do_sample=False)` on LlamaForCausalLM loaded from the same weights
  jax_ar      diffpo-jax `generate` at temperature 0
Drafts (for jacobi and official): `sampled` = the model's own answer at temperature 0.7 (our `generate`),
`greedy` = the greedy answer itself. Every method's answer (cut after the stop token, at most
max_new_tokens) must equal jax_ar's; mismatches are printed loudly and counted in the table.

Timing: wall time per prompt summed over prompts, after an untimed warm-up call per compiled shape
(prompts are right-padded to one width, drafts to max_new_tokens + block size). Methods are interleaved
per prompt (prompt 0 through every method, then prompt 1, ...), so load swings on a shared machine hit
them alike. JAX compile time is reported
separately as (first call - steady call) on the first prompt. Forward passes: jacobi = 1 prefill +
passes, official = iterations, generate = one per answer token. Torch runs with all cores
(`--torch-threads`, default: all cores, os.cpu_count()); XLA's CPU backend uses all cores by default.
A model without tokenizer files (tests' tiny models) gets random prompt ids.

`--mixed` measures the record scheduling of `python -m diffpo_jax.refine` instead (section
refine_mixed): `--mixed-records` records (default 64) from bench/data/self_distill_prompts.jsonl with
prompts and answers spread over about 4x (0, 2, 5 or 9 context sentences before the question; answers
asked for in 1, 2, 4 or 8 sentences), in a shuffled order; drafts are the model's own temperature-0.7
answers (`generate`); then `refine` (batch 8, block 16) over the file with `--sort-window 1` (batches of
consecutive records, each until its slowest row is done: the old schedule) and the default window (the
window's records through 8 slots with row refill), each run twice, the second (compiled) run timed:
records/s and the ratio, and the two output files must be byte-identical.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from bench import common

PROMPTS = Path(__file__).resolve().parent.parent / "examples" / "prompts.jsonl"
Answer = tuple[list[int], int]  # (answer tokens, forward passes)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.refine_speed", description=__doc__.split("\n")[0])
    ap.add_argument(
        "--model", default=None, help="anything diffpo_jax.sources.load_model accepts (default: embedded SmolLM2)"
    )
    ap.add_argument("--prompts", type=int, default=8, help="how many prompts of examples/prompts.jsonl")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--block-sizes", default="16,32,64,128,256")
    ap.add_argument("--official-block", type=int, default=256, help="the official loop's block (>= max-new-tokens)")
    ap.add_argument("--draft-temperature", type=float, default=0.7)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--torch-threads", type=int, default=os.cpu_count(), help="default: all cores")
    common.add_results_option(ap)
    ap.add_argument("--mixed", action="store_true", help="measure refine's record scheduling instead (module doc)")
    ap.add_argument("--mixed-records", type=int, default=64)
    args = ap.parse_args(argv)
    args.block_sizes = [int(b) for b in args.block_sizes.split(",")]
    if args.official_block < args.max_new_tokens:
        ap.error("--official-block must be >= --max-new-tokens (the official loop refines one block)")
    return args


def prompt_rows(tokenizer, count: int, vocab: int, seed: int) -> list[list[int]]:
    """Chat-templated ids of the first `count` example prompts, or random ids without a tokenizer."""
    if tokenizer is None:
        rng = np.random.default_rng(seed)
        return [rng.integers(3, vocab, size=int(rng.integers(4, 12))).tolist() for _ in range(count)]
    from diffpo_jax.chat import prompt_ids

    records = [json.loads(line) for line in PROMPTS.read_text().splitlines() if line.strip()]
    if count > len(records):
        raise SystemExit(f"{PROMPTS}: has {len(records)} prompts, asked for {count}")
    return [prompt_ids(tokenizer, r.get("messages") or r["prompt"]) for r in records[:count]]


def cut(tokens: Sequence[int], stop: tuple[int, ...], max_new: int) -> list[int]:
    """The answer: tokens up to and including the first stop token, at most max_new."""
    out = []
    for t in list(tokens)[:max_new]:
        out.append(int(t))
        if t in stop:
            break
    return out


def padded(row: Sequence[int], width: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """[1, width] right-padded (cut at width) and its length [1]."""
    row = list(row)[:width]
    out = np.full((1, width), pad, np.int32)
    out[0, : len(row)] = row
    return out, np.array([len(row)], np.int32)


# ---------------------------------------------------------------------- the official loop (PyTorch)


def official_loop(
    model, prompt: list[int], draft: list[int], block: int, pad: int, max_iter: int = 1000
) -> tuple[list[int], int]:
    """(the block at the fixed point, forwards): the official `get_jacobian_trajectory` for batch 1."""
    import torch

    p = len(prompt)
    current = torch.tensor([prompt + (list(draft) + [pad] * block)[:block]], dtype=torch.long)
    mask = torch.ones_like(current)
    forwards = 0
    with torch.inference_mode():
        for _ in range(max_iter + 1):
            logits = model(current, mask).logits
            forwards += 1
            nxt = torch.argmax(torch.nn.functional.softmax(logits, dim=-1), dim=-1)
            nxt = torch.cat((current[:, :p], nxt[:, p - 1 : -1]), dim=1)
            if torch.equal(nxt, current):
                break
            current = nxt
    return current[0, p:].tolist(), forwards


def hf_generate(model, prompt: list[int], max_new: int, stop: tuple[int, ...], pad: int) -> list[int]:
    import torch

    ids = torch.tensor([prompt], dtype=torch.long)
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new,
            do_sample=False,
            eos_token_id=list(stop),
            pad_token_id=pad,
            top_p=None,
            top_k=None,
            temperature=None,
        )
    return out[0, len(prompt) :].tolist()


# ---------------------------------------------------------------------- measurement


def measure(configs: dict[tuple, list[Callable[[], Answer]]], warm: dict[tuple, Callable[[], object]]) -> dict:
    """Time every config's call for prompt i, for i = 0, 1, ... (methods interleaved per prompt, so load
    changes on a shared machine hit all of them alike). warm[config]: an untimed first call (the compile);
    compile_s = its time minus the same config's timed call on prompt 0."""
    first = {}
    for key, call in warm.items():
        t = time.perf_counter()
        call()
        first[key] = time.perf_counter() - t
    out = {key: {"answers": [], "forwards": 0, "times": []} for key in configs}
    for i in range(len(next(iter(configs.values())))):
        for key, calls in configs.items():
            t = time.perf_counter()
            tokens, forwards = calls[i]()
            out[key]["times"].append(time.perf_counter() - t)
            out[key]["answers"].append(tokens)
            out[key]["forwards"] += forwards
    for key, m in out.items():
        m["wall_s"] = sum(m["times"])
        m["compile_s"] = max(first[key] - m["times"][0], 0.0) if key in first else None
    return out


def check(name: str, answers: list[list[int]], reference: list[list[int]]) -> int:
    """Number of prompts whose answer equals the reference; prints every mismatch loudly."""
    equal = 0
    for i, (a, r) in enumerate(zip(answers, reference)):
        if a == r:
            equal += 1
            continue
        k = next((j for j, (x, y) in enumerate(zip(a, r)) if x != y), min(len(a), len(r)))
        print(
            f"!!! MISMATCH {name}, prompt {i}: first difference at token {k} "
            f"(got {a[k : k + 5]}, jax_ar greedy {r[k : k + 5]}; lengths {len(a)} vs {len(r)})",
            flush=True,
        )
    return equal


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.mixed:
        return mixed(args, argv)
    import jax
    import torch
    from flax import nnx
    from transformers import AutoModelForCausalLM

    from diffpo_jax.decoding import generate, jacobi_decode
    from diffpo_jax.decoding.batching import bucket
    from diffpo_jax.sources import load_model

    torch.set_num_threads(args.torch_threads)
    loaded = load_model(args.model)
    ref_model = AutoModelForCausalLM.from_pretrained(**loaded.reference, dtype=torch.float32).eval()
    machine = common.machine()
    graphdef, state = nnx.split(loaded.model)
    stop = loaded.stop_tokens
    tok = loaded.tokenizer
    pad = int(tok.pad_token_id if tok is not None and tok.pad_token_id is not None else (stop[0] if stop else 0))
    n_new = args.max_new_tokens
    prompts = prompt_rows(tok, args.prompts, loaded.cfg.vocab_size, args.seed)
    width = bucket(max(map(len, prompts)))
    print(
        f"{len(prompts)} prompts ({min(map(len, prompts))}-{max(map(len, prompts))} tokens, padded to {width}), "
        f"max_new_tokens {n_new}, stop tokens {stop}, pad {pad}\n{machine}",
        flush=True,
    )

    def jax_generate(prompt, temperature, key):
        keys = None if key is None else key[None]  # the one row's key
        g = generate(
            graphdef,
            state,
            *padded(prompt, width, pad),
            keys,
            max_new_tokens=n_new,
            temperature=temperature,
            stop_tokens=stop,
            pad_id=pad,
        )
        g = jax.device_get(g)
        n = int(g.lengths[0])
        return g.tokens[0, :n].tolist(), n

    def jacobi(prompt, draft, block, realign):
        r = jacobi_decode(
            graphdef,
            state,
            *padded(prompt, width, pad),
            *padded(draft, n_new + block, pad),
            block_size=block,
            max_new_tokens=n_new,
            stop_tokens=stop,
            pad_id=pad,
            realign=realign,
        )
        r = jax.device_get(r)
        return r.tokens[0, : int(r.lengths[0])].tolist(), int(r.passes[0]) + 1

    # The reference (diffpo-jax AR greedy, untimed here: also jax_ar's compile) and the two kinds of drafts.
    t = time.perf_counter()
    reference = [jax_generate(p, 0.0, None)[0] for p in prompts[:1]]
    first_ar = time.perf_counter() - t
    reference += [jax_generate(p, 0.0, None)[0] for p in prompts[1:]]
    keys = [jax.random.fold_in(jax.random.key(args.seed), i) for i in range(len(prompts))]
    drafts = {
        "sampled": [jax_generate(p, args.draft_temperature, k)[0] for p, k in zip(prompts, keys)],
        "greedy": reference,
    }

    def official(p, d):
        block, forwards = official_loop(ref_model, p, d, args.official_block, pad)
        return cut(block, stop, n_new), forwards

    def hf(p):
        tokens = hf_generate(ref_model, p, n_new, stop, pad)
        return cut(tokens, stop, n_new), len(tokens)

    configs = {
        ("jax_ar", "-", "-", "-"): [lambda p=p: jax_generate(p, 0.0, None) for p in prompts],
        ("hf_generate", "-", "-", "-"): [lambda p=p: hf(p) for p in prompts],
    }
    warm = {("hf_generate", "-", "-", "-"): lambda: hf_generate(ref_model, prompts[0], 2, stop, pad)}
    for block in args.block_sizes:
        for realign in (True, False):
            for kind in ("sampled", "greedy"):
                configs[("jacobi", kind, block, realign)] = [
                    lambda p=p, d=d, b=block, r=realign: jacobi(p, d, b, r) for p, d in zip(prompts, drafts[kind])
                ]
            warm[("jacobi", "sampled", block, realign)] = configs[("jacobi", "sampled", block, realign)][0]
    for kind in ("sampled", "greedy"):
        configs[("official", kind, args.official_block, "-")] = [
            lambda p=p, d=d: official(p, d) for p, d in zip(prompts, drafts[kind])
        ]
    warm[("official", "sampled", args.official_block, "-")] = lambda: ref_model(
        torch.tensor([prompts[0] + [pad] * args.official_block])
    )
    with torch.inference_mode():
        results = measure(configs, warm)
    ar = results[("jax_ar", "-", "-", "-")]
    ar["compile_s"] = max(first_ar - ar["times"][0], 0.0)
    for key, m in results.items():
        if key[0] in ("hf_generate", "official"):  # eager torch: its warm-up is no compile
            m["compile_s"] = None
    rows = []
    for key, m in results.items():
        m["tokens"] = sum(map(len, m["answers"]))
        m["equal"] = check(" ".join(map(str, key)), m["answers"], reference)
        rows.append(
            [
                *key,
                m["wall_s"],
                m["forwards"],
                m["forwards"] / m["tokens"],
                m["tokens"] / m["wall_s"],
                "-" if m["compile_s"] is None else m["compile_s"],
                f"{m['equal']}/{len(prompts)}",
            ]
        )
    print(common.table(HEADERS, rows), flush=True)

    summary = summarize(results, args)
    body = [common.header("Refine speed", "refine_speed", "bench.refine_speed", argv, machine)]
    body.append(
        f"- {len(prompts)} prompts, max_new_tokens {n_new}, batch 1, fp32, model {loaded.source}; "
        f"answer tokens {results[('jax_ar', '-', '-', '-')]['tokens']}\n"
    )
    body += [common.table(HEADERS, rows), "", common.table(["comparison", "ratio (x faster)"], summary), ""]
    text = "\n".join(body)
    print("\n" + common.table(["comparison", "ratio (x faster)"], summary), flush=True)
    if str(args.results) != "-":
        common.write_section(args.results, "refine_speed", text)
    mismatches = sum(len(prompts) - m["equal"] for m in results.values())
    if mismatches:
        print(f"!!! {mismatches} answers differ from jax_ar's greedy answers (see MISMATCH lines)", flush=True)
    return {"results": results, "summary": summary, "mismatches": mismatches}


HEADERS = ["method", "drafts", "block", "realign", "wall s", "forwards", "fwd/token", "tokens/s", "compile s", "equal"]


MIXED_PROMPTS = Path(__file__).resolve().parent / "data" / "self_distill_prompts.jsonl"
CONTEXT = "This question comes from a curious student who reads a lot about science."
ANSWER = (
    "Answer in one sentence.",
    "Answer in two sentences.",
    "Answer in four sentences.",
    "Answer in eight sentences.",
)


def mixed_records(count: int, seed: int) -> list[dict]:
    """`count` prompts with 0, 2, 5 or 9 context sentences and answers asked in 1-8 sentences, shuffled."""
    topics = [
        json.loads(line)["prompt"].split("?")[0] + "?"
        for line in MIXED_PROMPTS.read_text().splitlines()
        if json.loads(line)["id"].endswith("-0")
    ]
    rng = np.random.default_rng(seed)
    rows = [
        {"id": i, "prompt": " ".join([CONTEXT] * (0, 2, 5, 9)[i % 4] + [topics[i % len(topics)], ANSWER[(i // 4) % 4]])}
        for i in range(count)
    ]
    return [rows[i] for i in rng.permutation(count)]


def loop_passes(passes: list[int], draft_chars: list[int], buckets: list[int], batch: int = 8) -> dict[str, float]:
    """Sum over batches of the batch's most passes, for the schedules of the refine_mixed section."""
    order = range(len(passes))

    def total(keys):
        ranked = sorted(order, key=keys)
        return sum(max(passes[i] for i in ranked[k : k + batch]) for k in range(0, len(ranked), batch))

    return {
        "input order": total(lambda i: i),
        "batches sorted by prompt bucket and draft length": total(lambda i: (buckets[i], draft_chars[i], i)),
        "oracle: sorted by the refined passes": total(lambda i: passes[i]),
        f"row refill bound: all passes / {batch} slots": sum(passes) / batch,
    }


def mixed(args, argv) -> dict:
    """The refine_mixed section (module doc)."""
    import tempfile

    from diffpo_jax import generate as generate_cli
    from diffpo_jax import refine as refine_cli
    from diffpo_jax.chat import prompt_ids
    from diffpo_jax.decoding.batching import bucket
    from diffpo_jax.sources import load_model

    loaded = load_model(args.model)
    machine = common.machine()
    work = Path(tempfile.mkdtemp(prefix="refine_mixed-"))
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in mixed_records(args.mixed_records, args.seed)))
    common_args = ["--max-new-tokens", str(args.max_new_tokens), "--batch-size", "8"]
    drafts = work / "drafts.jsonl"
    generate_cli.run(
        generate_cli.parse_args(
            [
                "--input",
                str(prompts),
                "--output",
                str(drafts),
                "--temperature",
                str(args.draft_temperature),
                "--seed",
                str(args.seed),
                *common_args,
            ]
        ),
        loaded,
    )
    rows = [json.loads(line) for line in drafts.read_text().splitlines()]
    draft_tokens = [len(loaded.tokenizer(r["draft"], add_special_tokens=False)["input_ids"]) for r in rows]
    runs = {}
    for attempt in ("compile", "timed"):
        for name, window in (("batches in input order (--sort-window 1)", "1"), ("row refill (default)", "256")):
            out = work / f"refined-{window}.jsonl"
            out.unlink(missing_ok=True)
            summary = refine_cli.run(
                refine_cli.parse_args(
                    [
                        "--input",
                        str(drafts),
                        "--output",
                        str(out),
                        "--block-size",
                        "16",
                        "--sort-window",
                        window,
                        *common_args,
                    ]
                ),
                loaded,
            )
            runs[name] = summary | {"bytes": out.read_bytes()}
            print(f"{attempt} {name}: {summary}", flush=True)
    (old, new) = runs.values()
    equal = old["bytes"] == new["bytes"]
    loop = loop_passes(
        [json.loads(line)["stats"]["passes"] for line in new["bytes"].decode().splitlines()],
        [len(r["draft"]) for r in rows],
        [bucket(len(prompt_ids(loaded.tokenizer, r["prompt"]))) for r in rows],
    )
    rows_out = [
        [name, r["seconds"], args.mixed_records / r["seconds"], r["passes_per_token"], r["tokens"]]
        for name, r in runs.items()
    ]
    ratio = old["seconds"] / new["seconds"]
    body = [
        common.header("Refine scheduling on mixed lengths", "refine_mixed", "bench.refine_speed", argv, machine),
        f"{args.mixed_records} records, drafts {min(draft_tokens)}-{max(draft_tokens)} tokens (the model's own "
        f"temperature-{args.draft_temperature} answers), max_new_tokens {args.max_new_tokens}, batch 8, block 16; "
        "the second of two runs each (compiled).\n",
        common.table(["schedule", "seconds", "records/s", "passes/token", "tokens"], rows_out),
        f"\nrow refill over batches in input order: **{ratio:.2f}x** records/s; output files byte-identical: "
        f"**{'yes' if equal else 'NO'}**.\n",
        "Why: a batch runs until its slowest row is done, and a pass costs the same however many rows are "
        "still live, so the wall time of batches follows the sum over batches of the batch's most passes; "
        "with row refill no slot waits, and the loop runs about all passes / 8 slots (from the per-record "
        "passes in the output):\n",
        common.table(
            ["batches", "sum of per-batch max passes", "vs input order"],
            [[k, v, loop["input order"] / v] for k, v in loop.items()],
        ),
        "\nSorting batches by prompt bucket and draft length (this project's schedule before row refill) gains little: "
        "the draft's length barely predicts the refined answer's passes (the model's temperature-0.7 answer "
        "against its greedy one). Row refill needs no prediction; its cost is one prefill per record and a "
        "return to the host whenever a row finishes.",
    ]
    text = "\n".join(body)
    common.report(args.results, "refine_mixed", text)
    if not equal:
        raise SystemExit("refine_mixed: the two schedules wrote different files")
    return {"ratio": ratio, "equal": equal, "loop_passes": loop}


def summarize(results: dict, args) -> list[list]:
    """Speed-up ratios of jacobi at its best block size (per draft kind) over the other methods."""
    out = []
    for kind in ("sampled", "greedy"):
        jac = {k: m for k, m in results.items() if k[0] == "jacobi" and k[1] == kind}
        (_, _, block, realign), best = min(jac.items(), key=lambda kv: kv[1]["wall_s"])
        label = f"jacobi {kind} drafts (best: block {block}, realign {realign})"
        off = results[("official", kind, args.official_block, "-")]
        out.append([f"{label} vs official loop ({args.official_block} block)", off["wall_s"] / best["wall_s"]])
        for name in ("hf_generate", "jax_ar"):
            out.append([f"{label} vs {name}", results[(name, "-", "-", "-")]["wall_s"] / best["wall_s"]])
    return out


if __name__ == "__main__":
    main()
