"""Ablation: condition forms (spec §7.9, paper Table 4a), cross-validated (configs/ablations/common.py).

The argument is `<form>` or `<form>,smoke`; forms (dnd_jax/data/prompts.py, data.condition):
  prompts          the paper's: the unlabeled prompts (the "reference" arm of every ablation)
  answers          the responses only (the original's CondA)
  prompts_answers  prompt + "answer: " + response (CondQ_A; paper: 27.0 vs 51.6 on ARC-c)
  mix              each text is prompt + answer with probability 0.2, else the prompt, fixed per text
                   (CondMix; paper: 49.7)
Generation uses the same form on the held-out task's test records (labeled examples for every form but
prompts; `python -m dnd_jax.generate --condition prompts` gives a mix generator plain prompts).

  python -m dnd_jax.experiment --config configs/ablations/conditions.py:answers --workdir runs/ablations
"""

from configs.ablations import common
from dnd_jax.data.prompts import CONDITIONS


def get_config(arg=None):
    form, smoke = common.parse(arg, CONDITIONS)
    c = common.get_config(smoke, "reference" if form == "prompts" else f"condition-{form}")
    c.data.condition = form
    return c
