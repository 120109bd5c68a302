"""DnD generator for ARC-c, trained on the other common-sense datasets (spec §5.1: 4000 steps).

python -m dnd_jax.train --config configs/arc_c.py:smoke --workdir runs/train/arc_c_smoke
python -m dnd_jax.train --config configs/arc_c.py --workdir runs/train/arc_c --config.data.collection_dir=DIR
"""

from configs import base


def get_config(arg=None):
    return base.get_config("ARC-c", ["ARC-e", "OBQA", "BoolQ", "WinoGrande", "PIQA", "HellaSwag"], steps=4000, arg=arg)
