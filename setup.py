"""lidit_jax: the LLM-infused diffuser (LI-DiT) and its sister methods in JAX / Flax."""
from setuptools import find_packages, setup

setup(
    name="lidit_jax",
    version="0.1.0",
    description="LI-DiT (LLM-infused Diffusion Transformer) in JAX/Flax: train, sample, evaluate, convert.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["lidit_jax", "lidit_jax.*"]),
    install_requires=[
        "jax>=0.6,<0.11",
        "flax>=0.10.6,<0.13",
        "optax>=0.2.4,<0.3",
        "orbax-checkpoint>=0.11.13,<0.13",
        "ml-collections>=1.0,<2",
        "absl-py>=2.1",
        "numpy>=1.26",
        "transformers>=4.50,<6",
        "tokenizers>=0.21",
        "jinja2>=3.1",  # transformers renders chat templates with it (torch brought it in for the tests only)
        "safetensors>=0.4",
        "pillow>=10",
        "tqdm>=4.66",
        "tensorboardX>=2.6",
        "etils[epath]>=1.5",
        # Data: TFDS ArrayRecord datasets read with grain, without TensorFlow.
        "tensorflow-datasets>=4.9.9",
        "grain>=0.2.18",
        "array-record>=0.8",
        "importlib_resources",  # imported by tfds, no longer brought in by etils
        "matplotlib>=3.8",  # the ablation study's position plot
    ],
    extras_require={
        # The PyTorch side is only a reference for parity tests. Pin torch: a bare `torch`
        # pulls a multi-GB CUDA build.
        "test": ["pytest>=8", "pytest-xdist>=3.5",  # two workers, one test file each at a time
                 "torch==2.13.0", "diffusers>=0.31",
                 "peft==0.21.2",  # LoRA parity: diffusers' load_lora_weights / save_lora_weights use it
                 "scikit-image>=0.24",  # its package data: real photos for the data tests
                 # libtpu: the TPU compiler, for compiling configs for TPU slices here (no TPU needed)
                 "jax[tpu]>=0.6,<0.11"],
        # The study's towers that know language train with transformers' PyTorch classes (experiments/pretrain_towers)
        "study": ["torch==2.13.0"],
        "tpu": ["jax[tpu]>=0.6,<0.11"],
        "gpu": ["jax[cuda12]>=0.6,<0.11"],
    },
)
