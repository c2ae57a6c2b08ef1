"""A rule-based tone reward: VADER's compound sentiment of the answer, in [-1, 1] (warm, positive,
constructive answers score high). The reward of bench/alignment.py and of `make demo`.

    python -m diffpo_jax.score --reward examples/rewards/vader.py:compound --input refined.jsonl --output scored.jsonl

VADER (Hutto & Gilbert, ICWSM 2014; MIT licence) is a lexicon- and rule-based sentiment model; its lexicon
ships inside the `vaderSentiment` wheel (pinned in requirements-test.txt), so it runs offline. The prompt is
not used: the reward is the tone of the answer alone.
"""

from __future__ import annotations

import functools


@functools.cache
def _analyzer():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def compound(prompts, completions, **kwargs) -> list[float]:
    """VADER compound score of each completion (TRL reward-function signature)."""
    return [_analyzer().polarity_scores(text)["compound"] for text in completions]
