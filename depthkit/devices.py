"""The `--device` option of every command: one reading of "auto", "cpu", "cuda", "cuda:1".

Commands choose the device (models never do: they follow the weights they are given).
"""

from __future__ import annotations


def torch_device(spec: str, *, local_rank: int | None = None):
    """`--device` as a `torch.device`: "auto" (CUDA when available), "cpu", "cuda", "cuda:1", ...; with `local_rank`
    (a process of a multi-GPU job), plain "cuda" (or "auto" on a CUDA machine) means that rank's GPU.

    Raises:
        ValueError: not a device name, a CUDA device on a machine without CUDA, or a rank without its GPU.
    """
    import torch

    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ValueError(f"--device {spec!r} is not a torch device (auto, cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {spec}: CUDA is not available")
    if device.type == "cuda" and device.index is None and local_rank is not None:
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"local rank {local_rank} needs cuda:{local_rank}, but {torch.cuda.device_count()} GPU(s)")
        device = torch.device("cuda", local_rank)
    return device


def uses_cuda(spec: str) -> bool:
    """Whether `--device spec` runs on CUDA (without checking that it can)."""
    import torch

    return spec.startswith("cuda") or (spec == "auto" and torch.cuda.is_available())
