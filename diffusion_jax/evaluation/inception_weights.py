"""The FID Inception's weights: pytorch-fid's checkpoint found or downloaded, verified and read into Flax.

The weights are pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`, a
state_dict whose parameter tree `inception.InceptionV3` mirrors, so loading is
a rename: conv weights OIHW → HWIO, the fc weight [out, in] → [in, out],
BatchNorm weight/bias/running_mean/running_var → scale/bias/mean/var.

`load_params()` reads a local `.pth` (or the `.npz` this module writes), or
looks in the cache directory (`runtime.default_cache_dir()`: $DIFFUSION_JAX_CACHE_DIR,
else ~/.cache/diffusion_jax) and torch hub's checkpoints folder, and else
downloads the file once into the cache, verifying the sha256 prefix in its
name. A `.pth` is parsed by `torch_checkpoint.load_torch_checkpoint`, which
runs no code from the file; the converted parameters are cached as `.npz`,
read back without pickle.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pathlib
import pickle
import struct
import tempfile
import urllib.request
import zipfile
from collections.abc import Mapping
from collections.abc import Sequence

import numpy as np
from flax import traverse_util

from diffusion_jax import errors
from diffusion_jax import runtime
from diffusion_jax.evaluation import inception
from diffusion_jax.evaluation import torch_checkpoint
from diffusion_jax.evaluation.inception import Params

FID_WEIGHTS_URL = (
  "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
)
FID_WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_SHA256_PREFIX = "6726825d"
FID_WEIGHTS_NPZ_FILENAME = "pt_inception-2015-12-05-6726825d.npz"


# ----------------------------------------------------------------------------
# state_dict ↔ Flax parameters.
# ----------------------------------------------------------------------------

_BN_LEAVES = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}


def params_from_state_dict(state_dict: Mapping[str, np.ndarray]) -> Params:
  """Maps pytorch-fid's Inception state_dict onto the Flax parameter tree.

  Conv weights OIHW → HWIO, fc weight [out, in] → [in, out], BatchNorm
  weight/bias/running_mean/running_var → scale/bias/mean/var;
  `num_batches_tracked` is dropped.

  Raises:
    ValueError: keys missing, unexpected or of the wrong shape (e.g. the
      torchvision ImageNet Inception, which has AuxLogits and 1000 classes).
  """
  flat = {}
  for key, value in state_dict.items():
    value = np.asarray(value)
    parts = key.split(".")
    if parts[-1] == "num_batches_tracked":
      continue
    if len(parts) >= 2 and parts[-2] == "conv" and parts[-1] == "weight" and value.ndim == 4:
      flat[(*parts[:-1], "kernel")] = value.transpose(2, 3, 1, 0)
    elif len(parts) >= 2 and parts[-2] == "bn" and parts[-1] in _BN_LEAVES:
      flat[(*parts[:-1], _BN_LEAVES[parts[-1]])] = value
    elif parts == ["fc", "weight"] and value.ndim == 2:
      flat[("fc", "kernel")] = value.T
    elif parts == ["fc", "bias"]:
      flat[("fc", "bias")] = value
    else:
      flat[tuple(parts)] = value
  return _check_params(flat, "state_dict")


@functools.lru_cache(maxsize=1)
def _expected_shapes() -> dict[tuple[str, ...], tuple[int, ...]]:
  return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(inception.param_shapes()).items()}


def _check_params(flat: Mapping[tuple[str, ...], np.ndarray], source: str) -> Params:
  expected = _expected_shapes()
  missing = sorted("/".join(k) for k in expected.keys() - flat.keys())
  unexpected = sorted("/".join(k) for k in flat.keys() - expected.keys())
  wrong = sorted(
    f"{'/'.join(k)}: {np.shape(flat[k])} vs {expected[k]}"
    for k in expected.keys() & flat.keys()
    if np.shape(flat[k]) != expected[k]
  )
  if missing or unexpected or wrong:
    show = lambda xs: ", ".join(xs[:5]) + (f" … ({len(xs)} in all)" if len(xs) > 5 else "")  # noqa: E731
    raise errors.UserError(
      f"{source} is not the FID Inception (pytorch-fid's pt_inception-2015-12-05): "
      + "; ".join(
        s
        for s in (
          missing and f"missing {show(missing)}",
          unexpected and f"unexpected {show(unexpected)}",
          wrong and f"wrong shapes {show(wrong)}",
        )
        if s
      )
    )
  return traverse_util.unflatten_dict({k: np.asarray(v, np.float32) for k, v in flat.items()})


def save_params_npz(params: Params, path: str | os.PathLike) -> None:
  """Writes the parameters to `.npz` ('/'-joined keys), atomically."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  flat = {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}
  fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, **flat)
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise


def load_params_npz(path: str | os.PathLike) -> Params:
  """Reads parameters written by `save_params_npz` (no pickle allowed)."""
  with np.load(path, allow_pickle=False) as data:
    flat = {tuple(k.split("/")): data[k] for k in data.files}
  return _check_params(flat, str(path))


# ----------------------------------------------------------------------------
# Finding, downloading and verifying the weights.
# ----------------------------------------------------------------------------


