"""Hyperparameter search for DePT on Optuna: `dept-tune` (see `dept_tune.cli`)."""
