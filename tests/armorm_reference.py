"""A PyTorch reference of RLHFlow's ArmoRM (`LlamaForRewardModelWithGating`, ArmoRM-Llama3-8B-v0.1),
written from its published modeling code: transformers 5 cannot import the hub's own file (it imports a
docstring constant that was removed). Same module names, so state_dict keys and config fields match."""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaModel, LlamaPreTrainedModel

# ArmoRM's pattern: tokenizer.encode("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
LLAMA3_PATTERN = [128009, 128006, 78191, 128007, 271]


class GatingNetwork(nn.Module):
    def __init__(self, in_features, out_features, temperature=10.0, logit_scale=1.0, hidden_dim=1024, n_hidden=3):
        super().__init__()
        self.temperature = temperature
        self.logit_scale = nn.Parameter(torch.ones(1) * logit_scale)
        layers = []
        for _ in range(n_hidden):
            layers.append(nn.Linear(in_features, hidden_dim))
            in_features = hidden_dim
        layers.append(nn.Linear(in_features, out_features, bias=True))
        self.layers = nn.ModuleList(layers)

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = F.relu(layer(x)) if i < len(self.layers) - 1 else layer(x)
        return F.softmax(x / self.temperature, dim=1) * self.logit_scale[0]


def find_token_for_gating(ids, pattern):
    """The start of the last occurrence of `pattern` in `ids`."""
    for j in range(len(ids) - len(pattern), -1, -1):
        if ids[j : j + len(pattern)] == pattern:
            return j
    raise ValueError("Token pattern not found in the list.")


class LlamaForRewardModelWithGating(LlamaPreTrainedModel):
    def __init__(self, config, pattern=LLAMA3_PATTERN):
        super().__init__(config)
        self.model = LlamaModel(config)
        k = config.num_objectives
        self.regression_layer = nn.Linear(config.hidden_size, k, bias=False)
        self.post_init()
        eye = torch.zeros(k, k)
        eye[range(k), range(k)] = 1.0
        self.reward_transform_matrix = nn.Parameter(eye, requires_grad=False)
        self.gating = GatingNetwork(
            config.hidden_size,
            k,
            temperature=config.gating_temperature,
            hidden_dim=config.gating_hidden_dim,
            n_hidden=config.gating_n_hidden,
        )
        self.pattern = pattern

    def forward(self, input_ids):
        hidden = self.model(input_ids).last_hidden_state
        # ArmoRM: the token before the first pad (the last token when there is none)
        last = (torch.eq(input_ids, self.config.pad_token_id).int().argmax(-1) - 1) % input_ids.shape[-1]
        rows = torch.arange(input_ids.shape[0])
        rewards = self.regression_layer(hidden[rows, last])
        gate = [find_token_for_gating(ids.tolist(), self.pattern) for ids in input_ids]
        gating = self.gating(hidden[rows, gate])
        score = torch.sum(gating * (rewards @ self.reward_transform_matrix), dim=1)
        return {"score": score, "rewards": rewards, "gating": gating}


def armorm_config(vocab: int, pad: int, objectives: int = 5) -> LlamaConfig:
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=pad,
    )
    cfg.architectures = ["LlamaForRewardModelWithGating"]
    cfg.num_objectives, cfg.gating_temperature, cfg.gating_hidden_dim, cfg.gating_n_hidden = objectives, 10, 32, 3
    return cfg


def build_armorm(config, seed=0, pattern=LLAMA3_PATTERN):
    torch.manual_seed(seed)
    model = LlamaForRewardModelWithGating(config, pattern).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        model.gating.logit_scale.fill_(1.7)
    return model
