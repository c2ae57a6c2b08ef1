"""Python reward functions for `score --reward SPEC`: rule-based and verifiable rewards beside reward models.

SPEC is `package.module:function` (imported) or `path/to/rewards.py:function` (loaded from the file).
The function is called TRL-style, batched, with keyword arguments:

    function(prompts=[prompt, ...], completions=[answer, ...]) -> [float, ...]

a prompt being what the record holds (a string, or a list of {"role", "content"} messages; trajectories'
prompt field; mt_bench: the conversation up to the scored answer), an answer a string. It returns one
real number per answer, in order (a list, tuple or 1-D array; bools are refused). `FunctionScorer` has
the interface of `reward.scorer.Scorer` (`row`, `score`, `batch_size`), so `score` streams, resumes,
splits over processes and summarises the same way. A function that raises, returns the wrong length,
a non-number or a non-finite value stops the run with a `RewardFunctionError` naming the function and
the row (score.py turns it into one line naming the record and field); nothing is written for that chunk.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import numbers
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from diffpo_jax.reward.scorer import Score


class RewardFunctionError(Exception):
    """A reward function that cannot be loaded or gave an unusable result. `row`: the offending row's index
    in the rows given to `score` (None when no one row is to blame)."""

    def __init__(self, message: str, row: int | None = None):
        super().__init__(message)
        self.row = row


def load_reward_function(spec: str) -> Callable[..., Any]:
    """The callable named by `module:function` or `file.py:function`."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise RewardFunctionError(f"--reward {spec}: expected MODULE:FUNCTION or path/to/file.py:FUNCTION")
    try:
        if target.endswith(".py") or "/" in target:
            path = Path(target)
            if not path.is_file():
                raise RewardFunctionError(f"--reward {spec}: no file {path}")
            module_name = f"diffpo_reward_{abs(hash(str(path.resolve())))}"
            module_spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[module_name] = module  # dataclasses and pickling look modules up by name
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except RewardFunctionError:
        raise
    except Exception as e:  # the user's module failed to import: say which and why, in one line
        raise RewardFunctionError(f"--reward {spec}: importing {target} failed: {type(e).__name__}: {e}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise RewardFunctionError(f"--reward {spec}: {target} has no function '{name}'")
    return fn


class FunctionScorer:
    """Scores (prompt, answer) rows with a Python reward function, `batch_size` rows per call."""

    def __init__(self, spec: str, *, batch_size: int):
        self.spec, self.fn, self.batch_size = spec, load_reward_function(spec), batch_size

    def row(self, prompt, answer: str) -> tuple[Any, str]:
        return prompt, answer

    def score(self, rows: list[tuple[Any, str]]) -> list[Score]:
        out: list[Score] = []
        for start in range(0, len(rows), self.batch_size):
            out += self._batch(rows[start : start + self.batch_size], start)
        return out

    def _batch(self, rows: list[tuple[Any, str]], first: int) -> list[Score]:
        try:
            values = self.fn(prompts=[p for p, _ in rows], completions=[a for _, a in rows])
        except Exception as e:
            # find the row to blame: the first that fails alone (a batch-level failure blames the batch's first)
            row = next((first + i for i, r in enumerate(rows) if not self._calls_alone(r)), first)
            raise RewardFunctionError(f"reward function {self.spec} raised {type(e).__name__}: {e}", row) from None
        try:
            values = list(values)
        except TypeError:
            raise RewardFunctionError(
                f"reward function {self.spec} returned {type(values).__name__}, not a list of numbers", first
            ) from None
        if len(values) != len(rows):
            raise RewardFunctionError(
                f"reward function {self.spec} returned {len(values)} values for {len(rows)} answers", first
            )
        scores = []
        for i, v in enumerate(values):
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise RewardFunctionError(
                    f"reward function {self.spec} returned {v!r} ({type(v).__name__}), not a number", first + i
                )
            if not math.isfinite(float(v)):
                raise RewardFunctionError(f"reward function {self.spec} returned {float(v)}", first + i)
            scores.append(Score(float(v)))
        return scores

    def _calls_alone(self, row: tuple[Any, str]) -> bool:
        try:
            self.fn(prompts=[row[0]], completions=[row[1]])
            return True
        except Exception:
            return False
