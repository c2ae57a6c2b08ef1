"""`python -m diffpo_jax.verify`: the embedded SmolLM2 against transformers, tiny models, CLI behaviour."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from diffpo_jax import verify
from diffpo_jax.model import abstract_model


@pytest.mark.slow
def test_embedded_smollm2_float32_matches_transformers(smollm2, smollm2_reference):
    results, ok = verify.check(smollm2, smollm2_reference, verify.BUILTIN, atol=1e-3, min_top1=1.0)
    assert len(results) >= 4 and all(r["tokens"] > 40 for r in results)
    assert ok, results
    assert max(r["max_abs_diff"] for r in results) <= 1e-3
    assert all(r["top1"] == 1.0 for r in results)


@pytest.mark.slow
def test_embedded_smollm2_bfloat16_top1_against_float32(smollm2, smollm2_reference):
    cfg = smollm2.cfg.replace(dtype="bfloat16", param_dtype="bfloat16")
    graphdef = nnx.graphdef(abstract_model(cfg))
    state = jax.tree.map(lambda x: x.astype(jnp.bfloat16), nnx.state(smollm2.model))  # as load_model(dtype=bf16)
    bf16 = dataclasses.replace(smollm2, cfg=cfg, model=nnx.merge(graphdef, state))
    results, ok = verify.check(
        bf16, smollm2_reference, verify.BUILTIN, atol=float("inf"), min_top1=verify.DEFAULT_MIN_TOP1["bfloat16"]
    )
    assert ok, results
    assert all(r["mean_kl"] < 5e-3 for r in results), results  # measured 1.3-1.8e-3: bf16 rounding, no more
    assert all(r["max_abs_diff"] > 1e-3 for r in results)  # it really ran in bf16


def test_cli_passes_on_tiny_gemma2_at_1e4(tiny_gemma2_dir, capsys):
    assert verify.main(["--model", str(tiny_gemma2_dir), "--atol", "1e-4"]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and out.count("100.00%") == 4  # four random-id sequences, no tokenizer


def test_cli_fails_outside_tolerance(tiny_llama_dir, capsys):
    assert verify.main(["--model", str(tiny_llama_dir), "--atol", "1e-12"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_compare_measures_what_it_says():
    ref = np.array([[0.0, 1.0, 2.0], [3.0, 0.0, 0.0]])
    same = verify.compare(ref, ref)
    assert same == {"max_abs_diff": 0.0, "mean_kl": 0.0, "top1": 1.0}
    other = verify.compare(ref + np.array([[0.0, 0.0, 0.5], [0.0, 5.0, 0.0]]), ref)
    assert other["max_abs_diff"] == 5.0 and other["top1"] == 0.5 and other["mean_kl"] > 0


def test_bad_prompts_file_names_file_and_line(tmp_path, tiny_llama_dir, capsys):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text(json.dumps({"prompt": "ok"}) + "\n{not json\n")
    assert verify.main(["--model", str(tiny_llama_dir), "--prompts", str(bad)]) == 2
    assert f"{bad}:2: not valid JSON" in capsys.readouterr().err
    bad.write_text(json.dumps({"text": "no prompt field"}) + "\n")
    assert verify.main(["--model", str(tiny_llama_dir), "--prompts", str(bad)]) == 2
    assert f"{bad}:1: field 'prompt'" in capsys.readouterr().err


def test_orbax_dir_is_refused_with_the_way_out(tmp_path, tiny_llama_dir, capsys):
    from flax import nnx

    from diffpo_jax.sources import load_model
    from diffpo_jax.weights.checkpoint import save_params

    loaded = load_model(str(tiny_llama_dir))
    orbax_dir = save_params(tmp_path / "orbax", loaded.cfg, nnx.state(loaded.model))
    assert verify.main(["--model", str(orbax_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"error: {orbax_dir}: an Orbax checkpoint, which transformers cannot read: export it first "
        f"(python -m diffpo_jax.convert to-hf {orbax_dir} OUT) and verify OUT"
    )


def test_reward_models_verify_their_scores(tmp_path, smol_tokenizer, capsys):
    from tests import tiny

    config = tiny.gemma2_config()
    config.vocab_size = len(smol_tokenizer)
    folder = tmp_path / "rm"
    tiny.build_classifier(config, 1).save_pretrained(folder)
    smol_tokenizer.save_pretrained(folder)
    assert verify.main(["--model", str(folder), "--atol", "1e-4"]) == 0
    out = capsys.readouterr().out
    assert "PASS: reward model, float32" in out and len(out.splitlines()) == 2 + len(verify.BUILTIN)
    assert verify.main(["--model", str(folder), "--atol", "1e-12"]) == 1
