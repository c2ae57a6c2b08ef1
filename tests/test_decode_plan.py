"""`refine|generate --plan`: the AOT memory of decoding, the layout it picks, the largest batch that fits."""

import jax
import pytest

from diffpo_jax.config import load_preset
from diffpo_jax.decoding import plan

DECODE_PRESETS = [
    "smollm2-135m-instruct",
    "llama-3.2-1b-instruct",
    "gemma-2-2b-it",
    "llama-3-8b-instruct",
    "gemma-2-9b-it",
]


@pytest.mark.slow
def test_default_layout_is_the_smallest_tensor_degree_that_fits():
    cfg = load_preset("tiny-llama")[0]
    roomy = plan.plan(
        cfg, devices=8, kind="refine", batch=8, prompt_len=64, max_new_tokens=32, block=8, device_memory_gib=1.0
    )
    assert roomy["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1} and roomy["fits"]
    tight = plan.plan(
        cfg,
        devices=8,
        kind="refine",
        batch=8,
        prompt_len=64,
        max_new_tokens=32,
        block=8,
        device_memory_gib=roomy["peak"] * 0.8 / plan.GIB / plan.HEADROOM,
    )
    assert tight["mesh"]["tensor"] == 2  # tiny-llama's 2 KV heads: the largest degree there is
    given = plan.plan(
        cfg,
        devices=8,
        kind="generate",
        batch=8,
        prompt_len=64,
        max_new_tokens=32,
        device_memory_gib=1.0,
        mesh_shape=(2, 4, 1),
    )
    assert given["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1} and not given["default_layout"]


@pytest.mark.slow
def test_the_largest_batch_fits_and_one_more_step_does_not():
    cfg = load_preset("tiny-llama")[0]
    kw = dict(devices=8, kind="refine", prompt_len=64, max_new_tokens=32, block=8)
    p = plan.plan(cfg, batch=8, device_memory_gib=0.02, **kw)
    most = p["max_batch"]
    assert most >= 8 and most % 8 == 0
    budget = 0.02 * plan.GIB * plan.HEADROOM
    assert plan.plan(cfg, batch=most, **kw)["peak"] <= budget
    assert plan.plan(cfg, batch=most + most // 16, **kw)["peak"] > budget  # within 1/16 of the limit


@pytest.mark.slow
@pytest.mark.parametrize("preset", DECODE_PRESETS)
def test_every_decode_preset_plans_on_one_8_gpu_node(preset):
    """bf16 on 8 x 80 GiB: each preset fits at batch 48 with 1,024 prompt and 256 new tokens; Gemma-2-9B
    on 8 x 16 GiB (TPU v5e) does not fit replicated, so the default layout goes tensor-parallel."""
    cfg = load_preset(preset)[0].replace(dtype="bfloat16", param_dtype="bfloat16")
    kw = dict(devices=8, kind="refine", batch=48, prompt_len=1024, max_new_tokens=256, block=32)
    p = plan.plan(cfg, device_memory_gib=80, **kw)
    assert p["fits"] and p["max_batch"] >= 48, p
    if preset == "gemma-2-9b-it":
        assert (
            p["mesh"]["tensor"] == 1 and 17 * plan.GIB < p["peak"] < 24 * plan.GIB
        )  # 18.5 GB of weights + 2.5 GiB cache
        small = plan.plan(cfg, device_memory_gib=16, **kw)
        assert small["mesh"]["tensor"] > 1 and small["fits"], small


def test_the_runtime_default_goes_tensor_parallel_when_weights_do_not_fit():
    from diffpo_jax.decoding.devices import default_shape

    gib = 2**30
    assert default_shape(int(18.5e9), 8, 8, 80 * gib) == ((8, 1, 1), None)  # Gemma-2-9B bf16 on 80 GB: replicated
    shape, why = default_shape(int(18.5e9), 8, 8, 16 * gib)  # on 16 GiB chips (TPU v5e): 8.6 GiB each over 2
    assert shape == (4, 1, 2) and "tensor-parallel over 2 devices" in why
    assert default_shape(int(18.5e9), 8, 8, 12 * gib)[0] == (2, 1, 4)
    assert default_shape(int(18.5e9), 8, 8, None) == ((8, 1, 1), None)  # no memory figure: all-data


def test_the_runtime_default_without_a_fitting_degree_is_the_largest_or_a_refusal():
    """No tensor degree brings the weights under 60% of a device: the largest degree that divides the devices
    and the KV heads, said in one line, while its share fits the device; else a refusal with the figures
    (it used to replicate them on every device without a word)."""
    from diffpo_jax.decoding.devices import MeshError, default_shape

    gib = 2**30
    shape, why = default_shape(20 * gib, 2, 8, 16 * gib)  # 2 KV heads: tensor 2 at most, 10 GiB of 16 each
    assert shape == (4, 1, 2)
    assert why == (
        "weights of 20.0 GiB are more than 60% of 16.0 GiB per device even tensor-parallel over 2 devices (the "
        "largest degree dividing the 8 devices and the 2 KV heads, 10.0 GiB each): tensor-parallel over 2 "
        "devices, little memory left for the KV cache"
    )
    with pytest.raises(MeshError) as e:
        default_shape(100 * gib, 2, 8, 16 * gib)
    assert str(e.value) == (
        "weights of 100.0 GiB do not fit 16.0 GiB per device even tensor-parallel over 2 devices (the largest "
        "degree dividing the 8 devices and the 2 KV heads, 50.0 GiB each): shard them over fsdp too "
        "(--mesh D,F,T) or use more devices (--plan shows what fits)"
    )


LLAMA_70B = {  # Llama-3-70B's config.json, the fields the config reads (no preset names it)
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "bos_token_id": 128000,
    "eos_token_id": 128009,
}


@pytest.fixture
def accelerator(monkeypatch):
    """decode_mesh as on 8 accelerators of `memory[0]` bytes each (the conftest's 8 CPU devices)."""
    from diffpo_jax.decoding import devices

    memory = [80 * 2**30]
    monkeypatch.setattr(devices, "accelerated", lambda: True)
    monkeypatch.setattr(devices, "device_memory", lambda: memory[0])
    return memory


def test_a_hub_model_is_sized_by_its_config_json_alone(accelerator, monkeypatch, tmp_path, capsys):
    """A hub id no preset names: only its config.json is fetched (hf_hub_download, here from a local folder)
    and sizes the default layout: Llama-3-70B in bf16 (141 GB) on 8 x 80 GiB goes tensor-parallel over 4
    (it was sized as 0 bytes and replicated on every device)."""
    import json

    import huggingface_hub

    from diffpo_jax.decoding import devices

    (tmp_path / "config.json").write_text(json.dumps(LLAMA_70B))
    fetched = []
    monkeypatch.setattr(
        huggingface_hub, "hf_hub_download", lambda repo, name: fetched.append((repo, name)) or tmp_path / name
    )
    size, kv_heads = devices.weight_bytes("some-org/llama-3-70b-finetune", "bfloat16")
    assert 141e9 < size < 141.2e9 and kv_heads == 8 and fetched == [("some-org/llama-3-70b-finetune", "config.json")]
    mesh = devices.decode_mesh(None, "some-org/llama-3-70b-finetune", "bfloat16")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 4}
    assert "tensor-parallel over 4 devices" in capsys.readouterr().err


def test_score_sizes_the_layout_by_its_reward_model(accelerator, smol_rm, tmp_path, capsys):
    """score's default layout is sized by the reward model (every weight, the head included; it was sized
    by the decoder's default model): on devices where it needs tensor parallelism it gets tensor 2."""
    from flax import nnx

    from diffpo_jax import score
    from diffpo_jax.decoding import devices
    from diffpo_jax.reward.loading import load_reward_model
    from tests.files import write_jsonl

    size, kv_heads = devices.weight_bytes(str(smol_rm[0]), "float32", reward=True)
    loaded = load_reward_model(str(smol_rm[0]))
    assert size == sum(x.nbytes for x in jax.tree.leaves(nnx.state(loaded.model))) and kv_heads == 2
    accelerator[0] = int(size / 0.9)  # 90% of a device replicated, 45% over tensor 2
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "Hi.", "draft": "Hello.", "refined": "Hello!"}] * 2)
    out = tmp_path / "scored.jsonl"
    assert (
        score.main(["--model", str(smol_rm[0]), "--input", str(src), "--output", str(out), "--dtype", "float32"]) == 0
    )
    printed = capsys.readouterr()
    assert "tensor-parallel over 2 devices" in printed.err
    assert '"devices": "8 (cpu), mesh data=4 fsdp=1 tensor=2"' in printed.out


