"""PyTorch checkpoints -> Flax parameters. See `hf_text` for text towers; `python -m lidit_jax.convert`."""
from lidit_jax.convert.hf_text import load_hf_text_model  # noqa: F401
from lidit_jax.convert.diffusers_vae import load_vae  # noqa: F401
from lidit_jax.convert.llm4gen import load_llm4gen_cam  # noqa: F401
