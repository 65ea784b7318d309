"""Evaluation: perplexity and bits per byte (more metrics and tasks live here)."""
