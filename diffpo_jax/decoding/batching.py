"""Text in, text out: chat templating, static-shape batches and the jitted decoders, for the CLIs.

`Decoder` wraps a loaded model: prompts are chat-templated with `diffpo_jax.chat.prompt_ids`, drafts
tokenized with `response_ids` (plus the end-of-turn token, since a draft is a whole answer). Every call
is padded to static shapes so nothing recompiles across batches:
  batch      exactly `batch_size` rows (a short last batch repeats its first row and key);
  prompts    right-padded to a power of two (at least 32);
  drafts     right-padded/cut to max_new_tokens + block_size (the only draft tokens the decoder reads).
A prompt whose length plus max_new_tokens exceeds the model's context is a `ContextError` (never
silently truncated). With a `mesh` (decoding/devices.py) every call's rows are split over its data x
fsdp devices (batch_size must be a multiple of them) and the model runs under it as in training
(params placed by `load_model(..., mesh=mesh)`); each row's answer does not depend on the mesh. Stop
tokens: the loaded model's (`LoadedModel.stop_tokens`: the config's, tokenizer's and generation config's
eos ids and the chat template's end-of-turn token). Texts are decoded without the stop token.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from diffpo_jax.chat import Messages, end_of_turn_id, pad_id, prompt_ids, response_ids
from diffpo_jax.decoding.devices import check_rows
from diffpo_jax.decoding.jacobi import jacobi_decode, jacobi_stream
from diffpo_jax.decoding.sampler import generate, generate_stream
from diffpo_jax.sharding import batch_sharding
from diffpo_jax.sources import LoadedModel, ModelSourceError

MIN_PROMPT_BUCKET = 32


class ContextError(ValueError):
    """A prompt that does not fit the model's context with max_new_tokens; str() is the message."""


def bucket(n: int, minimum: int = MIN_PROMPT_BUCKET) -> int:
    """The smallest power of two >= max(n, minimum)."""
    return max(minimum, 1 << max(0, n - 1).bit_length())


@dataclasses.dataclass
class Output:
    """One decoded row: the response tokens (stop token excluded), its text and per-row stats."""

    tokens: list[int]
    text: str
    stats: dict[str, Any]


