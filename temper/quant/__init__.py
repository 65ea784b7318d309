"""Quantisation of model weights."""
