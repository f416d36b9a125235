"""configs/lidit_backbone.py: LI-DiT's token refiners and collaborative refiner fusing the pipeline's Gemma with a
second LLM, on tiny random Sana and Lumina 2 pipeline folders (tests/test_sana.py, tests/test_lumina2.py): the run
trains from the folder's transformer with fresh refiners, resumes, and samples through Pipeline."""
import json

import numpy as np
import pytest

from lidit_jax import configs, train
from lidit_jax.data import shapes
from lidit_jax.pipeline import Pipeline

from conftest import ROOT
from test_lumina2 import lumina2_pipeline
from test_sana import PROMPTS, sana_pipeline
from test_sd_finetune import sd_config

pytest.importorskip("diffusers")

# the second LLM: a random Llama the size of the tiny Gemma, reading the demo's words
TINY_LLM = {"text.towers.llm.init": "random", "text.towers.llm.vocab_size": 0, "text.towers.llm.hidden_size": 16,
            "text.towers.llm.num_layers": 3, "text.towers.llm.num_heads": 2, "text.towers.llm.num_kv_heads": 1,
            "text.towers.llm.intermediate_size": 32, "text.words": shapes.VOCABULARY,
            "model.refiner.depth": 1, "model.refiner.num_heads": 2}


@pytest.mark.parametrize("family,make,side", [("sana", sana_pipeline, 8), ("lumina2", lumina2_pipeline, 8)])
def test_refiners_on_a_pretrained_backbone_train_and_sample(tmp_path, family, make, side):
  make(tmp_path / "pipe")
  config = sd_config("lidit_backbone", f"{family},{tmp_path / 'pipe'},random", **TINY_LLM)
  assert (config.conditioner.kind, config.text.use, config.model.family) == ("refiners", "gemma,llm", family)
  train.train_and_evaluate(config, str(tmp_path / "run"))
  losses = [json.loads(line)["loss"] for line in open(tmp_path / "run" / "metrics.jsonl")]
  assert len(losses) == 3 and np.isfinite(losses).all()
  pipe = Pipeline.from_pretrained(str(tmp_path / "run"))
  params = pipe.backend.params["model"]
  assert {"token_refiner_0", "token_refiner_1", "collaborative_refiner"} <= set(params["conditioner"])
  latents = np.random.default_rng(0).standard_normal((2, side, side, 4)).astype(np.float32)
  images = pipe(PROMPTS, num_steps=2, latents=latents)
  other = pipe(["a blue square", "a red circle"], num_steps=2, latents=latents)
  assert images.shape[0] == 2 and np.isfinite(images).all()
  assert np.abs(images - other).max() > 1e-3  # the refined text reaches the backbone


def test_refuses_an_unknown_backbone():
  with pytest.raises(ValueError, match="'pixart' is not one of"):
    configs.load_config_file(f"{ROOT / 'configs' / 'lidit_backbone.py'}:pixart")
