"""Which device a model runs on inside (or outside) a Spark task."""
from __future__ import annotations

import os


def _task_context():
    try:
        from pyspark import TaskContext
    except ImportError:
        return None
    return TaskContext.get()


def in_spark_task() -> bool:
    return _task_context() is not None


def task_gpu_addresses() -> list[str]:
    """GPU addresses Spark assigned to the running task; empty outside a task or without GPUs."""
    tc = _task_context()
    if tc is None:
        return []
    gpu = tc.resources().get("gpu")
    return list(gpu.addresses) if gpu is not None else []


def pick_device(prefer: str | None = None) -> str:
    """`prefer` ("cpu", "cuda", "cuda:1") wins when given; else the task's GPU, cuda:0, or cpu.

    Spark hands each GPU task the physical address of its GPU; using it (rather than cuda:0)
    is what keeps two tasks on a multi-GPU executor from sharing one card.
    """
    import torch

    if prefer:
        if prefer.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"device {prefer!r} requested but CUDA is not available")
        return prefer
    index = task_cuda_index()
    if index is not None and torch.cuda.is_available():
        return f"cuda:{index}"
    if torch.cuda.is_available():
        return "cuda:0"
    # A CPU task owns spark.task.cpus cores, and its sibling tasks run in other Python workers
    # on the same machine: torch's default (every core) oversubscribes them all.
    tc = _task_context()
    if tc is not None:
        torch.set_num_threads(max(1, tc.cpus()))
    return "cpu"


def task_device_label() -> str:
    """Where a model in the running task computes, as `runs` records it: pick_device's answer, and
    the GPU Spark assigned the task when it did ("cuda:1 (Spark GPU 3)")."""
    device = pick_device()
    addresses = task_gpu_addresses()
    return f"{device} (Spark GPU {addresses[0]})" if addresses else device


def task_cuda_index() -> int | None:
    """The CUDA device index (torch's and FAISS's numbering) of the running task's GPU; None
    outside a task or without GPUs. The one mapping every GPU user goes through."""
    addresses = task_gpu_addresses()
    return cuda_index(addresses[0], os.environ.get("CUDA_VISIBLE_DEVICES")) if addresses else None


def cuda_index(address: str, visible: str | None) -> int:
    """Spark's GPU address (a physical index from the discovery script) -> torch's device index.

    When CUDA_VISIBLE_DEVICES narrows what the process sees, torch renumbers the visible GPUs
    from 0, so physical GPU 3 under CUDA_VISIBLE_DEVICES=2,3 is cuda:1.
    """
    if visible:
        ids = [v.strip() for v in visible.split(",")]
        if address in ids:
            return ids.index(address)
    return int(address)