def sha256_of(path: str | os.PathLike) -> str:
  """The file's sha256 as hex digits, read in 1 MiB chunks."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def verify_checksum(path: str | os.PathLike, sha256_prefix: str = FID_WEIGHTS_SHA256_PREFIX) -> None:
  """Raises ValueError unless the file's sha256 starts with `sha256_prefix`."""
  digest = sha256_of(path)
  if not digest.startswith(sha256_prefix):
    raise errors.UserError(
      f"{path}: sha256 {digest} does not start with {sha256_prefix}; the file is corrupt or not the FID "
      f"Inception weights. Delete it and download {FID_WEIGHTS_URL} again."
    )


def download_weights(dest: str | os.PathLike, url: str = FID_WEIGHTS_URL, *, sha256_prefix=FID_WEIGHTS_SHA256_PREFIX):
  """Downloads `url` to `dest` (atomically), verifying the sha256 prefix."""
  dest = pathlib.Path(dest)
  dest.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=dest.parent, suffix=".part")
  try:
    h = hashlib.sha256()
    try:
      response = urllib.request.urlopen(url, timeout=60)
    except OSError as e:  # URLError, timeouts, DNS: offline or blocked
      raise errors.UserError(
        f"Could not download the FID Inception weights from {url} ({getattr(e, 'reason', e)}). On a machine "
        f"without internet access, download the file elsewhere and copy it to {dest} (or to torch hub's "
        "checkpoints folder), or pass its path with --config.eval.inception_weights=<path>."
      ) from None
    with os.fdopen(fd, "wb") as f, response:
      for chunk in iter(lambda: response.read(1 << 20), b""):
        h.update(chunk)
        f.write(chunk)
    if not h.hexdigest().startswith(sha256_prefix):
      raise errors.UserError(f"downloaded {url} has sha256 {h.hexdigest()}, expected the prefix {sha256_prefix}.")
    os.replace(tmp, dest)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise
  return dest


def _read_weights(path: pathlib.Path):
  """`torch_checkpoint.load_torch_checkpoint(path)`, with files that are not torch checkpoints reported by name."""
  try:
    return torch_checkpoint.load_torch_checkpoint(path)
  except torch_checkpoint.UnsafeCheckpointError:
    raise
  except (pickle.UnpicklingError, EOFError, ValueError, KeyError, IndexError, struct.error, zipfile.BadZipFile) as e:
    raise errors.UserError(
      f"{path} is not a PyTorch checkpoint of the FID Inception weights ({type(e).__name__}: {e}). Pass "
      f"pytorch-fid's {FID_WEIGHTS_FILENAME} (from {FID_WEIGHTS_URL}) or a .npz written by this package."
    ) from None


def load_params(
  path: str | os.PathLike | None = None, *, cache_dir: str | os.PathLike | None = None, download: bool = True
) -> Params:
  """The FID Inception parameters.

  Args:
    path: a `.pth` state_dict (read with `torch_checkpoint.load_torch_checkpoint`)
      or a `.npz` from `save_params_npz`. None: use the cached weights — the
      converted `.npz` in `cache_dir`, else pytorch-fid's `.pth` there or in
      torch hub's cache (checksum verified, converted and cached as `.npz`),
      else download.
    cache_dir: defaults to `runtime.default_cache_dir()`.
    download: allow downloading `FID_WEIGHTS_URL` when nothing is cached.

  Returns:
    The parameter tree (NumPy float32 leaves).
  """
  if path is not None:
    path = pathlib.Path(path)
    if not path.is_file():
      raise errors.UserError(
        f"FID Inception weights {path} do not exist: pass pytorch-fid's {FID_WEIGHTS_FILENAME} "
        f"or a .npz written by this package (downloaded from {FID_WEIGHTS_URL})."
      )
    if path.suffix == ".npz":
      return load_params_npz(path)
    return params_from_state_dict(_read_weights(path))

  cache_dir = pathlib.Path(cache_dir if cache_dir is not None else runtime.default_cache_dir())
  npz = cache_dir / FID_WEIGHTS_NPZ_FILENAME
  if npz.exists():
    return load_params_npz(npz)
  torch_hub = pathlib.Path(os.environ.get("TORCH_HOME", pathlib.Path.home() / ".cache" / "torch"))
  candidates = [cache_dir / FID_WEIGHTS_FILENAME, torch_hub / "hub" / "checkpoints" / FID_WEIGHTS_FILENAME]
  pth = next((c for c in candidates if c.exists()), None)
  if pth is None:
    if not download:
      raise errors.MissingFileError(
        f"FID Inception weights not found in {candidates[0]} or {candidates[1]}. Download {FID_WEIGHTS_URL} "
        "to one of them, pass its path, or allow downloading."
      )
    pth = download_weights(candidates[0])
  verify_checksum(pth)
  params = params_from_state_dict(_read_weights(pth))
  save_params_npz(params, npz)
  return params


__all__: Sequence[str] = (
  "FID_WEIGHTS_FILENAME",
  "FID_WEIGHTS_NPZ_FILENAME",
  "FID_WEIGHTS_SHA256_PREFIX",
  "FID_WEIGHTS_URL",
  "download_weights",
  "load_params",
  "load_params_npz",
  "params_from_state_dict",
  "save_params_npz",
  "sha256_of",
  "verify_checksum",
)
