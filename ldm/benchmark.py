"""Timing and peak-memory measurement for the bench/ scripts (ratios against a baseline, one process)."""
import ctypes
import gc
import os
import statistics
import threading
import time

import torch


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns, device, iters=10, warmup=2):
    """Median seconds per call of each function in ``fns`` (a dict), calls interleaved so that
    machine noise hits every candidate alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def _return_freed_memory_to_os():
    """Make glibc mmap every block over 64 KiB and release the free heap, so that memory a tensor
    uses shows in the resident set and leaves it when freed (glibc's default keeps freed memory for
    reuse, which would hide it). Slows allocation, so call it after timing."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
    libc.malloc_trim(0)


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory(fn, device, repeats=3, interval=0.0005):
    """Peak bytes allocated during ``fn()`` above what was allocated before it.

    CUDA uses the caching allocator's statistics. On the CPU, a thread samples the process's resident
    memory every ``interval`` seconds (tensors of any size are mmapped and returned on free, so this
    follows tensor memory; Linux only). Returns the median of ``repeats`` measurements.
    """
    return statistics.median(_peak_memory_once(fn, device, interval) for _ in range(repeats))


def _peak_memory_once(fn, device, interval):
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    gc.collect()
    _return_freed_memory_to_os()
    base = peak = _rss_bytes()
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss_bytes())
            time.sleep(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        fn()
    finally:
        done.set()
        sampler.join()
    return max(peak, _rss_bytes()) - base
