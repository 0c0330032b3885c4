"""The runtime layer: the device mesh, global arrays, host gathers, and the network built from a config.

Everything above the network and below the training loop, the samplers' callers
and evaluation goes through this module, so there is one of each:

* `make_mesh(config)`: one `Mesh` over every device of every process, axis
  `DATA_AXIS` ('data'), devices grouped by process so that process p owns the
  contiguous rows [p·B/P, (p+1)·B/P) of every global batch. A config may name
  more axes later (`mesh.axes`); today only the data axis exists.
* `topology_devices(slice_name, num_slices)`: the devices of a Cloud TPU slice
  (`v5e-8`, `v4-32`, ...) that is not there, for compiling ahead of time on
  any host with libtpu installed (`diffusion_jax.plan`); `make_mesh(devices=)`
  lays them out as it lays out real ones.
* `batch_sharding(mesh)` / `replicated(mesh)`: the two shardings in use.
* `global_array(local, mesh)`: a process's contiguous part of a batch (any
  pytree of NumPy arrays) → global `jax.Array`s sharded over the data axis.
* `prefetch(iterator, mesh, size=2)`: double-buffered global batches, put on
  the devices while the previous step runs; its `get_state()` is the position
  of the first batch not yet handed out, so checkpoints stay exact.
* `to_host(x)`: a (possibly multi-process) array gathered to a NumPy array.
* `build(config) -> (network, diffusion)` and `model_fn(network)`: the one
  function through which every caller runs the network,
  `model_fn(params, x_t, t, *, cond=None, train=False, rng=None)`.
* `bind(fn, params)`: that function with parameters as a pytree argument
  (`jax.tree_util.Partial`), the form the samplers take, so new parameters
  never recompile a sampling loop.
* `atomic_write(path, data)`: write-to-temporary-then-rename, for every file
  the library writes that a reader must never see half-written.
* `import_tensorflow()`: TensorFlow, imported on demand only and kept off the
  accelerators that JAX uses.
* `enable_compilation_cache()`: the persistent JAX compilation cache every
  entry point turns on (in the user's cache directory, unless configured).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
import re
import sys
import warnings
from collections.abc import Callable
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from diffusion_jax import diffusion as diffusion_lib
from diffusion_jax import errors
from diffusion_jax.models import unet

DATA_AXIS = "data"
AXES = (DATA_AXIS,)

ModelFn = Callable[..., jax.Array]


# ----------------------------------------------------------------------------
# The mesh and shardings.
# ----------------------------------------------------------------------------


@functools.cache
def _mesh(devices: tuple[Any, ...]) -> Mesh:
  return Mesh(np.asarray(devices), AXES)


def make_mesh(config: ml_collections.ConfigDict | None = None, devices=None) -> Mesh:
  """The device mesh: one 'data' axis over `devices` (default: every device of every process).

  Devices are ordered by (process, id), so each process holds a contiguous
  block of the data axis. The same devices always give the same `Mesh` object
  (compiled functions keyed by mesh are reused).

  Args:
    config: the run config (reserved for meshes with more axes; today every
      config gives the data-parallel mesh).
    devices: the devices to use (default `jax.devices()`).
  """
  del config  # One data axis today; a model axis would be read from the config here.
  devices = jax.devices() if devices is None else devices
  return _mesh(tuple(sorted(devices, key=lambda d: (d.process_index, d.id))))


@dataclasses.dataclass(frozen=True)
class TpuSlice:
  """A Cloud TPU slice by its accelerator-type name, as libtpu's topology descriptions take it.

  Attributes:
    name: the Cloud TPU name, e.g. "v5e-8", "v3-8", "v4-32".
    generation: v2, v3, v4, v5e, v5p or v6e.
    topology: libtpu's topology name, e.g. "v5e:2x4", "v4:2x2x4".
    chip_config: "megacore" where one JAX device spans a chip's two TensorCores (v4, v5p), else "default".
    chips_per_host_bounds: the chips of one host along each axis (its product: chips per host).
    chips: chips in the slice.
    devices: JAX devices in the slice (one per core on v2/v3, one per chip elsewhere).
    hosts: TPU VM hosts of the slice (JAX processes).
  """

  name: str
  generation: str
  topology: str
  chip_config: str
  chips_per_host_bounds: tuple[int, int, int]
  chips: int
  devices: int
  hosts: int


# Chips of a slice -> its shape: 2-D tori (v2, v3, v5e, v6e) and 3-D ones (v4, v5p), as Cloud TPU lays them out.
_SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}
_SHAPES_2D.update({512: (16, 32), 1024: (32, 32)})
_SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8)}
_SHAPES_3D.update({256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16), 2048: (8, 16, 16), 4096: (16, 16, 16)})
# The number in a Cloud TPU name counts TensorCores on v2, v3, v4 and v5p (two per chip) and chips on v5e and v6e.
_CORES_PER_CHIP_IN_NAME = {"v2": 2, "v3": 2, "v4": 2, "v5p": 2, "v5e": 1, "v6e": 1}
_TOPOLOGY_PREFIX = {"v2": "v2", "v3": "v3", "v4": "v4", "v5p": "v5p", "v5e": "v5e", "v6e": "v6e"}
_NAME_ALIASES = {"v5litepod": "v5e", "v6litepod": "v6e"}


def tpu_slice(name: str) -> TpuSlice:
  """The slice named `name` as Cloud TPU names accelerator types: "v3-8", "v4-8", "v5e-8" (or "v5litepod-8"),
  "v5p-8", "v6e-8", and multi-host ones ("v4-32", "v5e-16", ...)."""
  match = re.fullmatch(r"\s*(v\d+[a-z]*|v5litepod|v6litepod)-(\d+)\s*", str(name).lower())
  generation = match and _NAME_ALIASES.get(match.group(1), match.group(1))
  if not match or generation not in _CORES_PER_CHIP_IN_NAME:
    raise errors.UserError(
      f"Unknown TPU slice {name!r}: name it as Cloud TPU does, <generation>-<size> with a generation among "
      f"{', '.join(_CORES_PER_CHIP_IN_NAME)} (e.g. v3-8, v4-8, v5e-8, v5p-8, v6e-8, v4-32, v5e-16)."
    )
  size = int(match.group(2))
  per_chip = _CORES_PER_CHIP_IN_NAME[generation]
  chips = size // per_chip
  three_d = generation in ("v4", "v5p")
  shapes = _SHAPES_3D if three_d else _SHAPES_2D
  if size % per_chip or chips not in shapes:
    sizes = ", ".join(f"{generation}-{c * per_chip}" for c in sorted(shapes))
    raise errors.UserError(f"There is no TPU slice {name!r}; the {generation} slices are {sizes}.")
  shape = shapes[chips]
  if three_d or generation in ("v2", "v3") or chips > 8:
    host = (2, 2, 1) if chips >= 4 else (*shape[:2], 1) if len(shape) == 2 else shape
  else:  # v5e and v6e: one host holds up to 8 chips (the -8 slices are single-host 2x4)
    host = (*shape, 1)
  hosts = chips // (host[0] * host[1] * host[2])
  return TpuSlice(
    name=f"{generation}-{size}",
    generation=generation,
    topology=f"{_TOPOLOGY_PREFIX[generation]}:{'x'.join(map(str, shape))}",
    chip_config="megacore" if three_d else "default",
    chips_per_host_bounds=host,
    chips=chips,
    devices=chips * (2 if generation in ("v2", "v3") else 1),
    hosts=hosts,
  )


def libtpu_installed() -> bool:
  """Whether libtpu (`jax[tpu]`) is installed; looks for the package without importing it."""
  import importlib.util  # pylint: disable=g-import-not-at-top

  return importlib.util.find_spec("libtpu") is not None


def topology_devices(slice_name: str, num_slices: int = 1) -> list[Any]:
  """The devices of `num_slices` TPU slices named `slice_name`, for ahead-of-time compilation only.

  libtpu describes the topology, so this works on any host where `jax[tpu]` is
  installed, with or without a TPU; the devices can be laid out in a mesh
  (`make_mesh(devices=...)`) and compiled for, never run on.

  Raises:
    MissingPackageError: libtpu is not installed.
  """
  spec = tpu_slice(slice_name)
  if num_slices < 1:
    raise errors.UserError(f"num_slices must be at least 1, got {num_slices}.")
  if not libtpu_installed():
    raise errors.MissingPackageError(
      f'Compiling for a TPU needs libtpu, which is not installed here: pip install "jax[tpu]=={jax.__version__}".'
    )
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

  desc = topologies.get_topology_desc(
    platform="tpu",
    topology_name=spec.topology,
    chip_config_name=spec.chip_config,
    chips_per_host_bounds=spec.chips_per_host_bounds,
    num_slices=num_slices,
  )
  return list(desc.devices)


def grid_mesh(mesh: Mesh, rows: int, axes: tuple[str, str]) -> Mesh:
  """`mesh`'s devices, in the same order, as a (rows, D / rows) grid with two named axes.

  Row r holds devices [r·k, (r+1)·k), k = D / rows: an array sharded over
  both axes is laid out as one sharded over `mesh`'s data axis (the per-group
  clipping of `train_step` uses it for groups that span several devices).
  """
  devices = mesh.devices.reshape(-1)
  if devices.size % rows:
    raise errors.UserError(f"{devices.size} devices cannot be laid out in {rows} rows.")
  return Mesh(devices.reshape(rows, devices.size // rows), axes)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Arrays whose leading (batch) axis is split over the data axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """Arrays held whole on every device (parameters, the train state, rng keys)."""
  return NamedSharding(mesh, P())


def data_size(mesh: Mesh) -> int:
  """Number of shards of the batch axis."""
  return mesh.shape[DATA_AXIS]


def pad_to_multiple(n: int, multiple: int) -> int:
  """The smallest multiple of `multiple` that is >= n."""
  return -(-n // multiple) * multiple


# ----------------------------------------------------------------------------
# Global arrays from process-local data, and back to the host.
# ----------------------------------------------------------------------------


def global_array(local: Any, mesh: Mesh) -> Any:
  """This process's contiguous part of a global batch (a pytree of arrays) → global arrays on the data axis.

  Process p of P must pass rows [p·B/P, (p+1)·B/P) of the global batch of B
  rows (the layout of `input_pipeline`); on one process this is a sharded
  `device_put`.
  """
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local)


def put_replicated(tree: Any, mesh: Mesh) -> Any:
  """A pytree (parameters, keys) placed whole on every device of the mesh."""
  return jax.device_put(tree, replicated(mesh))


def to_host(x: Any) -> Any:
  """Arrays (a pytree) gathered to NumPy on every process; sharded arrays are concatenated along axis 0."""

  def gather(a):
    if isinstance(a, jax.Array) and not a.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(a, tiled=True))
    return np.asarray(a)

  return jax.tree.map(gather, x)


class Prefetcher(Iterator):
  """Global batches from a process-local iterator, `size` steps ahead of the consumer.

  Batches are assembled and transferred (asynchronously) as soon as a slot is
  free, so the host never waits on the input when the devices are busy.
  `get_state()` returns the underlying iterator's position before the oldest
  batch not yet handed out, and `set_state()` drops the buffer: a checkpoint
  written between steps resumes at exactly the next step's batch. This makes
  the prefetcher usable wherever the wrapped iterator was (Orbax item, grain
  checkpoint handler).
  """

  def __init__(self, iterator, mesh: Mesh, size: int = 2):
    if size < 1:
      raise errors.UserError(f"prefetch size must be >= 1, got {size}.")
    self._iterator = iterator
    self._mesh = mesh
    self._size = size
    self._buffer: collections.deque = collections.deque()

  def _fill(self):
    while len(self._buffer) < self._size:
      state = self._iterator.get_state() if hasattr(self._iterator, "get_state") else None
      self._buffer.append((state, global_array(next(self._iterator), self._mesh)))

  def __next__(self):
    self._fill()
    _, batch = self._buffer.popleft()
    self._fill()
    return batch

  def get_state(self):
    if self._buffer:
      return self._buffer[0][0]
    return self._iterator.get_state()

  def set_state(self, state):
    self._buffer.clear()
    self._iterator.set_state(state)

  def start_prefetch(self):
    if hasattr(self._iterator, "start_prefetch"):
      self._iterator.start_prefetch()

  @property
  def iterator(self):
    """The wrapped process-local iterator."""
    return self._iterator


def prefetch(iterator, mesh: Mesh, size: int = 2) -> Prefetcher:
  """Double-buffered (by default) global batches from a process-local iterator; see `Prefetcher`."""
  return Prefetcher(iterator, mesh, size)


# ----------------------------------------------------------------------------
# The network and the one model function.
# ----------------------------------------------------------------------------


def image_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
  """[H, W, C] of the config's images."""
  d = config.data
  return (d.image_size, d.image_size, d.channels)


