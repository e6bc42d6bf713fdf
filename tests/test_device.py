"""concrete_device: one spelling per device, as the tensors made there report it."""

import pytest
import torch

from pipelines.device import concrete_device


def test_cpu_spellings_are_the_device_cpu_tensors_report():
    assert concrete_device("cpu:0") == concrete_device(torch.device("cpu")) == torch.empty(0).device


@pytest.mark.cuda
def test_cuda_without_an_index_is_the_current_gpu_as_its_tensors_report_it():
    assert concrete_device("cuda") == torch.empty(0, device="cuda").device
    assert concrete_device("cuda:0") == torch.device("cuda", 0)
