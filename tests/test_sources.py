"""--model resolution: every bad input is a one-line error naming the path and the problem."""

import json
import shutil

import pytest

from diffpo_jax import verify
from diffpo_jax.config import ModelConfig, load_preset, preset_names
from diffpo_jax.sources import ModelSourceError, load_model


def error_of(spec) -> str:
    with pytest.raises(ModelSourceError) as e:
        load_model(spec, with_tokenizer=False)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_missing_path(tmp_path):
    assert error_of(str(tmp_path / "nope")) == f"{tmp_path / 'nope'}: no such file or directory"


def test_folder_without_config(tmp_path):
    assert error_of(str(tmp_path)) == f"{tmp_path}: not a model folder (no config.json)"


def test_folder_without_weights(tmp_path, tiny_llama_dir):
    shutil.copy(tiny_llama_dir / "config.json", tmp_path)
    assert error_of(str(tmp_path)) == f"{tmp_path}: no weights (*.safetensors) in this folder"


def test_unsupported_architecture(tmp_path, tiny_llama_dir):
    shutil.copy(tiny_llama_dir / "model.safetensors", tmp_path)
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    config.update(model_type="mistral", architectures=["MistralForCausalLM"])
    (tmp_path / "config.json").write_text(json.dumps(config))
    message = error_of(str(tmp_path))
    assert str(tmp_path) in message and "unsupported architecture 'MistralForCausalLM'" in message


@pytest.mark.parametrize(
    "damage, problem",
    [
        (lambda b: b[:4], "truncated header"),
        (lambda b: b[:8] + b"{garbage" + b[16:], "header is not JSON"),
        (lambda b: b[: len(b) // 2], "out of bounds"),
    ],
)
def test_corrupt_safetensors(tmp_path, tiny_llama_dir, damage, problem):
    shutil.copy(tiny_llama_dir / "config.json", tmp_path)
    data = (tiny_llama_dir / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(damage(data))
    message = error_of(str(tmp_path))
    assert message.startswith(f"{tmp_path / 'model.safetensors'}: corrupt safetensors file") and problem in message


def test_weights_of_the_wrong_shape(tmp_path, tiny_llama_dir):
    shutil.copy(tiny_llama_dir / "model.safetensors", tmp_path)
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    config["intermediate_size"] = 128
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert "has shape (96, 64), config expects (128, 64)" in error_of(str(tmp_path))


def test_cli_prints_one_line_and_exits_2(tmp_path, capsys):
    assert verify.main(["--model", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {tmp_path / 'nope'}: no such file or directory\n"


def test_presets_load_and_round_trip_through_hf():
    names = preset_names()
    for expected in [
        "gemma-2-2b-it",
        "gemma-2-9b-it",
        "llama-3-8b-instruct",
        "llama-3.2-1b-instruct",
        "smollm2-135m-instruct",
        "tiny-llama",
        "tiny-gemma2",
    ]:
        assert expected in names
    for name in names:
        cfg, _ = load_preset(name)
        assert ModelConfig.from_hf(cfg.to_hf()) == cfg
    gemma9, hf = load_preset("gemma-2-9b-it")
    assert (gemma9.num_layers, gemma9.hidden_size, gemma9.query_pre_attn_scalar, gemma9.sliding_window) == (
        42,
        3584,
        256,
        4096,
    )
    assert hf["hf_repo"] == "google/gemma-2-9b-it"


def test_to_hf_loads_in_transformers(tiny_gemma2_dir, tiny_llama_dir):
    from transformers import AutoConfig

    for folder in (tiny_gemma2_dir, tiny_llama_dir):
        cfg = ModelConfig.from_hf(json.loads((folder / "config.json").read_text()))
        theirs = AutoConfig.for_model(**cfg.to_hf())
        assert ModelConfig.from_hf(theirs.to_dict()) == cfg
