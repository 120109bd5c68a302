"""Ablation: number of conditions (spec §7.9, paper Fig. 4a), cross-validated (configs/ablations/common.py).

The argument is `<n>` or `<n>-<pool>`, optionally `,smoke`: n prompts per condition (data.num_texts,
the generator's first-layer N) drawn from a pool of the first `pool` prompts of each dataset
(data.max_prompts; absent = every prompt). The paper's Strategy 2 is 128 <- x (n 128, pool x) and
Strategy 1 is x <- x (n = pool = x). The reference arm is n 8 (smoke: 4) from the whole pool.

  python -m dnd_jax.experiment --config configs/ablations/num_conditions.py:2 --workdir runs/ablations
  python -m dnd_jax.experiment --config configs/ablations/num_conditions.py:8-16 --workdir runs/ablations
"""

from configs.ablations import common


def get_config(arg=None):
    value, smoke = common.parse(arg)
    n, _, pool = value.partition("-")
    if not n.isdigit() or int(n) < 1 or (pool and (not pool.isdigit() or int(pool) < int(n))):
        raise ValueError(f"unknown config argument {arg!r} (expected <n> or <n>-<pool> with pool >= n >= 1)")
    c = common.get_config(smoke)
    n, pool = int(n), int(pool or 0)
    default = c.data.num_texts
    c.experiment.variant = "reference" if (n, pool) == (default, 0) else f"texts-{n}" + (f"-pool{pool}" if pool else "")
    c.data.num_texts = n
    c.data.max_prompts = pool
    _, length, width = c.model.features[0]
    c.model.features = ((n, length, width), *c.model.features[1:])
    return c
