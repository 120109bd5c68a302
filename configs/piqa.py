"""DnD generator for PIQA, trained on the other common-sense datasets (spec §5.1: 1000 steps).

python -m dnd_jax.train --config configs/piqa.py:smoke --workdir runs/train/piqa_smoke
python -m dnd_jax.train --config configs/piqa.py --workdir runs/train/piqa --config.data.collection_dir=DIR
"""

from configs import base


def get_config(arg=None):
    return base.get_config("PIQA", ["ARC-c", "ARC-e", "OBQA", "BoolQ", "WinoGrande", "HellaSwag"], steps=1000, arg=arg)
