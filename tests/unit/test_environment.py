"""Guards for the CPU environment."""

import importlib.util


def test_torchvision_absent():
    # The registry's torchvision is a CUDA build: with CPU torch it breaks transformers' image
    # processors (MACHINE-NOTES). The PIL path we use must stay the only one.
    assert importlib.util.find_spec("torchvision") is None


def test_gpu_extra_absent_in_cpu_env():
    assert importlib.util.find_spec("vllm") is None and importlib.util.find_spec("sglang") is None
