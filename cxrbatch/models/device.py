"""Choosing the torch device once, from a setting; CPU threads of a worker process; how a
CPU thread waits for the GPU."""

from __future__ import annotations

import ctypes
import logging

import cv2
import torch

from cxrbatch.errors import ConfigError

log = logging.getLogger(__name__)

# The CUDA driver's scheduling flags of a context (cuda.h: CU_CTX_SCHED_*): how a CPU
# thread waits for the GPU in a synchronising call (a result copied back to the host).
GPU_WAIT_FLAGS = {"spin": 0x1, "yield": 0x2, "block": 0x4}
_SCHED_MASK = 0x7


def resolve_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device = 'cuda' was configured but no CUDA device is available.")
    return torch.device(setting)


def describe(device: torch.device) -> str:
    """What a device is, for the log line an operator checks after an install: the GPU's
    name and torch's CUDA build, or why the CPU (no CUDA in this torch build, or no device
    the driver shows)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return (
            f"{device.type}:{index} ({torch.cuda.get_device_name(index)}; torch "
            f"{torch.__version__}, CUDA {torch.version.cuda})"
        )
    if torch.version.cuda is None:
        why = "this torch is a CPU build"
    elif torch.cuda.is_available():
        why = "configured: a CUDA device is present"
    else:
        why = f"torch built for CUDA {torch.version.cuda} sees no CUDA device"
    return f"{device.type} ({why}; torch {torch.__version__}, {torch.get_num_threads()} threads)"


def limit_cpu_threads(threads: int) -> None:
    """CPU threads of one worker process, for torch and OpenCV alike: N workers share the
    cores instead of each starting a thread per core (OpenCV's default)."""
    torch.set_num_threads(threads)
    cv2.setNumThreads(threads)


def set_gpu_wait(policy: str, driver_library: str = "libcuda.so.1") -> str | None:
    """How this process's CPU threads wait for its GPUs (`processing.gpu_wait`): "block"
    sleeps until the GPU is done, "spin" busy-waits, "yield" busy-waits but yields the
    core; "auto" leaves CUDA's own choice, which is to spin wherever a process has fewer
    contexts than the host has cores, so that every worker process of a GPU host spins
    while it waits (docs/performance.md, the GPU section).

    Set on each device's primary context (the one torch uses) through the CUDA driver,
    before torch creates it: call this before the first CUDA work of the process. Returns
    None when set (or nothing to set), else why not, in one line; never raises. torch has
    no call for this, hence the driver's own (cuDevicePrimaryCtxSetFlags)."""
    if policy == "auto" or torch.version.cuda is None:
        return None
    flag = GPU_WAIT_FLAGS[policy]
    try:
        driver = ctypes.CDLL(driver_library)
    except OSError:
        return f"no CUDA driver ({driver_library} cannot be loaded)"
    count = ctypes.c_int(0)
    if driver.cuInit(0) != 0 or driver.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return "the CUDA driver found no device"
    for index in range(count.value):
        device = ctypes.c_int(0)
        flags, active = ctypes.c_uint(0), ctypes.c_int(0)
        if driver.cuDeviceGet(ctypes.byref(device), index) != 0:
            return f"CUDA device {index} cannot be opened"
        driver.cuDevicePrimaryCtxGetState(device, ctypes.byref(flags), ctypes.byref(active))
        if active.value and flags.value & _SCHED_MASK == flag:
            continue
        if active.value:
            return (
                f"CUDA device {index} is in use already in this process; its waiting "
                "policy cannot change now (it applies to processes that set it first)"
            )
        wanted = (flags.value & ~_SCHED_MASK) | flag
        status = driver.cuDevicePrimaryCtxSetFlags(device, ctypes.c_uint(wanted))
        if status != 0:
            return f"the CUDA driver refused the waiting policy on device {index} (error {status})"
    return None