def build_diffusion(config: ml_collections.ConfigDict) -> diffusion_lib.GaussianDiffusion:
  """The diffusion of a config's `diffusion` section."""
  return diffusion_lib.from_config(config.diffusion)


def build_network(
  config: ml_collections.ConfigDict, diffusion: diffusion_lib.GaussianDiffusion | None = None
) -> unet.UNet:
  """The U-Net of a config; its output channels follow the diffusion's variance type."""
  diffusion = build_diffusion(config) if diffusion is None else diffusion
  return unet.from_config(config.model, out_ch=diffusion.model_output_channels(config.data.channels))


def build(config: ml_collections.ConfigDict) -> tuple[unet.UNet, diffusion_lib.GaussianDiffusion]:
  """(network, diffusion) of a config."""
  diffusion = build_diffusion(config)
  return build_network(config, diffusion), diffusion


def init_params(network: unet.UNet, rng: jax.Array, shape, scheme: str = "ddpm") -> Any:
  """Fresh parameters of `network` for images of `shape` [H, W, C].

  `scheme` (`model.init`): "ddpm", the paper's initialisation, or "pytorch",
  PyTorch's layer defaults (`unet.pytorch_init`).
  """
  if scheme not in unet.INIT_SCHEMES:
    raise errors.UserError(f"Unknown model.init {scheme!r}; valid choices are {', '.join(unet.INIT_SCHEMES)}.")
  x = jnp.zeros((1,) + tuple(shape), jnp.float32)
  params = network.init(rng, x, jnp.zeros((1,), jnp.int32), train=False)["params"]
  if scheme == "pytorch":
    params = unet.pytorch_init(jax.random.fold_in(rng, 1), params)
  return params


