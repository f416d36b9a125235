"""Multi-process start-up: one JAX process per host (TPU VM worker) or per GPU node / task.

`initialize()` starts JAX's distributed runtime when this process is one of several, and does nothing
otherwise, so every entry point calls it first. Detected, in order:
  JAX_COORDINATOR_ADDRESS (+ JAX_NUM_PROCESSES, JAX_PROCESS_ID): explicit, e.g. GPU nodes started by hand;
  SLURM with more than one task (srun), and multi-worker Cloud TPU VMs / GKE: JAX's own cluster detection.
After it, `jax.devices()` lists the devices of every process; each process feeds its own slice of the
batch (data/pipeline.py) and only process 0 writes logs, metrics and images.
"""
from __future__ import annotations

import logging
import os

import jax

logger = logging.getLogger(__name__)


def _multi_process_cluster() -> bool:
  env = os.environ
  if int(env.get("SLURM_NTASKS", "1")) > 1:
    return True
  if "," in env.get("TPU_WORKER_HOSTNAMES", "") or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return True
  return False


def initialize() -> None:
  if jax.distributed.is_initialized():
    return
  env = os.environ
  if env.get("JAX_COORDINATOR_ADDRESS"):
    missing = [k for k in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if k not in env]
    if missing:
      raise ValueError(f"JAX_COORDINATOR_ADDRESS={env['JAX_COORDINATOR_ADDRESS']!r} is set but {missing} are not. "
                       "Fix: set JAX_NUM_PROCESSES (total processes) and JAX_PROCESS_ID (this one, from 0) too.")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU devices of several processes
    jax.distributed.initialize(num_processes=int(env["JAX_NUM_PROCESSES"]), process_id=int(env["JAX_PROCESS_ID"]))
  elif _multi_process_cluster():
    jax.distributed.initialize()
  else:
    return
  logger.warning("process %d of %d: %d local / %d global devices", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())
