"""`python -m lidit_jax.plan --topology`: the train step compiled for a TPU slice on this CPU (libtpu, no TPU), its
reported bytes the compiled program's own; a splash-attention DiT lowered by Mosaic; a config too large for a chip
reported as not fitting; a bad slice name refused in one message."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from lidit_jax import cli, tpu_compile

pytest.importorskip("libtpu", reason="the TPU compiler comes with the test extra (jax[tpu])")

TINY = str(ROOT / "configs/shapes.py:tiny")
# The host on CPU; no persistent cache: every compile here is the compiler's own.
ENV = {**{k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}, "JAX_PLATFORMS": "cpu"}
SPLASH = ["--config.model.attention=splash", "--config.model.patch_size=2",  # 256 image tokens
          "--config.text.towers.llama_a.max_length=64", "--config.text.towers.llama_b.max_length=64"]  # 128 text

DIRECT = r"""
import json, sys
from lidit_jax import configs, tpu_compile, train
c = configs.validate(configs.apply_overrides(configs.load_config_file(sys.argv[1]), json.loads(sys.argv[2])))
m = train.lower_train_step(c, tpu_compile.devices(tpu_compile.parse(sys.argv[3]))).compile().memory_analysis()
print(json.dumps({k: int(getattr(m, k)) for k in ("argument_size_in_bytes", "temp_size_in_bytes",
                                                  "output_size_in_bytes", "alias_size_in_bytes",
                                                  "generated_code_size_in_bytes")}))
