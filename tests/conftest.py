"""Shared fixtures. 8 simulated CPU devices so sharding tests run anywhere; set before jax is imported."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from tests import tiny  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: loads the real embedded model (SmolLM2-135M); still runs in CI")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    return tiny.save(tiny.llama_config(tie=False), tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_llama_tied_dir(tmp_path_factory):
    return tiny.save(tiny.llama_config(tie=True), tmp_path_factory.mktemp("tiny_llama_tied"))


@pytest.fixture(scope="session")
def tiny_gemma2_dir(tmp_path_factory):
    return tiny.save(tiny.gemma2_config(), tmp_path_factory.mktemp("tiny_gemma2"))


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M-Instruct, loaded once per test session (fp32)."""
    from diffpo_jax.sources import load_model

    return load_model(None)


@pytest.fixture(scope="session")
def smollm2_reference(smollm2):
    """transformers' own load of the same GGUF weights (fp32), once per session."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(**smollm2.reference, dtype=torch.float32, attn_implementation="eager").eval()
