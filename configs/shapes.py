"""The embedded shapes demo: a small LI-DiT learns compositional prompts on 32 px pixel-space images.

  python -m lidit_jax.train --config configs/shapes.py --workdir runs/shapes
  python -m lidit_jax.sample --config configs/shapes.py --workdir runs/shapes \
      --prompt "a red circle to the left of a blue square" --out sample.png
  python -m lidit_jax.evaluate --config configs/shapes.py --workdir runs/shapes --out eval.json

Two random frozen tiny Llama towers with the demo's word tokenizer, both refiners, a DiT 4 x 128 on 4 px patches.
`python -m lidit_jax` runs this config end to end (train, samples, held-out evaluation). Expected on a 2-core CPU
(2026-12-03): 17-22 minutes (2.0-1.5 steps/s, the shared machine's day); held-out colour 0.94, shape 0.53-0.54,
relation 0.45-0.52, count 0.50, whole prompt 0.03-0.04; relation probe +8-10 px (docs/results.md;
the issue-13 goals are not met yet).
`configs/shapes.py:tiny` is the same config shrunk for tests (seconds, not minutes).
`configs/shapes.py:hf` reads two tiny Hugging Face LLMs (a Llama-3 and a Qwen2, random weights) converted
to Orbax, in place of the random towers; make them first (no download, no torch):
  python -m lidit_jax.convert.tiny_models checkpoints/tiny --convert
`configs/shapes.py:unet` is the SD family on the same data: a small U-Net on plain tokens, DDPM (v-prediction).
`configs/shapes.py:pixart` is PixArt's family on the same data: adaLN-single DiT blocks behind a caption projection
of the towers' plain tokens, DDPM epsilon with a learned variance, DPM-Solver++ 2M.
`configs/shapes.py:sana` is Sana's family: linear-attention blocks with the GLU MBConv over the patch grid behind a
caption projection, rectified flow sampled with DPM-Solver++ 2M over flow sigmas.
`configs/shapes.py:lumina2` is Lumina 2's family: context and noise refiners, then joint attention over both.
`configs/shapes.py:cam` conditions on LLM4GEN's Cross-Adapter Module over the two towers instead of the refiners.
`configs/shapes.py:diff` conditions on the LLM Diff Adapter over the second tower's per-block scores (on the U-Net:
a second cross-attention per block; everything trains, the demo's U-Net being untrained).
`configs/shapes.py:pretrained` reads towers that know the demo's language (issue 17) in place of the random ones:
an instruction-tuned LM (llama_a, the instruction its chat template's system turn) and a second base LM (llama_b,
plain text); the base LM the first was tuned from (lm) and a T5-style encoder (t5) are there for `text.use` to name
(experiments/ablate.py); make them first (torch, ~25 minutes):
  python -m lidit_jax.experiments.pretrain_towers --out checkpoints/pretrained
`configs/shapes.py:unet,patches` runs the U-Net on 4 x 4 pixel patches (an 8 x 8 grid of 48 channels, as SD's on
latents) at 64 / 128 / 128 channels: as fast per step as the DiT here, 17x faster than on pixels.
Variants combine: `configs/shapes.py:tiny,hf`, `configs/shapes.py:tiny,unet`, `configs/shapes.py:unet,cam`.
"""
from lidit_jax import configs
from lidit_jax.data import shapes


HF_TOWERS = {"llama": "checkpoints/tiny/llama-orbax", "qwen2": "checkpoints/tiny/qwen2-orbax"}
PRETRAINED = "checkpoints/pretrained"  # experiments/pretrain_towers.py --out


