"""What a device can do at best, to put measured figures in proportion: peak dense TFLOP/s and a plain copy.

MFU (model FLOPs utilisation) is the model's FLOPs per second over the device's peak. The peaks are the vendors'
dense figures (no 2:4 sparsity): NVIDIA H100 SXM and H200 (the same GH100 compute at more memory) 989.4 bf16 and
66.9 fp32 TFLOP/s, A100 (SXM and PCIe) 312 bf16 and 19.5 fp32. fp32 is the non-tensor-core peak, which is what
megatron-core's fp32 matmuls get with torch's default ``allow_tf32=False``. A device not in the table (the H100
PCIe and NVL have lower clocks, any CPU) has no MFU unless the caller gives its peak.
"""

from __future__ import annotations

import os
import re
import time
from typing import Optional

import torch

# name -> (pattern of torch.cuda.get_device_name(), {dtype: peak dense TFLOP/s}). Patterns are exclusive: at most
# one matches any name ("NVIDIA H100 80GB HBM3" is the SXM part; the PCIe and NVL parts say so in their names).
PEAK_TFLOPS: dict[str, tuple[str, dict[str, float]]] = {
    "H100 SXM": (r"\bH100\b(?!.*\b(PCIe|NVL)\b)", {"bfloat16": 989.4, "float16": 989.4, "float32": 66.9}),
    "H200": (r"\bH200\b", {"bfloat16": 989.4, "float16": 989.4, "float32": 66.9}),
    "A100": (r"\bA100\b", {"bfloat16": 312.0, "float16": 312.0, "float32": 19.5}),
}


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"


def table_peak_tflops(name: str, dtype: str) -> tuple[Optional[str], Optional[float]]:
    """(table entry, peak TFLOP/s in ``dtype``) of the device called ``name``, or (None, None) if it is not listed."""
    matches = [entry for entry, (pattern, _) in PEAK_TFLOPS.items() if re.search(pattern, name)]
    assert len(matches) <= 1, f"device name {name!r} matches several peak-table entries {matches}"
    if not matches:
        return None, None
    return matches[0], PEAK_TFLOPS[matches[0]][1][dtype]


def memory_bytes(device: torch.device) -> int:
    """Total memory of the device (the host's RAM for the CPU)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_gb_per_s(num_bytes: int, device: torch.device, repeats: int = 5) -> float:
    """GB/s of a plain on-device copy of ``num_bytes`` (best of ``repeats``): the ceiling for moving weights on one
    device, against which the weight stream's resharding is read."""
    source = torch.empty(num_bytes, dtype=torch.uint8, device=device).fill_(1)
    target = torch.empty_like(source)
    target.copy_(source)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        target.copy_(source)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return num_bytes / 1e9 / best
