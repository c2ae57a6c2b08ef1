"""A PyTorch CLLM-style DiffPO train step: the baseline of bench/train_speed.py.

Same batch layout and loss as diffpo_jax/training/loss.py (written here from that description, not
shared code): teacher rows [prompt, best] and student rows [prompt, worse], attention mask
prompt_mask ++ ones(N), positions cumsum(mask) - 1; per response position i the logits at column
P-1+i give ce_i (CE of best under the teacher, with gradient: the AR loss) and
kl_i = KL(softmax(teacher.detach()) || softmax(student)); L = (sum ce + w * sum kl) / sum(best_mask),
both masked by best_mask. One forward over the 2b rows (teacher and student together), backward,
clip the global gradient norm, AdamW (the work of diffpo_jax.training.step's update). (CLLM's own trainer runs the teacher under no_grad plus a separate AR forward: one forward more
than this step.)
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


def sequences(batch: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens, positions, mask) [2b, P+N], teacher rows then student rows."""
    prompt = torch.as_tensor(batch["prompt"], dtype=torch.long)
    pmask = torch.as_tensor(batch["prompt_mask"], dtype=torch.bool)
    best = torch.as_tensor(batch["best"], dtype=torch.long)
    worse = torch.as_tensor(batch["worse"], dtype=torch.long)
    tokens = torch.cat([torch.cat([prompt, best], 1), torch.cat([prompt, worse], 1)], 0)
    mask = torch.cat([pmask, torch.ones_like(best, dtype=torch.bool)], 1).repeat(2, 1)
    positions = torch.cumsum(mask.long(), 1) - 1
    return tokens, positions.clamp(min=0), mask


def loss_fn(model, batch: dict[str, np.ndarray], con_weight: float) -> tuple[torch.Tensor, dict[str, float]]:
    tokens, positions, mask = sequences(batch)
    b, n = batch["best"].shape
    p = batch["prompt"].shape[1]
    logits = model(input_ids=tokens, attention_mask=mask.long(), position_ids=positions).logits
    logits = logits[:, p - 1 : p - 1 + n].float()
    t_logp = F.log_softmax(logits[:b], -1)
    s_logp = F.log_softmax(logits[b:], -1)
    best = torch.as_tensor(batch["best"], dtype=torch.long)
    valid = torch.as_tensor(batch["best_mask"], dtype=torch.float32)
    ce = -t_logp.gather(-1, best[..., None])[..., 0]
    p_logp = t_logp.detach()
    kl = (p_logp.exp() * (p_logp - s_logp)).sum(-1)
    count = valid.sum()
    ar, con = (ce * valid).sum() / count, (kl * valid).sum() / count
    return ar + con_weight * con, {"ar": float(ar.detach()), "con": float(con.detach())}


class TorchStep:
    """model + AdamW; `step(batch)` runs one optimisation step and returns (loss, parts)."""

    def __init__(self, model, *, learning_rate: float, weight_decay: float, con_weight: float, max_grad_norm: float):
        self.model = model.train()
        self.con_weight, self.max_grad_norm = con_weight, max_grad_norm
        self.opt = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay)

    def step(self, batch: dict[str, np.ndarray]) -> tuple[float, dict[str, Any]]:
        self.opt.zero_grad(set_to_none=True)
        loss, parts = loss_fn(self.model, batch, self.con_weight)
        loss.backward()
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.opt.step()
        return float(loss.detach()), parts
