"""Training, data and the command-line tools of slm-jax."""
