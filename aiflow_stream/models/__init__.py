"""Captioner adapters, the default model family and speculative decoding."""
