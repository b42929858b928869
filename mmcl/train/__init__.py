"""Training: the Accelerate-driven loop (trainer.py), its state (state.py), checkpoints (checkpoint.py)
and the optimizer and schedule (optim.py)."""