class Decoder:
    def __init__(self, loaded: LoadedModel, *, batch_size: int, max_new_tokens: int, mesh: Mesh | None = None):
        if mesh is not None:
            check_rows(mesh, batch_size)
        if loaded.tokenizer is None:
            raise ModelSourceError(f"{loaded.source}: no tokenizer files beside the weights")
        self.loaded, self.tokenizer = loaded, loaded.tokenizer
        if not getattr(self.tokenizer, "chat_template", None):
            raise ModelSourceError(f"{loaded.source}: the tokenizer has no chat template")
        self.graphdef, self.state = nnx.split(loaded.model)
        self.batch_size, self.max_new_tokens, self.mesh = batch_size, max_new_tokens, mesh
        self.stop_tokens = loaded.stop_tokens
        self.end_of_turn = end_of_turn_id(self.tokenizer)
        self.pad_id = pad_id(self.tokenizer, self.end_of_turn)

    # ------------------------------------------------------------------ tokens

    def prompt_tokens(self, prompt: str | Messages) -> list[int]:
        ids = prompt_ids(self.tokenizer, prompt)
        context = self.loaded.cfg.max_position_embeddings
        if len(ids) + self.max_new_tokens > context:
            raise ContextError(
                f"prompt is {len(ids)} tokens; with max_new_tokens {self.max_new_tokens} it exceeds the "
                f"model's context of {context} tokens"
            )
        return ids

    def draft_tokens(self, draft: str) -> list[int]:
        ids = response_ids(self.tokenizer, draft)
        return ids + [self.end_of_turn]

    def _text(self, tokens: np.ndarray, length: int, stopped: bool) -> tuple[list[int], str]:
        ids = tokens[: length - int(stopped)].tolist()
        return ids, self.tokenizer.decode(ids, skip_special_tokens=True)

    def _state_text(self, tokens: np.ndarray) -> str:
        ends = np.flatnonzero(np.isin(tokens, (*self.stop_tokens, self.pad_id)))
        ids = tokens[: ends[0] if ends.size else len(tokens)].tolist()
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _pad(self, rows: list[list[int]], width: int, count: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """[count (default batch_size), width] right-padded (rows past len(rows) repeat row 0) and lengths."""
        count = self.batch_size if count is None else count
        rows = rows + [rows[0]] * (count - len(rows))
        out = np.full((count, width), self.pad_id, np.int32)
        lens = np.zeros((count,), np.int32)
        for i, r in enumerate(rows):
            r = r[:width]
            out[i, : len(r)], lens[i] = r, len(r)
        return out, lens

    def _put(self, *arrays) -> tuple:
        """Batch-major inputs split over the mesh's data x fsdp devices (as they are without a mesh)."""
        if self.mesh is None:
            return arrays
        return tuple(jax.device_put(x, batch_sharding(self.mesh, x.ndim)) for x in arrays)

    def _under_mesh(self):
        return (
            contextlib.nullcontext() if self.mesh is None else jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh)
        )

    # ------------------------------------------------------------------ decoding

    def refine(
        self,
        prompts: list[list[int]],
        drafts: list[list[int]],
        *,
        block_size: int,
        max_iterations: int | None = None,
        hold_draft_prefix: int = 0,
        hold_lens: list[int] | None = None,
        realign: bool = True,
        trajectory: bool = False,
    ) -> list[Output]:
        """Jacobi-refine (prompt ids, draft ids) rows into the model's greedy answers: up to batch_size rows
        in one batch, more through batch_size slots with row refill (`jacobi_stream`: a finished row's
        slot takes the next row; the answers are the same). trajectory (one batch only):
        stats["trajectory"] holds the text of the response after each pass (each cut at its first stop
        or pad token). hold_lens: per row, hold this many (<= hold_draft_prefix) draft tokens instead."""
        assert 0 < len(prompts) == len(drafts) and (len(prompts) <= self.batch_size or not trajectory)
        assert hold_lens is None or (len(hold_lens) == len(prompts) and max(hold_lens) <= hold_draft_prefix)
        n = self.max_new_tokens
        options = dict(
            block_size=block_size,
            max_new_tokens=n,
            stop_tokens=self.stop_tokens,
            pad_id=self.pad_id,
            max_iterations=n if max_iterations is None else max_iterations,
            hold_draft_prefix=hold_draft_prefix,
            realign=realign,
        )
        count = max(len(prompts), self.batch_size)
        p, plen = self._pad(prompts, bucket(max(map(len, prompts))), count)
        d, dlen = self._pad(drafts, n + block_size, count)
        holds = np.full((count,), hold_draft_prefix, np.int32)
        holds[: len(prompts)] = holds[: len(prompts)] if hold_lens is None else hold_lens
        with self._under_mesh():
            if len(prompts) > self.batch_size:
                r = jacobi_stream(
                    self.graphdef,
                    self.state,
                    p,
                    plen,
                    d,
                    dlen,
                    batch_size=self.batch_size,
                    mesh=self.mesh,
                    hold_lens=holds,
                    **options,
                )
            else:
                r = jacobi_decode(
                    self.graphdef,
                    self.state,
                    *self._put(p, plen, d, dlen),
                    hold_lens=self._put(holds)[0],
                    trajectory=trajectory,
                    **options,
                )
        r = jax.device_get(r)
        outputs = []
        for i in range(len(prompts)):
            ids, text = self._text(r.tokens[i], int(r.lengths[i]), bool(r.stopped[i]))
            passes, committed = int(r.passes[i]), int(r.committed[i])
            stats = {
                "tokens": int(r.lengths[i]),
                "passes": passes,
                "tokens_per_pass": round(committed / max(passes, 1), 3),
                "converged": bool(r.converged[i]),
                "stopped": bool(r.stopped[i]),
                "draft_tokens": len(drafts[i]),
            }
            if trajectory:
                stats["trajectory"] = [self._state_text(r.states[i, k]) for k in range(passes)]
            outputs.append(Output(ids, text, stats))
        return outputs

    def sample(self, prompts: list[list[int]], keys: jax.Array, *, temperature: float, top_p: float) -> list[Output]:
        """Sample (greedy when temperature == 0) an answer for each prompt row, row i with keys[i] (a key
        array, one key per prompt): up to batch_size rows in one batch, more through batch_size slots with
        row refill (`generate_stream`; the answers are the same)."""
        assert 0 < len(prompts) == len(keys)
        count = max(len(prompts), self.batch_size)
        p, plen = self._pad(prompts, bucket(max(map(len, prompts))), count)
        options = dict(
            max_new_tokens=self.max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            stop_tokens=self.stop_tokens,
            pad_id=self.pad_id,
        )
        with self._under_mesh():
            if len(prompts) > self.batch_size:
                g = generate_stream(
                    self.graphdef, self.state, p, plen, keys, batch_size=self.batch_size, mesh=self.mesh, **options
                )
            else:
                padded_keys = keys[np.r_[np.arange(len(prompts)), np.zeros(count - len(prompts), int)]]
                g = generate(self.graphdef, self.state, *self._put(p, plen, padded_keys), **options)
        g = jax.device_get(g)
        outputs = []
        for i in range(len(prompts)):
            ids, text = self._text(g.tokens[i], int(g.lengths[i]), bool(g.stopped[i]))
            outputs.append(Output(ids, text, {"tokens": int(g.lengths[i]), "stopped": bool(g.stopped[i])}))
        return outputs
