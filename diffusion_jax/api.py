"""The API a notebook user touches: load a model, sample, interpolate, look at grids.

Example (runs as is on a workdir trained with configs/digits.py)::

  import jax
  import diffusion_jax

  model = diffusion_jax.load_model("runs/digits")            # EMA parameters
  images = diffusion_jax.sample_fn(model, 64, jax.random.PRNGKey(0), sampler="ddim", num_steps=50)
  diffusion_jax.save_image_grid(images, "digits.png", scale=4)  # uint8 [64, 8, 8, 1] → PNG

Every chain runs on the device mesh (all devices by default, `mesh=` to choose), sharded over the batch
through `inference` (one padded sharded batch per call; image i depends only on (rng, i)). The command-line
modes that sample and inpaint into a workdir are in `commands`.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from absl import logging
from etils import epath

from diffusion_jax import config_base
from diffusion_jax import errors
from diffusion_jax import images as images_lib
from diffusion_jax import inference
from diffusion_jax import runtime
from diffusion_jax import samplers
from diffusion_jax.inference import LoadedModel  # noqa: F401 (API)
from diffusion_jax.inference import load_model  # noqa: F401 (API)
from diffusion_jax.inference import model_from_config  # noqa: F401 (API)

__all__ = [
  "LoadedModel",
  "load_model",
  "model_from_config",
  "sample_fn",
  "progressive_fn",
  "interpolate_fn",
  "edit_fn",
  "encode_fn",
  "decode_fn",
  "inpaint_fn",
  "likelihood_fn",
  "save_image_grid",
  "slerp",
]


def _check_rng(rng) -> None:
  """`rng` must be a JAX random key (typed, or a raw uint32 key)."""
  dtype = getattr(rng, "dtype", None)
  if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    return
  if dtype == np.uint32 and np.ndim(rng) >= 1:
    return
  raise errors.UserError(
    f"rng must be a JAX random key, e.g. jax.random.PRNGKey(0) or jax.random.key(0), got {rng!r} "
    f"({type(rng).__name__}): pass jax.random.PRNGKey({rng!r})"
    + ("." if isinstance(rng, (int, np.integer)) else " with an integer seed.")
  )


def _spec(model: LoadedModel, sampler, num_steps, eta, settings) -> samplers.SamplerSpec:
  """The notebook API's boundary: a sampler name and its settings resolved once (a SamplerSpec passes through)."""
  unknown = sorted(set(settings) - set(samplers.registry.SETTINGS))
  if unknown:
    raise errors.UserError(
      f"Unknown sampler settings {unknown}; valid settings are {', '.join(samplers.registry.SETTINGS)}."
    )
  if isinstance(sampler, samplers.SamplerSpec):
    given = [k for k, v in dict(settings, num_steps=num_steps, eta=eta).items() if v not in (None, 0, 0.0)]
    if given:
      raise errors.UserError(
        f"Pass either a SamplerSpec or sampler settings, not both (got {', '.join(given)} with a spec)."
      )
    return samplers.resolve(sampler, num_timesteps=model.diffusion.num_timesteps)
  return samplers.resolve(
    sampler,
    num_timesteps=model.diffusion.num_timesteps,
    num_steps=num_steps,
    eta=None if eta is None else float(eta),
    **settings,
  )


def _check_student_grid(model: LoadedModel, spec: samplers.SamplerSpec) -> None:
  """A distilled student (`--mode=distill`) sampled off the grid it was trained for gets one warning."""
  n = int(model.config.get("distill", {}).get("student_steps", 0) or 0)
  if n and (spec.name, spec.num_steps, spec.timestep_spacing, spec.eta) != ("ddim", n, "nested", 0.0):
    logging.warning(
      "This model is a %d-step distilled student: it was trained for sampler='ddim', num_steps=%d, "
      "timestep_spacing='nested' (eta=0), and %s samples it off that grid.",
      n,
      n,
      spec.folder_name,
    )


