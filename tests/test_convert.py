"""Orbax checkpoints and `python -m diffpo_jax.convert`: round trips HF -> Orbax -> HF (bit-identical),
transformers loading the exports, sharded export == single-device export, train-state checkpoints
restored onto another mesh, and every bad input a one-line error that leaves nothing behind."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from diffpo_jax import convert, verify
from diffpo_jax.config import ModelConfig
from diffpo_jax.sharding import make_mesh, param_shardings
from diffpo_jax.sources import load_model
from diffpo_jax.weights import export
from diffpo_jax.weights.checkpoint import (
    TrainCheckpoints,
    is_orbax_dir,
    read_orbax_config,
    restore_params,
    save_params,
    write_model_files,
)
from diffpo_jax.weights.export import export_checkpoint, export_hf, parse_size
from diffpo_jax.weights.gguf import GGUFCheckpoint
from tests import tiny

FAMILIES = {"llama": "tiny_llama_dir", "llama_tied": "tiny_llama_tied_dir", "gemma2": "tiny_gemma2_dir"}
HF_CLASS = {"llama": "LlamaForCausalLM", "llama_tied": "LlamaForCausalLM", "gemma2": "Gemma2ForCausalLM"}


def hf_tensors(folder: Path) -> dict[str, np.ndarray]:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def tree_equal(a, b) -> bool:
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


RANDOM_IDS = np.random.default_rng(0).integers(0, tiny.VOCAB, (2, 40))  # longer than Gemma-2's window of 8


@pytest.fixture(scope="module")
def converted(request, tmp_path_factory):
    """family -> (family, HF source, Orbax model dir, HF export), through the library functions; each
    family converted once per module."""
    done = {}

    def get(family):
        if family not in done:
            src = request.getfixturevalue(FAMILIES[family])
            root = tmp_path_factory.mktemp(f"rt_{family}")
            orbax_dir = convert.from_hf(str(src), root / "orbax")
            done[family] = family, src, orbax_dir, export_checkpoint(orbax_dir, root / "hf")
        return done[family]

    return get


@pytest.fixture(params=list(FAMILIES))
def round_trip(request, converted):
    return converted(request.param)


@pytest.fixture
def llama(converted):
    return converted("llama")


# ---------------------------------------------------------------- round trips on tiny models


def test_round_trip_is_bit_identical(round_trip):
    family, src, orbax_dir, exported = round_trip
    assert is_orbax_dir(orbax_dir) and not is_orbax_dir(src)
    ours, theirs = hf_tensors(exported), hf_tensors(src)
    assert sorted(ours) == sorted(theirs)
    assert ("lm_head.weight" in ours) == (family == "llama")  # tied embeddings write no lm_head
    for name, t in theirs.items():
        assert ours[name].dtype == np.float32 and np.array_equal(ours[name], t), name
    config = json.loads((exported / "config.json").read_text())
    assert config["architectures"] == [HF_CLASS[family]] and config["torch_dtype"] == "float32"
    assert ModelConfig.from_hf(config) == ModelConfig.from_hf(json.loads((src / "config.json").read_text()))
    # rope settings under both keys: transformers 5 reads rope_parameters, older readers rope_scaling
    legacy = {k: v for k, v in config.items() if k != "rope_parameters"}
    assert ModelConfig.from_hf(legacy) == ModelConfig.from_hf(config)
    if family.startswith("llama"):
        assert config["rope_scaling"] == {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        }
        assert config["rope_parameters"] == {**config["rope_scaling"], "rope_theta": 500000.0}
    else:
        assert config["rope_scaling"] is None and config["rope_parameters"]["rope_type"] == "default"
    generation = json.loads((exported / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2 and generation["bos_token_id"] == 1
    assert sorted(p.name for p in exported.parent.iterdir()) == ["hf", "orbax"]  # no temp dirs left


def test_transformers_loads_export_with_equal_logits(round_trip):
    family, src, orbax_dir, exported = round_trip
    model = tiny.load_reference(exported)
    assert type(model).__name__ == HF_CLASS[family]
    diff = np.abs(tiny.torch_logits(model, RANDOM_IDS) - tiny.torch_logits(tiny.load_reference(src), RANDOM_IDS)).max()
    assert diff <= 1e-5, diff  # measured: 0.0 (same weights, same code)
    # Our load of the Orbax dir (sources.load_model) against transformers on the export.
    results, ok = verify.check(load_model(str(orbax_dir)), model, [], atol=1e-4, min_top1=1.0)
    assert ok, results


def test_verify_passes_on_the_export(round_trip, capsys):
    _, _, _, exported = round_trip
    assert verify.main(["--model", str(exported)]) == 0
    assert "PASS" in capsys.readouterr().out


def test_sharded_export_equals_single_device_export(converted, tmp_path):
    _, src, _, single = converted("gemma2")
    mesh = make_mesh((2, 2, 2))
    loaded = load_model(str(src), mesh=mesh)
    state = nnx.state(loaded.model)
    q = state["layers"]["attn"]["q_proj"][...]
    assert len(q.sharding.device_set) == 8 and q.sharding.spec != jax.sharding.PartitionSpec()
    sharded = export_hf(tmp_path / "hf", loaded.cfg, state)
    assert (sharded / "model.safetensors").read_bytes() == (single / "model.safetensors").read_bytes()
    assert (sharded / "config.json").read_text() == (single / "config.json").read_text()


def test_params_restore_onto_any_mesh(llama):
    _, _, orbax_dir, _ = llama
    cfg = read_orbax_config(orbax_dir)
    single = restore_params(orbax_dir, cfg)  # saved from one device; restored onto one, then onto meshes of 8
    assert all(len(x.sharding.device_set) == 1 for x in jax.tree.leaves(single))
    for shape in [(1, 8, 1), (2, 1, 4)]:
        mesh = make_mesh(shape)
        state = restore_params(orbax_dir, cfg, mesh)
        want = param_shardings(state, mesh)
        assert all(x.sharding == s for x, s in zip(jax.tree.leaves(state), jax.tree.leaves(want)))
        assert tree_equal(state, single)
    as_bf16 = restore_params(orbax_dir, cfg.replace(param_dtype="bfloat16"))
    assert tree_equal(as_bf16, jax.tree.map(lambda x: x.astype(jnp.bfloat16), single))


def test_sharded_safetensors_with_index(llama, tmp_path):
    _, src, orbax_dir, single = llama
    out = export_checkpoint(orbax_dir, tmp_path / "hf", max_shard_size="40KB")
    files = sorted(p.name for p in out.glob("*.safetensors"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert sorted(set(index["weight_map"].values())) == files
    tensors = hf_tensors(out)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
    for file in files:  # every file within the limit unless it holds a single larger tensor
        held = load_file(out / file)
        assert len(held) == 1 or sum(t.nbytes for t in held.values()) <= 40_000
    assert all(np.array_equal(t, hf_tensors(single)[n]) for n, t in tensors.items())
    diff = np.abs(
        tiny.torch_logits(tiny.load_reference(out), RANDOM_IDS)
        - tiny.torch_logits(tiny.load_reference(src), RANDOM_IDS)
    )
    assert diff.max() <= 1e-5


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30
    assert parse_size("40KB") == 40_000 and parse_size("1000") == 1000 and parse_size("1.5 mb") == 1_500_000
    with pytest.raises(ValueError, match="'5XB': expected a size like 5GB"):
        parse_size("5XB")


# ---------------------------------------------------------------- train-state checkpoints


@pytest.fixture(scope="module")
def train_run(tiny_llama_dir, tmp_path_factory):
    """A run dir with steps saved on an fsdp=8 mesh: params (shifted by step), adamw state, data state."""
    run = tmp_path_factory.mktemp("run")
    mesh = make_mesh((1, 8, 1))
    loaded = load_model(str(tiny_llama_dir), mesh=mesh)
    write_model_files(run, loaded.cfg, loaded.tokenizer)
    params = nnx.state(loaded.model)
    tx = optax.adamw(1e-2)
    opt_state = tx.init(params)
    ckpts = TrainCheckpoints(run, every=2, keep=2)
    saved, states = {}, {}

    @jax.jit
    def update(params, opt_state):
        updates, opt_state = tx.update(jax.tree.map(jnp.ones_like, params), opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    for step in range(6):
        params, opt_state = update(params, opt_state)
        data = {"epoch": 0, "record": 8 * step, "seed": 3}
        saved[step] = ckpts.save(step, params, opt_state, data, force=step == 5)
        states[step] = (params, opt_state, data)
    ckpts.wait()
    ckpts.close()
    return run, loaded.cfg, saved, states


def test_train_checkpoints_save_every_keep_and_restore_onto_another_mesh(train_run):
    run, cfg, saved, states = train_run
    assert saved == {0: True, 1: False, 2: True, 3: False, 4: True, 5: True}  # every 2, plus a forced save
    ckpts = TrainCheckpoints(run, every=2, keep=2)
    assert ckpts.latest_step() == 5 and sorted(int(p.name) for p in (run / "checkpoints").iterdir()) == [4, 5]
    mesh = make_mesh((2, 2, 2))
    params, opt_state, data = states[4]
    targets = [
        jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params, param_shardings(params, mesh)
        ),
        jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=jax.NamedSharding(mesh, jax.P())), opt_state
        ),
    ]
    got_params, got_opt, got_data = ckpts.restore(4, *targets)
    ckpts.close()
    assert isinstance(got_params, nnx.State) and got_data == data
    assert tree_equal(got_params, params) and tree_equal(got_opt, opt_state)
    assert int(got_opt[0].count) == 5  # adamw's step count after five updates
    for got, target in zip(jax.tree.leaves((got_params, got_opt)), jax.tree.leaves(targets)):
        assert got.sharding == target.sharding


def test_train_run_loads_and_exports_latest_or_given_step(train_run, tmp_path):
    run, cfg, _, states = train_run
    latest, step4 = load_model(str(run)), load_model(str(run / "checkpoints" / "4"))
    assert latest.cfg == cfg and step4.cfg == cfg
    assert tree_equal(nnx.state(latest.model), states[5][0]) and tree_equal(nnx.state(step4.model), states[4][0])
    out = export_checkpoint(run / "checkpoints" / "4", tmp_path / "hf", dtype="float32")
    exported = load_model(str(out))
    assert tree_equal(nnx.state(exported.model), states[4][0])


# ---------------------------------------------------------------- the embedded SmolLM2


@pytest.fixture(scope="module")
def smollm2_exports(smollm2, tmp_path_factory):
    """The embedded SmolLM2 (GGUF) -> Orbax (what from_hf does after load_model) -> HF fp32 and bf16."""
    root = tmp_path_factory.mktemp("smollm2")
    orbax_dir = save_params(root / "orbax", smollm2.cfg, nnx.state(smollm2.model), smollm2.tokenizer)
    fp32 = export_checkpoint(orbax_dir, root / "hf32")
    bf16 = export_checkpoint(orbax_dir, root / "hf16", dtype="bfloat16")
    return orbax_dir, fp32, bf16


@pytest.mark.slow
def test_smollm2_export_is_the_gguf_dequantized_bit_for_bit(smollm2, smollm2_exports):
    _, fp32, bf16 = smollm2_exports
    gguf = GGUFCheckpoint(Path(smollm2.source))
    exported, halved = load_file(fp32 / "model.safetensors"), load_file(bf16 / "model.safetensors")
    assert sorted(exported) == sorted(gguf.names()) and "lm_head.weight" not in exported
    for name in gguf.names():
        want = gguf.get(name)
        assert exported[name].dtype == np.float32 and np.array_equal(exported[name], want), name
        assert halved[name].dtype == ml_dtypes.bfloat16 and np.array_equal(
            halved[name], want.astype(ml_dtypes.bfloat16)
        ), name


@pytest.fixture(scope="module")
def smollm2_rows_and_reference_logits(smollm2, smollm2_reference):
    """verify's built-in chat prompts as token ids, and transformers' fp32 logits on the original GGUF."""
    rows = verify.token_rows(smollm2.tokenizer, verify.BUILTIN, smollm2.cfg.vocab_size)
    return rows, verify.reference_logits(smollm2_reference, rows)


@pytest.mark.slow
def test_smollm2_export_loads_in_transformers_with_equal_logits(
    smollm2, smollm2_exports, smollm2_rows_and_reference_logits
):
    _, fp32, _ = smollm2_exports
    rows, reference = smollm2_rows_and_reference_logits
    model = AutoModelForCausalLM.from_pretrained(str(fp32), dtype=torch.float32, attn_implementation="eager").eval()
    assert type(model).__name__ == "LlamaForCausalLM"
    diff = max(np.abs(a - b).max() for a, b in zip(verify.reference_logits(model, rows), reference))
    assert diff <= 1e-5, diff  # measured: 0.0
    tokenizer = AutoTokenizer.from_pretrained(str(fp32))  # chat template carried over
    assert verify.token_rows(tokenizer, verify.BUILTIN, smollm2.cfg.vocab_size) == rows


@pytest.mark.slow
def test_smollm2_bfloat16_export_top1_agrees_with_float32(smollm2_exports, smollm2_rows_and_reference_logits):
    _, _, bf16 = smollm2_exports
    rows, reference = smollm2_rows_and_reference_logits
    assert json.loads((bf16 / "config.json").read_text())["torch_dtype"] == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(str(bf16), dtype="auto", attn_implementation="eager").eval()
    assert model.dtype == torch.bfloat16
    # The bf16 weights, computed in fp32: CPU bf16 matmuls in torch are slow and add their own rounding
    # (measured: 97.8% top-1 with bf16 compute, 318 positions).
    low = verify.reference_logits(model.float(), rows)
    top1 = np.mean(np.concatenate([a.argmax(-1) == b.argmax(-1) for a, b in zip(low, reference)]))
    assert top1 >= 0.98, top1
    assert max(np.abs(a - b).max() for a, b in zip(low, reference)) > 1e-3  # the weights really are bf16


# ---------------------------------------------------------------- bad input and the CLI


def cli_error(argv, capsys) -> str:
    """Run the CLI in-process; it must exit 2 with exactly one line on stderr."""
    assert convert.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err[len("error: ") :].strip()


def test_bad_inputs_give_one_line_and_leave_nothing(llama, tmp_path, capsys):
    _, src, orbax_dir, _ = llama
    out = tmp_path / "out"
    missing = tmp_path / "nope"
    assert cli_error(["to-hf", str(missing), str(out)], capsys) == f"{missing}: no such directory"
    assert cli_error(["to-hf", str(src), str(out)], capsys).startswith(f"{src}: not an Orbax checkpoint")
    assert cli_error(["from-hf", str(missing), str(out)], capsys) == f"{missing}: no such file or directory"

    mistral = tmp_path / "mistral"
    shutil.copytree(orbax_dir, mistral)
    config = json.loads((mistral / "config.json").read_text())
    (mistral / "config.json").write_text(
        json.dumps(config | {"model_type": "mistral", "architectures": ["MistralForCausalLM"]})
    )
    message = cli_error(["to-hf", str(mistral), str(out)], capsys)
    assert message.startswith(f"{mistral / 'config.json'}: unsupported architecture 'MistralForCausalLM'")

    resized = tmp_path / "resized"
    shutil.copytree(orbax_dir, resized)
    (resized / "config.json").write_text(json.dumps(config | {"intermediate_size": 128}))
    assert cli_error(["to-hf", str(resized), str(out)], capsys).startswith(
        f"{resized / 'params'}: params do not match config.json"
    )

    assert cli_error(["to-hf", str(orbax_dir), str(out), "--max-shard-size", "5XB"], capsys).startswith(
        "max shard size '5XB'"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mistral", "resized"]  # no output, no temp dir

    out.mkdir()
    (out / "keep.txt").write_text("mine")
    for argv in (["to-hf", str(orbax_dir), str(out)], ["from-hf", str(src), str(out)]):
        assert cli_error(argv, capsys) == f"{out}: exists and is not empty (pass --overwrite to replace it)"
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert convert.main(["to-hf", str(orbax_dir), str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mistral", "out", "resized"]


def test_interrupted_export_leaves_nothing(llama, tmp_path, monkeypatch):
    _, _, orbax_dir, _ = llama
    written = []

    def save_then_stop(tensors, path, metadata):
        if written:
            raise KeyboardInterrupt
        written.append(path)
        Path(path).write_bytes(b"partial")

    monkeypatch.setattr(export, "save_file", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        export_checkpoint(orbax_dir, tmp_path / "hf", max_shard_size="40KB")
    assert written and list(tmp_path.iterdir()) == []


def test_cli_end_to_end_in_a_subprocess(tiny_llama_dir, tmp_path):
    """The real `python -m` entry point (8 simulated devices from conftest's XLA_FLAGS, so the fsdp mesh
    path): exit 0, one line on stdout, nothing from orbax on stderr."""
    env = dict(os.environ)

    def run(*args):
        return subprocess.run(
            [sys.executable, "-m", "diffpo_jax.convert", *args], capture_output=True, text=True, env=env
        )

    orbax_dir, out = tmp_path / "orbax", tmp_path / "hf"
    steps = [
        run("from-hf", str(tiny_llama_dir), str(orbax_dir)),
        run("to-hf", str(orbax_dir), str(out), "--dtype", "bfloat16"),
    ]
    for step, target in zip(steps, (orbax_dir, out)):
        assert step.returncode == 0 and step.stdout == f"wrote {target}\n" and step.stderr == "", step.stderr
    exported, source = hf_tensors(out), hf_tensors(tiny_llama_dir)
    assert all(np.array_equal(exported[n], t.astype(ml_dtypes.bfloat16)) for n, t in source.items())


def test_generation_config_survives_hf_to_orbax_to_hf(tiny_llama_dir, tmp_path):
    """The source's generation_config.json (sampling defaults, several eos ids) is carried into the Orbax
    model dir and out again in the HF export, unchanged; the decoders' stop tokens read it there too."""

    src = tmp_path / "src"
    shutil.copytree(tiny_llama_dir, src)
    generation = {"bos_token_id": 1, "eos_token_id": [2, 7], "do_sample": True, "temperature": 0.6, "top_p": 0.9}
    (src / "generation_config.json").write_text(json.dumps(generation))
    orbax_dir = convert.from_hf(str(src), tmp_path / "orbax")
    assert json.loads((orbax_dir / "generation_config.json").read_text()) == generation
    exported = export_checkpoint(orbax_dir, tmp_path / "hf")
    assert json.loads((exported / "generation_config.json").read_text()) == generation
    for model in (src, orbax_dir):  # resolved once, at load
        assert 7 in load_model(str(model), with_tokenizer=False).stop_tokens
