"""Fine-tuning and evaluation: the downstream tasks' readers, metrics and heads."""
