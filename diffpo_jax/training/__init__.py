"""Training: the DiffPO loss (loss.py), the sharded train step (step.py), the loop (trainer.py)."""
