"""Training: the config (config.py), what a run starts from (start.py), the DiffPO loss (loss.py), the sharded
train step (step.py), held-out evaluation (evaluation.py), what it logs (metrics.py), the loop (trainer.py) and
`--plan` (plan.py)."""
