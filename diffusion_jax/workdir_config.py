"""A workdir's saved config as a config file: `--config=<workdir>/config.json`.

ml_collections' config flags load Python files; the command line hands a `config.json` path (or a workdir) to
this file as its argument (`--config=.../workdir_config.py:<path>`), so a run's own resolved config, e.g. a
distilled student's, can be passed back with the usual `--config.X=...` overrides.
"""

from __future__ import annotations

import ml_collections
from etils import epath


def _tuples(value):
  """JSON's lists as the tuples the configs hold (config flags override tuples, not lists)."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def get_config(path: str) -> ml_collections.ConfigDict:
  from diffusion_jax import workdirs  # pylint: disable=g-import-not-at-top

  p = epath.Path(path)
  config = workdirs.read_config(p.parent if p.name == "config.json" else p)
  return ml_collections.ConfigDict(_tuples(config.to_dict()))


def rewrite_argv(argv: list[str]) -> list[str]:
  """`--config=X.json` (or `--config X.json`) becomes `--config=<this file>:X.json`; other arguments are kept."""
  out, i = [], 0
  while i < len(argv):
    a = argv[i]
    if a == "--config" and i + 1 < len(argv) and argv[i + 1].endswith(".json"):
      a, i = f"--config={argv[i + 1]}", i + 1
    if a.startswith("--config=") and a.endswith(".json"):
      a = f"--config={__file__}:{a[len('--config=') :]}"
    out.append(a)
    i += 1
  return out
