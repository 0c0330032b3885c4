"""What the converters share: the error they raise and the nested parameter trees they pass around.

Parameters travel as nested dicts of NumPy arrays with our U-Net's layout
(`{"down_0": {"block_0": {"conv1": {"kernel": ...}}}}`); the converters
compare and rename them as flat `{("down_0", "block_0", "conv1", "kernel"):
array}` dicts, written "down_0/block_0/conv1/kernel" in messages.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from diffusion_jax import errors

Params = dict[str, Any]

# Our U-Net's GroupNorm layers: their bias is TF's `beta` (not `b`) and they keep their layout in diffusers.
NORM_LAYERS = ("norm1", "norm2", "norm", "norm_out")
# Messages list this many parameter names of a kind, then how many more there are.
_MAX_LISTED = 25


class ConversionError(errors.UserError):
  """A checkpoint that does not match the network it is converted to or from (a user error: no traceback)."""


def flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  """{path: leaf} of a nested dict; every non-mapping value is a leaf."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def unflatten(flat: Mapping[tuple[str, ...], Any]) -> Params:
  """The nested dict of a `flatten` result."""
  tree: Params = {}
  for path, v in flat.items():
    node = tree
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = v
  return tree


def fmt(path: tuple[str, ...]) -> str:
  """A parameter path as messages write it: down_0/block_0/conv1/kernel."""
  return "/".join(path)


def listing(title: str, items: list[str]) -> str:
  """An indented message section: the title, the count and the first items, one a line."""
  shown = items[:_MAX_LISTED]
  more = f"\n    ... and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
  return f"  {title} ({len(items)}):\n    " + "\n    ".join(shown) + more
