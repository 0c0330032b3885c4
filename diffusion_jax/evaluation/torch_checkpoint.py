"""Safe reading of PyTorch checkpoints: tensors only, without torch and without running code from the file.

`torch.save` files are pickles, and unpickling runs whatever callables the
file names, so reading a downloaded `.pth` with `pickle` (or with `torch.load`
without `weights_only`) lets the file run arbitrary code. This reader parses
the pickle with an unpickler whose `find_class` resolves only
`collections.OrderedDict`, torch's tensor rebuild functions and the typed
storage classes, each replaced by a stand-in here; any other global raises
`UnsafeCheckpointError` before anything from the file is called. Tensor
metadata (offsets, sizes, strides) is checked against its storage before the
bytes are viewed, and the result holds NumPy arrays. Both the zip format
(torch >= 1.6) and the legacy format are read; torch is never imported.
"""

from __future__ import annotations

import collections
import os
import pathlib
import pickle
import struct
import tarfile
import zipfile
from collections.abc import Sequence
from typing import Any

import ml_dtypes
import numpy as np

from diffusion_jax import errors


class UnsafeCheckpointError(pickle.UnpicklingError, errors.UserError):
  """A checkpoint's pickle references something other than tensors and storages."""


_STORAGE_DTYPES = {
  "DoubleStorage": np.dtype(np.float64),
  "FloatStorage": np.dtype(np.float32),
  "HalfStorage": np.dtype(np.float16),
  "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
  "LongStorage": np.dtype(np.int64),
  "IntStorage": np.dtype(np.int32),
  "ShortStorage": np.dtype(np.int16),
  "CharStorage": np.dtype(np.int8),
  "ByteStorage": np.dtype(np.uint8),
  "BoolStorage": np.dtype(np.bool_),
  "UntypedStorage": np.dtype(np.uint8),
}


class _StorageType:
  """Stands in for `torch.FloatStorage` & co.: only carries a dtype."""

  __slots__ = ("name", "dtype")

  def __init__(self, name: str, dtype: np.dtype):
    self.name = name
    self.dtype = dtype


class _Storage:
  """A storage named in the pickle; its bytes are attached once read."""

  __slots__ = ("key", "dtype", "numel", "array")

  def __init__(self, key: str, dtype: np.dtype, numel: int):
    self.key = key
    self.dtype = dtype
    self.numel = numel
    self.array: np.ndarray | None = None


class _LazyTensor:
  """A tensor view of a storage, materialized after all storages are read."""

  __slots__ = ("storage", "offset", "size", "stride")

  def __init__(self, storage, offset, size, stride):
    if not isinstance(storage, _Storage):
      raise UnsafeCheckpointError(f"tensor rebuilt from {type(storage).__name__}, expected a storage.")
    if not (isinstance(offset, int) and all(isinstance(v, int) for v in (*size, *stride)) and len(size) == len(stride)):
      raise UnsafeCheckpointError(f"malformed tensor metadata: offset={offset!r} size={size!r} stride={stride!r}.")
    if offset < 0 or any(v < 0 for v in (*size, *stride)):
      raise UnsafeCheckpointError(f"negative tensor metadata: offset={offset} size={size} stride={stride}.")
    if 0 not in size:
      last = offset + sum((n - 1) * s for n, s in zip(size, stride))
      if last >= storage.numel:
        raise UnsafeCheckpointError(
          f"tensor (offset {offset}, size {tuple(size)}, stride {tuple(stride)}) overruns its storage of "
          f"{storage.numel} elements."
        )
    self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

  def materialize(self) -> np.ndarray:
    data = self.storage.array
    if data is None:
      raise pickle.UnpicklingError(f"storage {self.storage.key!r} has no data in the file.")
    if 0 in self.size:
      return np.zeros(self.size, data.dtype)
    item = data.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
      data[self.offset :], shape=self.size, strides=tuple(s * item for s in self.stride), writeable=False
    )
    return np.array(view)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
  del requires_grad, backward_hooks, metadata
  return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_tensor(storage, storage_offset, size, stride):
  return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *unused):
  del requires_grad, backward_hooks, unused
  if not isinstance(data, _LazyTensor):
    raise UnsafeCheckpointError(f"parameter rebuilt from {type(data).__name__}, expected a tensor.")
  return data


