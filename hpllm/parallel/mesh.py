"""The device mesh a `MeshConfig` describes.

Axes, outermost first: data, stage, fsdp, expert, tensor (`hpllm.config.MESH_AXES`). Tensor
parallelism talks twice per layer, so its devices are neighbours (innermost); data parallelism
talks once per step and may span hosts (outermost). Every axis is always present, size 1 when
unused, so the sharding rules can name any of them on any mesh.

The mesh is a GSPMD ("auto") mesh: shardings are annotations and XLA inserts the collectives.
(`jax.make_mesh` alone would default to explicit axis types in current JAX.)
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from hpllm.config import MESH_AXES, ConfigError, MeshConfig


def resolve_shape(mesh_config: MeshConfig, n_devices: int) -> dict[str, int]:
    """Axis sizes with -1 replaced by the devices the other axes leave; they must use all
    `n_devices` exactly."""
    mesh_config.validate()
    sizes = {name: getattr(mesh_config, name) for name in MESH_AXES}
    known = math.prod(v for v in sizes.values() if v != -1)
    described = ",".join(f"{k}={v}" for k, v in sizes.items() if v != 1) or "one device"
    if -1 in sizes.values():
        if n_devices % known:
            raise ConfigError(f"mesh {described}: {n_devices} devices are not divisible by "
                              f"the other axes' {known}")
        sizes = {k: (n_devices // known if v == -1 else v) for k, v in sizes.items()}
    elif known != n_devices:
        raise ConfigError(f"mesh {described} needs {known} devices, have {n_devices}")
    return sizes


def make_mesh(mesh_config: MeshConfig, devices=None) -> Mesh:
    """A Mesh with axes MESH_AXES over `devices`, which it must use exactly. By default:
    all devices of all processes when an axis is -1, else the first data*fsdp*... of them
    (so the default MeshConfig is one device on any machine)."""
    if devices is None:
        devices = jax.devices()
        sizes = [getattr(mesh_config, name) for name in MESH_AXES]
        if -1 not in sizes:
            mesh_config.validate()
            if math.prod(sizes) > len(devices):
                resolve_shape(mesh_config, len(devices))  # raises: too few devices
            devices = devices[:math.prod(sizes)]
    devices = list(devices)
    sizes = resolve_shape(mesh_config, len(devices))
    shape = tuple(sizes[name] for name in MESH_AXES)
    auto = (AxisType.Auto,) * len(MESH_AXES)
    try:  # device order that follows the physical topology on TPU/GPU slices
        return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)
    except (ValueError, NotImplementedError):  # e.g. a subset jax cannot lay out: as given
        return Mesh(np.asarray(devices, dtype=object).reshape(shape), MESH_AXES,
                    axis_types=auto)


def describe(mesh: Mesh) -> str:
    """'data=2,fsdp=4' (axes of size 1 left out), or '1 device'."""
    text = ",".join(f"{k}={v}" for k, v in mesh.shape.items() if v > 1)
    return text or "1 device"
