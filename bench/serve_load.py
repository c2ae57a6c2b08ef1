"""Load test of `python -m diffpo_jax.serve` on loopback: continuous batching against one request at a time.

  python -m bench.serve_load [--model embedded-refiner] [--draft-model DRAFTER] [--batch-size 16]
      [--clients 1,4,16,32] [--rates 0.5,1,2] [--requests 32] [--max-new-tokens 64] [--block-size 16]
      [--max-prompt-tokens 128] [--max-queue 64] [--timeout 300] [--max-seconds 600] [--one-slot | --no-one-slot]
      [--name serve_load] [--results bench/results]

Two services are started in turn, each in its own process with the same models and options: the
continuous-batching one (`--batch-size` slots) and the one-slot one (`--batch-size 1`; `--no-one-slot`:
only the first, e.g. for an overload run). Each service compiles its programs before it says it is
ready (/health), so no run pays a compile. Each gets the
same load: a closed loop of C clients (each sends its next request when its last one is answered) for
every C of --clients, then Poisson arrivals at every rate of --rates (requests per second). Every run
is bounded: --requests requests, none started after --max-seconds, each with a client --timeout.
Requests stream (the openai client): time to first token (TTFT, the first content chunk), time per
output token (TPOT: the rest of the stream over the remaining tokens), end-to-end latency, p50 / p99;
requests/s and tokens/s over the run, refined tokens per Jacobi pass (the `diffpo` stats). Every
response is checked: a role chunk, a finish reason, usage,
text, or a 503 with the OpenAI error object (none lost, none malformed, none past the timeout); request
i of a run asks prompt i with seed i, so its answer must be the same in every run of both services
(answers do not depend on load). Results: bench/results/NAME.md, figure bench/figures/NAME.png
(end-to-end p50 latency against requests/s).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bench import common

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ROOT / "examples" / "demo_prompts.jsonl"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.serve_load", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="embedded-refiner")
    ap.add_argument("--draft-model", help="the services' drafter (default: the embedded SmolLM2)")
    ap.add_argument("--prompts", type=Path, default=PROMPTS, help="jsonl with `prompt` (cycled)")
    ap.add_argument("--batch-size", type=int, default=16, help="the continuous-batching service's slots")
    ap.add_argument("--clients", default="1,4,16,32", help="closed-loop client counts")
    ap.add_argument("--rates", default="0.5,1,2", help="Poisson arrival rates (requests/s); '' for none")
    ap.add_argument("--requests", type=int, default=32, help="requests per run")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--max-prompt-tokens", type=int, default=128, help="the services' largest prompt bucket")
    ap.add_argument("--max-queue", type=int, default=64)
    ap.add_argument("--timeout", type=float, default=300.0, help="a request's client timeout (s)")
    ap.add_argument("--max-seconds", type=float, default=600.0, help="no request starts later in a run (s)")
    ap.add_argument("--seed", type=int, default=0, help="the Poisson arrivals' seed")
    ap.add_argument("--one-slot", action=argparse.BooleanOptionalAction, default=True, help="also the one-slot service")
    ap.add_argument("--name", default="serve_load", help="the run's name: bench/results/NAME.md, figures/NAME.png")
    common.add_results_option(ap)
    return ap.parse_args(argv)


@contextlib.contextmanager
def service(args: argparse.Namespace, slots: int):
    """`python -m diffpo_jax.serve` with `slots` slots on a free loopback port; yields its /v1 URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "diffpo_jax.serve", "--port", str(port), "--model", args.model,
           "--batch-size", str(slots), "--max-new-tokens", str(args.max_new_tokens),
           "--block-size", str(args.block_size), "--max-queue", str(args.max_queue),
           "--max-prompt-tokens", str(args.max_prompt_tokens)]  # fmt: skip
    cmd += ["--draft-model", args.draft_model] if args.draft_model else []
    proc = subprocess.Popen(cmd, cwd=ROOT, env=os.environ | {"PYTHONPATH": str(ROOT)})
    url = f"http://127.0.0.1:{port}"
    try:
        import httpx

        for _ in range(3000):
            if proc.poll() is not None:
                raise RuntimeError(f"the service exited with {proc.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            time.sleep(0.2)
        yield f"{url}/v1"
    finally:
        proc.terminate()
        proc.wait(60)


async def one(client, prompt: str, seed: int, timeout: float) -> dict:
    """A streamed request, timed and checked: {ok, status, ttft, tpot, e2e, tokens, text} or a problem."""
    import openai

    start = time.perf_counter()
    first, text, finish, usage, role, stats = None, "", None, None, None, None
    try:
        stream = await client.chat.completions.create(
            model="diffpo",
            messages=[{"role": "user", "content": prompt}],
            seed=seed,
            stream=True,
            stream_options={"include_usage": True},
            timeout=timeout,
        )
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                role = role or choice.delta.role
                if choice.delta.content:
                    first = first or time.perf_counter()
                    text += choice.delta.content
                finish = choice.finish_reason or finish
            stats = (getattr(chunk, "diffpo", None) or {}).get("stats") or stats
    except openai.APIStatusError as e:
        error = (e.body or {}) if isinstance(e.body, dict) else {}
        well_formed = e.status_code == 503 and {"message", "type", "param", "code"} <= set(error)
        return {"status": e.status_code, "problem": None if well_formed else f"{e.status_code}: {e.body}"}
    except Exception as e:  # timeouts, broken streams
        return {"status": None, "problem": f"{type(e).__name__}: {e}"}
    end = time.perf_counter()
    problems = [p for p, bad in [("no role", role != "assistant"), ("no finish", finish is None),
                                 ("no usage", usage is None), ("no text", not text), ("no stats", stats is None)]
                if bad]  # fmt: skip
    tokens = usage.completion_tokens if usage else 0
    return {
        "status": 200,
        "problem": ", ".join(problems) or None,
        "ttft": (first or end) - start,
        "tpot": (end - (first or end)) / max(tokens - 1, 1),
        "e2e": end - start,
        "tokens": tokens,
        "passes": stats["passes"] if stats else 0,
        "committed": stats["tokens_per_pass"] * stats["passes"] if stats else 0,
        "text": text,
    }


async def run_load(url: str, prompts: list[str], args, clients: int | None, rate: float | None) -> dict:
    """One run: a closed loop of `clients`, or Poisson arrivals at `rate`; its results, request by request."""
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0)
    results: dict[int, dict] = {}
    start = time.perf_counter()

    async def request(i: int):
        results[i] = await one(client, prompts[i % len(prompts)], i, args.timeout)

    if clients is not None:
        counter = iter(range(args.requests))

        async def worker():
            for i in counter:
                if time.perf_counter() - start > args.max_seconds:
                    return
                await request(i)

        await asyncio.gather(*(worker() for _ in range(clients)))
    else:
        rng, tasks, at = random.Random(args.seed), [], 0.0
        for i in range(args.requests):
            at += rng.expovariate(rate)
            if at > args.max_seconds:
                break
            await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
            tasks.append(asyncio.create_task(request(i)))
        await asyncio.gather(*tasks)
    seconds = time.perf_counter() - start
    await client.close()
    return {"seconds": seconds, "results": results}


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def summarize(name: str, load: str, run: dict) -> list:
    ok = [r for r in run["results"].values() if r["status"] == 200 and not r["problem"]]
    rejected = sum(r["status"] == 503 and not r["problem"] for r in run["results"].values())
    bad = sum(bool(r["problem"]) for r in run["results"].values())
    s = run["seconds"]
    cols = [pct([r[k] for r in ok], q) for k in ("ttft", "tpot", "e2e") for q in (0.5, 0.99)]
    per_pass = sum(r["committed"] for r in ok) / max(sum(r["passes"] for r in ok), 1)
    return [name, load, len(ok), rejected, bad, len(ok) / s, sum(r["tokens"] for r in ok) / s, per_pass, *cols]


