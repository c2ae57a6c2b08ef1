"""The record loop of the decoding CLIs (refine, generate, and `data distill`): records in, output records
out, in input order.

`decode_records` takes the records the output file (output.py) leaves to this process (one process: those
the file does not hold yet), checks every first turn against the context before any decoding, forms
batches (windows sorted by prompt bucket), decodes them turn by turn through the caller's callbacks and
appends each record to the `ResumableOutput`. It knows the record formats (formats.py) and the `Decoder`
(decoding/batching.py); the decoders know neither. `sample_keys`: generate's per-record sampling keys.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from diffpo_jax.decoding.batching import ContextError, Decoder, bucket
from diffpo_jax.records.formats import FormatError, Record, turn_prompt
from diffpo_jax.records.output import ResumableOutput

R = TypeVar("R")  # what a decode_records callback returns per record

ON_ERROR = ("stop", "skip")


def sample_keys(seed: int, indices: list[int], turn: int, samples: int = 1):
    """The sampling keys of `samples` answers to each record of `indices` (0-based input positions) at
    `turn` (0-based), a record's samples in adjacent rows: sample k draws with the key
    fold_in(fold_in(fold_in(jax.random.key(seed), record), turn), k), so an answer depends on neither the
    batching nor the process count nor a resume (generate's --seed)."""
    import jax
    import jax.numpy as jnp

    def key(record, sample):
        return jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), record), turn), sample)

    records, sample_rows = jnp.repeat(jnp.asarray(indices), samples), jnp.tile(jnp.arange(samples), len(indices))
    return jax.vmap(key)(records, sample_rows)


def decode_records(
    decoder: Decoder,
    records: list[Record],
    out: ResumableOutput,
    decode: Callable[[list[int], int, list[Record], list[list[int]]], list[R]],
    history: Callable[[Record, int, R], str],
    build: Callable[[Record, list[R]], dict[str, Any]],
    progress: Callable[[list[R]], None],
    *,
    batch_size: int | None = None,
    on_error: str = "stop",
    window: int = 0,
) -> int:
    """Decode the records `out` leaves to this process (`out.todo`), batch_size records at a time (default:
    the decoder's batch_size) and turn by turn; returns how many were skipped.

    decode(record indices, turn, records, prompt ids) -> one result (an Output, or what the caller makes of
    Outputs) per record for that turn, the indices being the records' 0-based positions in `records`;
    history(record, turn, result) -> the assistant text later turns see; build(record, results per turn)
    -> the output record, appended to `out`; progress(results) after each decode call.

    Every record's first turn is checked before any decoding (a prompt too long for the context fails in
    seconds, not hours in). A record that fails (any turn): on_error "stop" raises a FormatError naming
    it; "skip" writes it out in its place as the input record plus `error` (the message), and goes on.

    Scheduling: records are taken `window` at a time; within a window, batches are formed in order of
    the first turn's prompt bucket, so a batch's prompts share a bucket (a batch_size as large as the
    window hands the whole window to `decode` at once: the CLIs' row refill; refine --trajectory decodes
    batch by batch). A window is written out, in
    input order, when all its records are done (a killed run redoes at most one window).
    window <= batch_size: batches of consecutive records, as they come.
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    errors: dict[int, str] = {}

    def fail(i: int, turn: int, e: ContextError) -> None:
        message = f"{records[i].where}: turn {turn + 1}: {e}"
        if on_error == "stop":
            raise FormatError(message)
        errors[i] = message

    prompt_lens = {}
    for i in out.todo:
        try:
            prompt_lens[i] = len(decoder.prompt_tokens(records[i].prompt))
        except ContextError as e:
            fail(i, 0, e)
    size = decoder.batch_size if batch_size is None else batch_size
    span = max(window, size)
    for start in range(0, len(out.todo), span):
        indices = out.todo[start : start + span]
        order = sorted(indices, key=lambda i: (bucket(prompt_lens.get(i, 0)), i))
        outputs: dict[int, list[R]] = {i: [] for i in indices}
        for lo in range(0, len(order), size):
            _decode_batch(decoder, records, order[lo : lo + size], outputs, decode, history, progress, errors, fail)
        for i in indices:
            out.append(i, dict(records[i].raw, error=errors[i]) if i in errors else build(records[i], outputs[i]))
    return len(errors)


def _decode_batch(decoder, records, batch, outputs, decode, history, progress, errors, fail) -> None:
    """One batch of records, turn by turn (later turns see `history` of the earlier ones)."""
    answers: dict[int, list[str]] = {i: [] for i in batch}
    for turn in range(max(records[i].num_turns for i in batch)):
        live, ids = [], []
        for i in batch:
            if i in errors or turn >= records[i].num_turns:
                continue
            try:
                ids.append(decoder.prompt_tokens(turn_prompt(records[i], turn, answers[i])))
                live.append(i)
            except ContextError as e:
                fail(i, turn, e)
        if not live:
            continue
        results = decode(live, turn, [records[i] for i in live], ids)
        for i, res in zip(live, results):
            outputs[i].append(res)
            answers[i].append(history(records[i], turn, res))
        progress(results)
