"""Parameter-efficient fine-tuning, applied to a model from outside."""
