"""The paper's original TensorFlow 1 checkpoints, read into our parameter tree.

The released checkpoints (`diffusion_cifar10_model/model.ckpt-790000`, LSUN
bedroom/cat/church) hold `model/<scope>/W` and `/b` (convolutions HWIO, dense
and 1x1 "nin" layers [in, out]) and `model/<scope>/gamma`, `/beta`
(GroupNorm), each with an exponential-moving-average copy
`<name>/ExponentialMovingAverage`; the EMA copy is what the paper evaluated
and is taken by default. Optimizer slots (`.../W/Adam`, `.../W/Adam_1`),
`global_step` and `beta{1,2}_power` are ignored. Our trees use the same
scopes, so reading is a rename (W→kernel, b→bias, gamma→scale, beta→bias)
with no transposes. TensorFlow is imported only when a checkpoint is read:
pip install "diffusion_jax[tf]".
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from absl import logging

from diffusion_jax import errors
from diffusion_jax.convert import architecture
from diffusion_jax.convert import common
from diffusion_jax.convert.common import ConversionError
from diffusion_jax.convert.common import Params

TF_INSTALL_HINT = 'pip install "diffusion_jax[tf]"'
TF_SCOPE = "model"
TF_EMA_SUFFIX = "ExponentialMovingAverage"
# TF leaf name -> (our leaf name). W/b of conv, dense and nin layers; gamma/beta of GroupNorm.
_TF_LEAVES = {"W": "kernel", "b": "bias", "gamma": "scale", "beta": "bias"}


def variable_name(path: tuple[str, ...]) -> str:
  """Our parameter path -> the original TF variable name."""
  if path[-1] == "kernel":
    leaf = "W"
  elif path[-1] == "scale":
    leaf = "gamma"
  else:
    leaf = "beta" if len(path) > 1 and path[-2] in common.NORM_LAYERS else "b"
  return "/".join((TF_SCOPE,) + path[:-1] + (leaf,))


def _import_tensorflow():
  from diffusion_jax import runtime  # pylint: disable=g-import-not-at-top  (jax/flax only when needed)

  try:
    return runtime.import_tensorflow()
  except ImportError as e:
    raise errors.MissingPackageError(
      f"Reading the original TensorFlow checkpoints needs TensorFlow: {TF_INSTALL_HINT} ({e.__cause__ or e})."
    ) from None


def _resolve_tf_path(path: str | os.PathLike, tf) -> str:
  path = os.fspath(path)
  if os.path.isdir(path):
    latest = tf.train.latest_checkpoint(path)
    if latest is None:
      raise errors.MissingFileError(
        f"{path} is a directory without a TF 'checkpoint' index file; pass the checkpoint prefix, "
        "e.g. .../model.ckpt-790000."
      )
    return latest
  for suffix in (".index", ".meta"):
    path = path.removesuffix(suffix)
  path = re.sub(r"\.data-\d+-of-\d+$", "", path)
  if not os.path.exists(path + ".index"):
    raise errors.MissingFileError(
      f"No TensorFlow checkpoint at {path}: expected {path}.index and {path}.data-00000-of-00001 "
      "(pass the prefix, e.g. .../model.ckpt-790000)."
    )
  return path


def read_tf_checkpoint(path: str | os.PathLike, *, scope: str = TF_SCOPE) -> dict[str, Any]:
  """Reads a TF1 checkpoint of the paper's model into our layout, both copies.

  Args:
    path: the checkpoint prefix (`.../model.ckpt-790000`), one of its files, or
      a directory with a TF `checkpoint` file.
    scope: the model's variable scope.

  Returns:
    dict(raw=params or None, ema=params or None, step=int or None,
    prefix=the checkpoint prefix read); the trees are renamed (W→kernel,
    b→bias, gamma→scale, beta→bias) but not yet checked for completeness.

  Raises:
    ConversionError: for variables in the model scope that are not parameters.
  """
  tf = _import_tensorflow()
  prefix = _resolve_tf_path(path, tf)
  try:
    reader = tf.train.load_checkpoint(prefix)
    shapes = reader.get_variable_to_shape_map()
  except Exception as e:  # pylint: disable=broad-except
    raise ConversionError(f"Cannot read the TensorFlow checkpoint {prefix}: {type(e).__name__}: {e}") from None
  raw, ema, unknown, ignored = {}, {}, [], []
  for name in sorted(shapes):
    parts = name.split("/")
    if parts[0] != scope:
      ignored.append(name)  # global_step, beta1_power, ...
      continue
    if len(parts) >= 3 and parts[-1] == TF_EMA_SUFFIX and parts[-2] in _TF_LEAVES:
      ema[tuple(parts[1:-1])] = name
    elif len(parts) >= 2 and parts[-1] in _TF_LEAVES:
      raw[tuple(parts[1:])] = name
    elif len(parts) >= 3 and (parts[-2] in _TF_LEAVES or (parts[-2] == TF_EMA_SUFFIX and parts[-3] in _TF_LEAVES)):
      ignored.append(name)  # optimizer slots: .../W/Adam, .../W/Adam_1, .../W/Momentum
    else:
      unknown.append(name)
  if unknown:
    raise ConversionError(
      f"The TensorFlow checkpoint {prefix} has variables in scope {scope!r} that are no DDPM U-Net parameter "
      "(expected .../W, /b, /gamma, /beta, their /ExponentialMovingAverage copies and optimizer slots):\n"
      + common.listing("unused", unknown)
    )
  if not raw and not ema:
    raise ConversionError(
      f"The TensorFlow checkpoint {prefix} has no variables in scope {scope!r}; it holds "
      f"{', '.join(sorted(shapes)[:10]) or 'nothing'}."
    )
  if ignored:
    logging.info("Ignoring %d variables that are no model parameters (e.g. %s).", len(ignored), ignored[0])

  def read(names):
    if not names:
      return None
    flat = {}
    for scope_path, name in names.items():
      value = np.asarray(reader.get_tensor(name))
      if not np.issubdtype(value.dtype, np.floating):
        raise ConversionError(f"{name} has dtype {value.dtype}; expected floating point parameters.")
      flat[scope_path[:-1] + (_TF_LEAVES[scope_path[-1]],)] = value.astype(np.float32, copy=False)
    if len(flat) != len(names):
      raise ConversionError(f"{prefix} holds both a bias 'b' and a GroupNorm 'beta' in the same scope.")
    return common.unflatten(flat)

  step = None
  if "global_step" in shapes:
    step = int(reader.get_tensor("global_step"))
  else:
    m = re.search(r"-(\d+)$", prefix)
    step = int(m.group(1)) if m else None
  return dict(raw=read(raw), ema=read(ema), step=step, prefix=prefix)


def select_params(ckpt: Mapping[str, Any], *, use_ema: bool) -> Params:
  """The EMA (or raw) tree of a `read_tf_checkpoint` result, checked to be a complete U-Net.

  Raises:
    ConversionError: if that copy is absent, the two copies hold different variables, or the tree is incomplete.
  """
  raw, ema, prefix = ckpt["raw"], ckpt["ema"], ckpt["prefix"]
  if use_ema:
    if ema is None:
      raise ConversionError(
        f"The TensorFlow checkpoint {prefix} has no {TF_EMA_SUFFIX} copies of the parameters; "
        "convert the raw weights instead (use_ema=False, --raw)."
      )
    if raw is not None:
      raw_paths, ema_paths = set(common.flatten(raw)), set(common.flatten(ema))
      parts = []
      if raw_paths - ema_paths:
        parts.append(common.listing("without an EMA copy", sorted(variable_name(p) for p in raw_paths - ema_paths)))
      if ema_paths - raw_paths:
        parts.append(
          common.listing(
            "EMA copy without the variable",
            sorted(f"{variable_name(p)}/{TF_EMA_SUFFIX}" for p in ema_paths - raw_paths),
          )
        )
      if parts:
        raise ConversionError(f"The TensorFlow checkpoint {prefix} is inconsistent:\n" + "\n".join(parts))
    params, what = ema, "EMA"
  else:
    if raw is None:
      raise ConversionError(f"The TensorFlow checkpoint {prefix} holds only EMA copies; use_ema=False is impossible.")
    params, what = raw, "raw"
  architecture.check_complete(params, f"The {what} parameters of {prefix}", variable_name)
  return params


def tf_checkpoint_to_params(path: str | os.PathLike, *, use_ema: bool = True) -> Params:
  """Converts one of the paper's TF1 checkpoints to our parameter tree.

  Args:
    path: the checkpoint prefix (e.g. `.../model.ckpt-790000`), one of its
      files, or a directory with a TF `checkpoint` file.
    use_ema: take the `ExponentialMovingAverage` copies (what the paper
      evaluated); False takes the raw training weights.

  Returns:
    Nested dict of float32 NumPy arrays with our U-Net's layout.

  Raises:
    ImportError: if TensorFlow is not installed.
    FileNotFoundError: if there is no checkpoint at `path`.
    ConversionError: for unused, missing or wrongly shaped variables.
  """
  return select_params(read_tf_checkpoint(path), use_ema=use_ema)
