"""Device policy: which device, which precision, how many decoding processes, how much shared memory.

One place for the choices that depend on the machine, so that extraction, prediction, fine-tuning
and torchrun agree. Everything here is a pure function of what torch and the OS report, so the
tests can stand in for a GPU machine by patching those reports.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil

import torch

from ..errors import ConfigError
from .validation import PRECISIONS

log = logging.getLogger(__name__)

#: Autocast dtypes of the reduced precisions (fp32 runs without autocast).
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
#: Most decoding processes per GPU: PIL decodes a 224 px crop in ~4 ms, so 8 processes feed
#: ~2,000 img/s per GPU; more only add start-up time and shared memory.
MAX_WORKERS_PER_GPU = 8
#: Batches each decoding process keeps ready (DataLoader's prefetch_factor).
PREFETCH = 4


def autocast(device: torch.device, precision: str):
    """The autocast context of ``precision`` on ``device``; for fp32 on CUDA, IEEE fp32 (no TF32)."""
    dtype = AUTOCAST_DTYPES.get(precision)
    if dtype is None:
        return exact_fp32() if device.type == "cuda" else contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@contextlib.contextmanager
def exact_fp32():
    """TF32 off for cuDNN convolutions and CUDA matrix products while inside, restored after.

    PyTorch lets cuDNN convolutions use TF32 (10-bit mantissa) on Ampere and later GPUs by default:
    on an H200, fp32 features of resnet18 differed from the CPU's by up to 2e-3 (relative 0.8),
    against ~1e-6 with TF32 off. ``precision="fp32"`` means fp32; bf16 is the fast choice.
    """
    conv, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, matmul


@contextlib.contextmanager
def cudnn_autotuning(device: torch.device):
    """cuDNN autotuning on CUDA while inside (one input shape per run: the fastest algorithm is
    timed once and kept), the caller's setting restored after."""
    before = torch.backends.cudnn.benchmark
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def is_cuda(device: str | torch.device) -> bool:
    """True for ``cuda``, ``cuda:N`` and ``torch.device("cuda", N)``."""
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return str(device).split(":")[0] == "cuda"


def resolve_device(device: str | torch.device) -> torch.device:
    """The torch device for a ``device`` option: ``auto`` (CUDA, else MPS, else the CPU), ``cpu``,
    ``cuda``, ``cuda:N``, ``mps`` or ``meta`` (device-placement tests)."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"The 'device' option must be auto, cpu, cuda, cuda:N or mps. Got {device!r}.") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"Device '{device}' was asked for but CUDA is not available. Use device='cpu'.")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"Device '{device}' does not exist: this process sees {torch.cuda.device_count()} "
                              f"GPU(s) (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}).")
    return dev


def local_cuda_device(local_rank: int) -> torch.device:
    """The GPU of local rank ``local_rank``: ``cuda:(local_rank % visible GPUs)``, so that a
    scheduler giving each task its own ``CUDA_VISIBLE_DEVICES`` (one visible GPU) works too."""
    n = torch.cuda.device_count()
    if n < 1:
        raise ConfigError("CUDA was asked for but this process sees no GPU. Use device='cpu'.")
    return torch.device("cuda", local_rank % n)


def cpu_has_fast_bf16() -> bool:
    """True on CPUs with native bf16 math (AVX512-BF16 or AMX). Elsewhere bf16 autocast is
    emulated and was measured 18-30x slower than fp32 (BENCHMARKS.md)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cuda_has_bf16(device: torch.device) -> bool:
    """True on GPUs with native bf16 (compute capability 8.0+, Ampere and later)."""
    major, _ = torch.cuda.get_device_capability(device)
    return major >= 8


def default_batch_size(device: torch.device) -> int:
    """Images per forward pass when none is given: 8 on a CPU (small batches stay in cache), 64 on a GPU."""
    return 8 if device.type == "cpu" else 64


def resolve_compute(device: str | torch.device, precision: str,
                    batch_size: int | None) -> tuple[torch.device, str, int]:
    """The machine's choices for an extraction, made once: the device, the autocast precision on
    it and the batch size (each kept where it was given)."""
    resolved = resolve_device(device)
    _, slow = runnable_precision(precision, resolved)
    if slow:  # asked for explicitly: kept (it is in the fingerprint), but say so
        log.warning("precision=%s on %s is slow: %s. precision='auto' picks the fast one.", precision, resolved,
                    slow.split(";")[0])
    return resolved, resolve_precision(precision, resolved), batch_size or default_batch_size(resolved)


