"""Quantization of slm-jax models with AQT: configs, per-layer plans, QAT, PTQ conversion, serving, reports."""
