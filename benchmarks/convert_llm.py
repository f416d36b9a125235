"""Hugging Face -> Flax/Orbax conversion of a synthetic ~1.1B-parameter Llama: seconds and peak memory,
from a warm and from a cold page cache.

  python -m benchmarks.convert_llm [--quick] [--workdir DIR] [--keep] [--no-record] [--no-cold]
  python benchmarks/convert_llm.py  (same)

1. Writes a random bf16 Llama (hidden 2048, 16 layers, 16 heads / 8 KV heads, MLP 8192, vocab 32000, untied
   lm_head: 1.14B parameters, 2.28 GB) as transformers lays it out: config.json, model-0000X-of-0000N.safetensors
   shards of at most --shard-mb, model.safetensors.index.json. Tensors are generated and written one at a time
   (random bit patterns of bf16 numbers in +-[2^-7, 2^-5), norms 1), so the writer holds one tensor at most.
2. Baseline in the same run: seconds to read every shard twice with raw `readinto` calls into one reused
   64 MiB buffer (the goal's yardstick), (a) warm: after an untimed pass, so every page is cached; (b) cold:
   the shards are evicted from the page cache before each of the two passes (fsync, then
   posix_fadvise(POSIX_FADV_DONTNEED); mincore() confirms that no page stays resident). Also, warm, with
   safetensors' numpy API (`get_tensor` of every tensor).
3. Each conversion runs in a fresh subprocess, so its peak RSS is its own: (a) `load_hf_text_model(path,
   jnp.bfloat16)` to jax arrays in memory, (b) the CLI (`lidit_jax.convert.__main__.main`, called in-process
   by the child so it can be sampled) to an Orbax directory; each warm, then each cold (shards evicted just
   before the child starts). `os.sync()` runs before every timed step, so no earlier write-back competes.
   Times: *total* is the child's wall time from spawn to exit (interpreter start and imports included);
   *start-up* is spawn -> the first call of `build_params` (imports, including transformers' and torch's,
   config.json parsing, `eval_shape`), which does not grow with the model; *excl. start-up* = total -
   start-up. `build_params` (the streaming core) and the CLI's Orbax save are also timed on their own.
   Memory: a thread samples /proc/self/status every 5 ms (RssAnon: heap and arrays; RssFile: file-backed
   pages); VmHWM is the exact peak. The interpreter's RSS after `import jax, lidit_jax.convert` is recorded.
4. Prints one JSON line and (not with --quick / --no-record) adds a warm and a cold row to
   benchmarks/RESULTS.md. Goals: peak RSS at most 1.3x the checkpoint's bytes on disk; conversion no slower
   than reading the checkpoint twice (compared within one cache state).

The temp directory (several GB) is deleted at the end unless --keep or --workdir is given.
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import datetime
import json
import mmap
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


def evict(paths) -> None:
  """Drop the files' pages from the page cache (written back first, so they are clean and can go)."""
  for p in paths:
    fd = os.open(p, os.O_RDONLY)
    try:
      os.fsync(fd)
      os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
      os.close(fd)


_libc = None


def resident_fraction(paths) -> float:
  """Fraction of the files' pages in the page cache, by mincore() on a mapping (which reads nothing)."""
  global _libc
  if _libc is None:
    _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    _libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte))
  page = mmap.PAGESIZE
  resident = total = 0
  for p in paths:
    size = os.path.getsize(p)
    if not size:
      continue
    with open(p, "rb") as f, mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as m:
      n = (size + page - 1) // page
      vec = (ctypes.c_ubyte * n)()
      addr = _mmap_address(m)
      if _libc.mincore(ctypes.c_void_p(addr), size, vec):
        raise OSError(ctypes.get_errno(), "mincore failed")
      resident += sum(b & 1 for b in bytes(vec))
      total += n
  return resident / max(total, 1)


def _mmap_address(m: mmap.mmap) -> int:
  """Start address of a read-only mapping (ctypes.from_buffer needs a writable one)."""
  buf = np.frombuffer(m, np.uint8)
  addr = buf.ctypes.data
  del buf
  return addr


