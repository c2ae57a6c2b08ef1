"""The score summary: mean reward per field and the paired win rate of two fields, with a bootstrap CI."""

from __future__ import annotations

import numpy as np

BOOTSTRAP_SAMPLES = 1000


def win_rate(a: list[float], b: list[float], seed: int = 0) -> tuple[float, float, float]:
    """P(b > a) over paired records (ties count 1/2) and its 95% bootstrap interval (records resampled)."""
    wins = (np.asarray(b) > np.asarray(a)) + 0.5 * (np.asarray(b) == np.asarray(a))
    idx = np.random.default_rng(seed).integers(0, len(wins), (BOOTSTRAP_SAMPLES, len(wins)))
    lo, hi = np.percentile(wins[idx].mean(axis=1), [2.5, 97.5])
    return float(wins.mean()), float(lo), float(hi)


def summarize(per_field: dict[str, list[float]], pair: tuple[str, str] | None) -> dict:
    """{"fields": {field: {"n", "mean"}}, "win_rate": {"of", "over", "rate", "ci95"}} (the latter when a
    pair of one-answer fields was scored: `of` = the second field, `over` = the first)."""
    out = {"fields": {f: {"n": len(v), "mean": float(np.mean(v))} for f, v in per_field.items()}}
    if pair is not None:
        rate, lo, hi = win_rate(per_field[pair[0]], per_field[pair[1]])
        out["win_rate"] = {"of": pair[1], "over": pair[0], "rate": rate, "ci95": [lo, hi]}
    return out


def markdown(summary: dict, title: str) -> str:
    lines = [f"# {title}", "", "| field | answers | mean score |", "|---|---|---|"]
    lines += [f"| {f} | {s['n']} | {s['mean']:.4f} |" for f, s in summary["fields"].items()]
    if "win_rate" in summary:
        w = summary["win_rate"]
        lines += [
            "",
            f"Win rate of `{w['of']}` over `{w['over']}` (paired, ties 1/2): **{w['rate']:.3f}** "
            f"(bootstrap 95% CI {w['ci95'][0]:.3f}-{w['ci95'][1]:.3f}, {BOOTSTRAP_SAMPLES} resamples)",
        ]
    return "\n".join(lines) + "\n"
