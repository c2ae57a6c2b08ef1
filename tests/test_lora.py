"""LoRA: adapters out to PEFT (peft's logits == ours), merged by `to-hf` and `--model RUN_DIR`; a LoRA
training run trains the adapters only, its loss moves, resume is exact, 8 devices == 1 device."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from peft import PeftModel
from transformers import AutoModelForCausalLM

from diffpo_jax import convert
from diffpo_jax.config import LoraConfig
from diffpo_jax.data.loader import make_loader
from diffpo_jax.lora import (
    base_reference,
    init_adapters,
    merge_adapters,
    merge_layer,
    read_adapter_config,
    union,
    write_adapter_config,
)
from diffpo_jax.model import abstract_model
from diffpo_jax.sharding import make_mesh, param_shardings
from diffpo_jax.sources import ModelSourceError, load_model, write_base_identity
from diffpo_jax.training.config import TrainConfigError, load_config
from diffpo_jax.training.step import global_batch, init_state, make_optimizer, make_train_step, state_shardings
from diffpo_jax.training.trainer import train
from diffpo_jax.weights.checkpoint import TrainCheckpoints, restore_params, write_model_files
from tests import tiny
from tests.tiny_run import read_metrics, write_config

LORA = LoraConfig(
    rank=4, alpha=8.0, target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
)


def ours(model, ids: np.ndarray) -> np.ndarray:
    return np.asarray(model(ids, np.arange(ids.shape[1])[None].repeat(len(ids), 0))[0])


def lora_run(base_dir, run_dir, lora: LoraConfig, seed: int = 0):
    """A LoRA run dir as the trainer writes one (model files, adapter_config.json, one checkpoint of
    adapters) with random, non-zero adapters (fresh ones have B = 0); returns (LoRA model, adapters)."""
    base = load_model(str(base_dir))
    cfg = base.cfg.replace(lora=lora)
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    fresh = init_adapters(
        cfg, seed, jax.tree.map(lambda _: one, nnx.to_pure_dict(nnx.state(abstract_model(cfg), nnx.LoRAParam)))
    )
    keys = iter(jax.random.split(jax.random.key(seed), len(jax.tree.leaves(fresh))))
    adapters = jax.tree.map(lambda x: 0.2 * jax.random.normal(next(keys), x.shape, x.dtype), fresh)
    write_model_files(run_dir, base.cfg, base.tokenizer)
    write_adapter_config(run_dir, lora, base_reference(str(base_dir)))
    write_base_identity(run_dir, str(base_dir))
    checkpoints = TrainCheckpoints(run_dir, every=1, keep=1, async_save=False)
    checkpoints.save(3, adapters, {"count": np.zeros((), np.int32)}, {}, force=True)
    checkpoints.close()
    params = union(nnx.to_pure_dict(nnx.state(base.model)), adapters)
    return nnx.merge(nnx.graphdef(abstract_model(cfg)), params), adapters


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_peft_round_trip_and_merged_exports(family, request, tmp_path, capsys):
    base_dir = request.getfixturevalue(f"tiny_{family}_dir")
    model, adapters = lora_run(base_dir, tmp_path / "run", LORA)
    ids = np.random.default_rng(0).integers(3, tiny.VOCAB, (2, 20))
    adapted = ours(model, ids)
    base_logits = tiny.torch_logits(tiny.load_reference(base_dir), ids)
    assert np.abs(adapted - base_logits).max() > 0.1  # the adapters change the logits

    capsys.readouterr()
    assert convert.main(["to-peft", str(tmp_path / "run"), str(tmp_path / "peft")]) == 0
    assert capsys.readouterr().err == ""  # peft loads an HF folder: no note
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base_dir.resolve()) and config["r"] == 4
    peft = PeftModel.from_pretrained(tiny.load_reference(base_dir), str(tmp_path / "peft")).eval()
    np.testing.assert_allclose(tiny.torch_logits(peft, ids), adapted, atol=1e-4)

    merged = load_model(str(tmp_path / "run"))  # --model RUN_DIR: base + adapters, merged at load
    assert merged.cfg.lora is None and "q_proj_lora" not in nnx.to_pure_dict(nnx.state(merged.model))["layers"]["attn"]
    np.testing.assert_allclose(ours(merged.model, ids), adapted, atol=1e-4)
    assert convert.main(["to-hf", str(tmp_path / "run"), str(tmp_path / "hf"), "--dtype", "float32"]) == 0
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    np.testing.assert_allclose(tiny.torch_logits(hf, ids), adapted, atol=1e-4)


def test_to_peft_refuses_a_full_run(tiny_llama_dir, tmp_path, capsys):
    write_model_files(tmp_path / "run", load_model(str(tiny_llama_dir)).cfg, None)
    (tmp_path / "run" / "checkpoints").mkdir()
    assert convert.main(["to-peft", str(tmp_path / "run"), str(tmp_path / "peft")]) == 2
    assert "not a LoRA run (no adapter_config.json)" in capsys.readouterr().err
    assert not (tmp_path / "peft").exists()


@pytest.mark.slow
def test_to_peft_says_when_peft_cannot_load_the_base(tiny_llama_dir, tmp_path, capsys):
    """to-peft names the run's base; an HF folder or hub id peft loads (test_peft_round_trip...), an Orbax dir
    it cannot: one line says so (the folder still loads here, where an Orbax dir is a model)."""
    assert convert.main(["from-hf", str(tiny_llama_dir), str(tmp_path / "orbax")]) == 0
    lora_run(tmp_path / "orbax", tmp_path / "orbax_run", LORA)
    capsys.readouterr()
    assert convert.main(["to-peft", str(tmp_path / "orbax_run"), str(tmp_path / "orbax_peft")]) == 0
    assert capsys.readouterr().err == (
        f"note: {tmp_path / 'orbax_peft'}: peft cannot load its base_model_name_or_path '{tmp_path / 'orbax'}' "
        "(an Orbax dir: convert to-hf exports it as an HF folder); diffpo_jax can: give peft an HF export of "
        "that model as the base\n"
    )


@pytest.mark.slow
def test_a_lora_run_loads_on_its_own_base_only(tmp_path):
    """--model RUN_DIR on a base folder whose weights were replaced by another model's of the same shapes
    (same file sizes): refused, naming the run's base.json and the file that differs."""
    base = tiny.save(tiny.llama_config(False), tmp_path / "base", seed=0)
    lora_run(base, tmp_path / "run", LORA)
    load_model(str(tmp_path / "run"), with_tokenizer=False)
    tiny.save(tiny.llama_config(False), base, seed=1)
    with pytest.raises(ModelSourceError) as e:
        load_model(str(tmp_path / "run"), with_tokenizer=False)
    assert str(e.value) == (
        f"{tmp_path / 'run' / 'base.json'}: this LoRA run's base was {base}; {base} is now {base}, a different model "
        "(model.safetensors differs): its adapters only fit their own base"
    )