_ALLOWED_GLOBALS = {
  ("collections", "OrderedDict"): collections.OrderedDict,
  ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
  ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
  ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
  **{("torch", name): _StorageType(name, dtype) for name, dtype in _STORAGE_DTYPES.items()},
}


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickler that resolves only the whitelisted globals and torch's storage ids."""

  def __init__(self, file, *, source: str, storage_factory=None):
    super().__init__(file, encoding="utf-8")
    self._source = source
    self._storage_factory = storage_factory

  def find_class(self, module, name):
    try:
      return _ALLOWED_GLOBALS[(module, name)]
    except KeyError:
      raise UnsafeCheckpointError(
        f"refusing to load {self._source}: its pickle references the global '{module}.{name}', which is not a "
        "tensor or storage. Only plain state_dicts of tensors can be read safely; re-save the weights with "
        "`torch.save(model.state_dict(), path)` from a trusted source."
      ) from None

  def persistent_load(self, pid):
    if self._storage_factory is None:
      raise UnsafeCheckpointError(f"{self._source}: unexpected persistent id outside the tensor pickle.")
    if not isinstance(pid, tuple) or not pid or pid[0] not in ("storage", b"storage"):
      raise UnsafeCheckpointError(f"{self._source}: unsupported persistent id {pid!r:.80}.")
    return self._storage_factory(pid[1:])


def _resolve(obj):
  """Replaces lazy tensors with arrays in nested dicts/lists/tuples."""
  if isinstance(obj, _LazyTensor):
    return obj.materialize()
  if isinstance(obj, dict):
    out = type(obj)() if type(obj) in (dict, collections.OrderedDict) else {}
    for k, v in obj.items():
      out[k] = _resolve(v)
    return out
  if isinstance(obj, (list, tuple)):
    return type(obj)(_resolve(v) for v in obj)
  return obj


def _storage_from_pid(data, storages: dict, source: str, *, legacy: bool) -> _Storage:
  if legacy:
    if len(data) != 5:
      raise UnsafeCheckpointError(f"{source}: malformed storage id {data!r:.80}.")
    storage_type, key, _, numel, view_metadata = data
    if view_metadata is not None:
      raise pickle.UnpicklingError(f"{source}: storage views of the legacy format are not supported.")
  else:
    if len(data) != 4:
      raise UnsafeCheckpointError(f"{source}: malformed storage id {data!r:.80}.")
    storage_type, key, _, numel = data
  if not isinstance(storage_type, _StorageType) or not isinstance(numel, int) or numel < 0:
    raise UnsafeCheckpointError(f"{source}: malformed storage id {data!r:.80}.")
  key = key.decode("ascii") if isinstance(key, bytes) else str(key)
  if key in storages:
    return storages[key]
  storage = _Storage(key, storage_type.dtype, numel)
  storages[key] = storage
  return storage


def _load_zip(path: pathlib.Path, source: str):
  with zipfile.ZipFile(path) as zf:
    names = zf.namelist()
    pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
    if len(pkl) != 1:
      raise pickle.UnpicklingError(f"{source}: a PyTorch zip checkpoint has one data.pkl, found {pkl or 'none'}.")
    prefix = pkl[0][: -len("data.pkl")]
    byteorder = "little"
    if prefix + "byteorder" in names:
      byteorder = zf.read(prefix + "byteorder").decode("ascii").strip()
    storages: dict[str, _Storage] = {}
    factory = lambda data: _storage_from_pid(data, storages, source, legacy=False)  # noqa: E731
    with zf.open(pkl[0]) as f:
      obj = _RestrictedUnpickler(f, source=source, storage_factory=factory).load()
    for key, storage in storages.items():
      record = f"{prefix}data/{key}"
      if record not in names:
        raise pickle.UnpicklingError(f"{source}: storage record {record!r} is missing.")
      raw = zf.read(record)
      storage.array = _storage_array(raw, storage, byteorder == "little", source)
  return obj


