"""Orbax checkpoints of slm-jax runs: train states, serving models, their versioned metadata."""