@functools.cache
def model_fn(network: unet.UNet) -> ModelFn:
  """The one way to run the network: `fn(params, x_t, t, *, cond=None, train=False, rng=None)`.

  Args of the returned function:
    params: the network's parameters.
    x_t: [B, H, W, C] float32 noisy images.
    t: [B] int32 original timesteps in [0, T).
    cond: [B] int32 class labels for a class-conditional network, or None.
    train: dropout on (needs `rng`).
    rng: the dropout key when `train`.

  Returns:
    The network output [B, H, W, out_ch], float32.
  """

  def fn(params, x_t, t, *, cond=None, train=False, rng=None):
    kwargs = {}
    if cond is not None:
      kwargs["y"] = cond
    if train:
      if rng is None:
        raise errors.UserError("model_fn(..., train=True) needs rng= for dropout.")
      return network.apply({"params": params}, x_t, t, train=True, rngs={"dropout": rng}, **kwargs)
    return network.apply({"params": params}, x_t, t, train=False, **kwargs)

  return fn


@dataclasses.dataclass(frozen=True)
class _Inference:
  """`fn` at inference with positional (params, x_t, t[, cond]); hashable, so jit caches see one function."""

  fn: ModelFn

  def __call__(self, params, x_t, t, cond=None):
    return self.fn(params, x_t, t) if cond is None else self.fn(params, x_t, t, cond=cond)


