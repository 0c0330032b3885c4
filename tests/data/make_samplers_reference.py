r"""Writes tests/data/samplers_reference.npz: outputs of `samplers.sample`, `denoise` and `interpolate`.

The stored arrays were produced by the code of commit 1e08f74 (the samplers
before they became one protocol), on CPU, with

  cd <repository root> && JAX_PLATFORMS=cpu python tests/data/make_samplers_reference.py

`tests/samplers_test.py::test_reproduces_stored_outputs` runs the same `CASES`
through the current code and requires bit-identical results on the jax and jaxlib
recorded in `_meta` (the releases that wrote them), and results within
`conftest.STORED_OUTPUT_TOLERANCE` on other releases. The model is an
analytic function (no network), T = 20, 8×8 images with 2 channels, 2 samples.
"""

import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import samplers
from diffusion_jax.diffusion import GaussianDiffusion

OUT = pathlib.Path(__file__).resolve().parent / "samplers_reference.npz"
T = 20
SHAPE = (2, 8, 8, 2)
BETAS = np.linspace(1e-4, 0.2, T)
INDICES = np.array([3, 11], np.int32)
SEED = 5

# name: (function, mean type, var type, keyword arguments of samplers.<function>).
CASES = {
  "anc_eps_fl_full_prog4": ("sample", "eps", "fixedlarge", dict(progressive_every=4)),
  "anc_eps_fl_full": ("sample", "eps", "fixedlarge", dict()),
  "anc_eps_fs_7_noclip": ("sample", "eps", "fixedsmall", dict(num_steps=7, clip_denoised=False)),
  "anc_eps_fl_7_prog3": ("sample", "eps", "fixedlarge", dict(num_steps=7, progressive_every=3)),
  "anc_xstart_fl_full": ("sample", "xstart", "fixedlarge", dict()),
  "anc_xprev_fs_full": ("sample", "xprev", "fixedsmall", dict()),
  "anc_xprev_fs_7": ("sample", "xprev", "fixedsmall", dict(num_steps=7)),
  "anc_v_fl_7": ("sample", "v", "fixedlarge", dict(num_steps=7)),
  "anc_eps_lr_full": ("sample", "eps", "learned_range", dict()),
  "anc_eps_learned_7": ("sample", "eps", "learned", dict(num_steps=7)),
  "ddim_eps_eta0_5": ("sample", "eps", "fixedlarge", dict(sampler="ddim", num_steps=5)),
  "ddim_eps_eta0_full_prog5": ("sample", "eps", "fixedlarge", dict(sampler="ddim", progressive_every=5)),
  "ddim_eps_eta05_10": ("sample", "eps", "fixedlarge", dict(sampler="ddim", num_steps=10, eta=0.5)),
  "ddim_xstart_eta0_10_noclip": (
    "sample",
    "xstart",
    "fixedlarge",
    dict(sampler="ddim", num_steps=10, clip_denoised=False),
  ),
  "ddim_v_eta05_5": ("sample", "v", "fixedsmall", dict(sampler="ddim", num_steps=5, eta=0.5)),
  "ddim_xprev_eta0_10": ("sample", "xprev", "fixedsmall", dict(sampler="ddim", num_steps=10)),
  "ddim_eps_lr_eta0_7_prog2": (
    "sample",
    "eps",
    "learned_range",
    dict(sampler="ddim", num_steps=7, progressive_every=2),
  ),
  "denoise_anc_full_t12": ("denoise", "eps", "fixedlarge", dict(t=12)),
  "denoise_anc_7_t12": ("denoise", "eps", "fixedlarge", dict(t=12, num_steps=7)),
  "denoise_ddim_7_t12_eta05": ("denoise", "v", "fixedlarge", dict(t=12, sampler="ddim", num_steps=7, eta=0.5)),
  "interp_anc_full_t10": ("interpolate", "eps", "fixedlarge", dict(t=10)),
  "interp_ddim_7_t10_same": (
    "interpolate",
    "eps",
    "fixedlarge",
    dict(t=10, sampler="ddim", num_steps=7, same_noise=True),
  ),
}


def _analytic(x, t):
  """A deterministic t-dependent map with some spatial mixing; outputs of size ~1."""
  tf = t.astype(jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))
  mixed = 0.6 * x + 0.4 * jnp.roll(x, 1, axis=1) - 0.2 * jnp.flip(x, axis=-1)
  return 0.9 * jnp.tanh((0.5 + 0.05 * tf) * mixed + 0.1 * jnp.cos(0.3 * tf))


def make_model_fn(mean_type, var_type):
  if mean_type == "xprev":

    def mean_fn(x, t):
      return 0.92 * x + 0.05 * _analytic(x, t)
  else:
    mean_fn = _analytic
  if var_type in ("learned", "learned_range"):

    def fn(x, t):
      out = mean_fn(x, t)
      var = 0.5 * jnp.tanh(out) if var_type == "learned_range" else -3.0 + 0.5 * jnp.tanh(out)
      return jnp.concatenate([out, var], axis=-1)

    return jax.tree_util.Partial(fn)
  return jax.tree_util.Partial(mean_fn)


def make_diffusion(mean_type, var_type):
  loss = "hybrid" if var_type.startswith("learned") else "mse"
  return GaussianDiffusion.create(BETAS, model_mean_type=mean_type, model_var_type=var_type, loss_type=loss)


def run_case(name, module=samplers):
  """The outputs of case `name` as a dict of NumPy arrays, computed by `module` (the samplers)."""
  function, mean_type, var_type, kw = CASES[name]
  diffusion, model_fn = make_diffusion(mean_type, var_type), make_model_fn(mean_type, var_type)
  rng = jax.random.PRNGKey(SEED)
  kw = dict(kw)
  settings = {k: kw.pop(k) for k in samplers.registry.SETTINGS if k in kw}
  kw["sampler"] = samplers.resolve(kw.pop("sampler", "ancestral"), num_timesteps=diffusion.num_timesteps, **settings)
  if function == "sample":
    out = module.sample(diffusion, model_fn, rng, jnp.asarray(INDICES), SHAPE, **kw)
  elif function == "denoise":
    x_t = jax.random.normal(jax.random.PRNGKey(SEED + 1), SHAPE, jnp.float32)
    out = module.denoise(diffusion, model_fn, rng, jnp.asarray(INDICES), x_t, **kw)
  else:
    x1 = jnp.tanh(jax.random.normal(jax.random.PRNGKey(SEED + 2), SHAPE[1:], jnp.float32))
    x2 = -jnp.flip(x1, axis=0)
    out = {"samples": module.interpolate(diffusion, model_fn, rng, x1, x2, jnp.array([0.0, 0.25, 0.7, 1.0]), **kw)}
  return {k: np.asarray(v) for k, v in out.items()}


def main():
  arrays = {}
  for name in CASES:
    for key, value in run_case(name).items():
      arrays[f"{name}/{key}"] = value
  import jaxlib  # pylint: disable=g-import-not-at-top

  meta = dict(commit="1e08f74", jax=jax.__version__, jaxlib=jaxlib.__version__, cases=list(CASES))
  arrays["_meta"] = np.array(json.dumps(meta))
  np.savez_compressed(OUT, **arrays)
  print(f"wrote {len(arrays)} arrays to {OUT}", file=sys.stderr)


if __name__ == "__main__":
  main()