def sample_fn(
  model: LoadedModel,
  num_samples: int,
  rng: jax.Array,
  *,
  sampler: str | samplers.SamplerSpec = "ancestral",
  num_steps: int | None = None,
  eta: float = 0.0,
  clip_denoised: bool = True,
  labels=None,
  guidance_scale: float = 1.0,
  batch_size: int | None = None,
  progress: bool = True,
  mesh=None,
  **settings,
) -> np.ndarray:
  """Draws `num_samples` images from the model.

  Sample i depends only on (rng, i, its label): the same rng gives the same
  images for any batch size or number of devices.

  Args:
    model: from `load_model`.
    num_samples: how many images.
    rng: a `jax.random.PRNGKey`.
    sampler: one of `SAMPLERS` — `ancestral` (the paper's), `ddim`,
      `dpmpp2m`, `dpmpp3m`, `dpmpp2m_sde`, `dpmpp3m_sde`, `euler`, `heun` —
      or a `SamplerSpec` from `samplers.resolve`.
    num_steps: sampler steps (default T; fewer respaces the schedule). 20–50
      steps of `dpmpp2m` are the usual fast choice.
    eta: DDIM η (0 = deterministic).
    clip_denoised: clip x0 predictions to [-1, 1] (the paper's sampler).
    labels: class-conditional models only: one int or class name for every
      sample, or one per sample; None gives sample i the class i mod K.
    guidance_scale: classifier-free guidance s, ε(x, ∅) + s·(ε(x, c) − ε(x, ∅));
      1 = the conditional model, 0 = the unconditional one (Ho & Salimans' w is s − 1).
    batch_size: images per device batch round (default: config.sampling.batch_size).
    progress: show a progress bar over batches.
    mesh: the device mesh (`runtime.make_mesh`; default: all devices).
    **settings: `timestep_spacing` ("leading", "trailing", "linspace", ...),
      `sigma_schedule` ("uniform", "karras"), `order`, `lower_order_final`;
      see `samplers.resolve`.

  Returns:
    uint8 NumPy array [num_samples, H, W, C].

  Example:
    >>> images = sample_fn(model, 16, jax.random.PRNGKey(0), sampler="dpmpp2m", num_steps=20)
  """
  if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
    raise errors.UserError(f"num_samples must be an integer >= 1, got {num_samples!r}.")
  _check_rng(rng)
  spec = _spec(model, sampler, num_steps, eta, settings)
  _check_student_grid(model, spec)
  return inference.generate_set(
    model,
    int(num_samples),
    rng,
    spec,
    clip_denoised=clip_denoised,
    labels=labels,
    guidance_scale=guidance_scale,
    batch_size=batch_size,
    progress=progress,
    mesh=mesh,
  )


