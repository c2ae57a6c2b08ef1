"""`python -m diffpo_jax.serve` with the real openai client on loopback, over a tiny random model (SmolLM2's
tokenizer): answers equal `refine`'s (alone, concurrent, streamed), drafts equal `generate`'s, the upstream
drafter, every error path with its OpenAI error object, a disconnect frees the slot, SIGTERM drains (slow)."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import uvicorn

from diffpo_jax import generate as generate_cli
from diffpo_jax import refine as refine_cli
from diffpo_jax import serve
from diffpo_jax.decoding import engine as engine_module
from diffpo_jax.decoding import jacobi, sampler
from tests.files import read_jsonl, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
N, W, SLOTS = 16, 4, 2  # max new tokens, block size, slots
DECODE = ["--max-new-tokens", str(N), "--block-size", str(W), "--batch-size", str(SLOTS)]
RECORDS = [
    {"prompt": "What is the capital of France?", "draft": "Paris is the capital of France."},
    {"prompt": "Say hi.", "draft": ""},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."}],
     "draft": "Blue, like the sky on a clear day in June."},
    {"prompt": "Count to three.", "draft": "One two three four five six seven"},
    {"prompt": "Why?", "draft": "Because."},
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(service):
    """`service` on a free loopback port (uvicorn in a thread); yields its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(service.app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def tiny(tiny_init_dir):
    from diffpo_jax.sources import load_model

    return load_model(str(tiny_init_dir))


@pytest.fixture(scope="module")
def server(tiny, tiny_init_dir):
    """(engine, service, url): the tiny model refines and drafts, 2 slots, prompts up to 64 tokens."""
    args = serve.parse_args(["--model", str(tiny_init_dir), "--max-prompt-tokens", "64", *DECODE])
    engine, service = serve.build(args, refiner=tiny, drafter=tiny)
    try:
        with running(service) as url:
            yield engine, service, url
    finally:
        engine.stop(10)


def client(url: str, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key=kwargs.pop("api_key", "unused"), max_retries=0, timeout=60, **kwargs)


def messages(record: dict) -> list[dict]:
    return record.get("messages") or [{"role": "user", "content": record["prompt"]}]


def ask(url: str, record: dict, **kwargs):
    body = {"draft": record["draft"]} if "draft" in record else {}
    return client(url).chat.completions.create(model="diffpo", messages=messages(record), extra_body=body, **kwargs)


def ask_streamed(url: str, record: dict, **kwargs) -> tuple[str, list]:
    chunks = list(ask(url, record, stream=True, **kwargs))
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks


@pytest.fixture(scope="module")
def refined(tiny, tmp_path_factory):
    """What `refine` writes for RECORDS with the server's options."""
    folder = tmp_path_factory.mktemp("refine")
    inp = write_jsonl(folder / "in.jsonl", RECORDS)
    refine_cli.run(refine_cli.parse_args(["--input", str(inp), "--output", str(folder / "out.jsonl"), *DECODE]), tiny)
    return read_jsonl(folder / "out.jsonl")


def test_answers_equal_refine_alone_concurrent_and_streamed(server, refined):
    """Each draft's answer and stats are refine's: one request at a time, all at once through 2 slots (with
    row refill between passes), and streamed (the deltas join into the same text; role first, finish with
    `diffpo`, usage, [DONE])."""
    _, _, url = server
    serial = [ask(url, r) for r in RECORDS]
    with ThreadPoolExecutor(len(RECORDS)) as pool:
        concurrent = list(pool.map(lambda r: ask(url, r), RECORDS))
        streamed = list(pool.map(lambda r: ask_streamed(url, r, stream_options={"include_usage": True}), RECORDS))
    for answers in (serial, concurrent):
        assert [a.choices[0].message.content for a in answers] == [r["refined"] for r in refined]
        assert [a.diffpo for a in answers] == [{"draft": r["draft"], "stats": r["stats"]} for r in refined]
        for a, r in zip(answers, refined):
            assert a.choices[0].finish_reason == ("stop" if r["stats"]["stopped"] else "length")
            assert a.usage.completion_tokens == r["stats"]["tokens"] - r["stats"]["stopped"]
            assert a.usage.prompt_tokens > 0 and a.model == "diffpo" and a.object == "chat.completion"
    assert [text for text, _ in streamed] == [r["refined"] for r in refined]
    for (_, chunks), answer in zip(streamed, serial):
        assert chunks[0].choices[0].delta.role == "assistant"
        assert sum(bool(c.choices and c.choices[0].delta.content) for c in chunks) > 1
        (final,) = [c for c in chunks if c.choices and c.choices[0].finish_reason]
        assert final.diffpo == answer.diffpo and final.choices[0].finish_reason == answer.choices[0].finish_reason
        assert chunks[-1].choices == [] and chunks[-1].usage == answer.usage
    raw = httpx.post(f"{url}/chat/completions", json={"model": "diffpo", "messages": messages(RECORDS[1]), "draft": "",
                                                      "stream": True}).text  # fmt: skip
    assert raw.startswith("data: {") and raw.endswith("data: [DONE]\n\n")


def test_warm_up_compiles_every_program_before_the_first_request(server):
    """After the engine's warm-up (/health says "ok"), serving compiles nothing: a drafted short prompt,
    then every record at once through both slots (prefills of two prompt buckets, passes over 1 and 2
    slots, live rows moved into freed slots) leave every program's compile cache as it was."""
    engine, _, url = server
    assert engine.warm.wait(120) and httpx.get(url.removesuffix("/v1") + "/health").json()["status"] == "ok"
    programs = [jacobi.run_passes, jacobi.start_row, jacobi.move_row, engine_module._release, sampler._start,
                sampler._advance]  # fmt: skip
    before = [p._cache_size() for p in programs]
    assert ask(url, {"prompt": "Hello!"}).choices[0].finish_reason
    with ThreadPoolExecutor(len(RECORDS)) as pool:
        assert all(a.choices[0].finish_reason for a in pool.map(lambda r: ask(url, r), RECORDS))
    assert [p._cache_size() for p in programs] == before


def test_a_pass_costs_its_live_rows(tiny):
    """The engine's pass over the first `rows` of 4 slots compiles to about rows/4 of the flops of a pass
    over all 4 (so one request in flight does not pay for the empty slots)."""
    from diffpo_jax.decoding.batching import Decoder
    from diffpo_jax.decoding.engine import Engine

    decoder = Decoder(tiny, batch_size=4, max_new_tokens=N)
    engine = Engine(decoder, block_size=W, max_prompt_tokens=64)
    assert [engine._pass_rows(n) for n in range(1, 5)] == [1, 2, 4, 4]
    s = jacobi.empty_slots(tiny.cfg, 4, 64, N + W, engine.opts)
    flops = {
        rows: jacobi.run_passes.lower(
            decoder.graphdef, decoder.state, s, np.int32(N), np.int32(1), opts=engine.opts, rows=rows
        )
        .compile()
        .cost_analysis()["flops"]
        for rows in (1, 4)
    }
    assert 3.5 < flops[4] / flops[1] < 4.5, flops


def test_random_hold_is_drawn_per_request(tiny, tiny_init_dir):
    """--hold-draft-prefix random:R: each request holds a uniform 0..R of its draft tokens, drawn from its
    prompt and draft (the same at any load); its answer is refine's for that draft with that hold."""
    from diffpo_jax.decoding.batching import Decoder

    hold = ["--hold-draft-prefix", "random:6", "--draft-model", "none", "--no-warm-up", "--max-prompt-tokens", "64"]
    engine, service = serve.build(serve.parse_args(["--model", str(tiny_init_dir), *hold, *DECODE]), refiner=tiny)
    prompts = [engine.prompt_tokens(messages(r)) for r in RECORDS]
    drafts = [engine.refiner.draft_tokens(r["draft"])[: N + W] for r in RECORDS]
    held = [engine.held_tokens(p, d) for p, d in zip(prompts, drafts)]
    assert all(0 <= h <= 6 for h in held) and len(set(held)) > 1
    assert held == [engine.held_tokens(p, d) for p, d in zip(prompts, drafts)]
    try:
        with running(service) as url, ThreadPoolExecutor(len(RECORDS)) as pool:
            answers = list(pool.map(lambda r: ask(url, r), RECORDS))
    finally:
        engine.stop(10)
    expected = Decoder(tiny, batch_size=SLOTS, max_new_tokens=N).refine(
        prompts, drafts, block_size=W, hold_draft_prefix=6, hold_lens=held
    )
    assert [a.choices[0].message.content for a in answers] == [e.text for e in expected]
    assert [a.diffpo["stats"] for a in answers] == [e.stats for e in expected]


def test_max_tokens_and_stop_cut_the_answer(server, refined):
    _, _, url = server
    full = refined[0]["refined"]
    short = ask(url, RECORDS[0], max_tokens=3)
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"
    assert full.startswith(short.choices[0].message.content) and len(short.choices[0].message.content) < len(full)
    stop = full[len(full) // 2 :][:3]
    cut = ask(url, RECORDS[0], stop=[stop])
    assert cut.choices[0].message.content == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"
    assert ask_streamed(url, RECORDS[0], stop=stop)[0] == full[: full.index(stop)]


@pytest.mark.slow
def test_drafts_are_generates_and_the_upstreams(server, tiny, tmp_path):
    """No `draft`: the drafter writes the one `generate --seed S` writes (record 0), refined as that draft sent
    by the client is (refine's answer: the test above); a second app whose drafts come from the first over
    HTTP (--upstream) refines that server's answer."""
    engine, _, url = server
    prompt = {"prompt": "Tell me a story."}
    inp, out = write_jsonl(tmp_path / "p.jsonl", [prompt]), tmp_path / "d.jsonl"
    gen = ["--temperature", "0.9", "--seed", "7", "--max-new-tokens", str(N), "--batch-size", str(SLOTS)]
    generate_cli.run(generate_cli.parse_args(["--input", str(inp), "--output", str(out), *gen]), tiny)
    (drafted,) = read_jsonl(out)
    answer = ask(url, prompt, temperature=0.9, seed=7)
    assert answer.diffpo["draft"] == drafted["draft"]
    assert answer.choices[0].message.content == ask(url, drafted).choices[0].message.content
    greedy = [ask(url, prompt, temperature=0, seed=seed).diffpo["draft"] for seed in (1, 2)]
    assert greedy[0] == greedy[1] != answer.diffpo["draft"]  # temperature 0 is greedy, not "unset"

    upstream = serve.Service(engine, serve.Settings("diffpo", upstream=url, upstream_model="diffpo"))
    with running(upstream) as front:
        relayed = ask(front, prompt, temperature=0.9, seed=7)
    assert relayed.diffpo["draft"] == answer.choices[0].message.content
    assert (
        relayed.choices[0].message.content
        == ask(url, prompt | {"draft": relayed.diffpo["draft"]}).choices[0].message.content
    )


@pytest.mark.slow
def test_answers_on_a_mesh_equal_refine(tiny_init_dir, refined):
    """--mesh 2,1,2: the slots split over 2 data devices, heads and KV cache over 2 tensor devices; the
    answers are still refine's (one device)."""
    mesh = ["--mesh", "2,1,2", "--draft-model", "none", "--max-prompt-tokens", "64"]
    engine, service = serve.build(serve.parse_args(["--model", str(tiny_init_dir), *mesh, *DECODE]))
    try:
        with running(service) as url, ThreadPoolExecutor(len(RECORDS)) as pool:
            answers = list(pool.map(lambda r: ask(url, r), RECORDS))
    finally:
        engine.stop(10)
    assert [a.choices[0].message.content for a in answers] == [r["refined"] for r in refined]
    assert [a.diffpo["stats"] for a in answers] == [r["stats"] for r in refined]


def error_of(response: httpx.Response, status: int, code: str | None, param: str | None = None) -> str:
    assert response.status_code == status, response.text
    (error,) = response.json().values()
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code and error["param"] == param
    return error["message"]


def test_bad_requests_are_openai_errors_before_any_decoding(server, monkeypatch):
    engine, _, url = server
    submitted = []
    monkeypatch.setattr(engine, "submit", submitted.append)
    post = lambda body, **kw: httpx.post(f"{url}/chat/completions", **({"json": body} | kw))  # noqa: E731
    good = {"model": "diffpo", "messages": [{"role": "user", "content": "hi"}], "draft": "x"}
    assert "JSON" in error_of(post(None, content=b"{not json"), 400, "invalid_json")
    error_of(post(good | {"messages": "hi"}), 400, "invalid_type", "messages")
    error_of(post(good | {"max_tokens": "8"}), 400, "invalid_type", "max_tokens")
    error_of(post(good | {"temperature": True}), 400, "invalid_type", "temperature")
    error_of(post(good | {"messages": [{"role": "user", "content": 3}]}), 400, None, "messages[0].content")
    error_of(post(good | {"messages": []}), 400, "missing_required_parameter", "messages")
    error_of(post(good | {"n": 2}), 400, "unsupported_value", "n")
    error_of(post(good | {"seed": 2**64}), 400, "invalid_value", "seed")
    error_of(post(good | {"temperature": 2.5}), 400, "invalid_value", "temperature")
    long = good | {"messages": [{"role": "user", "content": "word " * 100}]}
    assert error_of(post(long), 400, "context_length_exceeded", "messages").endswith("this server takes at most 64")
    error_of(post(good, content=json.dumps(good | {"pad": "x" * serve.MAX_BODY})), 413, "request_too_large")
    error_of(httpx.get(f"{url}/nowhere"), 404, "not_found")
    with pytest.raises(openai.NotFoundError) as e:
        client(url).chat.completions.create(model="gpt-4", messages=good["messages"])
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client(url).chat.completions.create(model="diffpo", messages=[])
    assert submitted == []


def test_key_queue_and_upstream_failures(server):
    """--api-key-env: 401 without the key; a full queue: 503 with Retry-After; an upstream that refuses or
    never answers: 502 for that request, and the server goes on."""
    engine, _, url = server
    body = {"model": "diffpo", "messages": [{"role": "user", "content": "hi"}], "draft": "x"}
    keyed = serve.Service(engine, serve.Settings("diffpo", api_key="s3cret"))
    full = serve.Service(engine, serve.Settings("diffpo", max_queue=0))
    closed = serve.Service(engine, serve.Settings("diffpo", upstream=f"http://127.0.0.1:{free_port()}/v1",
                                                  upstream_model="m"))  # fmt: skip
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        mute = f"http://127.0.0.1:{silent.getsockname()[1]}/v1"
        slow = serve.Service(engine, serve.Settings("diffpo", upstream=mute, upstream_model="m", upstream_timeout=0.5))
        with running(keyed) as k, running(full) as f, running(closed) as c, running(slow) as s:
            error_of(httpx.post(f"{k}/chat/completions", json=body), 401, "invalid_api_key")
            with pytest.raises(openai.AuthenticationError):
                client(k, api_key="wrong").models.list()
            reply = client(k, api_key="s3cret").chat.completions.create(
                model="diffpo", messages=body["messages"], extra_body={"draft": "x"}
            )
            assert reply.choices[0].finish_reason in ("stop", "length")
            busy = httpx.post(f"{f}/chat/completions", json=body)
            error_of(busy, 503, "queue_full")
            assert busy.headers["retry-after"] == "1"
            no_draft = {k: v for k, v in body.items() if k != "draft"}
            error_of(httpx.post(f"{c}/chat/completions", json=no_draft), 502, "upstream_error")
            error_of(httpx.post(f"{s}/chat/completions", json=no_draft), 502, "upstream_timeout")
    assert client(url).models.list().data[0].id == "diffpo"
    assert httpx.get(url.removesuffix("/v1") + "/health").json()["status"] == "ok"


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "not-streamed"])
def test_a_disconnected_client_frees_its_slot(server, monkeypatch, stream):
    """The client goes away after the first pass; the engine frees the slot before its next pass."""
    engine, service, url = server
    health = lambda: httpx.get(url.removesuffix("/v1") + "/health").json()  # noqa: E731
    ask(url, RECORDS[0])  # compiled before the clock of the client's timeout starts
    before = health()
    passes, resume, real = [], threading.Event(), engine_module.run_passes

    def gated(*args, **kwargs):  # the second pass waits until the client is gone
        passes.append(1)
        if len(passes) > 1:
            resume.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(engine_module, "run_passes", gated)
    body = {"model": "diffpo", "messages": messages(RECORDS[0]), "draft": "", "stream": stream}
    if stream:
        with httpx.stream("POST", f"{url}/chat/completions", json=body) as r:
            lines = (line for line in r.iter_lines() if line)
            assert '"role"' in next(lines) and '"content"' in next(lines)
    else:
        with pytest.raises(httpx.ReadTimeout):  # the client gives up while the second pass waits
            httpx.post(f"{url}/chat/completions", json=body, timeout=httpx.Timeout(5, read=1))
        assert len(passes) == 2
    for _ in range(200):
        if health()["disconnects"] > before["disconnects"]:
            break
        time.sleep(0.05)
    resume.set()
    for _ in range(200):
        now = health()
        if now["cancelled"] > before["cancelled"]:
            break
        time.sleep(0.05)
    assert now["cancelled"] == before["cancelled"] + 1 and now["disconnects"] == before["disconnects"] + 1
    assert ask(url, RECORDS[1]).choices[0].finish_reason and health()["busy"] == 0


