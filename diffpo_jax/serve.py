"""python -m diffpo_jax.serve: an OpenAI-compatible DiffPO service (chat completions, refined by Jacobi decoding).

  python -m diffpo_jax.serve [--host 127.0.0.1] [--port 8000] [--model DIFFPO [--base B]] [--name diffpo]
      [--block-size 32] [--max-new-tokens 256] [--batch-size 8] [--max-prompt-tokens 1024]
      [--hold-draft-prefix R | random:R] [--dtype float32|bfloat16] [--mesh D,F,T]
      [--draft-model BASE | none | --upstream URL --upstream-model NAME [--upstream-timeout 60]]
      [--max-queue 64] [--api-key-env VAR] [--grace-period 30] [--no-warm-up]

Endpoints: POST /v1/chat/completions, GET /v1/models, GET /health. A request's answer is the DiffPO
model's refinement of a draft: the body's `draft` (a string: `extra_body={"draft": ...}` with the openai
client), else one written by the drafter: `--draft-model` (default: the embedded SmolLM2; `none`: every
request must bring its draft) with the request's temperature / top_p / seed (seed s draws the draft
`generate --seed s` writes for a one-record file), or `--upstream URL` (an OpenAI-compatible endpoint,
model `--upstream-model`, key from $DIFFPO_UPSTREAM_API_KEY). The refinement is greedy, so it is the
text `refine` writes for that draft with the same options, whatever the load (decoding/engine.py).
The response's extra field `diffpo` holds the draft and refine's stats. Errors are OpenAI error objects:
400 bad input (before any decoding), 401 wrong key (--api-key-env), 404 unknown model or path, 413 body
over 1 MiB, 502 upstream failure, 503 full queue (--max-queue) or draining (Retry-After). SIGTERM: new
requests get 503, the ones in flight finish (up to --grace-period seconds), exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import secrets
import sys
import threading
import time
import uuid
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from diffpo_jax.decoding import devices
from diffpo_jax.decoding.batching import ContextError
from diffpo_jax.decoding.engine import EngineError, Job, Progress
from diffpo_jax.records.loop import sample_keys
from diffpo_jax.refine import hold_max, hold_spec
from diffpo_jax.sources import ModelSourceError

MAX_BODY = 1 << 20  # bytes of a request body (413 past it)
UPSTREAM_KEY_ENV = "DIFFPO_UPSTREAM_API_KEY"
ROLES = ("system", "developer", "user", "assistant")
DISCONNECT_POLL_S = 0.25  # how often a non-streamed request checks that its client is still there


class ApiError(Exception):
    """An OpenAI error response: status, message, and the error object's param / code / type."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, kind=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = {"Retry-After": "1"} if status == 503 else {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclasses.dataclass
class ChatRequest:
    messages: list[dict[str, str]]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    stop: list[str]
    stream: bool
    include_usage: bool
    draft: str | None


def _field(body: dict, name: str, kinds: tuple, what: str, default=None):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise ApiError(400, f"'{name}' must be {what}, got {json.dumps(value)[:80]}", name, "invalid_type")
    return value


def _content(message: Any, i: int) -> dict[str, str]:
    if not isinstance(message, dict):
        raise ApiError(400, f"messages[{i}] must be an object with 'role' and 'content'", f"messages[{i}]")
    role, content = message.get("role"), message.get("content")
    if role not in ROLES:
        raise ApiError(400, f"messages[{i}].role must be one of {', '.join(ROLES)}", f"messages[{i}].role")
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        content = "".join(str(p.get("text", "")) for p in content)
    if not isinstance(content, str):
        raise ApiError(400, f"messages[{i}].content must be a string or text parts", f"messages[{i}].content")
    return {"role": "system" if role == "developer" else role, "content": content}


