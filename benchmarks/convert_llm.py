"""Hugging Face -> Flax/Orbax conversion of a synthetic ~1.1B-parameter Llama: seconds and peak memory.

  python -m benchmarks.convert_llm [--quick] [--workdir DIR] [--keep]
  python benchmarks/convert_llm.py  (same)

1. Writes a random bf16 Llama (hidden 2048, 16 layers, 16 heads / 8 KV heads, MLP 8192, vocab 32000, untied
   lm_head: 1.14B parameters, 2.28 GB) as transformers lays it out: config.json, model-0000X-of-0000N.safetensors
   shards of at most --shard-mb, model.safetensors.index.json. Tensors are generated and written one at a time
   (random bit patterns of bf16 numbers in +-[2^-7, 2^-5), norms 1), so the writer holds one tensor at most.
2. Baseline in the same run: seconds to read every shard twice, with raw `readinto` calls into one reused
   64 MiB buffer (the goal's yardstick), and also with safetensors' numpy API (`get_tensor` of every tensor).
   The files were just written, so both read from a warm page cache; nothing is dropped from it.
3. Each conversion runs in a fresh subprocess, so its peak RSS is its own: (a) `load_hf_text_model(path,
   jnp.bfloat16)` to jax arrays in memory, (b) the CLI (`lidit_jax.convert.__main__.main`, called in-process
   by the child so it can be sampled) to an Orbax directory. A thread samples /proc/self/status every 5 ms
   (RssAnon: heap and arrays; RssFile: file-backed pages, such as mmap'd checkpoint shards); VmHWM is the
   exact peak. The interpreter's own RSS after `import jax, lidit_jax.convert` is recorded as its baseline.
4. Prints one JSON line and (not with --quick) adds a row to benchmarks/RESULTS.md. Goals: peak RSS at most
   1.3x the checkpoint's bytes on disk; conversion no slower than reading the checkpoint twice.

The temp directory (several GB) is deleted at the end unless --keep or --workdir is given.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __package__ in (None, ""):  # run as `python benchmarks/convert_llm.py`
  sys.path.insert(0, REPO)

FULL = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=8,
            intermediate_size=8192, vocab_size=32000)
QUICK = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=1024, vocab_size=4096)
MEMORY_GOAL = 1.3  # peak RSS / checkpoint bytes
SPEED_GOAL = 1.0  # conversion seconds / (read the checkpoint twice) seconds
RESULT_TAG = "CHILD_RESULT "
SECTION = "## Hugging Face LLM -> Flax/Orbax conversion (`python -m benchmarks.convert_llm`)"
MiB = 1 << 20


# --------------------------------------------------------------------------------------------- writing
def tensor_shapes(arch: dict) -> list[tuple[str, tuple[int, ...]]]:
  """(name, shape) of a LlamaForCausalLM state dict, in the order transformers saves it."""
  d, n, h, g = arch["hidden_size"], arch["num_hidden_layers"], arch["num_attention_heads"], arch["num_key_value_heads"]
  f, v, k = arch["intermediate_size"], arch["vocab_size"], d // h
  out = [("model.embed_tokens.weight", (v, d))]
  for i in range(n):
    p = f"model.layers.{i}."
    out += [(p + "self_attn.q_proj.weight", (h * k, d)), (p + "self_attn.k_proj.weight", (g * k, d)),
            (p + "self_attn.v_proj.weight", (g * k, d)), (p + "self_attn.o_proj.weight", (d, h * k)),
            (p + "mlp.gate_proj.weight", (f, d)), (p + "mlp.up_proj.weight", (f, d)),
            (p + "mlp.down_proj.weight", (d, f)), (p + "input_layernorm.weight", (d,)),
            (p + "post_attention_layernorm.weight", (d,))]
  return out + [("model.norm.weight", (d,)), ("lm_head.weight", (v, d))]


def random_bf16_bits(rng: np.random.Generator, shape, name: str) -> np.ndarray:
  """uint16 bit patterns of bf16 numbers: norms 1.0, else random sign/mantissa, exponent 2^-7 or 2^-6."""
  if name.endswith("norm.weight"):
    return np.full(shape, 0x3F80, np.uint16)
  bits = rng.integers(0, 1 << 16, size=shape, dtype=np.uint16)
  bits &= 0x80FF  # sign, lowest exponent bit, mantissa
  bits |= 0x3C00  # exponent 120 (+1): |x| in [2^-7, 2^-5); never inf/nan
  return bits


def write_safetensors(path: str, entries, rng) -> int:
  """One shard in the safetensors layout (u64 header size, JSON header, data), written tensor by tensor."""
  header: dict = {"__metadata__": {"format": "pt"}}
  offset = 0
  for name, shape in entries:
    size = int(np.prod(shape)) * 2
    header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
    offset += size
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for name, shape in entries:
      f.write(memoryview(random_bf16_bits(rng, shape, name)).cast("B"))
  return os.path.getsize(path)


def write_checkpoint(out: str, arch: dict, shard_bytes: int, seed: int = 0) -> dict:
  """A random bf16 LlamaForCausalLM in the Hugging Face sharded layout. Returns sizes and counts."""
  import transformers
  os.makedirs(out, exist_ok=True)
  shards, size = [[]], 0
  for name, shape in tensor_shapes(arch):
    nbytes = int(np.prod(shape)) * 2
    if shards[-1] and size + nbytes > shard_bytes:  # transformers' greedy split, by tensor
      shards.append([])
      size = 0
    shards[-1].append((name, shape))
    size += nbytes
  rng = np.random.default_rng(seed)
  weight_map, on_disk = {}, 0
  for i, entries in enumerate(shards):
    fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    on_disk += write_safetensors(os.path.join(out, fname), entries, rng)
    weight_map.update({name: fname for name, _ in entries})
  total = sum(int(np.prod(s)) for _, s in tensor_shapes(arch))
  with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": total * 2}, "weight_map": weight_map}, f, indent=2)
  cfg = transformers.AutoConfig.for_model(
      "llama", architectures=["LlamaForCausalLM"], tie_word_embeddings=False, rms_norm_eps=1e-5,
      max_position_embeddings=4096, rope_theta=500000.0, bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16",
      **arch)
  cfg.save_pretrained(out)
  lm_head = arch["vocab_size"] * arch["hidden_size"]
  return {"params": total, "params_converted": total - lm_head, "shards": len(shards),
          "checkpoint_bytes": on_disk, "tensor_bytes": total * 2}


# --------------------------------------------------------------------------------------------- reading
def shard_paths(src: str) -> list[str]:
  return sorted(os.path.join(src, n) for n in os.listdir(src) if n.endswith(".safetensors"))


def read_raw(paths, view: memoryview) -> int:
  total = 0
  for p in paths:
    with open(p, "rb", buffering=0) as f:
      while n := f.readinto(view):
        total += n
  return total


def read_safetensors(paths) -> int:
  import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, which safetensors' numpy API needs)
  from safetensors import safe_open
  total = 0
  for p in paths:
    with safe_open(p, "np") as f:
      for k in f.keys():
        total += f.get_tensor(k).nbytes
  return total


def timed(fn, *args) -> tuple[float, object]:
  t = time.perf_counter()
  r = fn(*args)
  return time.perf_counter() - t, r


# --------------------------------------------------------------------------------------------- child side
def proc_status() -> dict[str, int]:
  """Memory lines of /proc/self/status, in bytes."""
  out = {}
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem")):
        k, v = line.split(":")
        out[k] = int(v.split()[0]) * 1024
  return out


class Sampler(threading.Thread):
  """Peak RssAnon / RssFile / VmRSS per phase, sampled every `interval` seconds."""

  def __init__(self, interval: float = 0.005):
    super().__init__(daemon=True)
    self.interval, self.phase, self.peaks = interval, "start", {}
    self._halt = threading.Event()

  def mark(self, phase: str):
    self._sample()
    self.phase = phase
    self._sample()

  def _sample(self):
    s = proc_status()
    p = self.peaks.setdefault(self.phase, {"VmRSS": 0, "RssAnon": 0, "RssFile": 0, "at_peak": {}})
    for k in ("RssAnon", "RssFile"):
      p[k] = max(p[k], s[k])
    if s["VmRSS"] > p["VmRSS"]:
      p["VmRSS"], p["at_peak"] = s["VmRSS"], {"RssAnon": s["RssAnon"], "RssFile": s["RssFile"]}

  def run(self):
    while not self._halt.wait(self.interval):
      self._sample()

  def stop(self):
    self._halt.set()
    self.join()
    self._sample()


def child(mode: str, src: str, out: str | None) -> None:
  sampler = Sampler()
  sampler.start()
  t0 = time.perf_counter()
  import jax
  import jax.numpy as jnp
  import lidit_jax.convert  # noqa: F401
  after_import = proc_status()
  import_s = time.perf_counter() - t0
  sampler.mark("convert")
  from lidit_jax.convert import hf_text
  phases = {}
  t = time.perf_counter()
  if mode == "memory":
    _, params = hf_text.load_hf_text_model(src, dtype=jnp.bfloat16)
    jax.block_until_ready(params)
    n = int(sum(x.size for x in jax.tree.leaves(params)))
    nbytes = int(sum(x.nbytes for x in jax.tree.leaves(params)))
  else:
    from lidit_jax.convert import __main__ as cli, orbax_io
    save = orbax_io.save_converted

    def timed_save(*a, **k):  # splits the CLI's time (and memory peaks) into conversion and Orbax save
      phases["convert_s"] = time.perf_counter() - t
      sampler.mark("save")
      t_save = time.perf_counter()
      save(*a, **k)
      phases["save_s"] = time.perf_counter() - t_save
    orbax_io.save_converted = timed_save
    if cli.main(["hf-text", src, out, "--dtype", "bfloat16"]) != 0:
      raise SystemExit("conversion failed")
    n = nbytes = None
  seconds = time.perf_counter() - t
  sampler.stop()
  end = proc_status()
  print(RESULT_TAG + json.dumps({
      "mode": mode, "seconds": seconds, **phases, "import_s": import_s, "params": n, "param_bytes": nbytes,
      "rss_after_import": after_import["VmRSS"], "anon_after_import": after_import["RssAnon"],
      "peak_rss": end["VmHWM"], "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
      "rss_end": end["VmRSS"], "phases": sampler.peaks}), flush=True)


def run_child(mode: str, src: str, out: str | None = None) -> dict:
  cmd = [sys.executable, "-m", "benchmarks.convert_llm", "--child", mode, src] + ([out] if out else [])
  t = time.perf_counter()
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True,
                          env={**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")})
  stdout = proc.stdout.read()
  _, status, usage = os.wait4(proc.pid, 0)
  wall = time.perf_counter() - t
  if status != 0:
    raise RuntimeError(f"child {mode} failed (status {status}):\n{stdout[-3000:]}")
  line = next(x for x in stdout.splitlines() if x.startswith(RESULT_TAG))
  result = json.loads(line[len(RESULT_TAG):])
  result.update(process_wall_s=wall, process_maxrss=usage.ru_maxrss * 1024)
  return result


# --------------------------------------------------------------------------------------------- report
def machine() -> str:
  model = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      model = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
  except (OSError, StopIteration):
    pass
  ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
  return f"{model}, {os.cpu_count()} cores, {ram:.0f} GiB RAM"


def dir_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(r, n)) for r, _, ns in os.walk(path) for n in ns)


def add_row(result: dict) -> str:
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
  gb = lambda b: f"{b / 1e9:.2f}"  # noqa: E731
  r, m, o = result, result["memory"], result["orbax"]
  yes = lambda ok: "yes" if ok else "**no**"  # noqa: E731
  row = (f"| {r['date']} | {r['machine']} | {r['jax']} | {r['safetensors']} | {r['params'] / 1e9:.2f}B "
         f"({r['shards']} shards) | {gb(r['checkpoint_bytes'])} | {r['read_raw_x2_s']:.2f} "
         f"({r['read_safetensors_x2_s']:.2f}) | {m['seconds']:.2f} | {o['seconds']:.2f} "
         f"({o['convert_s']:.2f} + {o['save_s']:.2f}) | {r['memory_over_read_x2']:.2f} / "
         f"{r['orbax_over_read_x2']:.2f} | {gb(m['peak_rss'])} ({gb(m['peak_anon'])} + {gb(m['peak_file'])}) | "
         f"{gb(o['peak_rss'])} ({gb(o['peak_anon'])} + {gb(o['peak_file'])}) | {gb(m['rss_after_import'])} | "
         f"{r['memory_peak_over_ckpt']:.2f} ({r['memory_net_over_ckpt']:.2f}) / "
         f"{r['orbax_peak_over_ckpt']:.2f} ({r['orbax_net_over_ckpt']:.2f}) | "
         f"{yes(r['memory_goal_met'])} / {yes(r['orbax_memory_goal_met'])} | "
         f"{yes(r['speed_goal_met'])} / {yes(r['orbax_speed_goal_met'])} |\n")
  header = (
      f"\n{SECTION}\n\n"
      "A random bf16 Llama written by the benchmark itself (hidden 2048, 16 layers, 16 heads / 8 KV heads, MLP "
      "8192, vocab 32000, untied lm_head, which the converter skips), sharded and indexed as transformers "
      "saves it. *read x2*: seconds to read every shard twice with raw `readinto` (in parentheses: with "
      "safetensors' numpy `get_tensor`), from a warm page cache (the files were just written; the cache is not "
      "dropped). *in memory*: `load_hf_text_model(path, jnp.bfloat16)`; *Orbax*: the `hf-text` CLI (conversion "
      "+ Orbax save). Each conversion runs in a fresh process; peak RSS is its VmHWM (in parentheses: peak "
      "anonymous + peak file-backed RSS, sampled every 5 ms). *interp.* is the child's RSS after `import jax, "
      "lidit_jax.convert`; *net* ratios subtract it. Goals: peak RSS <= 1.3x the checkpoint's bytes on disk; "
      "conversion seconds <= read x2 (raw).\n\n"
      "| date | machine | jax | safetensors | params | ckpt GB | read x2 s | in memory s | Orbax s (convert + "
      "save) | / read x2 (mem / Orbax) | peak GB in memory (anon + file) | peak GB Orbax (anon + file) | "
      "interp. GB | peak / ckpt (net), mem / Orbax | memory goal (mem / Orbax) | speed goal (mem / Orbax) |\n"
      "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
  with open(path, encoding="utf-8") as f:
    text = f.read()
  if SECTION not in text:  # new section at the end
    text = text.rstrip("\n") + "\n" + header + row
  else:  # the row goes after the last table row of this section, wherever the section is
    start = text.index(SECTION)
    nxt = text.find("\n## ", start + len(SECTION))
    end = len(text) if nxt < 0 else nxt + 1
    body = text[start:end].rstrip("\n") + "\n" + row
    text = text[:start] + body + ("\n" + text[end:] if nxt >= 0 else "")
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)
  return path


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--quick", action="store_true", help="a small model, a smoke check; RESULTS.md is not touched")
  ap.add_argument("--workdir", help="write the checkpoint and outputs here (kept) instead of a temp dir")
  ap.add_argument("--keep", action="store_true", help="keep the temp dir")
  ap.add_argument("--no-record", action="store_true", help="do not add a row to RESULTS.md")
  ap.add_argument("--shard-mb", type=int, default=None, help="largest shard (default 600 MB; 2 MB with --quick)")
  ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.child:
    child(args.child[0], args.child[1], args.child[2] if len(args.child) > 2 else None)
    return 0

  arch = QUICK if args.quick else FULL
  shard_bytes = (args.shard_mb or (2 if args.quick else 600)) * 10 ** 6
  work = args.workdir or tempfile.mkdtemp(prefix="convert_llm_")
  src, out = os.path.join(work, "hf"), os.path.join(work, "orbax")
  try:
    for p in (src, out):
      if os.path.exists(p):
        shutil.rmtree(p)
    write_s, info = timed(write_checkpoint, src, arch, shard_bytes)
    print(f"wrote {info['params'] / 1e9:.3f}B params, {info['checkpoint_bytes'] / 1e9:.2f} GB in "
          f"{info['shards']} shards to {src} in {write_s:.1f} s", file=sys.stderr)
    paths = shard_paths(src)
    view = memoryview(bytearray(64 * MiB))  # one reused read buffer
    read_raw(paths, view)  # one untimed pass, so every timed read starts from the same (warm) cache
    raw_s, raw_n = timed(lambda: read_raw(paths, view) + read_raw(paths, view))
    st_s, st_n = timed(lambda: read_safetensors(paths) + read_safetensors(paths))
    assert raw_n == 2 * info["checkpoint_bytes"] and st_n == 2 * info["tensor_bytes"], (raw_n, st_n, info)
    print(f"read x2: raw {raw_s:.2f} s, safetensors get_tensor {st_s:.2f} s", file=sys.stderr)
    results = {}
    for mode in ("memory", "orbax"):
      r = run_child(mode, src, out if mode == "orbax" else None)
      r.update(peak_anon=max(p["RssAnon"] for p in r["phases"].values()),
               peak_file=max(p["RssFile"] for p in r["phases"].values()))
      results[mode] = r
      print(f"{mode}: {r['seconds']:.2f} s, peak RSS {r['peak_rss'] / 1e9:.2f} GB", file=sys.stderr)
    import jax
    import safetensors
    ckpt = info["checkpoint_bytes"]
    mem, orb = results["memory"], results["orbax"]
    assert mem["params"] == info["params_converted"], (mem["params"], info)
    result = {
        "date": datetime.date.today().isoformat(), "machine": machine(), "jax": jax.__version__,
        "safetensors": safetensors.__version__, "arch": arch, **info, "write_s": write_s,
        "read_raw_x2_s": raw_s, "read_safetensors_x2_s": st_s, "page_cache": "warm (just written, not dropped)",
        "orbax_bytes": dir_bytes(out),
        "memory_over_read_x2": mem["seconds"] / raw_s, "orbax_over_read_x2": orb["seconds"] / raw_s,
        "memory_over_read_safetensors_x2": mem["seconds"] / st_s, "orbax_over_read_safetensors_x2": orb["seconds"] / st_s,
        "memory_peak_over_ckpt": mem["peak_rss"] / ckpt, "orbax_peak_over_ckpt": orb["peak_rss"] / ckpt,
        "memory_net_over_ckpt": (mem["peak_rss"] - mem["rss_after_import"]) / ckpt,
        "orbax_net_over_ckpt": (orb["peak_rss"] - orb["rss_after_import"]) / ckpt,
        "memory": mem, "orbax": orb}
    result.update(memory_goal_met=result["memory_peak_over_ckpt"] <= MEMORY_GOAL,
                  orbax_memory_goal_met=result["orbax_peak_over_ckpt"] <= MEMORY_GOAL,
                  speed_goal_met=result["memory_over_read_x2"] <= SPEED_GOAL,
                  orbax_speed_goal_met=result["orbax_over_read_x2"] <= SPEED_GOAL)
    print(json.dumps(result))
    if not (args.quick or args.no_record):
      print(f"added a row to {add_row(result)}", file=sys.stderr)
  finally:
    if not (args.workdir or args.keep):
      shutil.rmtree(work, ignore_errors=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
