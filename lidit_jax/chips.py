"""Per-chip figures the planner, the TPU compile report and the trainer's MFU share (a leaf module)."""
from __future__ import annotations

# Dense bf16 peak TFLOP/s per chip (vendor figures); "cpu" is this project's 2-core reference VM, float32
# jitted matmul measured by benchmarks/demo_step.py (2026-11-22).
CHIP_PEAK_TFLOPS = {"v4": 275.0, "v5e": 197.0, "v5p": 459.0, "v6e": 918.0, "h100": 989.0, "h200": 989.0,
                    "cpu": 0.176}
DEVICE_KINDS = {"TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5e": "v5e", "TPU v5p": "v5p", "TPU v5": "v5p",
                "TPU v6 lite": "v6e", "TPU v6e": "v6e", "NVIDIA H100": "h100", "NVIDIA H200": "h200", "cpu": "cpu"}
GiB = 1024 ** 3


def chip_of(device) -> str | None:
  kind = getattr(device, "device_kind", "") or device.platform
  for prefix, chip in sorted(DEVICE_KINDS.items(), key=lambda kv: -len(kv[0])):
    if kind.lower().startswith(prefix.lower()):
      return chip
  return None