def _storage_array(raw: bytes, storage: _Storage, little_endian: bool, source: str) -> np.ndarray:
  nbytes = storage.numel * storage.dtype.itemsize
  if len(raw) < nbytes:
    raise pickle.UnpicklingError(f"{source}: storage {storage.key!r} holds {len(raw)} bytes, expected {nbytes}.")
  dtype = storage.dtype.newbyteorder("<" if little_endian else ">") if storage.dtype.itemsize > 1 else storage.dtype
  return np.frombuffer(raw[:nbytes], dtype=dtype).astype(storage.dtype)


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


def _load_legacy(path: pathlib.Path, source: str):
  with open(path, "rb") as f:
    load = lambda: _RestrictedUnpickler(f, source=source).load()  # noqa: E731
    if load() != _LEGACY_MAGIC:
      raise pickle.UnpicklingError(f"{source} is neither a PyTorch zip checkpoint nor a legacy torch.save file.")
    if (version := load()) != _LEGACY_PROTOCOL:
      raise pickle.UnpicklingError(f"{source}: unsupported legacy protocol version {version}.")
    sys_info = load()
    little_endian = bool(sys_info.get("little_endian", True)) if isinstance(sys_info, dict) else True
    storages: dict[str, _Storage] = {}
    factory = lambda data: _storage_from_pid(data, storages, source, legacy=True)  # noqa: E731
    obj = _RestrictedUnpickler(f, source=source, storage_factory=factory).load()
    keys = load()
    if not isinstance(keys, list):
      raise pickle.UnpicklingError(f"{source}: malformed storage key list.")
    for key in keys:
      if key not in storages:
        raise pickle.UnpicklingError(f"{source}: storage {key!r} listed but never referenced.")
      storage = storages[key]
      header = f.read(8)
      if len(header) != 8:
        raise pickle.UnpicklingError(f"{source}: truncated file.")
      numel = struct.unpack("<q" if little_endian else ">q", header)[0]
      if numel != storage.numel:
        raise pickle.UnpicklingError(f"{source}: storage {key!r} has {numel} elements, expected {storage.numel}.")
      raw = f.read(numel * storage.dtype.itemsize)
      storage.array = _storage_array(raw, storage, little_endian, source)
  return obj


def load_torch_checkpoint(path: str | os.PathLike) -> Any:
  """Reads a `torch.save` file of tensors without torch and without running arbitrary code.

  Both the zip format (torch ≥ 1.6) and the legacy format are supported.
  The pickle may reference only `collections.OrderedDict`, torch's tensor
  rebuild functions and the typed storage classes; anything else raises
  `UnsafeCheckpointError` before it is resolved.

  Args:
    path: the `.pth`/`.pt` file.

  Returns:
    The saved object with every tensor replaced by a NumPy array (a state_dict
    becomes an `OrderedDict[str, np.ndarray]`).
  """
  path = pathlib.Path(path)
  source = str(path)
  if zipfile.is_zipfile(path):
    obj = _load_zip(path, source)
  else:
    if tarfile.is_tarfile(path):
      raise pickle.UnpicklingError(f"{source}: the pre-1.0 tar format of torch.save is not supported.")
    obj = _load_legacy(path, source)
  return _resolve(obj)


# ----------------------------------------------------------------------------
# state_dict ↔ Flax parameters.


__all__: Sequence[str] = ("UnsafeCheckpointError", "load_torch_checkpoint")
