"""`--device` for every command (`depthkit.devices`), a multi-GPU job's ranks included (CUDA faked: no GPU here)."""

import pytest
import torch

from depthkit.devices import torch_device, uses_cuda


def test_each_rank_takes_its_own_gpu_and_bad_devices_are_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert torch_device("cuda", local_rank=1) == torch.device("cuda", 1)
    assert torch_device("auto", local_rank=0) == torch.device("cuda", 0)
    assert torch_device("cuda:1", local_rank=0) == torch.device("cuda", 1)  # a named GPU stays named
    assert torch_device("cuda") == torch.device("cuda") and uses_cuda("auto")
    with pytest.raises(ValueError, match="local rank 2 needs cuda:2, but 2 GPU"):
        torch_device("cuda", local_rank=2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert torch_device("auto", local_rank=3) == torch.device("cpu") and not uses_cuda("auto")
    with pytest.raises(ValueError, match="--device cuda: CUDA is not available"):
        torch_device("cuda")
    with pytest.raises(ValueError, match="--device 'gpu0' is not a torch device"):
        torch_device("gpu0")
