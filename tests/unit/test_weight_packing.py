"""Weights travel as numpy byte arrays (zero-copy through the object store): the round trip is
exact for every dtype and shape a policy state dict holds, and the tensors view the buffer."""

from __future__ import annotations

import numpy as np
import torch

from services.rollout.weights import pack_state, unpack_state


def test_pack_unpack_is_exact_and_shares_memory():
    g = torch.Generator().manual_seed(0)
    state = {"bf16": torch.randn(3, 5, generator=g).to(torch.bfloat16),
             "f32": torch.randn(7, generator=g), "f16": torch.randn(2, 2, 2, generator=g).half(),
             "i64": torch.arange(6).view(2, 3), "bool": torch.tensor([True, False, True]),
             "scalar": torch.tensor(3.5), "empty": torch.zeros(0, 4),
             "strided": torch.randn(4, 6, generator=g).t()}  # not contiguous
    packed = pack_state(state)
    for data, _, _ in packed.values():
        assert isinstance(data, np.ndarray) and data.dtype == np.uint8
        data.flags.writeable = False  # what ray.get hands back: read-only shared memory
    out = unpack_state(packed)
    assert out.keys() == state.keys()
    for k, v in state.items():
        assert out[k].dtype == v.dtype and out[k].shape == v.shape and torch.equal(out[k], v), k
    # a view, not a copy: the tensor's storage is the packed buffer
    assert out["f32"].data_ptr() == packed["f32"][0].ctypes.data
    # and loading it into a model copies the values in
    lin = torch.nn.Linear(7, 1)
    lin.load_state_dict({"weight": unpack_state(pack_state({"w": torch.ones(1, 7)}))["w"], "bias": out["scalar"].view(1)})
    assert torch.equal(lin.weight, torch.ones(1, 7)) and float(lin.bias) == 3.5
