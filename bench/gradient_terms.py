"""Why w = 1e3 collapses: the gradient of each loss term at the start of training.

    python -m bench.gradient_terms [--data SRC ...] [--batches 4] [--prompt-len 64] [--response-len 32]

For each model (the tiny preset's random init and the embedded SmolLM2-135M-Instruct, fp32) and each
dataset (`--data`: source files or built dataset dirs; default the bundled reward-ranked
examples/trajectories.jsonl), over `--batches` loader batches of 8 rows: L_AR and L_Con (per-token normalisation, training/loss.py), the norms of their gradients
‖g_AR‖, ‖g_Con‖ with the KL on all positions (the paper), on the draft's positions and on the 16
positions after the first mismatch ("frontier", training/loss.py),
the cosine between g_AR and g_Con, and the balance weight w* = ‖g_AR‖ / ‖g_Con‖: at w = w* both terms
move the weights equally; at w = 1000 the AR term's share of the gradient is ‖g_AR‖ / (1000 ‖g_Con‖).
Writes bench/results/gradient-terms.md.
"""

from __future__ import annotations

import argparse
import tempfile
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from bench.common import add_results_option, header, machine, report, table
from diffpo_jax.training.loss import LossConfig, diffpo_loss, response_token_losses

ROOT = Path(__file__).resolve().parent.parent
MODELS = {"tiny preset (random init)": "preset:tiny-llama", "SmolLM2-135M-Instruct": "embedded"}


def term_gradients(loaded, batches: list[dict], positions: str) -> list[dict[str, float]]:
    """Per batch: L_AR, L_Con, ‖g_AR‖, ‖g_Con‖, cos(g_AR, g_Con) with the KL on `positions`."""
    graphdef, params = nnx.split(loaded.model)
    params, cfg = nnx.to_pure_dict(params), LossConfig(con_positions=positions)
    return [{k: float(v) for k, v in jax.device_get(_grads(graphdef, cfg, params, b)).items()} for b in batches]


def _term(graphdef, cfg, params, batch, name):
    ce, kl = response_token_losses(nnx.merge(graphdef, params), batch, 0)
    num_tokens = jnp.maximum(jnp.sum(batch["best_mask"]), 1).astype(jnp.float32)
    return diffpo_loss(ce, kl, batch, cfg, num_tokens=num_tokens)[1][name]


@partial(jax.jit, static_argnums=(0, 1))
def _grads(graphdef, cfg, params, batch):
    (ar, g_ar), (con, g_con) = (
        jax.value_and_grad(_term, argnums=2)(graphdef, cfg, params, batch, n) for n in ("ar", "con")
    )
    dot = sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(g_ar), jax.tree.leaves(g_con)))
    n_ar, n_con = optax.tree.norm(g_ar), optax.tree.norm(g_con)
    return {"ar": ar, "con": con, "g_ar": n_ar, "g_con": n_con, "cos": dot / (n_ar * n_con)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gradient_terms", description=__doc__.splitlines()[0])
    ap.add_argument("--data", nargs="+", default=[str(ROOT / "examples" / "trajectories.jsonl")])
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--response-len", type=int, default=32)
    add_results_option(ap)
    args = ap.parse_args(argv)
    from diffpo_jax.data.loader import make_loader
    from diffpo_jax.data.trajectories import MANIFEST, build
    from diffpo_jax.sharding import make_mesh
    from diffpo_jax.training.start import init_model

    line = machine()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        datasets = {}
        for i, src in enumerate(args.data):
            datasets[src] = Path(src) if (Path(src) / MANIFEST).is_file() else Path(tmp) / f"d{i}"
            if datasets[src] != Path(src):
                build([src], datasets[src])
        for name, spec in MODELS.items():
            loaded = init_model(spec, seed=0, dtype="float32", param_dtype="float32", mesh=make_mesh((1, -1, 1)))
            for src, data in datasets.items():
                loader = make_loader(
                    data,
                    loaded.tokenizer,
                    global_batch_size=8,
                    prompt_len=args.prompt_len,
                    response_len=args.response_len,
                    num_epochs=None,
                    shard_index=0,
                    shard_count=1,
                )
                it = iter(loader)
                batches = [next(it) for _ in range(args.batches)]
                for positions in ("all", "draft", "frontier"):
                    per = term_gradients(loaded, batches, positions)
                    mean = {k: float(np.mean([p[k] for p in per])) for k in per[0]}
                    w_star = float(np.median([p["g_ar"] / p["g_con"] for p in per]))
                    rows.append(
                        [
                            name,
                            src,
                            positions,
                            mean["ar"],
                            mean["con"],
                            mean["g_ar"],
                            mean["g_con"],
                            mean["cos"],
                            w_star,
                            mean["g_ar"] / (mean["g_ar"] + 1000 * mean["g_con"]),
                        ]
                    )
                    print(rows[-1], flush=True)
    body = header("Per-term gradients at initialisation", "gradient-terms", "bench.gradient_terms", argv, line)
    body += (
        f"\n{args.batches} batches of 8 rows per dataset, P={args.prompt_len}, N={args.response_len}; "
        "means over batches (w*: median). w* = ‖g_AR‖ / ‖g_Con‖; last column: the AR term's share "
        "‖g_AR‖ / (‖g_AR‖ + 1000 ‖g_Con‖) of the gradient at the paper's w (an upper bound).\n\n"
    )
    body += table(
        [
            "model",
            "data",
            "KL positions",
            "L_AR",
            "L_Con",
            "‖g_AR‖",
            "‖g_Con‖",
            "cos(g_AR, g_Con)",
            "w*",
            "AR share at w=1000",
        ],
        rows,
    )
    report(args.results, "gradient-terms", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
