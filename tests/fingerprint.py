r"""The outputs of a tiny run, stored to compare a refactor against: they must stay bit for bit the same.

Trains configs/tiny.py through the command line (30 steps, metrics every 5, a checkpoint and a sample grid every 10,
the digit metric at the end), evaluates it with --mode=eval (bits/dim, rate–distortion, the digit metric), and draws
samples with every sampler through the notebook API. It stores, in one .npz: the logged training losses and gradient
norms (from the TensorBoard events), the final train state (parameters, EMA parameters, optimizer state), the sample
grids' PNG bytes, every number in the eval results, and the samples of every sampler.

  python tests/fingerprint.py --out=/tmp/before.npz            # on the code before the change
  python tests/fingerprint.py --out=/tmp/after.npz --compare=/tmp/before.npz

With --compare, prints each entry that differs or is lost (or "bit-identical: N arrays"; entries only the new run
has are listed, not compared) and exits 1 on a difference. Compare on the same machine, JAX version and device
count only.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import struct
import subprocess
import sys
import tempfile

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout this file is in, not another installed copy
# Every process of the run, this one included, sees the same 2 CPU devices.
os.environ.update(XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
STEPS = 30

# The run's config: configs/tiny.py with the settings below, in the config schema of the code under test.
_CONFIG = r"""
import importlib.util, pathlib
_spec = importlib.util.spec_from_file_location("tiny", pathlib.Path({root!r}) / "configs" / "tiny.py")
_tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_tiny)

def get_config():
  config = _tiny.get_config()
  t = config.training
  t.num_train_steps, t.log_every, t.checkpoint_every, t.sample_every = {steps}, 5, 10, 10
  config.sampling.sampler, config.sampling.num_steps = "ddim", 10
  config.eval.num_samples, config.eval.bpd_max_examples = 16, 32
  if "final_eval" in t:  # the schema before evaluators
    t.final_eval, t.final_eval_samples, t.final_eval_sampler, t.final_eval_num_steps = True, 16, "ddim", 10
    config.eval.metrics = ("bpd", "fid")
  else:
    config.evals.digits.update(at_end=True, num_samples=16)
    config.evals.digits.sampling.update(sampler="ddim", num_steps=10)
    config.eval.metrics = ("bpd", "rate_distortion", "fid")
  return config
"""

SAMPLERS = [
  ("ancestral", {}),
  ("ancestral", {"num_steps": 7}),
  ("ddim", {"num_steps": 10}),
  ("ddim", {"num_steps": 10, "eta": 0.5}),
  ("dpmpp2m", {"num_steps": 8}),
  ("dpmpp3m", {"num_steps": 8}),
  ("dpmpp2m_sde", {"num_steps": 8}),
  ("dpmpp3m_sde", {"num_steps": 8, "sigma_schedule": "karras"}),
  ("euler", {"num_steps": 8}),
  ("heun", {"num_steps": 6, "timestep_spacing": "trailing"}),
]


def _events(logdir: pathlib.Path) -> dict[str, np.ndarray]:
  """Scalar series of the TensorBoard event files: tag -> [[step, value], ...] sorted by step."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top

  series: dict[str, list] = {}
  for path in sorted(logdir.glob("events.out.tfevents.*")):
    data = path.read_bytes()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos : pos + 8])
      record = data[pos + 12 : pos + 12 + length]
      pos += 12 + length + 4
      event = event_pb2.Event.FromString(record)
      for value in event.summary.value:
        if value.HasField("simple_value"):
          series.setdefault(value.tag, []).append((event.step, value.simple_value))
  return {tag: np.asarray(sorted(rows), np.float64) for tag, rows in series.items()}


def _numbers(obj, prefix, out):
  """Every number in a JSON result, by its key path (times and paths left out)."""
  if isinstance(obj, dict):
    for k, v in obj.items():
      _numbers(v, f"{prefix}/{k}", out)
  elif isinstance(obj, list) and obj and all(isinstance(v, (int, float)) or v is None for v in obj):
    out[prefix] = np.asarray([np.nan if v is None else v for v in obj], np.float64)
  elif isinstance(obj, list):
    for i, v in enumerate(obj):
      _numbers(v, f"{prefix}/{i}", out)
  elif isinstance(obj, (int, float)) and not isinstance(obj, bool) and "seconds" not in prefix:
    out[prefix] = np.asarray(obj, np.float64)


