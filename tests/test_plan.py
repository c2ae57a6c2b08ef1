"""`train --plan`: every train preset fits the topologies it documents; bad topologies fail in one line;
the AOT memory figures are the sharded train state's."""

import subprocess
import sys
from pathlib import Path

import pytest

from diffpo_jax.training import plan
from diffpo_jax.training.config import TrainConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent
PRESETS = sorted((ROOT / "configs" / "train").glob("*.yaml"))
PLACEHOLDERS = ["data=(plan)", "output_dir=(plan)"]


def config(preset: Path, *overrides: str):
    return load_config(preset, [*PLACEHOLDERS, *overrides])


@pytest.mark.parametrize("preset", PRESETS, ids=[p.stem for p in PRESETS])
def test_every_preset_fits_its_documented_topologies(preset):
    topologies = config(preset).topologies
    assert topologies, f"{preset.name} documents no topologies"
    for entry in topologies:
        topology, *overrides = entry.split()
        p = plan.plan(config(preset, *overrides), topology, compile=False)
        devices, hosts = plan.parse_topology(topology)
        assert p["rows_per_device"] >= 1 and p["mesh"]["tensor"] <= devices // hosts, entry
        assert p["grad_accum"] * p["rows_per_micro_batch"] == config(preset).global_batch_size


@pytest.mark.parametrize(
    "topology,overrides,message",
    [
        (
            "32/8",
            ["grad_accum=4"],
            "global_batch_size / grad_accum = 32 / 4 rows do not split over data x fsdp = 32 devices",
        ),
        ("64/16", [], "grad_accum auto: global_batch_size 32 does not split over data x fsdp = 64 devices"),
        ("16/4", ["mesh=[1,-1,8]"], "mesh [1, 2, 8]: tensor = 8 does not fit within one host's 4 devices"),
        ("32/3", [], "--plan '32/3': DEVICES must be a positive multiple of HOSTS"),
        ("12", [], "grad_accum auto: global_batch_size 32 does not split over data x fsdp = 12 devices"),
    ],
)
def test_a_topology_that_cannot_run_is_one_line(topology, overrides, message):
    preset = ROOT / "configs" / "train" / "gemma-2-9b.yaml"
    with pytest.raises(TrainConfigError) as e:
        plan.plan(config(preset, *overrides), topology, compile=False)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_model_configs_come_without_downloads():
    assert plan.model_config("google/gemma-2-9b-it").num_layers == 42  # the preset whose hf_repo it is
    assert plan.model_config("preset:tiny-llama").vocab_size == 49152  # sized to the embedded tokenizer
    with pytest.raises(TrainConfigError, match="no config without downloading it"):
        plan.model_config("someone/unknown-model")


@pytest.mark.slow
def test_aot_memory_is_the_sharded_train_state():
    """tiny on the tests' 8 devices (fsdp 8): the compiled step's arguments hold fp32 params and two AdamW
    moments split 8 ways (plus the batch and a few scalars)."""
    p = plan.plan(config(ROOT / "configs" / "train" / "tiny.yaml"), "8")
    m = p["memory"]
    state_bytes = 3 * 4 * p["params"] / 8
    assert state_bytes <= m["argument"] <= 1.1 * state_bytes
    assert m["peak"] == m["argument"] + m["output"] - m["alias"] + m["temp"] and m["temp"] > 0
    one = plan.plan(config(ROOT / "configs" / "train" / "tiny.yaml", "mesh=[1,1,1]"), "1")["memory"]
    assert one["argument"] > 7 * m["argument"]  # unsharded: every device holds it all


@pytest.mark.slow
def test_plan_cli_simulates_the_devices(tmp_path):
    """The CLI starts jax with the planned number of (simulated CPU) devices: 16 > the tests' 8."""
    cmd = [
        sys.executable,
        "-m",
        "diffpo_jax.train",
        "--config",
        str(ROOT / "configs" / "train" / "tiny.yaml"),
        "--plan",
        "16/2",
    ]
    r = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    )
    assert r.returncode == 2 and "16 rows" not in r.stdout  # global batch 8 does not split over 16
    assert r.stderr.strip().splitlines()[-1] == (
        "error: config: global_batch_size / grad_accum = 8 / 1 rows do not split over data x fsdp = 16 devices"
    )
    r = subprocess.run(
        cmd + ["global_batch_size=16"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    assert out[0] == "plan 16/2: 16 devices on 2 host(s), mesh data 1 x fsdp 16 x tensor 1"
    assert "1 micro-batch(es) of 16 rows, 1 row(s) per data-parallel device, 8 rows per host" in out[1]
    assert "6.4M params; per device (XLA, AOT)" in out[2]
