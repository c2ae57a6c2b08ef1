"""Tiny random HF models built in-process (no network), saved with save_pretrained."""

from pathlib import Path

import numpy as np
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

VOCAB = 128


def llama_config(tie: bool) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=32,
        ),
    )


def gemma2_config() -> Gemma2Config:
    # Traps covered: query_pre_attn_scalar != head_dim, sequences longer than the window, both soft-caps.
    return Gemma2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=24,
        sliding_window=8,
        final_logit_softcapping=5.0,
        attn_logit_softcapping=3.0,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def build(config, seed: int = 0):
    """A random model whose weights are large enough that logits and greedy decodes vary."""
    torch.manual_seed(seed)
    cls = Gemma2ForCausalLM if isinstance(config, Gemma2Config) else LlamaForCausalLM
    model = cls(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


def save(config, folder: Path, seed: int = 0) -> Path:
    build(config, seed).save_pretrained(folder)
    return Path(folder)


def load_reference(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, attn_implementation="eager").eval()


def peft_adapter(base_dir, folder, seed: int = 0, **config):
    """An adapter made and saved by peft itself (random, non-zero B) on the transformers base; returns the
    PeftModel. `config`: peft.LoraConfig's fields over r 4, alpha 6 on five of the seven projections."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    torch.manual_seed(seed)
    fields = dict(
        r=4,
        lora_alpha=6,
        target_modules=["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"],
        init_lora_weights=False,
    )
    model = get_peft_model(load_reference(base_dir), PeftLoraConfig(**(fields | config))).eval()
    model.save_pretrained(str(folder))
    return model


def build_classifier(config, num_labels: int, seed: int = 0):
    """A random *ForSequenceClassification reward model (score head of `num_labels`) over `config`."""
    from transformers import Gemma2ForSequenceClassification, LlamaForSequenceClassification

    fields = {k: v for k, v in config.to_dict().items() if k not in ("id2label", "label2id")}
    config = config.__class__.from_dict(fields | {"num_labels": num_labels})
    torch.manual_seed(seed)
    cls = Gemma2ForSequenceClassification if isinstance(config, Gemma2Config) else LlamaForSequenceClassification
    model = cls(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def llama3_tokenizer():
    """A small byte-level BPE tokenizer with Llama-3-8B-Instruct's special tokens and chat template, trained
    in-process (no network)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["user assistant system\n\nThe answer is yes. What is the capital of France? Paris is.\n\n"] * 20
    tok.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|end_of_text|>",
        chat_template=LLAMA3_TEMPLATE,
    )


def torch_logits(model, ids: np.ndarray) -> np.ndarray:
    """A transformers (or peft) model's fp32 logits for the token ids `ids` [B, T]."""
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()
