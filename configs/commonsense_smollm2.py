"""The paper's common-sense leave-one-out (ARC-c held out) at the scale of a 2-core CPU.

  python -m dnd_jax.pipeline --config configs/commonsense_smollm2.py --workdir runs/commonsense_smollm2

SmolLM2-135M-Instruct LoRAs (configs/collect/commonsense_smollm2.py) on the six other sets of
../shared/data/commonsense (ARC-e, OBQA, BoolQ, WinoGrande, PIQA, SIQA; SIQA replaces HellaSwag),
a CPU-sized generator, 5 generated adapters for ARC-c from its unlabeled test prompts, evaluated
against the base model, the training LoRAs and ARC-c's own LoRA (a reference the method never sees).
"""

from configs import base
from configs.collect import commonsense_smollm2 as collect_cfg


def get_config(arg=None):
    c = base.get_config("ARC-c", ("ARC-e", "OBQA", "BoolQ", "WinoGrande", "PIQA", "SIQA"), steps=400, arg="smoke")
    base.add_pipeline(c, collect_cfg.get_config("ARC-c"), "configs/commonsense_smollm2.py")
    # Checkpoints shared by every common-sense experiment (collected once, reused).
    c.data.collection_dir = "runs/collect"
    c.data.token_dir = "runs/tokens/smollm2"
    c.data.prompts_dir = "../shared/data/commonsense"
    # Generator: 16 prompts x 64 tokens -> (4770, 10, 66) tokens, k 3.
    c.data.num_texts = 16
    c.data.max_text_length = 64
    c.model.features = ((16, 64, 384), (32, 32, 128), (64, 10, 66), base.SMOLLM2_TOKENS)
    c.train.steps = 400
    c.train.batch_size = 8
    c.train.learning_rate = 1e-3
    c.train.log_every = 10
    c.train.eval_every = 100
    c.train.eval_batches = 4
    c.train.checkpoint_every = 100
    c.generate.num_adapters = 5
    c.eval.limit = 150
    if arg == "smoke":
        c.train.steps = 20
        c.eval.limit = 16
        c.generate.num_adapters = 2
    return c