def test_arguments(tmp_path, capsys, monkeypatch):
    assert serve.main(["--model", str(tmp_path / "nope"), "--draft-model", "none"]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'nope'}: no such file or directory\n"
    with pytest.raises(SystemExit):
        serve.parse_args(["--upstream", "http://x/v1"])
    with pytest.raises(SystemExit):
        serve.parse_args(["--upstream", "http://x/v1", "--upstream-model", "m", "--draft-model", "d"])
    monkeypatch.delenv("SERVE_TEST_KEY", raising=False)
    with pytest.raises(SystemExit):
        serve.parse_args(["--api-key-env", "SERVE_TEST_KEY"])
    assert "--api-key-env SERVE_TEST_KEY: the variable is not set" in capsys.readouterr().err
    args = serve.parse_args([])
    assert (args.host, args.port, args.model, args.draft_model) == ("127.0.0.1", 8000, "embedded-refiner", None)


@pytest.mark.slow
def test_sigterm_drains_and_exits_0(tiny_init_dir, xla_cache_dir):
    """`python -m diffpo_jax.serve` in a subprocess: streams in flight when SIGTERM comes all finish, a new
    request gets 503, the process exits 0."""
    port = free_port()
    env = os.environ | {"JAX_COMPILATION_CACHE_DIR": str(xla_cache_dir), "PYTHONPATH": str(ROOT)}
    args = ["--model", str(tiny_init_dir), "--draft-model", "none", "--port", str(port), "--max-new-tokens", "64",
            "--block-size", "4", "--batch-size", "1", "--max-prompt-tokens", "64"]  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "diffpo_jax.serve", *args], cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        for _ in range(600):
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/models").status_code == 200:
                    break
            time.sleep(0.2)
        started = threading.Semaphore(0)

        def one(record):
            chunks = []
            for c in ask(url, record, stream=True):
                chunks.append(c)
                if len(chunks) == 1:  # the role chunk: the request is in the engine
                    started.release()
            return chunks[-1].choices[0].finish_reason

        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(one, r) for r in RECORDS[:4]]
            assert all(started.acquire(timeout=60) for _ in futures)
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.2)
            late = httpx.post(f"{url}/chat/completions", json={"model": "diffpo", "messages": messages(RECORDS[0]),
                                                               "draft": "x"})  # fmt: skip
            assert all(f.result(timeout=120) in ("stop", "length") for f in futures)
        error_of(late, 503, "unavailable")
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
