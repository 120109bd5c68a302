"""Mesh construction and logical-axis rules: the one place parameters meet mesh axes.

Parameters carry logical axis names (`logical_axes` metadata on nnx.Param). `rules` lists
(logical name, mesh axis) pairs in priority order; each parameter gets, per mesh axis, the first
rule whose dimension is divisible by that mesh axis (uneven shards are not allowed), others are
replicated. Batches are split over every mesh axis on their leading dimension.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from dnd_jax.errors import DndError


def make_mesh(shape: Sequence[int], names: Sequence[str], devices=None) -> Mesh:
    """Builds a mesh; one -1 in `shape` takes all remaining devices.

    Args:
      shape: axis sizes, e.g. (-1, 1) for pure data parallelism, (4, 2) for data x fsdp.
      names: axis names, e.g. ("data", "fsdp").
      devices: devices to use (default: all).
    """
    devices = list(devices if devices is not None else jax.devices())
    shape = list(shape)
    if len(shape) != len(names):
        raise DndError(f"config field mesh: shape {shape} and axes {list(names)} differ in length")
    if shape.count(-1) > 1:
        raise DndError(f"config field mesh.shape {shape}: at most one -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if len(devices) % known:
            raise DndError(f"config field mesh.shape {shape}: {len(devices)} devices are not divisible by {known}")
        shape[shape.index(-1)] = len(devices) // known
    if math.prod(shape) != len(devices):
        raise DndError(f"config field mesh.shape {shape} needs {math.prod(shape)} devices, {len(devices)} available")
    return jax.make_mesh(tuple(shape), tuple(names), axis_types=(AxisType.Auto,) * len(shape), devices=devices)


def spec_for(shape: Sequence[int], logical: Sequence[str] | None, mesh: Mesh, rules) -> PartitionSpec:
    """PartitionSpec of one array from its logical axis names (see module docstring)."""
    spec: list = [None] * len(shape)
    if logical:
        used = set()
        for name, axis in rules:
            size = mesh.shape.get(axis, 1)
            if axis in used or size == 1:
                continue
            for d, lname in enumerate(logical):
                if lname == name and spec[d] is None and shape[d] % size == 0:
                    spec[d], _ = axis, used.add(axis)
                    break
    return PartitionSpec(*spec)


def param_specs(state: nnx.State, mesh: Mesh, rules) -> nnx.State:
    """Maps an nnx.State of Params to PartitionSpecs (same tree, Variables unwrapped)."""

    def f(v):
        return spec_for(v.shape, v.get_metadata("logical_axes", None), mesh, rules)

    return jax.tree.map(f, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over all mesh axes."""
    return NamedSharding(mesh, PartitionSpec(tuple(mesh.axis_names)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
