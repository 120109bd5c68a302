"""DnD generator for WinoGrande, trained on the other common-sense datasets (spec §5.1: 2000 steps).
WinoGrande trains on four datasets only (ARC-e, BoolQ, PIQA, HellaSwag), as the original.

  python -m dnd_jax.train --config configs/winogrande.py:smoke --workdir runs/train/winogrande_smoke
  python -m dnd_jax.train --config configs/winogrande.py --workdir runs/train/wg --config.data.collection_dir=DIR
"""

from configs import base


def get_config(arg=None):
    return base.get_config("WinoGrande", ["ARC-e", "BoolQ", "PIQA", "HellaSwag"], steps=2000, arg=arg)
