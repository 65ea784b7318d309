"""temper: a native-PyTorch library and CLI for the whole training lifecycle of a language model."""

__version__ = "0.1.0"
