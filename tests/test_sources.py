"""--model resolution: every bad input is a one-line error naming the path and the problem."""

import json
import os
import shutil

import numpy as np
import pytest

from diffpo_jax import verify
from diffpo_jax.config import ModelConfig, load_preset, preset_names
from diffpo_jax.sources import ModelSourceError, load_model
from tests import tiny


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


# ---------------------------------------------------------------- PEFT adapters wherever they are


def adapter_logits(folder, ids):
    model = load_model(str(folder), with_tokenizer=False).model
    return np.asarray(model(ids, np.arange(ids.shape[1])[None].repeat(len(ids), 0))[0])


IDS = np.random.default_rng(4).integers(3, tiny.VOCAB, (1, 12))


@pytest.fixture
def adapter(tiny_llama_dir, tmp_path):
    """(a peft adapter folder on the tiny Llama, peft's logits of IDS)."""
    peft = tiny.peft_adapter(tiny_llama_dir, tmp_path / "adapter")
    return tmp_path / "adapter", tiny.torch_logits(peft, IDS)


def test_an_adapter_beside_a_config_json_is_an_adapter(adapter, tiny_llama_dir):
    """adapter_config.json and adapter weights decide, whatever else the folder holds (as transformers)."""
    folder, expected = adapter
    shutil.copy(tiny_llama_dir / "config.json", folder)
    np.testing.assert_allclose(adapter_logits(folder, IDS), expected, atol=1e-4)


def test_an_adapter_on_the_hub_loads_its_base_at_its_revision(adapter, tiny_llama_dir, monkeypatch):
    """A hub id naming an adapter repo is an adapter; its base, a hub id, is fetched at the config's
    revision (huggingface_hub's snapshot_download stands in: local folders, the calls recorded)."""
    import huggingface_hub

    folder, expected = adapter
    config = json.loads((folder / "adapter_config.json").read_text())
    config |= {"base_model_name_or_path": "org/base", "revision": "0123abcd"}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    calls = []

    def snapshot_download(repo_id, revision=None, allow_patterns=None, local_files_only=False):
        calls.append((repo_id, revision))
        return str({"org/adapter": folder, "org/base": tiny_llama_dir}[repo_id])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    np.testing.assert_allclose(adapter_logits("org/adapter", IDS), expected, atol=1e-4)
    assert calls == [("org/adapter", None), ("org/base", "0123abcd")]


def test_an_adapter_at_a_url_is_an_adapter(adapter, tmp_path, monkeypatch):
    """gs://bucket/adapter (a local dir stands in for the bucket, etils' mock_epath) is read from this
    host's copy, as any URL folder."""
    from etils.epath import testing as epath_testing

    folder, expected = adapter
    store = tmp_path / "store"
    shutil.copytree(folder, store / "bucket" / "adapter")
    monkeypatch.setenv("DIFFPO_CACHE", str(tmp_path / "cache"))

    def local(p):
        s = os.fspath(p)
        return str(store / s[len("gs://") :]) if s.startswith("gs://") else p

    def redirect(fn, path, *args, **kwargs):
        return fn(local(path), *(local(a) if isinstance(a, (str, os.PathLike)) else a for a in args), **kwargs)

    names = ["open", "copy", "exists", "glob", "isdir", "listdir", "makedirs", "mkdir", "rename", "replace", "stat"]
    with epath_testing.mock_epath(**{name: redirect for name in names}):
        np.testing.assert_allclose(adapter_logits("gs://bucket/adapter", IDS), expected, atol=1e-4)