def read_x2(paths, view: memoryview, cold: bool) -> float:
  """Seconds to read every shard twice; cold: evicted before each pass (eviction not timed)."""
  seconds, total = 0.0, 0
  for _ in range(2):
    if cold:
      evict(paths)
    os.sync()
    dt, n = timed(read_raw, paths, view)
    seconds, total = seconds + dt, total + n
  return seconds, total


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
  from lidit_jax.convert import hf_text, safetensors_io
  phases = {}
  build = safetensors_io.build_params

  def timed_build(*a, **k):  # the streaming core alone (read, transform, cast, place), without config/imports
    phases["build_start_epoch"] = time.time()
    t_build = time.perf_counter()
    out = jax.block_until_ready(build(*a, **k))
    phases["build_params_s"] = time.perf_counter() - t_build
    return out
  safetensors_io.build_params = timed_build
  t = time.perf_counter()
  if mode == "memory":
    _, params = hf_text.load_hf_text_model(src, dtype=jnp.bfloat16)
    jax.block_until_ready(params)
    n = int(sum(x.size for x in jax.tree.leaves(params)))
    nbytes = int(sum(x.nbytes for x in jax.tree.leaves(params)))
    kinds = sorted({type(x).__name__ for x in jax.tree.leaves(params)})
  else:
    from lidit_jax.convert import __main__ as cli, orbax_io
    writer = orbax_io.ParamsWriter

    class TimedWriter(writer):  # notes what the CLI hands to Orbax and how long the save runs on after
      def put(self, path, value):
        phases["saved_leaf_types"] = sorted(set(phases.get("saved_leaf_types", [])) | {type(value).__name__})
        super().put(path, value)

      def finish(self):
        sampler.mark("save_tail")
        t_finish = time.perf_counter()
        super().finish()
        phases["save_tail_s"] = time.perf_counter() - t_finish  # writing left after the last parameter
    orbax_io.ParamsWriter = TimedWriter
    if cli.main(["hf-text", src, out, "--dtype", "bfloat16"]) != 0:
      raise SystemExit("conversion failed")
    n = nbytes = kinds = None
  seconds = time.perf_counter() - t
  sampler.stop()
  end = proc_status()
  print(RESULT_TAG + json.dumps({
      "mode": mode, "seconds": seconds, **phases, "import_s": import_s, "params": n, "param_bytes": nbytes,
      "leaf_types": kinds, "rss_after_import": after_import["VmRSS"], "anon_after_import": after_import["RssAnon"],
      "peak_rss": end["VmHWM"], "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
      "rss_end": end["VmRSS"], "phases": sampler.peaks, "end_epoch": time.time()}), flush=True)


def run_child(mode: str, src: str, out: str | None = None) -> dict:
  cmd = [sys.executable, "-m", "benchmarks.convert_llm", "--child", mode, src] + ([out] if out else [])
  spawn_epoch = time.time()
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
  startup = result.pop("build_start_epoch") - spawn_epoch
  exit_s = spawn_epoch + wall - result.pop("end_epoch")  # result printed -> process gone (interpreter teardown)
  result.update(process_wall_s=wall, process_maxrss=usage.ru_maxrss * 1024, startup_s=startup, exit_s=exit_s,
                excl_startup_s=wall - startup, work_s=wall - startup - exit_s,
                peak_anon=max(p["RssAnon"] for p in result["phases"].values()),
                peak_file=max(p["RssFile"] for p in result["phases"].values()))
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


def versions() -> dict:
  import importlib.metadata as md
  out = {}
  for name in ("jax", "flax", "orbax-checkpoint", "tensorstore", "safetensors", "numpy", "transformers", "torch"):
    try:
      out[name] = md.version(name)
    except md.PackageNotFoundError:
      out[name] = None
  return out


def dir_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(r, n)) for r, _, ns in os.walk(path) for n in ns)


TABLE_HEADER = (
    "| date | machine | jax / orbax / safetensors | params | ckpt GB | page cache | read x2 s | in memory s: "
    "total / excl. start-up (core) | CLI s: total / excl. start-up (core + save tail) | fixed s, start-up + "
    "exit: mem / CLI | "
    "/ read x2, total (excl. start-up): mem / CLI | peak GB in memory (anon + file) | peak GB CLI (anon + file) "
    "| peak / ckpt: mem / CLI | memory goal: mem / CLI | speed goal, total (excl. start-up): mem / CLI |\n")
