"""Seconds per call of a function on the CPU or a GPU: the one timing helper of the benchmarks in this folder."""

import time

import torch


def time_it(fn, device, reps, warmup=2):
    """Mean seconds of `reps` calls of fn() after `warmup` untimed ones (kernels, autotuning, compilation); on a
    GPU the clock stops only when the queued work is done."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps
