"""The serving engine: continuous batching of Jacobi refinement across requests (`python -m diffpo_jax.serve`).

One thread owns the devices and the jitted functions. It keeps `batch_size` refinement slots (the state
of `jacobi_stream`: one KV cache for prompts up to the largest bucket) and loops: take the requests that
arrived (`submit`, from any thread), drop the cancelled ones (their slot is free at once), write drafts
for the waiting requests that have none (the drafter `Decoder`: one batched AR call of the smallest
power-of-two batch that holds them, on this thread),
start waiting requests in the free slots (`jacobi.start_row`: one prefill each, compiled once per
prompt bucket), run one Jacobi pass over the live slots, then hand every live request its committed
tokens (`Progress`, through the request's `emit`, called on this thread) and free the slots whose rows
are done or reached the request's `max_tokens`.

The live rows are kept in slots 0..busy-1 (a freed slot takes the last live row, `jacobi.move_row`), so
a pass runs over the smallest power-of-two prefix of slots that holds them (`jacobi.run_passes`, one
program per size): with a few requests in flight a pass costs a few rows, not every slot's. (With the
slots split over several data devices the pass always runs over all of them: a prefix would leave
devices idle.)

Shapes are fixed at start (slots, pass sizes, prompt buckets 32, 64, .. up to `max_prompt_tokens`,
drafts cut to max_new_tokens + block_size as `Decoder.refine` cuts them), and `warm_up` compiles every
program before the first request. Rows are independent of each other in every decoder step, so a
request's answer and stats are the ones `Decoder.refine` gives its (prompt, draft), whatever else is in
the slots.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import queue
import threading
import traceback
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffpo_jax.chat import Messages
from diffpo_jax.decoding import slots as slots_lib
from diffpo_jax.decoding.batching import ContextError, Decoder, bucket
from diffpo_jax.decoding.jacobi import JacobiOptions, empty_slots, move_row, run_passes, slot_results, start_row


class EngineError(RuntimeError):
    """A request the engine could not decode (its drafter or the devices failed); str() is the message."""


@dataclasses.dataclass
class Progress:
    """A request's response so far (the stop token excluded): after each pass, and once with `finish`."""

    tokens: list[int]
    text: str
    stats: dict[str, Any]  # as `Decoder.refine`'s Output.stats
    finish: str | None = None  # "stop" (a stop token), "length" (max_tokens), None: more to come
    draft: str | None = None  # the draft's text (the client's, or the drafter's)


@dataclasses.dataclass(eq=False)
class Job:
    """One request. `emit` is called on the engine thread with a `Progress` after every pass that commits
    tokens (the last one with `finish` set) or once with an `EngineError`; `cancelled` may be set from
    any thread: the engine frees the request's slot before its next pass and emits nothing more."""

    prompt: list[int]  # the refiner's prompt tokens (`Engine.prompt_tokens`)
    max_tokens: int  # <= the refiner's max_new_tokens
    emit: Callable[[Progress | EngineError], None]
    draft: str | None = None  # None: the drafter writes it
    draft_prompt: list[int] | None = None  # the drafter's prompt tokens (when draft is None)
    key: jax.Array | None = None  # the drafter's sampling key (a key array scalar)
    temperature: float = 1.0
    top_p: float = 1.0
    cancelled: bool = False
    draft_ids: list[int] | None = dataclasses.field(default=None, init=False)


