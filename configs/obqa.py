"""DnD generator for OBQA, trained on the other common-sense datasets (spec §5.1: 3000 steps).

python -m dnd_jax.train --config configs/obqa.py:smoke --workdir runs/train/obqa_smoke
python -m dnd_jax.train --config configs/obqa.py --workdir runs/train/obqa --config.data.collection_dir=DIR
"""

from configs import base


def get_config(arg=None):
    return base.get_config("OBQA", ["ARC-c", "ARC-e", "BoolQ", "WinoGrande", "PIQA", "HellaSwag"], steps=3000, arg=arg)
