"""DnD generator for BoolQ, trained on the other common-sense datasets (spec §5.1: 3000 steps).

python -m dnd_jax.train --config configs/boolq.py:smoke --workdir runs/train/boolq_smoke
python -m dnd_jax.train --config configs/boolq.py --workdir runs/train/boolq --config.data.collection_dir=DIR
"""

from configs import base


def get_config(arg=None):
    return base.get_config("BoolQ", ["ARC-c", "ARC-e", "OBQA", "WinoGrande", "PIQA", "HellaSwag"], steps=3000, arg=arg)
