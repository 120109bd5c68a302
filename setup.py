"""dnd_jax: Drag-and-Drop LLMs (prompt-to-LoRA weights) in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="dnd_jax",
    version="0.1.0",
    description="Drag-and-Drop LLMs (arXiv 2506.16406) in JAX/Flax: prompts to LoRA weights.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["dnd_jax", "dnd_jax.*", "converters", "converters.*", "configs", "configs.*"]),
    install_requires=[
        "jax>=0.7",
        # Sharding metadata names moved in 0.12.4; NNX API of the 0.12 line.
        "flax>=0.12.4,<0.13",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "ml_collections>=1.0",
        "absl-py",
        "numpy>=1.26",
        "safetensors>=0.4",
        # Any torch >= 2.4 works; CPU machines pin the local wheel via constraints.txt.
        "torch>=2.4",
        "transformers>=4.56",
        # The prompt extractors' tokenizer.json, run without transformers (dnd_jax/extractors.py: TextTokenizer).
        "tokenizers>=0.21",
        "sentence-transformers>=5.0",
        "peft>=0.17",
        "gguf>=0.17",
        "tqdm",
        # TensorBoard event files without PyTorch or TensorFlow in the training process.
        "tensorboardX",
        "tensorboard",
        "matplotlib",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout", "pytest-xdist>=3.5", "ruff>=0.6", "selenium>=4.20"],
        "cuda": ["jax[cuda12]"],
        "tpu": ["jax[tpu]"],
    },
)
