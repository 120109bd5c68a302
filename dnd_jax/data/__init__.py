"""Data: prompt datasets (LLaMA-Factory format), the token store and criterion weights, pairing."""
