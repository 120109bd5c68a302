"""The experiment layer: leak checks, fold building, statistics, and the experiments built on them."""