def test_merge_adapters_is_the_adapted_forward(tiny_gemma2_dir, tmp_path):
    """Only the targeted projections change, and the merged model's logits are the adapted model's."""
    lora = LoraConfig(rank=2, alpha=3.0, target_modules=("v_proj", "down_proj"))
    model, adapters = lora_run(tiny_gemma2_dir, tmp_path / "run", lora)
    ids = np.random.default_rng(1).integers(3, tiny.VOCAB, (1, 12))
    adapted = ours(model, ids)
    params = nnx.to_pure_dict(nnx.state(model))
    v_proj = params["layers"]["attn"]["v_proj"]
    merged = merge_adapters(params, lora)
    assert v_proj.is_deleted()  # the base's projection was donated to the merged one
    base = nnx.to_pure_dict(nnx.state(load_model(str(tiny_gemma2_dir)).model))
    assert changed(merged, base) == {"['layers']['attn']['v_proj']", "['layers']['mlp']['down_proj']"}
    plain = nnx.merge(nnx.graphdef(abstract_model(model.cfg.replace(lora=None))), merged)
    np.testing.assert_allclose(ours(plain, ids), adapted, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_a_peft_folder_is_a_model(family, request, tmp_path):
    """--model PEFT_FOLDER: peft's own adapter on its named base, or on --base, gives peft's logits."""
    base_dir = request.getfixturevalue(f"tiny_{family}_dir")
    peft = tiny.peft_adapter(base_dir, tmp_path / "peft")
    ids = np.random.default_rng(2).integers(3, tiny.VOCAB, (2, 16))
    expected = tiny.torch_logits(peft, ids)
    assert np.abs(expected - tiny.torch_logits(tiny.load_reference(base_dir), ids)).max() > 0.1  # the adapter matters
    loaded = load_model(str(tmp_path / "peft"))
    assert loaded.cfg.lora is None and loaded.source == f"{tmp_path / 'peft'} on {base_dir}"
    np.testing.assert_allclose(ours(loaded.model, ids), expected, atol=1e-4)

    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": "gone"}))
    with pytest.raises(ModelSourceError, match="gone: no such file or directory"):
        load_model(str(tmp_path / "peft"))
    np.testing.assert_allclose(
        ours(load_model(str(tmp_path / "peft"), base=str(base_dir)).model, ids), expected, atol=1e-4
    )


# peft's own adapters whose config gives modules their own targets, ranks or scales: peft's logits
# (~6 s each on 2 cores: the three in the fast loop, the others slow).
HONOURED = {
    "alpha_pattern": dict(alpha_pattern={"q_proj": 32, "model.layers.1.mlp.down_proj": 2}),
    "rank_pattern": dict(rank_pattern={"v_proj": 2, "model.layers.0.self_attn.o_proj": 6}, alpha_pattern={"o_proj": 3}),
    "all-linear": dict(target_modules="all-linear"),
    "use_rslora": pytest.param(dict(use_rslora=True, r=8), marks=pytest.mark.slow),
    "regex target_modules": pytest.param(dict(target_modules=r".*\.1\.self_attn\.(q|k)_proj"), marks=pytest.mark.slow),
    "layers_to_transform": pytest.param(
        dict(layers_to_transform=[1], exclude_modules=["down_proj"]), marks=pytest.mark.slow
    ),
}


@pytest.mark.parametrize("fields", HONOURED.values(), ids=HONOURED.keys())
def test_peft_adapter_configs_are_honoured(fields, tiny_llama_dir, tmp_path):
    peft = tiny.peft_adapter(tiny_llama_dir, tmp_path / "peft", **fields)
    ids = np.random.default_rng(3).integers(3, tiny.VOCAB, (2, 16))
    expected = tiny.torch_logits(peft, ids)
    assert np.abs(expected - tiny.torch_logits(tiny.load_reference(tiny_llama_dir), ids)).max() > 0.1
    np.testing.assert_allclose(ours(load_model(str(tmp_path / "peft")).model, ids), expected, atol=1e-4)
    if fields == HONOURED["all-linear"]:  # peft saved the qualified names; the shorthand itself loads too
        path = tmp_path / "peft" / "adapter_config.json"
        path.write_text(json.dumps(json.loads(path.read_text()) | {"target_modules": "all-linear"}))
        np.testing.assert_allclose(ours(load_model(str(tmp_path / "peft")).model, ids), expected, atol=1e-4)


# adapter_config.json fields that change the math and are not honoured: one line naming the file and field.
REFUSED = {
    "pissa": (dict(init_lora_weights="pissa"), 'init_lora_weights = "pissa": this init changes the base'),
    "alora": (dict(alora_invocation_tokens=[5, 6]), "alora_invocation_tokens = [5, 6]: not supported"),
    "dora": (dict(use_dora=True), "use_dora = true: not supported"),
    "modules_to_save": (dict(modules_to_save=["lm_head"]), 'modules_to_save = ["lm_head"]: not supported'),
    "bias": (dict(bias="lora_only"), 'bias = "lora_only": not supported'),
}


@pytest.mark.parametrize("fields, problem", REFUSED.values(), ids=REFUSED.keys())
def test_peft_adapter_configs_that_change_the_math_are_refused(fields, problem, tiny_llama_dir, tmp_path):
    tiny.peft_adapter(tiny_llama_dir, tmp_path / "peft", **fields)
    with pytest.raises(ModelSourceError) as e:
        load_model(str(tmp_path / "peft"))
    assert str(e.value).startswith(f"{tmp_path / 'peft' / 'adapter_config.json'}: {problem}"), str(e.value)
    assert "\n" not in str(e.value)


def test_a_rank_that_is_not_the_patterns_names_the_pattern(tiny_llama_dir, tmp_path):
    tiny.peft_adapter(tiny_llama_dir, tmp_path / "peft", rank_pattern={"v_proj": 2})
    path = tmp_path / "peft" / "adapter_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"rank_pattern": {"v_proj": 3}}))
    name = "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"
    with pytest.raises(
        ModelSourceError, match=f"'{name}' has rank 2, but {path} gives its module rank_pattern\\['v_proj'\\] = 3"
    ):
        load_model(str(tmp_path / "peft"))


def test_unknown_adapter_config_fields_are_refused(tiny_llama_dir, tmp_path):
    tiny.peft_adapter(tiny_llama_dir, tmp_path / "peft")
    path = tmp_path / "peft" / "adapter_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"lora_magic": 2}))
    with pytest.raises(ModelSourceError, match=f"^{path}: lora_magic = 2: a field this loader does not know"):
        load_model(str(tmp_path / "peft"))


def test_the_merge_is_in_place_one_layer_at_a_time():
    """The compiled merge of one layer into a projection at Llama-3-8B's q_proj shape (bf16, 8 layers, r 16):
    the output is the donated projection's buffer, and the only temporary is the layer's fp32 product (was:
    the whole projection's fp32 product, an fp32 copy of it and a new output, ~3.4x the projection)."""
    layers, size, rank = 8, 4096, 16
    w = jax.ShapeDtypeStruct((layers, size, size), jnp.bfloat16)
    a, b = jax.ShapeDtypeStruct((size, rank), jnp.float32), jax.ShapeDtypeStruct((rank, size), jnp.float32)
    layer = jax.ShapeDtypeStruct((size, size), jnp.bfloat16)
    memory = merge_layer.lower(w, layer, a, b, 3, jnp.float32(2.0)).compile().memory_analysis()
    projection = layers * size * size * 2
    assert memory.output_size_in_bytes == memory.alias_size_in_bytes == projection
    assert memory.temp_size_in_bytes <= size * size * 4, memory.temp_size_in_bytes


def test_to_peft_dtype_round_trips(tiny_llama_dir, tmp_path):
    """to-peft --dtype bfloat16 stores BF16 tensors, read back as exactly the bf16 rounding of the run's adapters."""
    from diffpo_jax.weights.hf import safetensors_tensors
    from diffpo_jax.weights.peft import read_peft_adapters

    _, adapters = lora_run(tiny_llama_dir, tmp_path / "run", LORA)
    assert convert.main(["to-peft", str(tmp_path / "run"), str(tmp_path / "peft"), "--dtype", "bfloat16"]) == 0
    stored = safetensors_tensors(tmp_path / "peft" / "adapter_model.safetensors")
    assert {t.dtype for t in stored.values()} == {"BF16"} and len(stored) == 2 * 2 * len(LORA.target_modules)
    cfg = load_model(str(tiny_llama_dir)).cfg
    lora, read = read_peft_adapters(tmp_path / "peft", cfg, read_adapter_config(tmp_path / "peft"))
    assert lora == LoraConfig(rank=4, alpha=4.0, target_modules=LORA.target_modules)  # scale 1: LORA's 2 is in B
    rounded = jax.tree.map(lambda x: np.asarray(x.astype(jnp.bfloat16).astype(jnp.float32)), adapters)
    rounded = jax.tree_util.tree_map_with_path(lambda p, x: x * LORA.scale if p[-1].key == "lora_b" else x, rounded)
    jax.tree.map(np.testing.assert_array_equal, read, rounded)


def test_bad_peft_folders_are_one_line_errors(tiny_llama_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    tiny.peft_adapter(tiny_llama_dir, tmp_path / "peft")
    weights = tmp_path / "peft" / "adapter_model.safetensors"
    tensors = load_file(weights)
    name = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    save_file({k: v for k, v in tensors.items() if k != name}, weights)
    with pytest.raises(ModelSourceError, match=f"{weights}: tensor '{name}' is missing"):
        load_model(str(tmp_path / "peft"))
    save_file(tensors | {name: tensors[name][:, :2]}, weights)
    with pytest.raises(
        ModelSourceError,
        match=r"v_proj.lora_B.weight' has rank 2, but .* gives its module r = 4 \(no rank_pattern key matches\)",
    ):
        load_model(str(tmp_path / "peft"))
    save_file(tensors | {"base_model.model.lm_head.lora_A.weight": tensors[name]}, weights)
    with pytest.raises(
        ModelSourceError, match="1 tensors this model's adapters do not have, e.g. 'base_model.model.lm_head"
    ):
        load_model(str(tmp_path / "peft"))
    with pytest.raises(ModelSourceError, match="only a PEFT adapter folder takes a base"):
        load_model(str(tiny_llama_dir), base=str(tiny_llama_dir))


def changed(params: dict, base: dict) -> set[str]:
    """The paths of the params that differ from the base's (same structure)."""
    flat = dict(jax.tree_util.tree_leaves_with_path(base))
    return {
        jax.tree_util.keystr(p)
        for p, a in jax.tree_util.tree_leaves_with_path(params)
        if not np.array_equal(a, flat[p])
    }


# ---------------------------------------------------------------- training


STEPS = 4
CHANGES = dict(
    max_steps=STEPS,
    save_every=2,
    async_checkpoints=False,
    loss={"con_weight": 1000.0, "chunk": 4},
    optimizer={"learning_rate": 1e-2, "warmup_ratio": 0.0},
    eval={"holdout_prompts": 2, "max_rows": 4, "batch_size": 4, "block_size": 4},
    lora={"rank": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]},
)


def run_config(tmp_path, tiny_init_dir, trajectories_dir, name, *overrides):
    path = write_config(tmp_path / "lora.yaml", tiny_init_dir, trajectories_dir, **CHANGES)
    return load_config(path, [f"output_dir={tmp_path / name}", *overrides])


@pytest.fixture(scope="module")
def lora_reference(tmp_path_factory, tiny_init_dir, trajectories_dir):
    """An uninterrupted LoRA run of STEPS steps on 8 devices (fsdp) with held-out evaluation."""
    tmp = tmp_path_factory.mktemp("lora")
    result = train(run_config(tmp, tiny_init_dir, trajectories_dir, "reference"), log=lambda _: None)
    assert result.step == STEPS
    return result, read_metrics(result.run_dir)


@pytest.mark.slow
def test_lora_run_trains_the_adapters_only(lora_reference, tiny_init_dir):
    result, lines = lora_reference
    losses = [m["loss"] for m in lines if "loss" in m]
    assert len(losses) == STEPS and losses[-1] < losses[0], losses
    assert "eval_ar" in lines[0] and "eval_ar" in lines[-1]  # held-out evaluation before and after
    # the checkpoint holds the adapters alone; the merged model differs from the base in the targets only
    found = read_adapter_config(result.run_dir)
    lora = found.lora()
    assert found.base == str(tiny_init_dir.resolve()) and lora.rank == 4
    cfg = load_model(str(tiny_init_dir), with_tokenizer=False).cfg.replace(lora=lora)
    adapters = nnx.to_pure_dict(restore_params(result.run_dir, cfg, None, nnx.LoRAParam))
    assert set(adapters["layers"]["attn"]) == {"q_proj_lora", "v_proj_lora", "o_proj_lora"}
    assert all(np.abs(np.asarray(a["lora_b"])).max() > 0 for m in adapters["layers"].values() for a in m.values())
    base = nnx.to_pure_dict(nnx.state(load_model(str(tiny_init_dir)).model))
    merged = nnx.to_pure_dict(nnx.state(load_model(str(result.run_dir)).model))
    assert changed(merged, base) == {
        f"['layers']['{m}']['{n}']"
        for m, n in (
            ("attn", "q_proj"),
            ("attn", "v_proj"),
            ("attn", "o_proj"),
            ("mlp", "up_proj"),
            ("mlp", "down_proj"),
        )
    }


@pytest.mark.slow
def test_lora_resume_is_exact(lora_reference, tiny_init_dir, trajectories_dir, tmp_path):
    _, expected = lora_reference
    assert train(run_config(tmp_path, tiny_init_dir, trajectories_dir, "run", "stop_after=2"), log=print).step == 2
    assert train(run_config(tmp_path, tiny_init_dir, trajectories_dir, "run"), log=print).start_step == 2
    got = read_metrics(tmp_path / "run")
    keys = ("loss", "ar", "con", "grad_norm", "eval_ar", "eval_con")
    assert [[m.get(k) for k in keys] for m in got] == [[m.get(k) for k in keys] for m in expected]


@pytest.mark.slow
def test_a_lora_run_resumes_on_its_own_base_only(tiny_init_dir, trajectories_dir, tmp_path):
    """`model` now resolving to another model (its Orbax params replaced by a different init's): the
    resume is refused before any step, naming the run's base.json and a file that differs."""
    import shutil

    from diffpo_jax.sharding import make_mesh
    from diffpo_jax.training.start import embedded_tokenizer, random_model
    from diffpo_jax.weights.checkpoint import save_params

    base = tmp_path / "base"
    shutil.copytree(tiny_init_dir, base)
    assert train(run_config(tmp_path, base, trajectories_dir, "run", "stop_after=2"), log=print).step == 2
    other = random_model(
        "tiny-llama", embedded_tokenizer(), seed=1, dtype="float32", param_dtype="float32", mesh=make_mesh((1, -1, 1))
    )
    save_params(base, other.cfg, nnx.state(other.model), other.tokenizer, overwrite=True)
    with pytest.raises(ModelSourceError, match=f"^{tmp_path / 'run' / 'base.json'}: this LoRA run's base was {base}; "):
        train(run_config(tmp_path, base, trajectories_dir, "run"), log=print)


@pytest.mark.slow
def test_lora_one_device_equals_eight(lora_reference, tiny_init_dir, trajectories_dir, tmp_path):
    """The reference run's steps (8 devices, fsdp) replayed on one device (2 micro-batches): same losses;
    the base passes through the steps unchanged."""
    _, lines = lora_reference
    cfg = run_config(tmp_path, tiny_init_dir, trajectories_dir, "unused")
    mesh = make_mesh((1, 1, 1), jax.devices()[:1])
    loaded = load_model(str(tiny_init_dir), mesh=mesh)
    model_cfg = loaded.cfg.replace(lora=cfg.lora)
    abstract = abstract_model(model_cfg)
    adapters_sharding = nnx.to_pure_dict(param_shardings(nnx.state(abstract, nnx.LoRAParam), mesh))
    adapters = init_adapters(model_cfg, cfg.seed, adapters_sharding)
    tx, schedule = make_optimizer(cfg.optimizer, STEPS)
    base_sharding = nnx.to_pure_dict(param_shardings(nnx.state(loaded.model), mesh))
    shardings = state_shardings(tx, adapters_sharding, adapters, mesh, base_sharding)
    base = nnx.to_pure_dict(nnx.state(loaded.model))
    before = jax.tree.map(np.asarray, base)
    state = init_state(adapters, tx, shardings, base)
    step = make_train_step(nnx.graphdef(abstract), tx, schedule, cfg.loss, shardings, mesh, grad_accum=2)
    loader = make_loader(
        trajectories_dir,
        loaded.tokenizer,
        global_batch_size=8,
        prompt_len=cfg.prompt_len,
        response_len=cfg.response_len,
        seed=cfg.seed,
        num_epochs=1,
        indices=_train_indices(trajectories_dir, cfg),
    )
    got = []
    for _ in range(STEPS):
        state, metrics = step(state, global_batch(next(loader), mesh))
        got.append([float(metrics[k]) for k in ("ar", "con", "grad_norm")])
    expected = np.array([[m[k] for k in ("ar", "con", "grad_norm")] for m in lines if "ar" in m])
    np.testing.assert_allclose(np.array(got)[:, 0], expected[:, 0], rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.array(got)[:, 1], expected[:, 1], rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.array(got)[:, 2], expected[:, 2], rtol=1e-4)
    assert jax.tree.all(jax.tree.map(np.array_equal, jax.tree.map(np.asarray, state.frozen), before))


def _train_indices(data_dir, cfg):
    from diffpo_jax.training.evaluation import holdout_split, read_records

    return holdout_split(read_records(data_dir), cfg.eval.holdout_prompts)[0]


def test_lora_config_errors_are_one_line(tmp_path, tiny_init_dir, trajectories_dir):
    for override, message in (
        ("lora.dropout=0.1", "lora.dropout must be 0"),
        ("lora.target_modules=[q_proj,lm_head]", "lora.target_modules must be some of"),
        ("model=preset:tiny-llama", "lora needs a trained base, not preset:tiny-llama"),
    ):
        with pytest.raises(TrainConfigError, match=message):
            run_config(tmp_path, tiny_init_dir, trajectories_dir, "run", override)


def test_a_run_started_before_the_lora_section_resumes(tmp_path, tiny_init_dir, trajectories_dir):
    """A train_config.json without the `lora` section (written before it existed) had its defaults."""
    import dataclasses

    from diffpo_jax.training.config import TRAIN_CONFIG, check_resume_config

    cfg = dataclasses.replace(run_config(tmp_path, tiny_init_dir, trajectories_dir, "run"), lora=LoraConfig())
    old = {k: v for k, v in json.loads(json.dumps(dataclasses.asdict(cfg))).items() if k != "lora"}
    (tmp_path / TRAIN_CONFIG).write_text(json.dumps(old))
    check_resume_config(cfg, tmp_path)
    with pytest.raises(TrainConfigError, match=r"lora.rank 0 -> 4"):
        check_resume_config(run_config(tmp_path, tiny_init_dir, trajectories_dir, "run"), tmp_path)


@pytest.mark.slow
def test_refine_defaults_to_the_embedded_refiner(smollm2):
    """`refine` without --model loads the shipped adapter (diffpo_jax/refiner/, a PEFT folder the package
    installs) on the embedded SmolLM2: only the adapted projections differ from the base."""
    from pathlib import Path

    from diffpo_jax import refine as refine_cli
    from diffpo_jax.sources import REFINER_DIR

    assert refine_cli.parse_args(["--input", "i", "--output", "o"]).model == "embedded-refiner"
    refiner = load_model("embedded-refiner")
    assert refiner.source == f"{REFINER_DIR} on {smollm2.source}" and refiner.stop_tokens == smollm2.stop_tokens
    base = nnx.to_pure_dict(nnx.state(smollm2.model))
    assert changed(nnx.to_pure_dict(nnx.state(refiner.model)), base) == {
        f"['layers']['{kind}']['{name}']"
        for kind, names in (
            ("attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
            ("mlp", ("gate_proj", "up_proj", "down_proj")),
        )
        for name in names
    }
    setup = (Path(__file__).resolve().parent.parent / "setup.py").read_text()
    assert '"refiner/*.json", "refiner/*.safetensors"' in setup  # installed with the package, not only in a checkout