def get_config(variant: str = ""):
  variants = {v.strip() for v in variant.split(",") if v.strip()}
  unknown = variants - {"tiny", "hf", "pretrained", "unet", "pixart", "sana", "lumina2", "patches",
                          "cam", "diff"}
  if unknown:
    raise ValueError(f"unknown variant(s) {sorted(unknown)} of configs/shapes.py; use tiny, hf, pretrained, unet, "
                     "pixart, sana, lumina2, patches, cam and/or diff")
  c = configs.base_config()
  c.model.update(width=128, depth=4, num_heads=4, patch_size=4, pos_embed="both",
                 scan=False)  # 4 blocks: unrolled runs 11 % faster on this CPU (benchmarks/RESULTS.md)
  # Random towers cannot follow an instruction: a short one keeps LI-DiT's scaffold (masked out after the
  # refiners) without spending 25 of every 56 text positions on it. 10 template tokens + captions of <= 21 words.
  c.text.instruction = "Describe the objects:"
  c.text.words = shapes.VOCABULARY  # the word tokenizer of the random towers knows the demo's words
  for t in c.text.towers.values():
    t.max_length = 32
  # Rotary word positions in the token refiners: random towers carry the word order only faintly.
  c.model.refiner.update(depth=2, num_heads=4, rope=True)
  # Uniform times shifted towards noise (median t 0.75): where the layout, and so the relation, is decided.
  # The network predicts the clean image and the loss is its MSE (JiT's x0 prediction with the x0 loss): at the
  # same 1800 steps and seed, crisper shapes (0.53 vs 0.43 held out) at the same relations (0.52 vs 0.55); x0
  # with the velocity loss drew crisp shapes but lost the relations (0.32): benchmarks/RESULTS.md.
  c.flow.update(timestep="uniform", shift=3.0, prediction="x0", loss="x0")
  c.optim.update(lr=1.5e-3, warmup_steps=100, weight_decay=0.0, ema_decay=0.995, grad_clip=1.0)
  c.train.update(num_steps=1800, batch_size=32, log_every=25, checkpoint_every=300, sample_every=600)
  # Guidance 5 over 3 (same checkpoint, same noise): colour +0.03, relation +0.05, count +0.03; Heun or 50 steps
  # gain nothing for twice the time (benchmarks/RESULTS.md, sampler sweep).
  c.sample.update(steps=25, sampler="euler", cfg=5.0)
  c.eval.update(num_prompts=128, steps=25, cfg=5.0, probe_pairs=16)
  if "tiny" in variants:
    # Scanned blocks, as the large configs: what tests check (the unrolled path is tested against it).
    c.model.update(width=32, depth=2, num_heads=2, patch_size=4, scan=True)
    c.model.refiner.update(depth=1, num_heads=2)
    c.text.towers.llama_a.update(hidden_size=32, num_layers=3, num_heads=2, num_kv_heads=1, intermediate_size=64)
    c.text.towers.llama_b.update(hidden_size=32, num_layers=3, num_heads=2, num_kv_heads=2, intermediate_size=64)
    c.optim.warmup_steps = 2
    c.train.update(num_steps=6, batch_size=4, log_every=2, checkpoint_every=3, sample_every=6)
    c.sample.update(steps=3, num_images=2)
    c.eval.update(num_prompts=4, steps=3, batch_size=4, probe_pairs=2)
  if "unet" in variants:
    # The SD family on the same data and towers: a small pixel-space U-Net reading plain projected tokens, trained
    # on v-prediction DDPM with min-SNR weights, sampled with DPM-Solver++ 2M.
    c.model.family = "unet"
    c.conditioner.kind = "tokens"
    cross = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    c.unet.update(block_out_channels=(32, 64, 64), down_block_types=cross,
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                  num_heads=4, cross_attention_dim=64, norm_num_groups=8, use_linear_projection=True)
    c.objective.kind = "ddpm"
    c.ddpm.update(prediction_type="v_prediction", snr_gamma=5.0, timestep_spacing="trailing", steps_offset=0)
    c.sample.sampler = "dpmpp_2m"
    if "tiny" in variants:
      c.unet.update(block_out_channels=(16, 32), down_block_types=cross[1:], up_block_types=("UpBlock2D",
                    "CrossAttnUpBlock2D"), num_heads=2, cross_attention_dim=32, norm_num_groups=8)
  if "pixart" in variants:
    # PixArt's transformer on the same data and towers (lidit_jax/denoisers/pixart.py): 4 px patches as the DiT's,
    # positions at the 32 px grid, epsilon over PixArt's linear schedule.
    c.model.family = "pixart"
    c.conditioner.kind = "tokens"
    c.pixart.update(num_attention_heads=4, attention_head_dim=32, num_layers=4, caption_channels=64, sample_size=32,
                    patch_size=4, interpolation_scale=1.0)
    c.objective.kind = "ddpm"
    c.ddpm.update(beta_schedule="linear", beta_start=0.0001, beta_end=0.02, timestep_spacing="linspace", steps_offset=0)
    c.sample.sampler = "dpmpp_2m"
    if "tiny" in variants:
      # a width (48) other than the towers' (32): LI-DiT's refiners then read the backbone's time through a projection
      c.pixart.update(num_attention_heads=2, attention_head_dim=24, num_layers=2, caption_channels=32)
  if "sana" in variants:
    # Sana's transformer on the same data and towers (lidit_jax/denoisers/sana.py): 4 px patches, no positions (the
    # depthwise convolutions carry them), the demo's flow objective sampled as Sana's scheduler steps.
    c.model.family = "sana"
    c.conditioner.kind = "tokens"
    c.sana.update(num_attention_heads=4, attention_head_dim=32, num_layers=4, num_cross_attention_heads=4,
                  cross_attention_head_dim=32, caption_channels=64, sample_size=8, patch_size=4)
    c.sample.sampler = "dpmpp_2m"
    if "tiny" in variants:  # a width (48) other than the towers' (32), as pixart's
      c.sana.update(num_attention_heads=2, attention_head_dim=24, num_layers=2, num_cross_attention_heads=2,
                    cross_attention_head_dim=24, caption_channels=32)
  if "lumina2" in variants:
    # Lumina 2's transformer on the same data and towers (lidit_jax/denoisers/lumina2.py): 4 px patches, 3-axis RoPE
    # over (caption position, row, column).
    c.model.family = "lumina2"
    c.conditioner.kind = "tokens"
    c.lumina2.update(sample_size=8, patch_size=4, hidden_size=128, num_layers=4, num_refiner_layers=1,
                     num_attention_heads=4, num_kv_heads=2, multiple_of=16, axes_dim_rope=(16, 8, 8),
                     axes_lens=(128, 16, 16), cap_feat_dim=64)
    if "tiny" in variants:  # a width (48) other than the towers' (32), as pixart's
      c.lumina2.update(hidden_size=48, num_layers=2, num_attention_heads=2, num_kv_heads=1, axes_dim_rope=(8, 8, 8),
                       cap_feat_dim=32)
  if "patches" in variants:
    # The denoiser works on 4 x 4 pixel patches (48 channels, an 8 x 8 grid: the DiT's token grid), as SD's U-Net on
    # latents. The U-Net then steps as fast as the DiT on this CPU (1.27 vs 1.33 steps/s, 2026-12-05) where on
    # pixels it takes 17x as long: the issue-17 study's U-Net.
    c.autoencoder.update(kind="patches", factor=4, channels=48)
    if c.model.family == "unet":
      c.unet.block_out_channels = (64, 128, 128) if "tiny" not in variants else (16, 32)
    elif c.model.family == "pixart":
      c.pixart.update(patch_size=1, sample_size=8)
    else:
      c.model.patch_size = 1  # the DiT's tokens stay the 8 x 8 patches
  if "hf" in variants:  # architecture, tokenizer and vocabulary come from the checkpoints
    c.text.use = ",".join(HF_TOWERS)
    c.text.towers = {name: configs.tower(init=path, max_length=56) for name, path in HF_TOWERS.items()}
  if "pretrained" in variants:
    # Their own word tokenizers; the instruction is one the instruction-tuned LM was tuned on. LI-DiT reads layer
    # -3 of the LMs' 4 blocks, the T5 its normed last state. Base LM and T5 read the prompt alone.
    from lidit_jax.experiments import corpus
    c.text.update(use="llama_a,llama_b", instruction=corpus.INSTRUCTIONS[0], words=())
    c.text.towers = {"llama_a": configs.tower(init=f"{PRETRAINED}/lm_instruct", max_length=32, dtype="float32"),
                     "llama_b": configs.tower(init=f"{PRETRAINED}/lm_b", instruction="", max_length=32,
                                              dtype="float32"),
                     "lm": configs.tower(init=f"{PRETRAINED}/lm", instruction="", max_length=32, dtype="float32"),
                     "t5": configs.tower(init=f"{PRETRAINED}/t5", instruction="", layer=-1, max_length=32,
                                         dtype="float32")}
  if "cam" in variants:
    # LLM4GEN's Cross-Adapter Module on the demo's towers: the first stands where CLIP does (keys and values, its
    # tokens first in the context), the second is the LLM (queries); on the DiT a projection to its width follows.
    first, second = configs.tower_names(c)
    c.conditioner.kind = "llm4gen"
    c.conditioner.cam.update(clip=first, llm=second, num_heads=4 if "tiny" not in variants else 2)
  if "diff" in variants:
    # The LLM Diff Adapter on the second tower: its per-block scores summed into the text code (phi(code): the
    # context; the code itself: the U-Net's second cross-attentions). The instruction stays in the tower, masked.
    llm = configs.tower_names(c)[-1]
    c.text.use = llm
    c.text.towers[llm].output = "scores"
    c.conditioner.kind = "diff_adapter"
    c.conditioner.diff.llm = llm
  return c