TABLE_RULE = "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
TABLE_INTRO = (
    "A random bf16 Llama written by the benchmark itself (hidden 2048, 16 layers, 16 heads / 8 KV heads, MLP "
    "8192, vocab 32000, untied lm_head, which the converter skips), sharded and indexed as transformers saves "
    "it. Each run adds two rows: *warm* (every shard in the page cache) and *cold* (the shards evicted with "
    "fsync + `posix_fadvise(POSIX_FADV_DONTNEED)` before each timed read pass and before each conversion; "
    "mincore confirms that no page stays cached). *read x2*: seconds to read every shard twice with raw "
    "`readinto` into one reused 64 MiB buffer, the yardstick. *in memory*: `load_hf_text_model(path, "
    "jnp.bfloat16)` to jax arrays; *CLI*: `python -m lidit_jax.convert hf-text SRC OUT`, which converts to "
    "host arrays and streams each finished parameter to the Orbax writer (uncompressed OCDBT, written with "
    "fsync). Each conversion runs in a fresh process: *total* is its wall time from spawn to exit; *start-up* "
    "is spawn -> first call of `build_params` (interpreter, imports including transformers and torch, "
    "config.json parsing, `eval_shape`) and *exit* is result printed -> process gone (interpreter teardown), "
    "fixed costs that do not grow with the model; *excl. start-up* = total - start-up; *core* is "
    "`build_params` alone (read, reshape, place); *save tail* is the Orbax writing still left once the last "
    "parameter is converted. Peak RSS is the process's VmHWM (in parentheses: peak anonymous + peak "
    "file-backed RSS, sampled every 5 ms). Goals: peak RSS <= 1.3x the checkpoint's bytes on disk; "
    "conversion seconds <= read x2 of the same cache state.\n\n")


def rows(result: dict) -> str:
  gb = lambda b: f"{b / 1e9:.2f}"  # noqa: E731
  yes = lambda ok: "yes" if ok else "**no**"  # noqa: E731
  r, v = result, result["versions"]
  out = ""
  for cache in r["caches"]:
    c = r[cache]
    m, o = c["memory"], c["orbax"]
    out += (
        f"| {r['date']} | {r['machine']} | {v['jax']} / {v['orbax-checkpoint']} / {v['safetensors']} | "
        f"{r['params'] / 1e9:.2f}B ({r['shards']} shards) | {gb(r['checkpoint_bytes'])} | {cache} | "
        f"{c['read_raw_x2_s']:.2f} | {m['process_wall_s']:.2f} / {m['excl_startup_s']:.2f} "
        f"({m['build_params_s']:.2f}) | {o['process_wall_s']:.2f} / {o['excl_startup_s']:.2f} "
        f"({o['build_params_s']:.2f} + {o['save_tail_s']:.2f}) | {m['startup_s']:.2f} + {m['exit_s']:.2f} / "
        f"{o['startup_s']:.2f} + {o['exit_s']:.2f} | "
        f"{c['memory_over_read_x2']:.1f} ({c['memory_excl_over_read_x2']:.1f}) / {c['orbax_over_read_x2']:.1f} "
        f"({c['orbax_excl_over_read_x2']:.1f}) | {gb(m['peak_rss'])} ({gb(m['peak_anon'])} + "
        f"{gb(m['peak_file'])}) | {gb(o['peak_rss'])} ({gb(o['peak_anon'])} + {gb(o['peak_file'])}) | "
        f"{c['memory_peak_over_ckpt']:.2f} / {c['orbax_peak_over_ckpt']:.2f} | "
        f"{yes(c['memory_goal_met'])} / {yes(c['orbax_memory_goal_met'])} | "
        f"{yes(c['speed_goal_met'])} ({yes(c['speed_goal_excl_met'])}) / {yes(c['orbax_speed_goal_met'])} "
        f"({yes(c['orbax_speed_goal_excl_met'])}) |\n")
  return out