def resolve_precision(precision: str, device: torch.device) -> str:
    """The autocast precision for ``device``.

    ``auto``: bf16 on GPUs with native bf16, fp16 on older GPUs; on a CPU bf16 where it has native
    bf16 (AVX512-BF16/AMX: 1.6-1.95x the fp32 forward rate of resnet50 and EfficientNet-Lite0 on
    the AMD EPYC test machine, the same probe accuracy), else fp32 (emulated bf16 ran 18x slower;
    BENCHMARKS.md). An explicit precision is kept.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"The 'precision' option must be one of {', '.join(PRECISIONS)}. Got {precision!r}.")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if cuda_has_bf16(device) else "fp16"
    if device.type == "cpu" and cpu_has_fast_bf16():
        return "bf16"
    return "fp32"


def runnable_precision(precision: str, device: torch.device) -> tuple[str, str | None]:
    """The precision to run a recorded ``precision`` at on ``device``, and why it differs.

    A cache made on a GPU records bf16 or fp16; on a CPU without native bf16, bf16 autocast is
    emulated (18-30x slower) and CPU fp16 autocast is slower still, so prediction runs in fp32
    there: its features then differ from the cached ones by rounding only.
    """
    if precision == "auto":
        return resolve_precision(precision, device), None
    if device.type == "cpu" and precision == "fp16":
        return "fp32", "fp16 autocast is slow on a CPU; running in fp32 (features differ by rounding only)"
    if device.type == "cpu" and precision == "bf16" and not cpu_has_fast_bf16():
        return "fp32", ("this CPU has no native bf16 (emulated bf16 runs 18-30x slower); running in fp32 "
                        "(features differ by rounding only)")
    if device.type == "cuda" and precision == "bf16" and not cuda_has_bf16(device):
        return "fp16", "this GPU has no native bf16; running in fp16"
    return precision, None


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask (taskset, cgroup cpusets, Slurm), not the
    machine's count that ``os.cpu_count()`` reports."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def local_world_size() -> int:
    """Processes of this job on this machine (torchrun's ``LOCAL_WORLD_SIZE``; 1 outside torchrun)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def cpus_per_local_rank() -> int:
    return max(1, usable_cpus() // local_world_size())


def default_workers(device: torch.device) -> int:
    """Decoding processes: none on a CPU (there the main process decodes each batch with a thread
    per core between forward passes: decode processes beside the forward pass stall its threads,
    64 vs 81 img/s on 2 cores, BENCHMARKS.md); on a GPU this rank's share of the usable CPUs, less
    one for the main process, at most :data:`MAX_WORKERS_PER_GPU`, for files and pre-decoded arrays
    alike (arrays are resized and hashed per sample too: on an H200, resnet50 from 224 px arrays
    ran at 2,725 img/s with 8 processes against 1,175 with 8 main-process threads and 493 with one)."""
    if device.type in ("cpu", "meta"):
        return 0
    return max(1, min(MAX_WORKERS_PER_GPU, cpus_per_local_rank() - 1))


def main_process_decode_threads(device: torch.device, workers: int, *, pre_decoded: bool) -> int:
    """Threads that read, hash and crop samples in the main process (none of it when ``workers``
    processes do). On a CPU: one per forward thread for files, one for arrays (little work, and the
    forward pass needs the cores). On a GPU the cores are free: this rank's share of them, at most
    :data:`MAX_WORKERS_PER_GPU`; with one thread an H200 extracted resnet50 from arrays at 757 img/s
    against a bare forward of 11,600 (sha256 + crop + collate of each sample in one thread)."""
    if workers:
        return 1
    if device.type == "cuda":
        return max(1, min(MAX_WORKERS_PER_GPU, cpus_per_local_rank()))
    return 1 if pre_decoded else torch.get_num_threads()


def decode_settings(device: torch.device, num_workers: int | None, *, pre_decoded: bool,
                    batch_bytes: int) -> tuple[int, int, int | None]:
    """How an extraction decodes on this machine, decided once: ``(worker processes, main-process
    threads, batches each worker keeps ready)`` (the last None without workers)."""
    workers = num_workers if num_workers is not None else default_workers(device)
    threads = main_process_decode_threads(device, workers, pre_decoded=pre_decoded)
    prefetch = prefetch_for_shm(workers, batch_bytes, free=shm_free_bytes()) if workers else None
    return workers, threads, prefetch


def shm_free_bytes(path: str = "/dev/shm") -> int | None:
    """Free bytes of the shared-memory file system DataLoader workers hand batches over in."""
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def prefetch_for_shm(workers: int, batch_bytes: int, *, free: int | None) -> int:
    """Batches each worker may keep ready so that all of them fit in half of ``/dev/shm``.

    Returns :data:`PREFETCH` when there is room. A default Docker container has 64 MB of
    ``/dev/shm``: 8 workers x 4 batches x 64 x 3 x 224 x 224 bytes (~300 MB) end in a bus error.

    Raises
    ------
    ConfigError
        When not even one batch per worker fits.
    """
    if workers == 0 or free is None:
        return PREFETCH
    fits = int(free * 0.5) // max(1, workers * batch_bytes)
    if fits >= PREFETCH:
        return PREFETCH
    if fits >= 1:
        log.warning("/dev/shm has %d MB free: %d decoding processes keep %d batch(es) ready each instead of %d "
                    "(a container started with --shm-size 1g or --ipc=host avoids this)",
                    free >> 20, workers, fits, PREFETCH)
        return fits
    raise ConfigError(
        f"/dev/shm has {free >> 20} MB free, too little for {workers} decoding processes handing over "
        f"batches of {batch_bytes >> 20} MB. Start the container with --shm-size 1g (or --ipc=host), or "
        f"use fewer workers (num_workers=0 decodes in the main process) or a smaller batch_size."
    )


def distributed_backend(device: torch.device) -> str:
    """The torch.distributed backend for ``device``: NCCL when each local rank has a GPU of its own,
    gloo otherwise. NCCL refuses two ranks on one GPU ("Duplicate GPU detected", seen with
    ``torchrun --nproc-per-node 2`` on a one-GPU H200 machine); featcache's collectives carry only
    digests and barriers, which gloo handles as well, so ranks that share a GPU (to add decoding
    processes, say) work too."""
    if device.type != "cuda" or local_world_size() > torch.cuda.device_count():
        return "gloo"
    return "nccl"