def inference_fn(network: unet.UNet) -> _Inference:
  """The network at inference as a hashable `fn(params, x_t, t, cond=None)`, for compiled samplers."""
  return _Inference(model_fn(network))


def bind(fn: ModelFn, params: Any) -> jax.tree_util.Partial:
  """`fn` with its parameters bound as a pytree argument: `(x_t, t[, cond]) -> output`, at inference.

  The parameters stay traced arguments of whatever jitted function receives
  the result (a `jax.tree_util.Partial`), never compile-time constants.
  """
  return jax.tree_util.Partial(_Inference(fn), params)


# ----------------------------------------------------------------------------
# Files and optional imports.
# ----------------------------------------------------------------------------


def progress_bar(iterable, total: int, enabled: bool, desc: str):
  """A tqdm bar over `iterable` (`total` items of `desc`, counted in batches) on process 0 when `enabled`."""
  if not enabled or jax.process_index() != 0:
    return iterable
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top

  return tqdm(iterable, total=total, desc=desc, unit="batch")


def atomic_write(path: str | os.PathLike, data: bytes | str) -> epath.Path:
  """Writes `data` to `path` through a temporary file and a rename, so readers see all or nothing (replaces `path`)."""
  path = epath.Path(path)
  tmp = path.parent / (path.name + ".tmp")
  if isinstance(data, str):
    tmp.write_text(data)
  else:
    tmp.write_bytes(data)
  tmp.replace(path)  # os.replace semantics: an existing file is replaced (callers decide whether it may be)
  return path


