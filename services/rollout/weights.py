"""Versioned policy weights in the Ray object store: the trainer publishes, rollout replicas pull.

Pull by version (docs/design.md, "Weight sync"): the trainer puts one CPU state dict in the object store
and records (version, ref) in a named actor; a replica that needs version >= v asks the actor for
the latest and loads it. Publishing therefore never depends on how many replicas exist, and a
replica that starts later (autoscaling, restart) finds the latest version on its own.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import numpy as np
import ray
import torch

WEIGHT_STORE_NAME = "deepeyes_weight_store"
# Serve replicas live in Serve's namespace and a driver in its own (anonymous unless set), so both
# sides name one namespace for the store; pass another to run several trainings on one cluster.
WEIGHT_STORE_NAMESPACE = "deepeyes"
_STORES: dict[str, Any] = {}  # handles this process created (keeps the non-detached actor alive)


@ray.remote(num_cpus=0)
class WeightStore:
    """The latest published policy version and a reference to its CPU state dict.

    Invariant: versions only grow; `latest()` always returns a version together with the ref that
    was published with it. The ref travels inside a list so Ray hands it over unresolved (the
    actor never holds the tensors in its own heap, only the reference that keeps them alive).
    """

    def __init__(self) -> None:
        self._version = 0
        self._refs: list[ray.ObjectRef] = []

    def publish(self, version: int, state_ref_list: list[ray.ObjectRef]) -> None:
        if version <= self._version:
            raise ValueError(f"weight version {version} is not newer than the published {self._version}; "
                             f"publish increasing versions")
        self._version = int(version)
        self._refs = list(state_ref_list)

    def latest(self) -> tuple[int, list[ray.ObjectRef]]:
        return self._version, self._refs

    def version(self) -> int:
        return self._version


def get_or_create_weight_store(namespace: str = WEIGHT_STORE_NAMESPACE) -> Any:
    """The named store of this namespace, created on first use.

    Not detached: it lives as long as the job that created it (the driver), like the weights.
    A non-detached actor dies when its creator drops the last handle, so the creating process
    keeps one here.
    """
    if namespace not in _STORES:
        _STORES[namespace] = WeightStore.options(name=WEIGHT_STORE_NAME, namespace=namespace,
                                                 get_if_exists=True, lifetime=None).remote()
    return _STORES[namespace]


def get_weight_store(namespace: str = WEIGHT_STORE_NAMESPACE) -> Any | None:
    """The store if someone created it, else None (replicas never create it)."""
    try:
        return ray.get_actor(WEIGHT_STORE_NAME, namespace=namespace)
    except ValueError:
        return None


def pack_state(state_dict: dict[str, torch.Tensor]) -> dict[str, tuple[np.ndarray, str, tuple[int, ...]]]:
    """A state dict as numpy byte arrays (name -> (bytes, dtype name, shape)), no copy on CPU.

    Ray stores numpy buffers out of band and `ray.get` maps them read-only from shared memory
    without a copy; a torch tensor is pickled instead, which cost a copy on each side (measured:
    publish + fetch 27x an in-memory copy of the same bytes).
    """
    packed = {}
    for k, v in state_dict.items():
        t = v.detach().to("cpu").contiguous()
        packed[k] = (t.view(-1).view(torch.uint8).numpy(), str(t.dtype).removeprefix("torch."), tuple(t.shape))
    return packed


def unpack_state(packed: dict[str, tuple[np.ndarray, str, tuple[int, ...]]]) -> dict[str, torch.Tensor]:
    """`pack_state`'s output (as `ray.get` returns it) -> tensors viewing the same memory.

    The tensors are read-only views of the object store's buffer: load them into a model (a copy),
    never write to them.
    """
    out = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for k, (data, dtype, shape) in packed.items():
            if data.size == 0:  # numpy gives an empty array stride 0, which torch will not reinterpret
                out[k] = torch.empty(shape, dtype=getattr(torch, dtype))
                continue
            out[k] = torch.from_numpy(data).view(getattr(torch, dtype)).view(shape)
    return out


def fetch_weights(ref: ray.ObjectRef, timeout_s: float | None = None) -> dict[str, torch.Tensor]:
    """The published state dict behind `ref` (from `WeightStore.latest`), zero-copy."""
    return unpack_state(ray.get(ref, timeout=timeout_s))


def publish_weights(state_dict: dict[str, torch.Tensor], version: int, namespace: str = WEIGHT_STORE_NAMESPACE,
                    timeout_s: float = 120.0) -> float:
    """Put the state dict in the object store once (one copy, `pack_state`) and record it;
    returns seconds. Replicas read it with `fetch_weights` / `unpack_state`."""
    t0 = time.perf_counter()
    ref = ray.put(pack_state(state_dict))
    store = get_or_create_weight_store(namespace)
    ray.get(store.publish.remote(version, [ref]), timeout=timeout_s)
    return time.perf_counter() - t0
