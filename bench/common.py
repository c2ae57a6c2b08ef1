"""What every benchmark shares: the machine description, markdown tables, and its results file.

Each benchmark run writes its results to one file, `bench/results/NAME.md` (NAME: the run's name, the
script's default or its `--section`), replaced whole at every run, and its figure, if it draws one, to
`bench/figures/`. bench/RESULTS.md, the hand-written summary, links to them. `--results DIR` (every
benchmark) writes DIR/NAME.md instead, and the figure to the `figures` folder beside DIR; `--results -`
prints only.
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


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


def add_results_option(ap) -> None:
    """The `--results` option every benchmark takes."""
    ap.add_argument(
        "--results",
        type=Path,
        default=RESULTS,
        help="folder for the results, one NAME.md per run (default: bench/results; '-': print only)",
    )


def header(title: str, name: str, module: str, argv: Sequence[str] | None, machine_line: str) -> str:
    """The results file's heading, naming the script and the run, with the date, machine and command."""
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    script = "bench/" + module.rsplit(".", 1)[-1] + ".py"
    return (
        f"## {title} ({script}, run {name})\n\n- date: {now}\n- machine: {machine_line}\n"
        f"- command: `{command(module, argv)}`\n"
    )


def report(results: Path | str, name: str, body: str) -> None:
    """Print `body` and write it as run NAME's results file (not when results is '-')."""
    print(body)
    if str(results) != "-":
        write_section(Path(results), name, body)


def write_section(results: Path, name: str, body: str) -> Path:
    """Write `body` as the whole of RESULTS/NAME.md (atomically: a temp file, then a rename); its path."""
    results = Path(results)
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"{name}.md"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(body.rstrip("\n") + "\n")
    tmp.replace(path)
    return path


def figure(results: Path | str, name: str, curves: dict[str, list[dict]], passes_title: str, ar_title: str) -> str:
    """Draw run NAME's eval curves into the `figures` folder beside RESULTS (not when it is '-'); the
    markdown line that shows it from RESULTS/NAME.md."""
    file = name.replace("-", "_") + ".png"
    if str(results) != "-":
        folder = Path(results).resolve().parent / "figures"
        folder.mkdir(parents=True, exist_ok=True)
        plot_eval_curves(curves, folder / file, passes_title, ar_title)
    return f"![held-out passes per token and L_AR against step](../figures/{file})"


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