def hide_accelerators_from_tensorflow(tf) -> None:
  """Keeps TensorFlow off the GPUs/TPUs that JAX needs (memory and threads)."""
  for kind in ("GPU", "TPU"):
    try:
      tf.config.set_visible_devices([], kind)
    except (RuntimeError, ValueError, AttributeError):
      pass  # Already initialised, no such device type, or a stub module.


def import_tensorflow():
  """TensorFlow, imported now (only for TF checkpoints or tfds preparation) and hidden from accelerators.

  Raises:
    ImportError: with the install command, when TensorFlow is missing.
  """
  already = "tensorflow" in sys.modules
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise errors.MissingPackageError(
      "This needs TensorFlow (reading TF checkpoints or preparing a tfds dataset): "
      "pip install 'diffusion_jax[tf]' (or tensorflow-cpu)."
    ) from e
  if not already:
    hide_accelerators_from_tensorflow(tf)
  return tf


# The environment variable that chooses the directory of the package's caches: the persistent compilation cache
# (in its jax/ folder) and downloaded weights (the FID Inception's). "0" (or "off", "") turns the compilation cache off.
CACHE_ENV = "DIFFUSION_JAX_CACHE_DIR"
# Its deprecated alias, the FID Inception weights' variable before every cache shared one directory.
DEPRECATED_CACHE_ENV = "DIFFUSION_JAX_CACHE"
_CACHE_OFF = ("0", "", "off", "false", "no")


@functools.cache
def _warn_deprecated_cache_env() -> None:
  warnings.warn(
    f"${DEPRECATED_CACHE_ENV} is deprecated; set ${CACHE_ENV} instead (the directory of diffusion_jax's caches: "
    "the compilation cache in its jax/ folder and the FID Inception weights).",
    FutureWarning,
    stacklevel=1,
  )


def _cache_env() -> str | None:
  """$DIFFUSION_JAX_CACHE_DIR, else $DIFFUSION_JAX_CACHE (warning once that it is deprecated), else None."""
  if CACHE_ENV in os.environ:
    return os.environ[CACHE_ENV]
  if DEPRECATED_CACHE_ENV in os.environ:
    _warn_deprecated_cache_env()
    return os.environ[DEPRECATED_CACHE_ENV]
  return None


def default_cache_dir() -> str:
  """The directory of the package's caches: the compilation cache (its jax/ folder) and downloaded weights.

  $DIFFUSION_JAX_CACHE_DIR; else $DIFFUSION_JAX_CACHE, its deprecated alias
  (the FID Inception weights' variable before every cache shared this
  directory), read with a FutureWarning, once per process, that names
  DIFFUSION_JAX_CACHE_DIR; else $XDG_CACHE_HOME/diffusion_jax, or
  ~/.cache/diffusion_jax. A value that turns the compilation cache off ("0",
  "off", "") leaves the other caches in that default.
  """
  directory = _cache_env()
  if directory is not None and directory.strip().lower() not in _CACHE_OFF:
    return os.path.expanduser(directory)
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "diffusion_jax")


def enable_compilation_cache() -> str | None:
  """Turns on JAX's persistent compilation cache, so a restarted run or a new session skips recompiling.

  The directory is jax/ in `default_cache_dir()` ($DIFFUSION_JAX_CACHE_DIR, by
  default ~/.cache/diffusion_jax); DIFFUSION_JAX_CACHE_DIR=0 turns the cache
  off. A cache the user configured
  ($JAX_COMPILATION_CACHE_DIR or `jax.config.update("jax_compilation_cache_dir",
  ...)`) is kept as it is, and so are minimum compile time and entry size
  set through their own variables. Call it before the first compilation: JAX
  settles on a cache when it first compiles.

  Returns:
    The cache directory in use, or None if there is none.
  """
  configured = jax.config.jax_compilation_cache_dir or os.environ.get("JAX_COMPILATION_CACHE_DIR")
  if configured:
    return configured
  directory = _cache_env()
  if directory is not None and directory.strip().lower() in _CACHE_OFF:
    return None
  directory = os.path.join(default_cache_dir(), "jax")
  try:
    os.makedirs(directory, exist_ok=True)
  except OSError:
    return None  # a read-only home: run without the cache rather than fail
  jax.config.update("jax_compilation_cache_dir", directory)
  # Also the many small programs of a run's start (initialisation, checksums, grids): together they take seconds.
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  return directory


def hide_tensorflow_if_loaded() -> None:
  """If something (tfds) already imported TensorFlow, keep it off the accelerators."""
  tf = sys.modules.get("tensorflow")
  if tf is not None:
    hide_accelerators_from_tensorflow(tf)