def progressive_fn(
  model: LoadedModel,
  num_samples: int,
  rng: jax.Array,
  *,
  every: int | None = None,
  sampler: str | samplers.SamplerSpec = "ancestral",
  num_steps: int | None = None,
  eta: float = 0.0,
  labels=None,
  guidance_scale: float = 1.0,
  mesh=None,
  **settings,
) -> dict[str, np.ndarray]:
  """Progressive generation (the paper's Figure 6): x0 predictions and x_t along the reverse process.

  Arguments as in `sample_fn`; `every`: record every k-th step (default: 10 pictures).

  Returns:
    dict with uint8 `samples` [N, H, W, C], `pred_xstart` and `trajectory` [N, K, H, W, C].
  """
  if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
    raise errors.UserError(f"num_samples must be an integer >= 1, got {num_samples!r}.")
  _check_rng(rng)
  spec = _spec(model, sampler, num_steps, eta, settings)
  every = every or max(1, spec.num_steps // 10)
  out = inference.generate(
    model,
    np.arange(num_samples),
    rng,
    spec,
    progressive_every=every,
    labels=inference.resolve_labels(model, labels, int(num_samples)),
    guidance_scale=guidance_scale,
    mesh=mesh,
  )
  return {k: images_lib.to_uint8(v) for k, v in out.items()}


def interpolate_fn(
  model: LoadedModel,
  x1,
  x2,
  rng: jax.Array,
  *,
  lambdas=None,
  t: int | None = None,
  sampler: str | samplers.SamplerSpec = "ancestral",
  num_steps: int | None = None,
  eta: float = 0.0,
  same_noise: bool = False,
  clip_denoised: bool = True,
  label=None,
  guidance_scale: float = 1.0,
  method: str = "paper",
  mesh=None,
  **settings,
) -> np.ndarray:
  """Interpolates between two images in latent space (the paper's §4.4, Figure 8).

  `method="slerp"` instead inverts both images with deterministic DDIM (`encode_fn`, on the `sampler`'s
  `num_steps`, "ddim" by default there), interpolates the latents spherically,
  slerp(z1, z2; λ) = sin((1−λ)θ)/sin θ · z1 + sin(λθ)/sin θ · z2 with cos θ = ⟨z1, z2⟩/(|z1||z2|), and decodes
  each with `decode_fn`: rows 0 and −1 are then the images' DDIM round trips.

  Both images are diffused to step t, their latents mixed as (1−λ)x_t + λx'_t
  and the mixture denoised back to an image. The parameters are an argument of
  the compiled chain: calls with new images, weights or models of the same
  shape reuse it.

  Args:
    model: from `load_model`.
    x1, x2: uint8 [H, W, C] images (or floats in [-1, 1]).
    rng: a `jax.random.PRNGKey`.
    lambdas: mixing weights (default 11 values from 0 to 1).
    t: the diffusion step to mix at (default T/2; the paper used 500 of 1000).
    sampler, num_steps, eta, clip_denoised, guidance_scale, **settings: as in `sample_fn`.
    same_noise: diffuse both endpoints with the same noise (the reference
      code draws independent noise).
    label: conditional models: the class (int or name) to denoise towards;
      None denoises with the null class (the unconditional model).
    mesh: as in `sample_fn`.

  Returns:
    uint8 [len(lambdas), H, W, C].
  """
  if method not in ("paper", "slerp"):
    raise errors.UserError(f"method={method!r}: use 'paper' (mix the diffused images at t) or 'slerp'.")
  _check_rng(rng)
  lambdas = np.linspace(0.0, 1.0, 11) if lambdas is None else np.asarray(lambdas, np.float32)
  x1 = _float_images(model, np.asarray(x1)[None], "x1", single=True)[0]
  x2 = _float_images(model, np.asarray(x2)[None], "x2", single=True)[0]
  if method == "slerp":
    if t is not None or same_noise or eta:
      raise errors.UserError("method='slerp' takes no t, same_noise or eta: it inverts both images with DDIM.")
    return _slerp_interpolation(model, x1, x2, lambdas, sampler, num_steps, label, guidance_scale, mesh, settings)
  spec = _spec(model, sampler, num_steps, eta, settings)
  t = model.diffusion.num_timesteps // 2 if t is None else int(t)
  x_t, d_rng = samplers.mix_latents(model.diffusion, rng, x1, x2, lambdas, t=t, same_noise=same_noise)
  n = int(x_t.shape[0])
  out = inference.denoise(
    model,
    np.asarray(x_t),
    d_rng,
    spec,
    t=t,
    indices=np.zeros((n,), np.int32),  # every row the same reverse noise: rows differ by their latents only
    clip_denoised=clip_denoised,
    labels=_labels(model, label, n),
    guidance_scale=guidance_scale,
    mesh=mesh,
  )
  return images_lib.to_uint8(out)


# ----------------------------------------------------------------------------
# Editing: SDEdit, DDIM inversion, inpainting, the ODE likelihood (inference.denoise, .invert, .inpaint).
# ----------------------------------------------------------------------------


def _float_images(model: LoadedModel, images, name: str = "images", *, single: bool = False) -> np.ndarray:
  """[N, H, W, C] float32 in [-1, 1] from uint8 images (floats in [-1, 1] pass through) of the model's shape.

  The images are checked once here: shape, dtype, finiteness and range.
  """
  x = np.asarray(images)
  if x.ndim != 4 or x.shape[1:] != model.image_shape or x.shape[0] < 1:
    shape = x.shape[1:] if single else x.shape
    want = model.image_shape if single else f"[N, *{model.image_shape}] batches"
    raise errors.UserError(f"{name} has shape {shape}; the model takes {want}.")
  if x.dtype == np.uint8:
    return x.astype(np.float32) / 127.5 - 1.0
  if not np.issubdtype(x.dtype, np.floating):
    raise errors.UserError(
      f"{name} has dtype {x.dtype}: pass uint8 images (0..255) or floats in [-1, 1] "
      f"(e.g. {name}.astype(np.uint8) for 0..255 values)."
    )
  if not np.all(np.isfinite(x)):
    raise errors.UserError(f"{name} holds NaN or infinite values ({int(np.sum(~np.isfinite(x)))} of {x.size}).")
  lo, hi = float(np.min(x)), float(np.max(x))
  if lo < -1.0 - 1e-3 or hi > 1.0 + 1e-3:
    hint = (
      f": 0..255 pixel values? pass them as uint8 ({name}.astype(np.uint8)) or scale them with x / 127.5 - 1"
      if hi > 2.0
      else ""
    )
    raise errors.UserError(f"float {name} must lie in [-1, 1], got values in [{lo:g}, {hi:g}]{hint}.")
  return x.astype(np.float32)


def _labels(model: LoadedModel, labels, n: int) -> np.ndarray | None:
  """[n] int32 labels of a conditional model (one or n given; None = the null class, i.e. the unconditional
  model); None for an unconditional model (which refuses labels)."""
  if not model.num_classes:
    if labels is not None:
      inference.resolve_labels(model, labels, n)  # raises: labels for an unconditional model
    return None
  if labels is None:
    return np.full((n,), model.network.null_label, np.int32)
  return inference.resolve_labels(model, labels, n)


def edit_fn(
  model: LoadedModel,
  images,
  strength: float,
  rng: jax.Array,
  *,
  sampler: str | samplers.SamplerSpec = "ancestral",
  num_steps: int | None = None,
  eta: float = 0.0,
  clip_denoised: bool = True,
  labels=None,
  guidance_scale: float = 1.0,
  mesh=None,
  **settings,
) -> np.ndarray:
  """Image-to-image (SDEdit, Meng et al. 2022): noises the images part of the way and samples back.

  `strength` s ∈ (0, 1] picks t = max(round(s·T), 1) − 1; image i is diffused to t as
  q_sample(x_0, t, normal(fold_in(fold_in(rng, i), 0))) (the noise `sample_fn` would start image i from)
  and denoised from t by the sampler with `samplers.denoise`, on its grid for `num_steps` restricted to
  timesteps below t (so a smaller strength runs fewer steps). Small strengths return nearly the input;
  s = 1 nearly ignores it. The batch is sharded over the mesh; image i depends only on (rng, i).

  Args:
    model: from `load_model`.
    images: uint8 [N, H, W, C] of the model's image shape (or floats in [-1, 1]).
    strength: in (0, 1].
    rng: a `jax.random.PRNGKey`.
    sampler, num_steps, eta, clip_denoised, guidance_scale, mesh, **settings: as in `sample_fn`.
    labels: conditional models: one class (int or name) or one per image; None uses the null class.

  Returns:
    uint8 [N, H, W, C].
  """
  _check_rng(rng)
  spec = _spec(model, sampler, num_steps, eta, settings)
  x0 = _float_images(model, images)
  n = x0.shape[0]
  out = inference.denoise(
    model,
    x0,
    rng,
    spec,
    t=samplers.strength_to_timestep(strength, model.diffusion.num_timesteps),
    indices=np.arange(n, dtype=np.int32),
    edit=True,
    clip_denoised=clip_denoised,
    labels=_labels(model, labels, n),
    guidance_scale=guidance_scale,
    mesh=mesh,
  )
  return images_lib.to_uint8(out)


def encode_fn(
  model: LoadedModel,
  images,
  *,
  sampler: str | samplers.SamplerSpec = "ddim",
  num_steps: int | None = None,
  clip_denoised: bool = False,
  labels=None,
  guidance_scale: float = 1.0,
  network_t: str = "target",
  mesh=None,
  **settings,
) -> np.ndarray:
  """DDIM inversion: the latents x_T from which deterministic DDIM regenerates the images (approximately).

  Runs the DDIM ODE upwards on the grid of `sampler` ("ddim", η = 0) for `num_steps` (`samplers.invert`;
  the network is evaluated at the current point, so the round trip is approximate and closer with more
  steps; `timestep_spacing="trailing"` is closer than the default `even` at few steps). `decode_fn` with the
  same settings maps the latents back to images; on the `even` and `trailing` grids the latents are at
  timestep T − 1, the start of `sample_fn`'s chain. The batch is sharded over the mesh.

  Args:
    model: from `load_model`.
    images: uint8 [N, H, W, C] of the model's image shape (or floats in [-1, 1]).
    sampler, num_steps, **settings: a `ddim` spec or the name "ddim" with its settings (as in `sample_fn`).
    clip_denoised: clip x_0 predictions (off: clipping is not invertible).
    labels, guidance_scale, mesh: as in `edit_fn`.
    network_t: the network's timestep label in each inverse step: "target" (the timestep the step goes to,
      as diffusers' DDIMInverseScheduler is called; the closer round trip) or "current" (the point's own).

  Returns:
    float32 [N, H, W, C] latents.
  """
  spec = _spec(model, sampler, num_steps, None, settings)
  x0 = _float_images(model, images)
  return inference.invert(
    model,
    x0,
    spec,
    clip_denoised=clip_denoised,
    network_t=network_t,
    labels=_labels(model, labels, x0.shape[0]),
    guidance_scale=guidance_scale,
    mesh=mesh,
  )


def decode_fn(
  model: LoadedModel,
  latents,
  *,
  sampler: str | samplers.SamplerSpec = "ddim",
  num_steps: int | None = None,
  clip_denoised: bool = False,
  labels=None,
  guidance_scale: float = 1.0,
  mesh=None,
  **settings,
) -> np.ndarray:
  """uint8 images from `encode_fn` latents: deterministic DDIM from the top of the same grid down to 0.

  Arguments as in `encode_fn` (pass the same sampler settings); latents: float [N, H, W, C].
  """
  spec = _spec(model, sampler, num_steps, None, settings)
  if spec.name != "ddim" or spec.eta != 0:
    raise errors.UserError(f"decode_fn needs the ddim sampler with eta=0, got {spec.name!r} with eta={spec.eta}.")
  x = np.asarray(latents)
  if x.ndim != 4 or x.shape[1:] != model.image_shape or not np.issubdtype(x.dtype, np.floating):
    raise errors.UserError(
      f"latents has shape {x.shape} and dtype {x.dtype}; the model takes float [N, *{model.image_shape}] batches."
    )
  if not np.all(np.isfinite(x)):
    raise errors.UserError("latents hold NaN or infinite values.")
  out = inference.denoise(
    model,
    x.astype(np.float32),
    jax.random.PRNGKey(0),  # unused: η = 0 draws no noise
    spec,
    t=int(samplers.inversion.inversion_grid(spec)[-1]),
    indices=np.arange(x.shape[0], dtype=np.int32),
    clip_denoised=clip_denoised,
    labels=_labels(model, labels, x.shape[0]),
    guidance_scale=guidance_scale,
    mesh=mesh,
  )
  return images_lib.to_uint8(out)


def inpaint_fn(
  model: LoadedModel,
  images,
  masks,
  rng: jax.Array,
  *,
  sampler: str | samplers.SamplerSpec = "ancestral",
  num_steps: int | None = None,
  eta: float = 0.0,
  clip_denoised: bool = True,
  labels=None,
  guidance_scale: float = 1.0,
  resample: int = 1,
  jump_length: int = 10,
  resample_range: tuple[int, int] | None = None,
  mesh=None,
  **settings,
) -> np.ndarray:
  """Inpainting with any sampler: fills the pixels where masks == 0, keeping those where masks == 1.

  `resample` > 1 adds RePaint's resampling (`samplers.repaint`, Lugmayr et al. 2022) to the ancestral sampler,
  on all T steps or respaced (`num_steps`; RePaint: 250 of 1000): every `jump_length` steps the chain goes back
  up `jump_length` steps and redoes them, for `resample` passes in all (RePaint: 10 and 10), multiplying the
  network calls accordingly (`samplers.repaint.schedule` counts them). `resample_range=(lo, hi)` resamples
  only the stretches at timesteps lo <= t < hi (with `resample` > 1).

  Image i is sampled as `sample_fn` samples image i (x_T and step noise from (rng, i)), with the known
  pixels replaced before every network call by the forward process of the input at that call's noise
  level (`samplers.inpaint`; noise from a separate stream of the same key). The known pixels of the
  result are the input's exactly. The batch is sharded over the mesh.

  Args:
    model: from `load_model`.
    images: uint8 [N, H, W, C] of the model's image shape (or floats in [-1, 1]).
    masks: [N, H, W] or [N, H, W, 1] (or [N, H, W, C]) of 0/1 (or bool): 1 = keep.
    rng: a `jax.random.PRNGKey`.
    sampler, num_steps, eta, clip_denoised, guidance_scale, mesh, **settings: as in `sample_fn` (guidance with
      RePaint too).
    labels: as in `edit_fn`.

  Returns:
    uint8 [N, H, W, C].
  """
  _check_rng(rng)
  spec = _spec(model, sampler, num_steps, eta, settings)
  x0 = _float_images(model, images)
  m = np.asarray(masks)
  if m.ndim == 3:
    m = m[..., None]
  if m.ndim != 4 or m.shape[:3] != x0.shape[:3] or m.shape[3] not in (1, x0.shape[3]):
    raise errors.UserError(f"masks has shape {np.shape(masks)}; expected [N, H, W] or [N, H, W, 1] for {x0.shape}.")
  if not np.all((m == 0) | (m == 1)):
    raise errors.UserError("masks must hold 0 (fill) and 1 (keep) only.")
  if isinstance(resample, bool) or not isinstance(resample, (int, np.integer)) or resample < 1:
    raise errors.UserError(f"resample must be an integer >= 1 (1: no resampling; RePaint: 10), got {resample!r}.")
  repaint = None
  if resample != 1 or resample_range is not None:
    if resample == 1:
      raise errors.UserError(
        f"resample_range={resample_range!r} limits RePaint's resampling, and resample=1 does none: pass "
        "resample > 1 (RePaint: 10), or leave resample_range=None."
      )
    if spec.name != "ancestral":
      raise errors.UserError(
        f"resample > 1 (RePaint) runs the ancestral sampler: use sampler='ancestral' (got {spec.folder_name})."
      )
    repaint = dict(
      timesteps=samplers.ancestral.chain_timesteps(spec, None),
      jump_length=jump_length,
      jump_n_sample=int(resample),
      resample_range=None if resample_range is None else tuple(resample_range),
    )
  n = x0.shape[0]
  mask = np.broadcast_to(m.astype(bool), x0.shape)
  out = inference.inpaint(
    model,
    x0,
    mask,
    rng,
    spec,
    indices=np.arange(n, dtype=np.int32),
    clip_denoised=clip_denoised,
    labels=_labels(model, labels, n),
    guidance_scale=guidance_scale,
    repaint=repaint,
    mesh=mesh,
  )
  given = np.asarray(images)
  original = given if given.dtype == np.uint8 else images_lib.to_uint8(x0)
  return np.where(mask, original, images_lib.to_uint8(out))


def likelihood_fn(
  model: LoadedModel,
  images,
  rng: jax.Array,
  *,
  labels=None,
  rtol: float = config_base.ODE_BPD_DEFAULTS["rtol"],
  atol: float = config_base.ODE_BPD_DEFAULTS["atol"],
  solver: str = config_base.ODE_BPD_DEFAULTS["solver"],
  estimator: str = config_base.ODE_BPD_DEFAULTS["estimator"],
  num_probes: int = config_base.ODE_BPD_DEFAULTS["num_probes"],
  t_start: float = config_base.ODE_BPD_DEFAULTS["t_start"],
  step_to_knots: bool = config_base.ODE_BPD_DEFAULTS["step_to_knots"],
  mesh=None,
) -> dict[str, np.ndarray]:
  """Bits/dim of each image through the probability-flow ODE: the `ode_bpd` evaluator's computation on a batch.

  The uint8 images are dequantised with uniform noise and their log density integrated from the data to
  τ = T with diffrax (`evaluation.likelihood`: the formula, the prior and the dequantisation terms), the
  divergence by the Skilling–Hutchinson estimator; bits/dim = −log p(z)/(D ln 2) + 7. As in the evaluator, the
  batch, padded to a multiple of the mesh's devices (the last image repeated; its results dropped), is ONE ODE
  system sharded over the mesh (one adaptive step sequence), its dequantisation noise and probes drawn from
  `rng` for the whole padded batch: for N a multiple of the device count the system is the same on any mesh.

  Args:
    model: from `load_model`; an eps, xstart or v model.
    images: uint8 [N, H, W, C] of the model's image shape.
    rng: a `jax.random.PRNGKey`.
    labels: class-conditional models: one label or N (the conditional density; None: the null class, i.e.
      the unconditional density the model learnt with label dropout); None for unconditional models.
    rtol, atol, solver, estimator, num_probes, t_start, step_to_knots: as in the `ode_bpd` evaluator
      (docs/editing.md).
    mesh: as in `sample_fn`.

  Returns:
    dict of NumPy arrays: `bpd` [N] = `prior_bpd` + `delta_bpd` + 7, the terms −log N(x_T; 0, I) and
    −∫ ∇·f dτ in bits/dim plus the dequantisation's 7 bits; `bpd_sem` [N], the trace estimator's standard error
    in bits/dim (NaN for one probe, 0 for `estimator="exact"`); `nfe` and `num_steps`, the network evaluations
    and solver steps of the batch.
  """
  from diffusion_jax.evaluation import likelihood  # noqa: PLC0415 (diffrax: imported when first used)

  _check_rng(rng)
  x = np.asarray(images)
  if x.dtype != np.uint8:
    raise errors.UserError(f"images must be uint8 (the 8-bit data the bits/dim are of), got {x.dtype}.")
  x = _float_images(model, x)
  labels = _labels(model, labels, x.shape[0])
  settings = likelihood.solver_settings(rtol, atol, solver, estimator, num_probes, t_start, step_to_knots)
  mesh = runtime.make_mesh() if mesh is None else mesh
  n = x.shape[0]
  padded = inference.padded_size(n, mesh)
  fn = likelihood.batch_fn(model.network, mesh, settings, labels is not None)
  diffusion = runtime.put_replicated(model.diffusion, mesh)
  sharding = runtime.batch_sharding(mesh)
  batched = [x] + ([] if labels is None else [labels])
  rows = [jax.device_put(inference.pad_rows(a, padded), sharding) for a in batched]
  out = runtime.to_host(fn(model.params_on(mesh), diffusion, rows[0], rng, *rows[1:]))
  d = int(np.prod(model.image_shape))
  to_bits = lambda nats: -np.asarray(nats, np.float64)[:n] / (d * np.log(2.0))  # noqa: E731
  return dict(
    bpd=np.asarray(out["bpd"], np.float64)[:n],
    bpd_sem=np.asarray(out["delta_logp_sem_bpd"], np.float64)[:n],
    prior_bpd=to_bits(out["prior"]),
    delta_bpd=to_bits(out["delta_logp"]),
    nfe=np.asarray(out["nfe"]),
    num_steps=np.asarray(out["num_steps"]),
  )


def save_image_grid(
  images, path: str | os.PathLike, *, ncols: int | None = None, scale: int = 1, overwrite: bool = False
) -> epath.Path:
  """Writes uint8 [N, H, W, C] images as one PNG grid; refuses to overwrite an existing file unless asked."""
  return images_lib.save_image(images_lib.make_grid(images, ncols=ncols, scale=scale), path, overwrite=overwrite)


def slerp(z1: np.ndarray, z2: np.ndarray, lam: float) -> np.ndarray:
  """Spherical interpolation between two arrays (flattened angle); linear where they are parallel."""
  a, b = np.asarray(z1, np.float64).ravel(), np.asarray(z2, np.float64).ravel()
  cos = float(np.clip(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)), -1.0, 1.0))
  theta = float(np.arccos(cos))
  if theta < 1e-6:
    out = (1.0 - lam) * a + lam * b
  else:
    out = (np.sin((1.0 - lam) * theta) * a + np.sin(lam * theta) * b) / np.sin(theta)
  return out.reshape(np.shape(z1)).astype(np.float32)


def _slerp_interpolation(model, x1, x2, lambdas, sampler, num_steps, label, guidance_scale, mesh, settings):
  sampler = "ddim" if sampler == "ancestral" else sampler  # the default of interpolate_fn: DDIM inverts
  both = np.stack([x1, x2])
  labels = None if label is None else [label, label]
  kw = dict(sampler=sampler, num_steps=num_steps, labels=labels, guidance_scale=guidance_scale, mesh=mesh, **settings)
  z1, z2 = encode_fn(model, both, **kw)
  latents = np.stack([slerp(z1, z2, float(lam)) for lam in np.asarray(lambdas).reshape(-1)])
  kw["labels"] = None if label is None else [label] * len(latents)
  return decode_fn(model, latents, **kw)