class Engine:
    def __init__(
        self,
        refiner: Decoder,
        *,
        block_size: int,
        max_prompt_tokens: int,
        hold_draft_prefix: int = 0,
        random_hold: bool = False,
        realign: bool = True,
        drafter: Decoder | None = None,
    ):
        """hold_draft_prefix R: each request holds its first R draft tokens; with `random_hold` (refine's
        "random:R") a uniform 0..R drawn from its prompt and draft tokens (`held_tokens`), so a request
        holds the same prefix whatever the load."""
        if drafter is not None and drafter.batch_size != refiner.batch_size:
            raise ValueError("the drafter's batch size must be the refiner's (one draft per free slot)")
        self.refiner, self.drafter = refiner, drafter
        self._drafters: dict[int, Decoder] = {}  # the drafter at smaller batch sizes (`_drafter_for`)
        self.slots, self.max_new_tokens = refiner.batch_size, refiner.max_new_tokens
        self.prompt_width = bucket(max_prompt_tokens)  # the largest bucket: the longest prompt served
        self.random_hold = random_hold
        self.opts = JacobiOptions(
            block_size, refiner.max_new_tokens, refiner.stop_tokens, refiner.pad_id, hold_draft_prefix, realign
        )
        self.tokenizer_lock = threading.Lock()  # the refiner's tokenizer is used by this thread and the server's
        self._inbox: queue.SimpleQueue[Job] = queue.SimpleQueue()
        self._waiting: collections.deque[Job] = collections.deque()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="diffpo-engine", daemon=True)
        self.busy = 0  # live slots (read from any thread)
        self.cancelled = 0  # requests whose slot was freed because they were cancelled
        self.failure: str | None = None  # set when the engine thread died
        self._live: list[Job] = []  # the request in each live slot: slots 0..busy-1
        mesh = refiner.mesh
        self._split = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]  # devices the slots span
        self.warm = threading.Event()  # set once `warm_up` has compiled every program (or was skipped)

    # ------------------------------------------------------------------ any thread

    def prompt_tokens(self, messages: Messages, decoder: Decoder | None = None) -> list[int]:
        """The prompt's tokens for `decoder` (default: the refiner); a `ContextError` when they exceed the
        model's context with max_new_tokens or the largest prompt bucket."""
        decoder = decoder or self.refiner
        with self.tokenizer_lock:
            ids = decoder.prompt_tokens(messages)
        if len(ids) > self.prompt_width:
            raise ContextError(f"prompt is {len(ids)} tokens; this server takes at most {self.prompt_width}")
        return ids

    def start(self, warm_up: bool = True) -> None:
        """Start the engine thread; with `warm_up` it first compiles every program (`self.warm` is set
        when it is done: requests submitted meanwhile wait)."""
        self._warm_up_first = warm_up
        if not warm_up:
            self.warm.set()
        self._thread.start()

    def submit(self, job: Job) -> None:
        self._inbox.put(job)

    @property
    def queued(self) -> int:
        """Requests submitted and not yet in a slot."""
        return self._inbox.qsize() + len(self._waiting)

    def idle(self) -> bool:
        return self.busy == 0 and self.queued == 0

    def stop(self, timeout: float | None = None) -> None:
        """Stop after the requests in flight (join the thread)."""
        self._stopping.set()
        self._thread.join(timeout)

    # ------------------------------------------------------------------ the engine thread

    def _under_mesh(self):
        mesh = self.refiner.mesh
        return contextlib.nullcontext() if mesh is None else jax.sharding.use_abstract_mesh(mesh.abstract_mesh)

    def _run(self) -> None:
        try:
            with self._under_mesh():
                self._serve()
        except Exception as e:  # the devices failed: every request in flight and later gets the error
            self.failure = f"engine stopped: {type(e).__name__}: {e}"
            traceback.print_exc()
            for job in [*self._live, *self._waiting, *iter(lambda: self._take_nowait(), None)]:
                job.emit(EngineError(self.failure))

    def _take_nowait(self) -> Job | None:
        try:
            return self._inbox.get_nowait()
        except queue.Empty:
            return None

    def _serve(self) -> None:
        opts = self.opts
        width = opts.max_new_tokens + opts.block_size
        cfg = self.refiner.loaded.cfg
        s = slots_lib.place(empty_slots(cfg, self.slots, self.prompt_width, width, opts), self.refiner.mesh)
        if self._warm_up_first:
            s = self._warm_up(s)
            self.warm.set()
        while True:
            self._collect(block=self.busy == 0)
            if self._stopping.is_set() and self.busy == 0 and not self._waiting:
                return
            for slot in reversed(range(self.busy)):  # from the last: a freed slot takes the last live row
                if self._live[slot].cancelled:
                    s = self._free(s, slot)
                    self.cancelled += 1
            self._draft(self.slots - self.busy)
            while self.busy < self.slots and (job := self._next_ready()) is not None:
                s = self._start(s, job)
            if self.busy:
                s = self._report(self._pass(s, self._pass_rows(self.busy)))

    def _pass_rows(self, live: int) -> int:
        """The slots a pass runs over with `live` rows in flight: the smallest power of two that holds
        them (all slots when they are split over several devices)."""
        return self.slots if self._split > 1 else min(self.slots, bucket(live, minimum=1))

    def _pass(self, s, rows: int):
        """One Jacobi pass over slots 0..rows-1."""
        opts = self.opts
        return run_passes(
            self.refiner.graphdef,
            self.refiner.state,
            s,
            np.int32(opts.max_new_tokens),
            np.int32(1),
            opts=opts,
            rows=rows,
        )

    def held_tokens(self, prompt: list[int], draft_ids: list[int]) -> int:
        """The draft tokens a request holds: R, or under "random:R" a uniform 0..R drawn from a digest of
        its prompt and draft tokens (the same request holds the same prefix in any run, at any load)."""
        if not self.random_hold:
            return self.opts.hold_draft_prefix
        digest = hashlib.sha256(np.asarray([*prompt, -1, *draft_ids], np.int64).tobytes()).digest()
        return int(np.random.default_rng(int.from_bytes(digest[:8])).integers(0, self.opts.hold_draft_prefix + 1))

    def _start(self, s, job: Job):
        """`job` starts in the first free slot (its prefill)."""
        opts, pad = self.opts, self.refiner.pad_id
        width = opts.max_new_tokens + opts.block_size
        prompt = np.full(bucket(len(job.prompt)), pad, np.int32)
        prompt[: len(job.prompt)] = job.prompt
        draft = np.full(width, pad, np.int32)
        ids = job.draft_ids[:width]
        draft[: len(ids)] = ids
        hold = self.held_tokens(job.prompt, ids)
        s = start_row(
            self.refiner.graphdef,
            self.refiner.state,
            s,
            np.int32(self.busy),
            prompt,
            np.int32(len(job.prompt)),
            draft,
            np.int32(len(ids)),
            np.int32(hold),
            opts=opts,
        )
        self._live.append(job)
        self.busy += 1
        return s

    def _warm_up(self, s):
        """Compile every program serving runs, so that no request pays a compile: a prefill per prompt
        bucket (slot 0, freed again), a pass per pass size (over empty slots: no pass runs), and the
        drafter at each batch size it is called with, on a short chat prompt (its smallest bucket; a
        longer prompt's bucket compiles at its first request)."""
        size = bucket(1)
        while True:  # a request of each prompt bucket starts in slot 0 and leaves
            job = Job([self.refiner.pad_id] * size, 1, emit=lambda _: None, draft="")
            job.draft_ids = []
            s = self._free(self._start(s, job), 0)
            if size >= self.prompt_width:
                break
            size *= 2
        for rows in sorted({self._pass_rows(n) for n in range(1, self.slots + 1)}):
            s = self._pass(s, rows)
        s = move_row(s, np.int32(min(1, self.slots - 1)), np.int32(0))
        if self.drafter is not None:
            prompt = self.prompt_tokens([{"role": "user", "content": "Hello!"}], self.drafter)
            for size in sorted({self._drafter_for(n).batch_size for n in range(1, self.slots + 1)}):
                keys = jax.random.split(jax.random.key(0), size)
                self._drafter_for(size).sample([prompt] * size, keys, temperature=1.0, top_p=1.0)
        return s

    def _collect(self, block: bool) -> None:
        """Move the submitted requests to the waiting queue; with `block` (nothing to decode), wait for one."""
        while block and not self._waiting and not self._stopping.is_set():
            try:
                self._waiting.append(self._inbox.get(timeout=0.05))
            except queue.Empty:
                continue
        while (job := self._take_nowait()) is not None:
            self._waiting.append(job)

    def _next_ready(self) -> Job | None:
        """The first waiting request that is not cancelled, if its draft is ready (FIFO)."""
        while self._waiting and self._waiting[0].cancelled:
            self._waiting.popleft()
        if self._waiting and self._waiting[0].draft_ids is not None:
            return self._waiting.popleft()
        return None

    def _draft(self, count: int) -> None:
        """The drafts of the first `count` waiting requests (those about to take a free slot): their
        tokens, and for those that came without one, the drafter's (one batched call per sampling option)."""
        head = [job for job in self._waiting if not job.cancelled][:count]
        todo = [job for job in head if job.draft is None]
        for temperature, top_p in dict.fromkeys((job.temperature, job.top_p) for job in todo):
            group = [job for job in todo if (job.temperature, job.top_p) == (temperature, top_p)]
            try:
                outputs = self._drafter_for(len(group)).sample(
                    [job.draft_prompt for job in group],
                    jnp.stack([job.key for job in group]),
                    temperature=temperature,
                    top_p=top_p,
                )
            except Exception as e:  # this group's requests fail, the others go on
                for job in group:
                    job.cancelled = True
                    job.emit(EngineError(f"the drafter failed: {type(e).__name__}: {e}"))
                continue
            for job, output in zip(group, outputs):
                job.draft = output.text
        for job in head:
            if job.draft_ids is None and not job.cancelled:
                with self.tokenizer_lock:
                    job.draft_ids = self.refiner.draft_tokens(job.draft)

    def _drafter_for(self, rows: int) -> Decoder:
        """The drafter with the smallest power-of-two batch >= rows (that splits over its mesh), so one
        draft costs a one-row decode, not the padding of all slots; each size compiles once per bucket."""
        d = self.drafter
        size = min(d.batch_size, bucket(rows, minimum=1))
        if d.mesh is not None and size % (d.mesh.shape["data"] * d.mesh.shape["fsdp"]):
            size = d.batch_size
        if size == d.batch_size:
            return d
        if size not in self._drafters:
            self._drafters[size] = Decoder(d.loaded, batch_size=size, max_new_tokens=d.max_new_tokens, mesh=d.mesh)
        return self._drafters[size]

    def _free(self, s, slot: int):
        """The request in `slot` leaves; the last live row moves into its slot (live rows stay first)."""
        last = self.busy - 1
        self._live[slot] = self._live[last]
        self._live.pop()
        self.busy -= 1
        return _release(s, np.int32(slot)) if slot == last else move_row(s, np.int32(last), np.int32(slot))

    def _report(self, s):
        """Every live request's progress after a pass; the slots of finished ones freed."""
        done, r = jax.device_get((s.done, slot_results(s)))
        finished_slots = []
        for slot, job in enumerate(self._live):
            if job.cancelled:  # freed before the next pass
                continue
            n = int(r.lengths[slot])
            finished = bool(done[slot]) or n >= job.max_tokens
            k = min(n, job.max_tokens)
            stopped = bool(r.stopped[slot]) and n <= job.max_tokens
            ids = r.tokens[slot, : k - stopped].tolist()
            passes, committed = int(r.passes[slot]), int(r.committed[slot])
            stats = {
                "tokens": k,
                "passes": passes,
                "tokens_per_pass": round(committed / max(passes, 1), 3),
                "converged": bool(r.converged[slot]) if done[slot] else finished,
                "stopped": stopped,
                "draft_tokens": len(job.draft_ids),
            }
            with self.tokenizer_lock:
                text = self.refiner.tokenizer.decode(ids, skip_special_tokens=True)
            finish = ("stop" if stopped else "length") if finished else None
            job.emit(Progress(ids, text, stats, finish, job.draft))
            if finished:
                finished_slots.append(slot)
        for slot in reversed(finished_slots):  # from the last: a freed slot takes the last live row
            s = self._free(s, slot)
        return s


@partial(jax.jit, donate_argnums=0)
def _release(s, slot):
    """The row in `slot` ends (done): the slot is free for the next request."""
    return slots_lib.constrain_state(s.replace(done=s.done.at[slot].set(True)))