def add_rows(result: dict, path: str | None = None) -> str:
  """Appends this run's rows to the current table of the conversion section of RESULTS.md (a section or a
  table that does not exist yet is created; the section may sit anywhere in the file)."""
  path = path or os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
  new = rows(result)
  with open(path, encoding="utf-8") as f:
    lines = f.read().splitlines(keepends=True)
  try:
    start = next(i for i, l in enumerate(lines) if l.rstrip("\n") == SECTION)
  except StopIteration:  # new section at the end
    text = "".join(lines).rstrip("\n") + "\n\n" + SECTION + "\n\n" + TABLE_INTRO + TABLE_HEADER + TABLE_RULE + new
  else:
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    try:
      head = next(i for i in range(start, end) if lines[i] == TABLE_HEADER)
    except StopIteration:  # this table is new: intro + table right under the section's title
      lines[start + 1:start + 1] = ["\n", TABLE_INTRO, TABLE_HEADER, TABLE_RULE, new]
    else:  # after the last row of the current table
      last = head
      while last + 1 < end and lines[last + 1].startswith("|"):
        last += 1
      lines.insert(last + 1, new)
    text = "".join(lines)
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)
  return path


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--quick", action="store_true", help="a small model, a smoke check; RESULTS.md is not touched")
  ap.add_argument("--workdir", help="write the checkpoint and outputs here (kept) instead of a temp dir")
  ap.add_argument("--keep", action="store_true", help="keep the temp dir")
  ap.add_argument("--no-record", action="store_true", help="do not add rows to RESULTS.md")
  ap.add_argument("--no-cold", action="store_true", help="warm page cache only")
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
  caches = ("warm",) if args.no_cold else ("warm", "cold")
  try:
    for p in (src, out):
      if os.path.exists(p):
        shutil.rmtree(p)
    write_s, info = timed(write_checkpoint, src, arch, shard_bytes)
    print(f"wrote {info['params'] / 1e9:.3f}B params, {info['checkpoint_bytes'] / 1e9:.2f} GB in "
          f"{info['shards']} shards to {src} in {write_s:.1f} s", file=sys.stderr)
    paths = shard_paths(src)
    ckpt = info["checkpoint_bytes"]
    view = memoryview(bytearray(64 * MiB))  # one reused read buffer
    os.sync()
    read_raw(paths, view)  # one untimed pass: every shard is cached and the buffer's pages exist
    result = {"date": datetime.date.today().isoformat(), "machine": machine(), "versions": versions(),
              "arch": arch, **info, "write_s": write_s, "caches": caches}
    result["jax"], result["safetensors"] = result["versions"]["jax"], result["versions"]["safetensors"]
    for cache in caches:
      c = result[cache] = {}
      raw_s, raw_n = read_x2(paths, view, cold=cache == "cold")
      assert raw_n == 2 * ckpt, (raw_n, info)
      c["read_raw_x2_s"] = raw_s
      if cache == "warm":
        st_s, st_n = timed(lambda: read_safetensors(paths) + read_safetensors(paths))
        assert st_n == 2 * info["tensor_bytes"], (st_n, info)
        c["read_safetensors_x2_s"] = st_s
      else:  # the eviction works: after it, nothing is resident, and a read is slower than a warm one
        evict(paths)
        c["resident_after_evict"] = resident_fraction(paths)
      print(f"{cache}: read x2 raw {raw_s:.2f} s", file=sys.stderr)
      for mode in ("memory", "orbax"):
        if os.path.exists(out):
          shutil.rmtree(out)
        if cache == "cold":
          evict(paths)
        else:
          read_raw(paths, view)  # warm again (a cold step before may have evicted; it does not, as ordered)
        os.sync()
        r = run_child(mode, src, out if mode == "orbax" else None)
        c[mode] = r
        print(f"{cache} {mode}: {r['process_wall_s']:.2f} s total, {r['excl_startup_s']:.2f} s excl. start-up "
              f"({r['startup_s']:.2f} s), peak RSS {r['peak_rss'] / 1e9:.2f} GB", file=sys.stderr)
      mem, orb = c["memory"], c["orbax"]
      assert mem["params"] == info["params_converted"], (mem["params"], info)
      c.update(
          orbax_bytes=dir_bytes(out),
          memory_over_read_x2=mem["process_wall_s"] / raw_s, orbax_over_read_x2=orb["process_wall_s"] / raw_s,
          memory_excl_over_read_x2=mem["excl_startup_s"] / raw_s,
          orbax_excl_over_read_x2=orb["excl_startup_s"] / raw_s,
          core_over_read_x2=mem["build_params_s"] / raw_s,
          memory_peak_over_ckpt=mem["peak_rss"] / ckpt, orbax_peak_over_ckpt=orb["peak_rss"] / ckpt,
          memory_net_over_ckpt=(mem["peak_rss"] - mem["rss_after_import"]) / ckpt,
          orbax_net_over_ckpt=(orb["peak_rss"] - orb["rss_after_import"]) / ckpt)
      c.update(memory_goal_met=c["memory_peak_over_ckpt"] <= MEMORY_GOAL,
               orbax_memory_goal_met=c["orbax_peak_over_ckpt"] <= MEMORY_GOAL,
               speed_goal_met=c["memory_over_read_x2"] <= SPEED_GOAL,
               speed_goal_excl_met=c["memory_excl_over_read_x2"] <= SPEED_GOAL,
               orbax_speed_goal_met=c["orbax_over_read_x2"] <= SPEED_GOAL,
               orbax_speed_goal_excl_met=c["orbax_excl_over_read_x2"] <= SPEED_GOAL)
    print(json.dumps(result))
    if not (args.quick or args.no_record):
      print(f"added rows to {add_rows(result)}", file=sys.stderr)
  finally:
    if not (args.workdir or args.keep):
      shutil.rmtree(work, ignore_errors=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
