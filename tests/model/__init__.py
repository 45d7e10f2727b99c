"""Tests of the model: EDJEConfig, EDJEModel, EDJEProcessor, image tokens, saving and loading, and
the checkpoints (compact, the authors', the shipped quickstart model)."""
