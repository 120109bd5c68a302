"""DnD generator for HellaSwag, trained on the other common-sense datasets (spec §5.1: 2000 steps).

python -m dnd_jax.train --config configs/hellaswag.py:smoke --workdir runs/train/hellaswag_smoke
python -m dnd_jax.train --config configs/hellaswag.py --workdir runs/train/hellaswag --config.data.collection_dir=DIR
"""

from configs import base


def get_config(arg=None):
    return base.get_config("HellaSwag", ["ARC-c", "ARC-e", "OBQA", "BoolQ", "WinoGrande", "PIQA"], steps=2000, arg=arg)