@pytest.mark.slow
def test_the_clis_plan_without_weights_or_input(capsys):
    """`refine --plan 8 --device-memory 16` for Gemma-2-9B (bf16 by default): tensor-parallel, and the line
    says so; `generate --plan` on the embedded model; a bad topology is one line, exit 2."""
    import subprocess
    import sys

    run = lambda *a: subprocess.run([sys.executable, "-m", *a], capture_output=True, text=True)
    out = run(
        "diffpo_jax.refine",
        "--plan",
        "8",
        "--device-memory",
        "16",
        "--model",
        "google/gemma-2-9b-it",
        "--batch-size",
        "16",
        "--max-new-tokens",
        "128",
        "--prompt-len",
        "512",
        "--block-size",
        "16",
    )
    assert out.returncode == 0, out.stderr
    assert (
        "tensor 2 (smallest tensor-parallel degree that fits)" in out.stdout and "largest batch that fits" in out.stdout
    )
    out = run("diffpo_jax.generate", "--plan", "4", "--batch-size", "8", "--max-new-tokens", "32", "--prompt-len", "64")
    assert out.returncode == 0 and "plan generate 4/1" in out.stdout, out.stderr
    out = run("diffpo_jax.refine", "--plan", "8/3")
    assert out.returncode == 2 and out.stderr.strip().endswith(
        "--plan '8/3': expected DEVICES or DEVICES/HOSTS, e.g. 32/8"
    )
