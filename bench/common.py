"""What every benchmark shares: the machine description, markdown tables, and its section of RESULTS.md.

Each benchmark owns one section of `bench/RESULTS.md`, between `<!-- begin NAME -->` and `<!-- end NAME -->`;
a rerun replaces that section only (the file is rewritten through a temp file and a rename), so the
hand-written analysis outside the markers survives.
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Any, Sequence

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def machine() -> str:
    """One line: CPU model, cores, load average, jax / torch versions and the jax backend."""
    import jax

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    parts = [f"{cpu}, {os.cpu_count()} cores, load average {load} (1/5/15 min) at the start"]
    parts.append(f"jax {jax.__version__} on {jax.default_backend()} ({len(jax.devices())} devices)")
    if "torch" in sys.modules:
        import torch

        parts.append(f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
    return "; ".join(parts)


def command(module: str, argv: Sequence[str] | None) -> str:
    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join(["python -m", module, *map(shlex.quote, args)])


def fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"
    return str(x)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table (also what the benchmarks print)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def header(title: str, module: str, argv: Sequence[str] | None, machine_line: str) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"## {title}\n\n- date: {now}\n- machine: {machine_line}\n- command: `{command(module, argv)}`\n"


def report(path: Path | str, name: str, body: str) -> None:
    """Print `body` and write it as the NAME section of the results file (not when path is '-')."""
    print(body)
    if str(path) != "-":
        write_section(Path(path), name, body)


def write_section(path: Path, name: str, body: str) -> None:
    """Replace (or append) the NAME section of the results file, atomically."""
    path = Path(path)
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    block = f"{begin}\n{body.rstrip()}\n{end}\n"
    text = path.read_text() if path.is_file() else "# Benchmark results\n\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def plot_eval_curves(curves: dict[str, list[dict]], path: Path, passes_title: str, ar_title: str) -> None:
    """PNG of the trainer's held-out eval lines per run: Jacobi passes per token and L_AR against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, curve in curves.items():
        steps = [m["step"] for m in curve]
        axes[0].plot(steps, [m["eval_passes_per_token"] for m in curve], marker="o", label=name)
        axes[1].plot(steps, [m["eval_ar"] for m in curve], marker="o", label=name)
    axes[0].set(xlabel="step", ylabel="held-out Jacobi passes per token", title=passes_title)
    axes[1].set(xlabel="step", ylabel="held-out L_AR (nats/token)", title=ar_title)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
