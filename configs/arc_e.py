"""DnD generator for ARC-e, trained on the other common-sense datasets (spec §5.1: 2000 steps).

python -m dnd_jax.train --config configs/arc_e.py:smoke --workdir runs/train/arc_e_smoke
python -m dnd_jax.train --config configs/arc_e.py --workdir runs/train/arc_e --config.data.collection_dir=DIR
"""

from configs import base


def get_config(arg=None):
    return base.get_config("ARC-e", ["ARC-c", "OBQA", "BoolQ", "WinoGrande", "PIQA", "HellaSwag"], steps=2000, arg=arg)
