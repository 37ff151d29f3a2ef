"""Memory a device loses that llama.cpp never reports: the GPU context and the BLAS workspace.

llama.cpp's buffer log (model, KV, compute) is exact, but a CUDA process also pays for its context (per-SM
local memory, module images) and the cuBLAS handle and workspace. ``device_overhead_bytes`` gives that fixed
cost per device; a device's own ``overhead_bytes`` (user or inventory supplied) always wins.
"""

from __future__ import annotations

from tuner.devices import Device

MiB = 1024 * 1024

# Measured on an NVIDIA H100 80GB SXM (driver 580.159, CUDA 13.0, llama-cpp-python 0.3.36 built with
# GGML_CUDA=ON; /work/shared/data/h100-llama-cpp-buffers.json): on the first load of a process NVML's used
# memory rose 528.6 MiB more than the sum of llama.cpp's CUDA0 buffers; later loads in the same process
# rose by the buffers plus 1-3 MiB. The value is rounded up to whole MiB. Other GPUs and drivers differ by
# tens to a few hundred MiB (the context grows with the SM count), so a measured value belongs in
# Device.overhead_bytes when one is known.
CUDA_OVERHEAD_BYTES = 529 * MiB

# Assumption, not a measurement (no AMD GPU was available): the HIP runtime context plus the rocBLAS /
# hipBLASLt handle and workspace cost about what CUDA's do, so ROCm devices get the CUDA figure.
ROCM_OVERHEAD_BYTES = CUDA_OVERHEAD_BYTES

_DEFAULTS: dict[str, int] = {"cuda": CUDA_OVERHEAD_BYTES, "rocm": ROCM_OVERHEAD_BYTES, "cpu": 0}


def device_overhead_bytes(device: Device) -> int:
    """Bytes the device loses beyond llama.cpp's buffers once a model is loaded on it.

    ``device.overhead_bytes`` when set. Otherwise 0 for RPC devices, whose server already holds its context
    (the free memory it reports excludes it) and for CPU-backed devices; the measured GPU context cost for
    local CUDA/ROCm devices and simulated ones (which stand for local GPUs). llama.cpp creates a context
    on every device it is given, so the cost applies even to a device that receives no layers.
    """
    if device.overhead_bytes is not None:
        return device.overhead_bytes
    if device.kind == "rpc":
        return 0
    return _DEFAULTS[device.backend]