"""


def plan(*args):
  r = subprocess.run([sys.executable, "-m", "lidit_jax.plan", *args], capture_output=True, text=True, timeout=900,
                     cwd=ROOT, env=ENV)
  last = (r.stdout.strip().splitlines() or [""])[-1]
  return r, (json.loads(last) if last.startswith("{") else None)


def test_tiny_train_step_compiled_for_a_v5e_2x2_slice_reports_the_compiled_bytes():
  r, p = plan("--config", TINY, "--config.mesh.fsdp=-1", "--topology", "v5e:2x2")
  assert r.returncode == 0, r.stderr[-3000:]
  c = p["compiled"]
  assert (c["topology"], c["chip"], c["chips"], p["devices"]) == ("v5e:2x2", "v5e", 4, 4)
  assert c["hbm_bytes"] == 16 * 2 ** 30 and c["fits"] and c["headroom_bytes"] == c["hbm_bytes"] - c["peak_bytes"]
  # fsdp over 4 chips: the parameters are gathered and the gradients reduced across them
  assert c["collectives"] and sum(v["count"] for v in c["collectives"].values()) > 0, c["collectives"]
  assert c["mosaic_kernels"] == 0  # XLA attention: the splash test's arm that must differ
  assert c["flops_per_chip_estimate"] > 0 and c["step_seconds_estimate"] > 0
  assert "compiled the train step for v5e:2x2" in r.stdout and "peak vs HBM: fits" in r.stdout
  d = subprocess.run([sys.executable, "-c", DIRECT, TINY, json.dumps({"mesh.fsdp": -1}), "v5e:2x2"],
                     capture_output=True, text=True, timeout=900, cwd=ROOT, env=ENV)
  assert d.returncode == 0, d.stderr[-3000:]
  m = json.loads(d.stdout.strip().splitlines()[-1])
  assert c["argument_bytes"] == m["argument_size_in_bytes"] > 0
  assert c["temp_bytes"] == m["temp_size_in_bytes"] > 0
  assert c["output_not_aliased_bytes"] == m["output_size_in_bytes"] - m["alias_size_in_bytes"]
  assert c["peak_bytes"] == (m["argument_size_in_bytes"] + m["output_size_in_bytes"] - m["alias_size_in_bytes"]
                             + m["temp_size_in_bytes"] + m["generated_code_size_in_bytes"])


@pytest.mark.parametrize("family", ["pixart", "sana", "lumina2"])
def test_the_open_dits_train_steps_compile_for_a_slice_with_their_weights_sharded(family):
  """Each open DiT family (the demo's tiny layout) fully sharded over a v5e 2x2: the compiled step fits and its
  parameters are gathered / its gradients reduced across the chips."""
  r, p = plan("--config", f"{TINY},{family}", "--config.mesh.fsdp=-1", "--topology", "v5e:2x2")
  assert r.returncode == 0, r.stderr[-3000:]
  c = p["compiled"]
  assert c["fits"] and c["argument_bytes"] > 0 and sum(v["count"] for v in c["collectives"].values()) > 0, c
  assert "compiled the train step for v5e:2x2" in r.stdout


def test_splash_attention_dit_is_lowered_by_mosaic_for_a_tpu_slice():
  """The Pallas splash kernel compiled for real (not interpret mode): Mosaic custom calls in the TPU program."""
  r, p = plan("--config", TINY, "--config.mesh.fsdp=-1", *SPLASH, "--topology", "v6e-4")
  assert r.returncode == 0, r.stderr[-3000:]
  assert p["compiled"]["topology"] == "v6e:2x2" and p["compiled"]["mosaic_kernels"] > 0, p["compiled"]


def test_a_config_too_large_for_one_chip_is_reported_as_not_fitting():
  """The tiny config 8192 wide (billions of float32 parameters with AdamW and EMA) on one 16 GiB v5e chip: the TPU
  compiler refuses the program, and the report carries its figures."""
  r, p = plan("--config", TINY, "--config.model.width=8192", "--topology", "v5litepod-1", "--require_fit")
  assert r.returncode == 2, r.stderr[-3000:]  # launch/tpu_vm.sh stops here, before the slice
  errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and "does not fit v5e:1x1" in errors[0] and "--fit" in errors[0], r.stderr[-3000:]
  c = p["compiled"]
  assert c["chips"] == 1 and not c["fits"] and c["peak_bytes"] > c["hbm_bytes"] == 16 * 2 ** 30, c
  assert "RESOURCE_EXHAUSTED" in c["compiler_message"] and c["headroom_bytes"] < 0
  assert "does NOT fit" in r.stdout


def test_two_slices_put_the_data_axis_across_them():
  r, p = plan("--config", TINY, "--config.mesh.fsdp=-1", "--config.train.batch_size=8", "--topology", "v5e-4",
              "--slices", "2")
  assert r.returncode == 0, r.stderr[-3000:]
  assert p["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1} and p["devices"] == 8, p["mesh"]
  assert (p["compiled"]["slices"], p["compiled"]["chips"], p["compiled"]["fits"]) == (2, 8, True)


@pytest.mark.parametrize("message,required,available", [
    ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (157.87G) exceeds "
     "available HBM (15.75G).", 157.87, 15.75),
    ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm. Used 20.50G of "
     "15.75G hbm. Exceeded hbm capacity by 4.75G.", 20.5, 15.75)])
def test_the_compilers_out_of_memory_message_gives_the_bytes(message, required, available):
  oom = tpu_compile.out_of_memory(RuntimeError(message))
  assert oom["peak_bytes"] == int(required * 2 ** 30) and oom["compiler_hbm_bytes"] == int(available * 2 ** 30)
  assert tpu_compile.out_of_memory(RuntimeError("INVALID_ARGUMENT: something else")) is None


def test_a_bad_topology_name_is_one_message():
  r, _ = plan("--config", TINY, "--topology", "v9-8")
  assert r.returncode == 2, r.stderr[-3000:]
  errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and "'v9-8'" in errors[0] and "v5p-128" in errors[0] and "v5p:4x4x4" in errors[0], r.stderr
  assert "Traceback" not in r.stderr


@pytest.mark.parametrize("name,topology,chips", [
    ("v4-128", "v4:4x4x4", 64), ("v5p-128", "v5p:4x4x4", 64), ("v5p-8", "v5p:2x2x1", 4),
    ("v5litepod-256", "v5e:16x16", 256), ("v5e-256", "v5e:16x16", 256), ("v5e-1", "v5e:1x1", 1),
    ("v6e-8", "v6e:2x4", 8), ("v6e-256", "v6e:16x16", 256), ("v5p:4x4x8", "v5p:4x4x8", 128),
    ("v5:4x4x4", "v5p:4x4x4", 64), ("v5e:2x2x1", "v5e:2x2", 4)])
def test_slice_names_gcloud_counts_cores_on_v4_v5p_and_chips_on_v5e_v6e(name, topology, chips):
  t = tpu_compile.parse(name)
  assert (t.name, t.chips) == (topology, chips)
  assert tpu_compile.parse(name, slices=2).chips == 2 * chips


@pytest.mark.parametrize("name", ["v9-8", "v5p-7", "v5e-2", "v6e-512", "v4:2x2", "v5p", "tpu"])
def test_bad_slice_names_are_refused_naming_the_value(name):
  with pytest.raises(cli.UserError, match=f"--topology '{name}'"):
    tpu_compile.parse(name)


def test_collectives_are_read_from_tpu_hlo_with_async_starts_and_tiled_layouts():
  from lidit_jax import hlo_cost
  hlo = "\n".join([
      "ENTRY %main (p: bf16[8,128], x: f32[1024], y: f32[1024]) -> f32[256] {",
      "  %all-gather-start = (bf16[8,128]{1,0:T(8,128)(2,1)}, bf16[32,128]{1,0:T(8,128)(2,1)}) "
      "all-gather-start(bf16[8,128]{1,0:T(8,128)(2,1)} %p), dimensions={0}, "
      'metadata={op_name="jit(train_step)/jvp(LIDiT)/denoiser/while/body/closed_call/blocks/block/mlp/dot_general"}',
      "  %all-gather-done = bf16[32,128]{1,0} all-gather-done(%all-gather-start)",
      "  %ar = f32[1024]{0} all-reduce(f32[1024]{0} %x), to_apply=%add",
      "  ROOT %rs = f32[256]{0} reduce-scatter(f32[1024]{0} %y), dimensions={0}",
      "}"])
  c = hlo_cost.costs(hlo, tpu_compile.COLLECTIVES)
  assert c["collectives"] == {"all-gather": {"count": 1, "bytes": 32 * 128 * 2},
                              "all-reduce": {"count": 1, "bytes": 4096}, "reduce-scatter": {"count": 1, "bytes": 1024}}
  assert c["collectives_by_source"]["all-gather forward LIDiT/denoiser/blocks"] == {"count": 1, "bytes": 8192}


@pytest.mark.parametrize("shape,spec,fitted", [
    ((1152, 16, 72), ("fsdp", "tensor", None), (None, "tensor", None)),  # 256 divides nothing: replicated
    ((1152, 4608), ("fsdp", None), (None, "fsdp")),  # moved to the dimension it divides
    ((4096, 1152), ("fsdp", None), ("fsdp", None)),  # divides: kept
    ((50257, 512), ("tensor", "fsdp"), (None, ("fsdp", "tensor"))),
    ((50257, 32), ("tensor", "fsdp"), (None, "tensor")),
    ((28, 1152, 4608), (None, "fsdp", "data"), (None, None, ("data", "fsdp"))),  # joins a size-1 axis' dimension
    ((1152, 4608), ("fsdp", "tensor"), (None, ("tensor", "fsdp")))])  # and a real one's, where both divide  # the only dimension tensor could take is taken
def test_shardings_fit_any_mesh_moving_an_axis_to_a_dimension_it_divides(shape, spec, fitted):
  """LI-DiT-1B's 1152-wide kernels on fsdp=256 (v5e-256) failed jit's even-division check before this."""
  from jax.sharding import AbstractMesh, PartitionSpec as P
  from lidit_jax import sharding
  mesh = AbstractMesh((1, 256, 2), ("data", "fsdp", "tensor"))
  assert sharding.fit_spec(shape, P(*spec), mesh.shape) == P(*fitted)


SCANNED_HLO = """
%body (p: (s32[], f32[8,64])) -> (s32[], f32[8,64]) {
  %p = (s32[], f32[8,64]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[8,64]{1,0} get-tuple-element(%p), index=1
  %w = f32[64,64]{1,0} constant({...})
  %y = f32[8,64]{1,0} convolution(%x, %w), dim_labels=bf_io->bf
  %ar = f32[8,64]{1,0} all-reduce(%y), to_apply=%add
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %t = (s32[], f32[8,64]{1,0}) tuple(%next, %ar)
}

%cond (c: (s32[], f32[8,64])) -> pred[] {
  %c = (s32[], f32[8,64]{1,0}) parameter(0)
  %n = s32[] get-tuple-element(%c), index=0
  %limit = s32[]{:T(128)} constant(12)
  ROOT %lt = pred[]{:T(512)} compare(%n, %limit), direction=LT
}

ENTRY %main (a: f32[8,64], b: f32[4,8,8]) -> f32[8,64] {
  %a = f32[8,64]{1,0} parameter(0)
  %b = f32[4,8,8]{2,1,0} parameter(1)
  %bmm = f32[4,8,8]{2,1,0} dot(%b, %b), lhs_batch_dims={0}, lhs_contracting_dims={2}, rhs_batch_dims={0}, rhs_contracting_dims={1}
  %zero = s32[] constant(0)
  %init = (s32[], f32[8,64]{1,0}) tuple(%zero, %a)
  %loop = (s32[], f32[8,64]{1,0}) while(%init), condition=%cond, body=%body
  ROOT %out = f32[8,64]{1,0} get-tuple-element(%loop), index=1
}
"""


def test_loop_bodies_are_counted_their_trip_count_times():
  """XLA's cost analysis counts a while body once; hlo_cost reads the trip count from the condition."""
  from lidit_jax import hlo_cost
  c = hlo_cost.costs(SCANNED_HLO, ("all-reduce",))
  matmul, bmm = 2 * 8 * 64 * 64, 2 * 4 * 8 * 8 * 8
  assert c["loops"] == {"body": 12}
  assert (c["flops_once"], c["flops"]) == (matmul + bmm, 12 * matmul + bmm)
  assert c["collectives"] == {"all-reduce": {"count": 12, "bytes": 12 * 8 * 64 * 4}}
  assert c["bytes"] > c["bytes_once"] > 0


SPLASH_HLO = """
ENTRY %main (q: f32[4,256,64], k: f32[4,128,64], w: f32[64,64]) -> f32[256,64] {
  %q = f32[4,256,64]{2,1,0} parameter(0)
  %k = f32[4,128,64]{2,1,0} parameter(1)
  %w = f32[64,64]{1,0} parameter(2)
  %splash_mha_fwd.1 = (f32[4,256,64]{2,1,0}, f32[4,256,128]{2,1,0}) custom-call(%q, %k, %k), custom_call_target="tpu_custom_call", backend_config={"custom_call_config": {"body": "kernel text
}}, metadata={op_name="splash_mha_fwd"}
  %o = f32[4,256,64]{2,1,0} get-tuple-element(%splash_mha_fwd.1), index=0
  %x = f32[256,64]{1,0} reshape(%o)
  ROOT %y = f32[256,64]{1,0} dot(%x, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}
"""


def test_splash_kernels_are_counted_and_do_not_hide_what_follows_them():
  """A Mosaic kernel's attributes span lines, one starting with "}}": that is not the computation's end (it hid
  every instruction after the first splash call, so LI-DiT's FLOPs, bytes and collectives were under-counted), and
  the kernel's own matmuls (QK^T and PV), opaque to the compiler, are counted from q and k."""
  from lidit_jax import hlo_cost
  c = hlo_cost.costs(SPLASH_HLO)
  kernel = 2 * 2 * 4 * 256 * 128 * 64
  assert c["kernel_flops_once"] == kernel and c["flops"] == kernel + 2 * 256 * 64 * 64
  # several examples a chip: `jax.vmap` over the kernel gives its operands a leading batch axis (B, H, T, D)
  batched = SPLASH_HLO.replace("f32[4,", "f32[3,4,").replace("{2,1,0}", "{3,2,1,0}").replace(
      "f32[256,64]{1,0} reshape", "f32[768,64]{1,0} reshape").replace("%y = f32[256,64]", "%y = f32[768,64]")
  c = hlo_cost.costs(batched)
  assert c["kernel_flops_once"] == 3 * kernel and c["flops"] == 3 * kernel + 3 * 2 * 256 * 64 * 64


CUBLAS_HLO = """
ENTRY %main (x: bf16[32,64], w: bf16[64,96]) -> bf16[32,96] {
  %x = bf16[32,64]{1,0} parameter(0)
  %w = bf16[64,96]{1,0} parameter(1)
  %mm = (bf16[32,96]{1,0}, s8[4194304]{0}) custom-call(%x, %w), custom_call_target="__cublas$lt$matmul", backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]}}}
  ROOT %y = bf16[32,96]{1,0} get-tuple-element(%mm), index=0
}
"""


def test_a_gpu_programs_cublas_matmuls_are_counted():
  """XLA's GPU compiler turns dots into cuBLAS custom calls (dimensions in the backend config), and a GPU target
  has no cost analysis: hlo_cost counts them itself."""
  from lidit_jax import hlo_cost
  assert hlo_cost.costs(CUBLAS_HLO)["flops"] == 2 * 32 * 96 * 64


def test_a_batched_matmul_as_a_padded_convolution_counts_only_real_taps():
  """TPU lowers `...d,hkd->...hk` (2 heads) to a convolution over a padded 'spatial' head axis: one real tap each."""
  from lidit_jax import hlo_cost
  flops = hlo_cost.conv_flops("bf16[32,2,16]", "bf16[32,32,1]", "bf16[2,16,32]",
                              "window={size=2 pad=1_1 rhs_reversal=1}, dim_labels=bf0_0oi->b0f")
  assert flops == 2 * 32 * 2 * 16 * 32


SCAN_CONFIG = ["--config.mesh.fsdp=-1", "--config.model.width=256", "--config.model.depth=8",
               "--config.model.num_heads=4", "--config.model.remat=none"]


@pytest.mark.slow
def test_a_scanned_models_cost_matches_the_same_model_unrolled():
  """The loop-counted FLOPs and bytes of the scanned DiT against the compiler's own for the unrolled one (whose
  cost analysis needs no loop counting): within 5 %, where the scanned body counted once is about a third."""
  (r1, scanned), (r2, unrolled) = [plan("--config", TINY, *SCAN_CONFIG, f"--config.model.scan={s}", "--topology",
                                        "v5e:2x2") for s in (True, False)]
  assert r1.returncode == 0 and r2.returncode == 0, (r1.stderr + r2.stderr)[-3000:]
  s, u = scanned["compiled"], unrolled["compiled"]
  assert 8 in s["loop_trip_counts"] and s["compiler_flops_loop_bodies_once"] < 0.5 * u["flops_per_chip_estimate"]
  assert s["flops_per_chip_estimate"] == pytest.approx(u["flops_per_chip_estimate"], rel=0.05)
  assert s["bytes_accessed_per_chip_estimate"] == pytest.approx(u["bytes_accessed_per_chip_estimate"], rel=0.05)
  assert 0 < s["mfu_estimate"] and "MFU" in r1.stdout


@pytest.mark.slow
def test_fit_finds_settings_the_compiler_confirms_when_the_config_does_not_fit():
  """2048 examples of a 256-wide tiny model on one 16 GiB v5e chip: the config as it is takes 18 GiB; --fit prints
  the cheapest overrides that fit, confirmed by the compiler (the `compiled` report is the fitted config's)."""
  wide = ["--config", TINY, "--config.train.batch_size=2048", "--config.model.width=256", "--config.model.num_heads=4"]
  r, p = plan(*wide, "--topology", "v5e-1", "--fit")
  assert r.returncode == 0, r.stderr[-3000:]
  found = p["fit"]["flags"]
  assert found and p["compiled"]["fits"] and p["fit"]["compiles"] >= 1, p["fit"]
  assert f"--fit: add {' '.join(found)}" in r.stdout and p["compiled"]["peak_bytes"] <= p["compiled"]["hbm_bytes"]


def test_the_sampling_function_compiles_for_a_slice():
  """Pipeline's jitted sampler (config.sample: steps, guidance) for 8 prompts over a v5e 2x2: its loop over the
  sampling steps counted, its bytes the compiled program's."""
  r, p = plan("--config", TINY, "--config.mesh.fsdp=-1", "--config.sample.steps=5", "--topology", "v5e:2x2",
              "--sample", "--sample_batch", "8")
  assert r.returncode == 0, r.stderr[-3000:]
  c = p["compiled"]
  assert c["batch"] == 8 and c["fits"] and c["temp_bytes"] > 0 and 5 in c["loop_trip_counts"], c
  assert "compiled sampling (8 prompts, 5 steps" in r.stdout


def test_the_planner_agrees_with_the_stored_compiles_of_every_shipped_config():
  """Item 2 kept by every run, no compile: today's planner against the TPU compiler's peaks stored by
  `python -m benchmarks.tpu_slices` (benchmarks/tpu_slices.json), within 15 % for one slice per shipped config
  where the program fit unsqueezed (a refused or squeezed program holds what the compiler made fit, not the step)."""
  sys.path.insert(0, str(ROOT))
  from benchmarks import tpu_slices
  results, checked = tpu_slices.load(), {}
  for config in tpu_slices.CONFIGS:
    for key, r in sorted(results.items()):
      if key.split("|")[0] != config or "compiled" not in r or config in checked:
        continue
      c, flags = r["compiled"], r.get("flags", [])
      if "compiler_message" in c:
        continue
      planned = tpu_slices.planner_bytes(config, key.split("|")[1], flags)
      if tpu_slices.squeezed(c, planned):
        continue
      checked[config] = (key, planned / c["peak_bytes"])
  assert set(checked) == set(tpu_slices.CONFIGS), set(tpu_slices.CONFIGS) - set(checked)
  off = {config: kr for config, kr in checked.items() if not 0.85 <= kr[1] <= 1.15}
  assert not off, off


# jax's CUDA plugin holds XLA's GPU compiler; no GPU or CUDA runtime is needed to compile with it. Installed into a
# folder of its own (LIDIT_CUDA_PLUGIN or a cache folder, ~480 MB), on the plan subprocess' path only: in this
# environment every jax process would otherwise look for CUDA drivers at start.
CUDA_PLUGIN = os.environ.get("LIDIT_CUDA_PLUGIN") or os.path.expanduser("~/.cache/lidit_jax/cuda_plugin")


def cuda_plugin() -> str:
  import jax
  folder = f"{CUDA_PLUGIN}-{jax.__version__}"
  if not os.path.isdir(folder):
    staging = f"{folder}.partial-{os.getpid()}"  # renamed when complete: an interrupted install is not used
    pins = [f"jax-cuda12-plugin=={jax.__version__}", f"jax-cuda12-pjrt=={jax.__version__}"]
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", staging, *pins],
                       capture_output=True, text=True, timeout=900)
    if r.returncode:
      pytest.fail(f"could not install {' '.join(pins)} into {staging}:\n{r.stderr[-2000:]}")
    os.rename(staging, folder)
  return folder


def test_train_step_compiled_for_h100_nodes_reports_the_compiled_bytes():
  """Item 8: `--topology h100-8` compiles the tiny config's bf16 train step (cuDNN's fused attention, which refused
  a key-padding mask before this compile showed it) for eight compile-only H100s with XLA's GPU compiler; the report
  holds the compiled program's bytes against the card's 80 GB, collectives and the program's matmul count. Without
  the plugin: one message naming the pip command."""
  args = ["--config", TINY, "--config.mesh.data=-1", "--config.train.batch_size=8", "--config.model.dtype=bfloat16",
          "--topology", "h100-8"]
  r = subprocess.run([sys.executable, "-m", "lidit_jax.plan", *args], capture_output=True, text=True, timeout=900,
                     cwd=ROOT, env={**ENV, "PYTHONPATH": cuda_plugin()})
  assert r.returncode == 0, r.stderr[-3000:]
  c = json.loads(r.stdout.strip().splitlines()[-1])["compiled"]
  assert (c["topology"], c["chip"], c["chips"], c["hbm_bytes"]) == ("h100:1x8", "h100", 8, 84_978_434_048)
  assert c["fits"] and 0 < c["argument_bytes"] < c["peak_bytes"] < 2 ** 26 and c["temp_bytes"] > 0
  assert c["collectives"]["all-reduce"]["count"] > 0 and c["cost_source"] == "hlo" and c["flops_per_chip_estimate"] > 0
  assert "8 x h100" in r.stdout and "XLA has no cost model for a GPU target" in r.stdout
  r, _ = plan(*args)  # the test environment has no CUDA plugin
  assert r.returncode == 2 and "pip install jax-cuda12-plugin==" in r.stderr and "Traceback" not in r.stderr


def test_gpu_names():
  assert tpu_compile.parse("h100-16") == tpu_compile.Topology("h100", (2, 8))
  assert tpu_compile.parse("H200-4") == tpu_compile.Topology("h200", (1, 4))
  assert tpu_compile.parse("h100:3x8").chips == 24
  for bad in ("h100-12", "h100:1x16", "a100-8"):
    with pytest.raises(cli.UserError, match="h100-N"):
      tpu_compile.parse(bad)
  with pytest.raises(cli.UserError, match="--slices"):
    tpu_compile.parse("h100-8", slices=2)
