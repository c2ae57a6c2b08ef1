"""Shared fixtures. 8 simulated CPU devices so sharding tests run anywhere; set before jax is imported."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402, F401  (imported now: the device count is fixed at 8 whatever a test module sets later)
import pytest  # noqa: E402

from tests import tiny  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "slow: loads the embedded SmolLM2-135M, or runs over ~5 s on 2 cores (many compiles, subprocesses); "
        "CI runs every test",
    )


@pytest.fixture(autouse=True)
def _fast_tests_do_not_load_smollm2(request, monkeypatch):
    """A test not marked slow that reaches the embedded GGUF (in this process) fails, naming the marker."""
    if request.node.get_closest_marker("slow") is None:
        from diffpo_jax import sources
        from diffpo_jax.weights import gguf

        message = "this test loads the embedded SmolLM2: mark it @pytest.mark.slow (or use smol_tokenizer)"
        assert not {"smollm2", "smollm2_reference"} & set(request.fixturenames), message

        def refuse():
            raise AssertionError(message)

        for module in (gguf, sources):
            monkeypatch.setattr(module, "embedded_gguf_path", refuse)


@pytest.fixture(scope="session")
def smol_tokenizer(tmp_path_factory):
    """SmolLM2-135M-Instruct's tokenizer from its files in tests/data (the embedded GGUF's, saved once; a slow
    test checks they agree), for tiny models that tokenize real text without reading the GGUF."""
    import gzip
    import shutil
    from pathlib import Path

    from diffpo_jax.weights.checkpoint import tokenizer_from_dir

    source, folder = Path(__file__).parent / "data" / "smollm2_tokenizer", tmp_path_factory.mktemp("smol_tokenizer")
    for f in source.iterdir():
        if f.suffix == ".gz":
            (folder / f.stem).write_bytes(gzip.decompress(f.read_bytes()))
        else:
            shutil.copy(f, folder / f.name)
    return tokenizer_from_dir(folder)


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

    return AutoModelForCausalLM.from_pretrained(
        **smollm2.reference, dtype=torch.float32, attn_implementation="eager"
    ).eval()


@pytest.fixture(scope="session")
def smol_rm(tmp_path_factory, smol_tokenizer):
    """A random LlamaForSequenceClassification over SmolLM2's vocabulary, saved with SmolLM2's tokenizer
    (whose pad token is its end-of-turn token <|im_end|>)."""
    config = tiny.llama_config(tie=True)
    config.vocab_size, config.pad_token_id = len(smol_tokenizer), smol_tokenizer.pad_token_id
    model = tiny.build_classifier(config, 1, seed=3)
    folder = tmp_path_factory.mktemp("smol_rm")
    model.save_pretrained(folder)
    smol_tokenizer.save_pretrained(folder)
    return folder, model, smol_tokenizer


# ---- training runs (tests/test_train.py, tests/test_distributed.py)


@pytest.fixture(scope="session")
def trajectories_dir(tmp_path_factory):
    """examples/trajectories.jsonl built into a trajectory dataset."""
    from pathlib import Path

    from diffpo_jax.data.trajectories import build

    out = tmp_path_factory.mktemp("train") / "trajectories"
    build([str(Path(__file__).resolve().parent.parent / "examples" / "trajectories.jsonl")], out)
    return out


@pytest.fixture(scope="session")
def tiny_init_dir(tmp_path_factory, smol_tokenizer):
    """`preset:tiny-llama` (random, sized to the embedded tokenizer) saved as an Orbax model dir, so every
    training run starts from the same weights without reading the GGUF tokenizer again."""
    from flax import nnx

    from diffpo_jax.sharding import make_mesh
    from diffpo_jax.training.start import random_model
    from diffpo_jax.weights.checkpoint import save_params

    loaded = random_model(
        "tiny-llama", smol_tokenizer, seed=0, dtype="float32", param_dtype="float32", mesh=make_mesh((1, -1, 1))
    )
    assert loaded.cfg.vocab_size == len(loaded.tokenizer) == 49152
    return save_params(tmp_path_factory.mktemp("train") / "init", loaded.cfg, nnx.state(loaded.model), loaded.tokenizer)


@pytest.fixture(scope="session")
def xla_cache_dir(tmp_path_factory):
    """A persistent XLA cache shared by CLI runs in subprocesses: a train step compiles once, not per run."""
    return tmp_path_factory.mktemp("xla_cache")