def parse_request(raw: bytes, name: str, max_new_tokens: int) -> ChatRequest:
    """The body of a chat completion request, checked; an ApiError (400 / 404) names the first bad field."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the body is not valid JSON: {e}", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object", None, "invalid_json")
    model = _field(body, "model", (str,), "a string")
    if model is None:
        raise ApiError(400, "'model' is required", "model", "missing_required_parameter")
    messages = _field(body, "messages", (list,), "a list of messages")
    if not messages:
        raise ApiError(400, "'messages' must be a non-empty list", "messages", "missing_required_parameter")
    messages = [_content(m, i) for i, m in enumerate(messages)]
    if _field(body, "n", (int,), "an integer", 1) != 1:
        raise ApiError(400, "'n' must be 1 (one refined answer per request)", "n", "unsupported_value")
    limits = [_field(body, k, (int,), "an integer", max_new_tokens) for k in ("max_tokens", "max_completion_tokens")]
    if min(limits) < 1:
        raise ApiError(400, "'max_tokens' must be >= 1", "max_tokens", "invalid_value")
    temperature = float(_field(body, "temperature", (int, float), "a number", 1.0))
    top_p = float(_field(body, "top_p", (int, float), "a number", 1.0))
    if not 0 <= temperature <= 2:
        raise ApiError(400, "'temperature' must be in [0, 2]", "temperature", "invalid_value")
    if not 0 < top_p <= 1:
        raise ApiError(400, "'top_p' must be in (0, 1]", "top_p", "invalid_value")
    seed = _field(body, "seed", (int,), "an integer", secrets.randbits(31))
    if not -(2**63) <= seed < 2**63:
        raise ApiError(400, "'seed' must fit in 64 bits", "seed", "invalid_value")
    stop = _field(body, "stop", (str, list), "a string or a list of strings", [])
    stop = [stop] if isinstance(stop, str) else stop
    if not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise ApiError(400, "'stop' must be up to 4 non-empty strings", "stop", "invalid_value")
    options = _field(body, "stream_options", (dict,), "an object", {})
    request = ChatRequest(
        messages=messages,
        max_tokens=min(*limits, max_new_tokens),
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        stop=stop,
        stream=_field(body, "stream", (bool,), "a boolean", False),
        include_usage=_field(options, "include_usage", (bool,), "a boolean", False),
        draft=_field(body, "draft", (str,), "a string"),
    )
    if model != name:
        raise ApiError(
            404, f"the model '{model}' does not exist; this server serves '{name}'", "model", "model_not_found"
        )
    return request


@dataclasses.dataclass
class Settings:
    """What the HTTP side needs besides the engine."""

    name: str
    max_queue: int = 64
    api_key: str | None = None
    upstream: str | None = None  # base URL of an OpenAI-compatible endpoint writing the drafts
    upstream_model: str | None = None
    upstream_timeout: float = 60.0


def _cut(text: str, stops: list[str]) -> tuple[str, bool]:
    """`text` up to the first stop sequence, and whether there was one."""
    at = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text, False) if at < 0 else (text[:at], True)


class Service:
    """The Starlette app over an engine: routes, checks, drafts from upstream, streaming."""

    def __init__(self, engine, settings: Settings):
        self.engine, self.settings = engine, settings
        self.draining = False
        self.disconnects = 0  # streams whose client went away before the end
        self.app = Starlette(
            routes=[
                Route("/v1/chat/completions", self.chat, methods=["POST"]),
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/health", self.health, methods=["GET"]),
            ],
            exception_handlers={HTTPException: self._http_error, Exception: self._server_error},
        )

    # ------------------------------------------------------------------ responses

    @staticmethod
    def error(e: ApiError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    async def _http_error(self, _request, exc):
        return self.error(
            ApiError(exc.status_code, f"{exc.detail}", None, "not_found" if exc.status_code == 404 else None)
        )

    async def _server_error(self, _request, exc):
        return self.error(ApiError(500, f"internal error: {type(exc).__name__}: {exc}"))

    def _check_key(self, request) -> None:
        key = self.settings.api_key
        if key is not None and request.headers.get("authorization") != f"Bearer {key}":
            raise ApiError(401, "missing or wrong API key (Authorization: Bearer KEY)", None, "invalid_api_key")

    async def health(self, _request):
        engine = self.engine
        status = (
            "failed"
            if engine.failure
            else "draining"
            if self.draining
            else "warming up"
            if not engine.warm.is_set()
            else "ok"
        )
        body = {
            "status": status,
            "slots": engine.slots,
            "busy": engine.busy,
            "queued": engine.queued,
            "cancelled": engine.cancelled,
            "disconnects": self.disconnects,
        }
        return JSONResponse(body, status_code=200 if status == "ok" else 503)

    async def models(self, request):
        try:
            self._check_key(request)
        except ApiError as e:
            return self.error(e)
        card = {"id": self.settings.name, "object": "model", "created": 0, "owned_by": "diffpo-jax"}
        return JSONResponse({"object": "list", "data": [card]})

    # ------------------------------------------------------------------ chat completions

    async def chat(self, request):
        try:
            self._check_key(request)
            if self.draining or self.engine.failure:
                raise ApiError(503, self.engine.failure or "the server is shutting down", None, "unavailable")
            length = request.headers.get("content-length", "")
            if length.isdigit() and int(length) > MAX_BODY:  # refused before the body is read
                raise ApiError(413, f"the body is over {MAX_BODY} bytes", None, "request_too_large")
            raw = await request.body()
            if len(raw) > MAX_BODY:
                raise ApiError(413, f"the body is over {MAX_BODY} bytes", None, "request_too_large")
            req = parse_request(raw, self.settings.name, self.engine.max_new_tokens)
            job = self._job(req)
            if self.engine.queued >= self.settings.max_queue:
                raise ApiError(
                    503, f"the queue is full ({self.settings.max_queue} requests waiting)", None, "queue_full"
                )
            if job.draft is None and self.settings.upstream:
                job.draft = await self._upstream_draft(req)
        except ApiError as e:
            return self.error(e)
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def emit(event):  # on the engine thread; after shutdown the loop is gone and nobody listens
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(events.put_nowait, event)

        job.emit = emit
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.settings.name}
        self.engine.submit(job)
        if req.stream:
            return StreamingResponse(self._stream(job, req, events, meta), media_type="text/event-stream")
        answer = asyncio.ensure_future(self._finish(job, req, events))
        try:
            while not (await asyncio.wait({answer}, timeout=DISCONNECT_POLL_S))[0]:
                if await request.is_disconnected():  # the client is gone: free the slot, answer no one
                    self.disconnects += 1
                    answer.cancel()
                    return Response(status_code=499)
            text, finish, progress = answer.result()
        except EngineError as e:
            return self.error(ApiError(500, str(e), None, "engine_error"))
        finally:
            job.cancelled = True  # a no-op once finished
        return JSONResponse(
            meta
            | {
                "object": "chat.completion",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": finish,
                        "logprobs": None,
                    }
                ],
                "usage": self._usage(job, progress, text),
                "diffpo": {"draft": progress.draft, "stats": progress.stats},
            }
        )

    def _job(self, req: ChatRequest) -> Job:
        """The engine's job for `req`: its prompt checked (400) and, without a draft, the drafter's inputs."""
        engine = self.engine
        try:
            prompt = engine.prompt_tokens(req.messages)
            job = Job(prompt, req.max_tokens, emit=None, draft=req.draft, temperature=req.temperature, top_p=req.top_p)
            if req.draft is None and not self.settings.upstream:
                if engine.drafter is None:
                    raise ApiError(400, "this server has no drafter: send the answer to refine as 'draft'", "draft")
                job.draft_prompt = engine.prompt_tokens(req.messages, engine.drafter)
                job.key = sample_keys(req.seed, [0], 0)[0]
        except ContextError as e:
            raise ApiError(400, str(e), "messages", "context_length_exceeded") from None
        return job

    async def _upstream_draft(self, req: ChatRequest) -> str:
        """The draft of the upstream endpoint; a 502 ApiError when it fails or times out."""
        s = self.settings
        url = s.upstream.rstrip("/") + "/chat/completions"
        body = {"model": s.upstream_model, "messages": req.messages, "max_tokens": req.max_tokens}
        body |= {"temperature": req.temperature, "top_p": req.top_p, "seed": req.seed}
        key = os.environ.get(UPSTREAM_KEY_ENV)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        try:
            async with httpx.AsyncClient(timeout=s.upstream_timeout) as client:
                r = await client.post(url, json=body, headers=headers)
            if r.status_code != 200:
                raise ApiError(502, f"upstream {url} answered {r.status_code}: {r.text[:200]}", None, "upstream_error")
            content = r.json()["choices"][0]["message"]["content"]
            if not isinstance(content, str):
                raise TypeError("choices[0].message.content is not a string")
            return content
        except httpx.TimeoutException:
            raise ApiError(
                502, f"upstream {url} timed out after {s.upstream_timeout} s", None, "upstream_timeout"
            ) from None
        except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as e:
            raise ApiError(502, f"upstream {url} failed: {type(e).__name__}: {e}", None, "upstream_error") from None

    async def _progress(self, job: Job, req: ChatRequest, events: asyncio.Queue):
        """(text so far, finish reason or None, the Progress) after each pass; stop sequences cut the text
        and end the request (its slot freed); an EngineError is raised."""
        while True:
            event = await events.get()
            if isinstance(event, EngineError):
                raise event
            text, cut = _cut(event.text, req.stop)
            finish = "stop" if cut else event.finish
            if finish:
                job.cancelled = True  # cut by a stop sequence: the engine frees the slot
            yield text, finish, event
            if finish:
                return

    async def _finish(self, job: Job, req: ChatRequest, events: asyncio.Queue):
        async for text, finish, progress in self._progress(job, req, events):
            if finish:
                return text, finish, progress

    def _usage(self, job: Job, progress: Progress, text: str) -> dict:
        completion = len(progress.tokens)
        if text != progress.text:  # cut by a stop sequence: the tokens of what is left
            with self.engine.tokenizer_lock:
                completion = len(self.engine.refiner.tokenizer(text, add_special_tokens=False)["input_ids"])
        return {
            "prompt_tokens": len(job.prompt),
            "completion_tokens": completion,
            "total_tokens": len(job.prompt) + completion,
        }

    async def _stream(self, job: Job, req: ChatRequest, events: asyncio.Queue, meta: dict):
        """SSE chunks: the role first, then the text as passes commit it (held back while it may still be
        a stop sequence's start or ends in a partial character), the finish with `diffpo`, usage, [DONE]."""

        def chunk(delta: dict, finish=None, **extra) -> str:
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            return (
                "data: " + json.dumps(meta | {"object": "chat.completion.chunk", "choices": [choice]} | extra) + "\n\n"
            )

        hold = max(map(len, req.stop), default=1) - 1
        sent, finished = "", False
        try:
            yield chunk({"role": "assistant", "content": ""})
            async for text, finish, progress in self._progress(job, req, events):
                shown = text if finish else text[: len(text) - hold].rstrip("\ufffd")
                if len(shown) > len(sent) and shown.startswith(sent):
                    yield chunk({"content": shown[len(sent) :]})
                    sent = shown
                if finish:
                    yield chunk({}, finish, diffpo={"draft": progress.draft, "stats": progress.stats})
                    if req.include_usage:
                        usage = self._usage(job, progress, text)
                        yield (
                            "data: "
                            + json.dumps(meta | {"object": "chat.completion.chunk", "choices": [], "usage": usage})
                            + "\n\n"
                        )
            finished = True
        except EngineError as e:
            yield "data: " + json.dumps(ApiError(500, str(e), None, "engine_error").body()) + "\n\n"
            finished = True
        finally:
            if not finished:
                self.disconnects += 1
            job.cancelled = True
        yield "data: [DONE]\n\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m diffpo_jax.serve", description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument(
        "--model", default="embedded-refiner", help="the DiffPO model (any --model source; refine's default)"
    )
    ap.add_argument("--base", help="the base model of a PEFT adapter --model")
    ap.add_argument("--name", default="diffpo", help="the model name clients send and /v1/models lists")
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=256, help="the most tokens an answer has (caps max_tokens)")
    ap.add_argument("--batch-size", type=int, default=8, help="decoder slots: requests refined at once")
    ap.add_argument("--max-prompt-tokens", type=int, default=1024, help="the largest prompt bucket (longer: 400)")
    ap.add_argument(
        "--hold-draft-prefix",
        type=hold_spec,
        default=0,
        metavar="R | random:R",
        help="keep the first R draft tokens; random:R: a uniform 0..R per request, drawn from its prompt and draft",
    )
    devices.add_arguments(ap)
    ap.add_argument("--draft-model", help="the local drafter (any --model source; default: the embedded SmolLM2; none)")
    ap.add_argument(
        "--upstream", metavar="URL", help=f"OpenAI-compatible endpoint writing the drafts (key: ${UPSTREAM_KEY_ENV})"
    )
    ap.add_argument("--upstream-model", metavar="NAME", help="the model the upstream endpoint is asked for")
    ap.add_argument("--upstream-timeout", type=float, default=60.0, metavar="S")
    ap.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot before 503")
    ap.add_argument("--api-key-env", metavar="VAR", help="require the key in this environment variable")
    ap.add_argument("--grace-period", type=float, default=30.0, metavar="S", help="SIGTERM: time to finish requests")
    ap.add_argument(
        "--no-warm-up",
        dest="warm_up",
        action="store_false",
        help="skip compiling every program at start (/health says 'warming up' until it is done)",
    )
    args = ap.parse_args(argv)
    for name in ("block_size", "max_new_tokens", "batch_size", "max_prompt_tokens"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 <= hold_max(args.hold_draft_prefix) <= args.max_new_tokens:
        ap.error("--hold-draft-prefix must be in [0, --max-new-tokens]")
    if args.max_queue < 0:
        ap.error("--max-queue must be >= 0")
    if bool(args.upstream) != bool(args.upstream_model):
        ap.error("--upstream and --upstream-model go together")
    if args.upstream and args.draft_model:
        ap.error("--draft-model and --upstream exclude each other (one writes the drafts)")
    if args.api_key_env and not os.environ.get(args.api_key_env):
        ap.error(f"--api-key-env {args.api_key_env}: the variable is not set")
    return args


def build(args: argparse.Namespace, refiner=None, drafter=None):
    """The engine (started) and the Service for `args`; `refiner` / `drafter`: already loaded models to use
    instead of args.model / args.draft_model."""
    from diffpo_jax.decoding.batching import Decoder
    from diffpo_jax.decoding.engine import Engine
    from diffpo_jax.sources import load_model

    mesh = devices.decode_mesh(args.mesh, args.base or args.model, args.dtype)
    devices.check_rows(mesh, args.batch_size)
    dtype = devices.default_dtype(args.dtype)
    refiner = refiner or load_model(args.model, base=args.base, dtype=dtype, mesh=mesh)
    decoders = dict(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, mesh=mesh)
    if drafter is None and not args.upstream and args.draft_model != "none":
        drafter = load_model(args.draft_model, dtype=dtype, mesh=mesh)
    engine = Engine(
        Decoder(refiner, **decoders),
        block_size=args.block_size,
        max_prompt_tokens=args.max_prompt_tokens,
        hold_draft_prefix=hold_max(args.hold_draft_prefix),
        random_hold=isinstance(args.hold_draft_prefix, str),
        drafter=None if drafter is None else Decoder(drafter, **decoders),
    )
    engine.start(warm_up=args.warm_up)
    settings = Settings(
        name=args.name,
        max_queue=args.max_queue,
        api_key=os.environ[args.api_key_env] if args.api_key_env else None,
        upstream=args.upstream,
        upstream_model=args.upstream_model,
        upstream_timeout=args.upstream_timeout,
    )
    return engine, Service(engine, settings)


def serve(service: Service, host: str, port: int, grace: float) -> None:
    """Run uvicorn until SIGTERM / SIGINT, then drain: new requests get 503, the engine finishes what it
    holds (at most `grace` seconds), the open responses are sent, and the server stops (a second signal:
    at once)."""

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            if service.draining:
                self.should_exit = True
                return
            service.draining = True
            threading.Thread(target=self._drain, daemon=True).start()

        def _drain(self):
            deadline = time.monotonic() + grace
            while not service.engine.idle() and time.monotonic() < deadline:
                time.sleep(0.05)
            self.should_exit = True

    config = uvicorn.Config(service.app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=grace)
    Server(config).run()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        engine, service = build(args)
    except (ModelSourceError, devices.MeshError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"serving {args.name} on http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    serve(service, args.host, args.port, args.grace_period)
    engine.stop(timeout=args.grace_period)
    return 0


if __name__ == "__main__":
    sys.exit(main())
