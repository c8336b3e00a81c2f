"""Per-GPU Optuna autotuning of kernel configs, stored in a persistent tuning database."""
