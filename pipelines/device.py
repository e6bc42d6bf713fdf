"""One spelling of a device, so that device checks compare like with like.

`torch.device("cuda")` names "the current GPU" without an index, while every tensor made there reports
`cuda:<index>`; `torch.device("cuda") != torch.device("cuda:0")`, so a check of a tensor's device against
a user's "cuda" fails although both are the same GPU. Constructors that check devices store
`concrete_device(device)` instead.
"""

from __future__ import annotations

import torch


def concrete_device(device: torch.device | str) -> torch.device:
    """`device` as its tensors report it: "cuda" -> cuda:<current index>, "cpu:0" -> cpu."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    if device.type == "cpu":
        return torch.device("cpu")
    return device