HEADERS = ["service", "load", "ok", "503", "bad", "req/s", "tok/s", "tok/pass", "TTFT p50", "TTFT p99",
           "TPOT p50", "TPOT p99", "e2e p50", "e2e p99"]  # fmt: skip


def plot(rows: list[list], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r[0] for r in rows):
        mine = sorted((r[5], r[12], r[1]) for r in rows if r[0] == name)
        ax.plot([m[0] for m in mine], [m[1] for m in mine], marker="o", label=name)
        for x, y, label in mine:
            ax.annotate(label, (x, y), fontsize=6)
    ax.set(xlabel="requests/s", ylabel="end-to-end latency p50 (s)", title="serve: latency against throughput")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    machine = common.machine()
    prompts = [json.loads(line)["prompt"] for line in args.prompts.read_text().splitlines() if line.strip()]
    loads = [(f"closed {c}", int(c), None) for c in args.clients.split(",") if c]
    loads += [(f"poisson {r}/s", None, float(r)) for r in args.rates.split(",") if r]
    rows, answers, mismatches = [], {}, 0
    services = [(f"{args.batch_size} slots", args.batch_size)] + [("1 slot", 1)] * args.one_slot
    for name, slots in services:
        with service(args, slots) as url:
            for load, clients, rate in loads:
                run = asyncio.run(run_load(url, prompts, args, clients, rate))
                for i, r in run["results"].items():
                    if r["status"] == 200 and not r["problem"]:
                        mismatches += answers.setdefault(i, r["text"]) != r["text"]
                rows.append(summarize(name, load, run))
                print(common.table(HEADERS, rows[-1:]), flush=True)
    bad = sum(r[4] for r in rows)
    body = [common.header("Serving under load", args.name, "bench.serve_load", argv, machine)]
    body += ["", common.table(HEADERS, rows), ""]
    body += [f"Responses checked: {bad} malformed, lost or timed out; {mismatches} answers that differ from the "
             "same request's answer in another run (request i: prompt i, seed i). Times in seconds.", ""]  # fmt: skip
    if str(args.results) != "-":
        folder = Path(args.results).resolve().parent / "figures"
        folder.mkdir(parents=True, exist_ok=True)
        plot(rows, folder / f"{args.name}.png")
        body += [f"![end-to-end p50 latency against requests/s](../figures/{args.name}.png)", ""]
    common.report(args.results, args.name, "\n".join(body))
    return {"rows": rows, "bad": bad, "mismatches": mismatches}


if __name__ == "__main__":
    main()
