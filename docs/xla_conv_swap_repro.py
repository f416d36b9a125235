"""Reproducer of an XLA SPMD partitioning bug (jax 0.10.2, Shardy partitioner; seen on CPU), to report upstream.

conv3x3(conv3x3(x * s)) with x batch-sharded over ('data', 'fsdp') and both kernels sharded
P(None, None, 'tensor', 'fsdp') on a 2 x 2 x 2 mesh comes out with the examples of two batch shards swapped
(examples 2,3 <-> 4,5): the compiled program holds a collective-permute with pairs {2,4},{4,2},{3,5},{5,3}.
A single conv, the chain without the per-channel scale, or kernels sharded over one axis only come out right.
lidit_jax works around it in models/dit.py (PositionResBlock constrains the convs' inputs and outputs).

  python docs/xla_conv_swap_repro.py     # prints the relative error per case; > 1e-5 is wrong
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402


def conv(x, k):
  return jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def main():
  mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
  rng = np.random.default_rng(0)
  b, hw, d = 8, 8, 32
  x = rng.standard_normal((b, hw, hw, d)).astype(np.float32)
  k1, k2 = ((rng.standard_normal((3, 3, d, d)) / np.sqrt(9 * d)).astype(np.float32) for _ in range(2))
  s = (1 + 0.1 * rng.standard_normal(d)).astype(np.float32)
  cases = {"conv(conv(x * s))": lambda x, k1, k2, s: conv(conv(x * s, k1), k2),
           "conv(conv(x))": lambda x, k1, k2, s: conv(conv(x, k1), k2),
           "conv(x * s)": lambda x, k1, k2, s: conv(x * s, k1)}
  at = lambda spec: NamedSharding(mesh, spec)
  print(f"jax {jax.__version__}, shardy: {jax.config.jax_use_shardy_partitioner}")
  for kernel_spec in (P(None, None, "tensor", "fsdp"), P(None, None, None, "fsdp")):
    for name, fn in cases.items():
      want = np.asarray(jax.jit(fn)(x, k1, k2, s))
      got = np.asarray(jax.jit(fn, in_shardings=(at(P(("data", "fsdp"))), at(kernel_spec), at(kernel_spec), at(P())))(
          x, k1, k2, s))
      rel = np.linalg.norm(got - want) / np.linalg.norm(want)
      per_example = [f"{np.linalg.norm(got[i] - want[i]) / np.linalg.norm(want[i]):.1g}" for i in range(b)]
      print(f"kernels {str(kernel_spec):32s} {name:18s} rel {rel:.1e}{'  WRONG' if rel > 1e-5 else ''}"
            f"  per example {per_example}")


if __name__ == "__main__":
  main()
