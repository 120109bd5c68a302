"""Scoring protocols of `dnd_jax.evaluate`: `ll` (lm-eval log-likelihood), `gen` (the DnD generation
protocol) and `nll` (the gold response's loss in the training chat format)."""
