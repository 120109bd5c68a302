"""Training objectives of the generator: `recon` (fit checkpoint tokens, the paper's)."""