def _leaf(key: str) -> str:
  """A result number's name without the schema's nesting: the figures keep their own names across schemas."""
  return key.rsplit("/", 1)[-1] if key.count("/") else key


def run(workdir: pathlib.Path) -> dict[str, np.ndarray]:
  config_file = workdir.parent / "fingerprint_config.py"
  config_file.write_text(_CONFIG.format(root=str(ROOT), steps=STEPS))
  env = dict(os.environ)
  base = [sys.executable, "-m", "diffusion_jax.main", f"--config={config_file}", f"--workdir={workdir}"]
  for mode in ("train", "eval"):
    subprocess.run(base + [f"--mode={mode}"], check=True, cwd=ROOT, env=env)

  out: dict[str, np.ndarray] = {}
  for tag, series in _events(workdir / "tensorboard").items():
    if "/" not in tag and "per_sec" not in tag:  # the training metrics; eval figures come from their JSON
      out[f"tensorboard/{tag}"] = series
  for png in sorted((workdir / "samples").glob("grid_step_*.png")):
    out[f"grid/{png.name}"] = np.frombuffer(png.read_bytes(), np.uint8)
  for path in sorted((workdir / "eval").glob("*.json")):
    numbers: dict[str, np.ndarray] = {}
    _numbers(json.loads(path.read_text()), "", numbers)
    stem = path.name.split("_step_")[0]
    stem = {"final": "digits"}.get(stem, stem)  # the end-of-training digit metric's file, as named before
    for key, value in numbers.items():
      if not key.endswith(("/step", "/checkpoint_step")):
        out[f"eval/{stem}/{_leaf(key)}"] = value

  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  import diffusion_jax  # pylint: disable=g-import-not-at-top

  assert pathlib.Path(diffusion_jax.__file__).is_relative_to(ROOT), diffusion_jax.__file__

  state = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(STEPS) / "state")
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    out["state/" + jax.tree_util.keystr(path)] = np.asarray(leaf)
  model = diffusion_jax.load_model(str(workdir))
  rng = jax.random.PRNGKey(3)
  for name, settings in SAMPLERS:
    key = name + "".join(f"_{k}={v}" for k, v in sorted(settings.items()))
    out[f"samples/{key}"] = diffusion_jax.sample_fn(model, 6, rng, sampler=name, progress=False, **settings)
  prog = diffusion_jax.progressive_fn(model, 3, rng, sampler="ddim", num_steps=10)
  for k, v in prog.items():
    out[f"progressive/{k}"] = v
  images = diffusion_jax.sample_fn(model, 2, rng, sampler="ddim", num_steps=10, progress=False)
  out["interpolate/ddim"] = diffusion_jax.interpolate_fn(model, images[0], images[1], rng, sampler="ddim", num_steps=5)
  out["interpolate/ancestral"] = diffusion_jax.interpolate_fn(model, images[0], images[1], rng, t=10)
  return out


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="where to write this run's outputs (.npz)")
  parser.add_argument("--compare", help="a stored .npz to compare with")
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    out = run(pathlib.Path(tmp) / "run")
  np.savez(args.out, **out)
  print(f"{len(out)} arrays written to {args.out}")
  if not args.compare:
    return 0
  with np.load(args.compare) as f:
    want = {k: f[k] for k in f.files}
  problems = [f"lost (only before): {k}" for k in sorted(set(want) - set(out))]
  for k in sorted(set(out) - set(want)):
    print(f"new (only after, not compared): {k}")
  for k in sorted(set(want) & set(out)):
    a, b = want[k], out[k]
    if a.shape != b.shape or a.dtype != b.dtype or a.tobytes() != b.tobytes():
      detail = f"{a.shape} {a.dtype} vs {b.shape} {b.dtype}"
      if a.shape == b.shape and np.issubdtype(a.dtype, np.number) and np.issubdtype(b.dtype, np.number):
        detail += f", max |diff| {np.nanmax(np.abs(a.astype(np.float64) - b.astype(np.float64)))}"
      problems.append(f"differs: {k}: {detail}")
  for p in problems:
    print(p)
  print(f"bit-identical: {len(set(want) & set(out))} arrays" if not problems else f"{len(problems)} differences")
  return 1 if problems else 0


if __name__ == "__main__":
  sys.exit(main())
