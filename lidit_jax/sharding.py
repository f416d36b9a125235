"""Device mesh from the config and logical -> mesh shardings.

The mesh has axes (data, fsdp, tensor); one entry may be -1 to take the remaining devices. Parameters
carry logical axis names; `config.sharding_rules` maps them to mesh axes.
"""
from __future__ import annotations

import contextlib
import math

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, ...]:
  dims = [int(mesh_cfg[a]) for a in AXES]
  if dims.count(-1) > 1:
    raise ValueError(f"mesh {dict(zip(AXES, dims))}: at most one axis may be -1")
  known = math.prod(d for d in dims if d != -1)
  if -1 in dims:
    if num_devices % known:
      raise ValueError(f"mesh {dict(zip(AXES, dims))}: {num_devices} devices are not divisible by {known}")
    dims[dims.index(-1)] = num_devices // known
  if math.prod(dims) != num_devices:
    raise ValueError(f"mesh {dict(zip(AXES, dims))} needs {math.prod(dims)} devices but {num_devices} are "
                     f"available. Fix: make --config.mesh.data x fsdp x tensor = {num_devices}, or set one to -1.")
  return tuple(dims)


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  """The mesh of the config's `mesh` section. With several slices (`mesh.dcn_data` / `mesh.dcn_fsdp` > 1, multi-slice TPU pods
  joined over the data-center network), each axis is split into an in-slice (ICI) and a cross-slice
  (DCN) factor, so that only the gradient reduction of data / fsdp crosses slices."""
  devices = devices if devices is not None else jax.devices()
  dcn = (int(mesh_cfg.get("dcn_data", 1)), int(mesh_cfg.get("dcn_fsdp", 1)), 1)
  if math.prod(dcn) == 1:
    shape = mesh_shape(mesh_cfg, len(devices))
    return Mesh(np.asarray(devices).reshape(shape), AXES)
  slices = {getattr(d, "slice_index", None) for d in devices}
  if None in slices or len(slices) != math.prod(dcn):
    raise ValueError(f"mesh.dcn_data x dcn_fsdp = {math.prod(dcn)} slices, but the devices come from "
                     f"{'no multi-slice set-up' if None in slices else f'{len(slices)} slice(s)'}. Fix: set them to "
                     "the number of slices of the pod (or 1).")
  ici = mesh_shape(mesh_cfg, len(devices) // math.prod(dcn))  # the config's axes describe one slice
  return Mesh(mesh_utils.create_hybrid_device_mesh(ici, dcn, devices), AXES)


def rules(pairs) -> tuple:
  """`config.sharding_rules` ([logical name, mesh axes] pairs, lists after a JSON round trip) as flax wants them."""
  return tuple((name, tuple(v) if isinstance(v, list) else v) for name, v in pairs)


def logical_shardings(abstract_tree, mesh: Mesh, rules: tuple):
  """NamedShardings for a tree of (possibly boxed) abstract values, fitted to their shapes (`fit_spec`);
  unannotated leaves are replicated."""
  # optax's MaskedNode (a frozen parameter's empty optimizer state, still in its box) holds no array: it gets
  # no sharding. It is an empty tuple, which flax's own mapping would take for a logical spec: map specs only.
  is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)
  tree = jax.tree.map(lambda x: x.value if is_box(x) and not jax.tree.leaves(x.value) else x, abstract_tree,
                      is_leaf=is_box)
  specs, treedef = jax.tree.flatten(nn.get_partition_spec(tree), is_leaf=lambda x: isinstance(x, P))
  values = jax.tree.leaves(tree, is_leaf=is_box)
  shape = lambda v: (v.value if is_box(v) else v).shape
  return treedef.unflatten([NamedSharding(mesh, fit_spec(shape(v), nn.logical_to_mesh_axes(spec, rules), mesh.shape))
                            for spec, v in zip(specs, values, strict=True)])


def axis_names(boxed_tree) -> dict[tuple, tuple]:
  """{path of dict keys: logical axis names} of a tree of logically partitioned values (a model's `init`)."""
  leaves = jax.tree_util.tree_flatten_with_path(boxed_tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))[0]
  return {tuple(k.key for k in p): tuple(leaf.names) for p, leaf in leaves}


def device_batch(batch: dict, mesh) -> dict:
  """A per-process numpy batch's "image" and "text" -> global arrays split over (data, fsdp)."""
  arrays = {"image": batch["image"], "text": batch["text"]}
  sh = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sh, np.asarray(x)), arrays)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def compile_only(mesh: Mesh) -> bool:
  """Whether the mesh's devices exist only for the compiler (`jax.experimental.topologies`: a TPU slice described
  on a machine without one): nothing can be placed on them."""
  return getattr(mesh.devices.flat[0].client, "runtime_type", "") == "compile_only_runtime"


@contextlib.contextmanager
def active(mesh: Mesh, rules: tuple):
  """Mesh + logical `rules` in scope, for tracing and running sharded functions. A compile-only mesh is put in
  scope abstractly: under `jax.set_mesh` eager values (`jax.random.key(0)`) would be placed on its devices."""
  scope = jax.sharding.use_abstract_mesh(mesh.abstract_mesh) if compile_only(mesh) else jax.set_mesh(mesh)
  with scope, nn.logical_axis_rules(rules):
    yield


def fit_spec(shape, spec: P, mesh_shape) -> P:
  """`spec` for an array of `shape` with every dimension evenly divided by its mesh axes (`mesh_shape`: {axis:
  size}, e.g. `mesh.shape`): a mesh axis that does not divide its dimension (an attention kernel's 1152 over
  fsdp=256) joins the largest other dimension it divides (with the axes there), else that dimension is replicated
  (a vocabulary of 50257 over 4 devices)."""
  spec = [(a,) if isinstance(a, str) else tuple(a or ()) for a in tuple(spec) + (None,) * (len(shape) - len(spec))]
  size = lambda names: math.prod(mesh_shape[a] for a in names)
  homeless = []
  for i, dim in enumerate(shape):
    if spec[i] and dim % size(spec[i]):
      homeless.extend(a for a in spec[i] if mesh_shape[a] > 1)
      spec[i] = tuple(a for a in spec[i] if mesh_shape[a] == 1)
  for name in homeless:
    fits = [i for i, dim in enumerate(shape) if dim > 1 and dim % (size(spec[i]) * mesh_shape[name]) == 0]
    if fits:  # prefer a dimension no real axis splits yet, then the largest
      i = max(fits, key=lambda i: (size(spec[i]) == 1, shape[i]))
      spec[i] = spec[i] + (name,)
  return P(*[None if not a else a[0] if len(a) == 1 else a for a in spec])


def fit_to_shapes(abstract_tree, mesh: Mesh, rule_pairs) -> "pytree of NamedSharding":
  """Shardings from logical axes, fitted to the shapes (`fit_spec`), so that any checkpoint loads on any mesh."""
  specs = nn.get_partition_spec(abstract_tree)
  shardings = nn.logical_to_mesh_sharding(specs, mesh, rule_pairs)

  def fit(value, sh):
    shape = value.value.shape if isinstance(value, nn.meta.AxisMetadata) else value.shape
    return NamedSharding(mesh, fit_spec(shape, sh.spec, mesh.shape))

  return jax.tree.map(fit, abstract_tree, shardings, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
