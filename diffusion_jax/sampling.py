"""The API a notebook user touches: load a model, sample, interpolate, look at grids.

Example (runs as is on a workdir trained with configs/digits.py)::

  import jax
  import diffusion_jax

  model = diffusion_jax.load_model("runs/digits")            # EMA parameters
  images = diffusion_jax.sample_fn(model, 64, jax.random.PRNGKey(0), sampler="ddim", num_steps=50)
  diffusion_jax.save_image_grid(images, "digits.png", scale=4)  # uint8 [64, 8, 8, 1] → PNG

`--mode=sample` of `diffusion_jax.main` uses `sample_to_workdir`, which writes
large sample sets in chunks that survive interruption.
"""

from __future__ import annotations

import hashlib
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from diffusion_jax import checkpointing
from diffusion_jax import config_base
from diffusion_jax import errors
from diffusion_jax import images as images_lib
from diffusion_jax import inference
from diffusion_jax import runtime
from diffusion_jax import samplers
from diffusion_jax.evaluation import sample_export
from diffusion_jax.inference import LoadedModel  # noqa: F401 (API)
from diffusion_jax.inference import load_model  # noqa: F401 (API)
from diffusion_jax.inference import model_from_config  # noqa: F401 (API)

SAMPLERS = samplers.SAMPLERS


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
      or a `SamplerSpec` from `resolve_sampler`.
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
  spec = _spec(model, sampler, num_steps, eta, settings)
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
  **settings,
) -> dict[str, np.ndarray]:
  """Progressive generation (the paper's Figure 6): x0 predictions and x_t along the reverse process.

  Arguments as in `sample_fn`; `every`: record every k-th step (default: 10 pictures).

  Returns:
    dict with uint8 `samples` [N, H, W, C], `pred_xstart` and `trajectory` [N, K, H, W, C].
  """
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

  Returns:
    uint8 [len(lambdas), H, W, C].
  """
  if method not in ("paper", "slerp"):
    raise errors.UserError(f"method={method!r}: use 'paper' (mix the diffused images at t) or 'slerp'.")
  lambdas = np.linspace(0.0, 1.0, 11) if lambdas is None else np.asarray(lambdas, np.float32)
  if method == "slerp":
    if t is not None or same_noise or eta:
      raise errors.UserError("method='slerp' takes no t, same_noise or eta: it inverts both images with DDIM.")
    return _slerp_interpolation(model, x1, x2, lambdas, sampler, num_steps, label, guidance_scale, settings)
  spec = _spec(model, sampler, num_steps, eta, settings)
  t = model.diffusion.num_timesteps // 2 if t is None else int(t)

  def prep(x, name):
    x = np.asarray(x)
    if x.shape != model.image_shape:
      raise errors.UserError(f"{name} has shape {x.shape}; the model takes {model.image_shape} images.")
    return x.astype(np.float32) / 127.5 - 1.0 if x.dtype == np.uint8 else x.astype(np.float32)

  x1, x2 = prep(x1, "x1"), prep(x2, "x2")
  scale = inference.check_guidance(model, guidance_scale)
  guidance = {}
  if model.num_classes:
    n = int(np.shape(lambdas)[0])
    cond = (
      np.full((n,), model.network.null_label, np.int32) if label is None else inference.resolve_labels(model, label, n)
    )
    guidance = dict(cond=jnp.asarray(cond), guidance_scale=scale, null_label=model.network.null_label)
  elif label is not None:
    inference.resolve_labels(model, label, 1)  # raises: a label for an unconditional model

  model_fn = runtime.bind(runtime.model_fn(model.network), model.params)
  out = samplers.interpolate(
    model.diffusion,
    model_fn,
    rng,
    jnp.asarray(x1),
    jnp.asarray(x2),
    jnp.asarray(lambdas),
    t=t,
    sampler=spec,
    same_noise=same_noise,
    clip_denoised=clip_denoised,
    **guidance,
  )
  return images_lib.to_uint8(out)


# ----------------------------------------------------------------------------
# Editing: SDEdit, DDIM inversion, inpainting (samplers.edit, samplers.invert, samplers.inpaint).
# ----------------------------------------------------------------------------


def _float_images(model: LoadedModel, images, name: str = "images") -> np.ndarray:
  """[N, H, W, C] float32 in [-1, 1] from uint8 images (floats in [-1, 1] pass through) of the model's shape."""
  x = np.asarray(images)
  if x.ndim != 4 or x.shape[1:] != model.image_shape or x.shape[0] < 1:
    raise errors.UserError(f"{name} has shape {x.shape}; the model takes [N, *{model.image_shape}] batches.")
  return x.astype(np.float32) / 127.5 - 1.0 if x.dtype == np.uint8 else x.astype(np.float32)


def _guidance(model: LoadedModel, labels, n: int, guidance_scale) -> dict:
  """cond/guidance_scale/null_label for n images: `labels` (one or n), None = the null class (unconditional)."""
  scale = inference.check_guidance(model, guidance_scale)
  if not model.num_classes:
    if labels is not None:
      inference.resolve_labels(model, labels, n)  # raises: labels for an unconditional model
    return {}
  null = model.network.null_label
  cond = np.full((n,), null, np.int32) if labels is None else inference.resolve_labels(model, labels, n)
  return dict(cond=jnp.asarray(cond), guidance_scale=scale, null_label=null)


def _bound_model_fn(model: LoadedModel):
  return runtime.bind(runtime.model_fn(model.network), model.params)


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
  **settings,
) -> np.ndarray:
  """Image-to-image (SDEdit, Meng et al. 2022): noises the images part of the way and samples back.

  `strength` s ∈ (0, 1] picks t = max(round(s·T), 1) − 1; image i is diffused to t as
  q_sample(x_0, t, normal(fold_in(fold_in(rng, i), 0))) (the noise `sample_fn` would start image i from)
  and denoised from t by the sampler with `samplers.denoise`, on its grid for `num_steps` restricted to
  timesteps below t (so a smaller strength runs fewer steps). Small strengths return nearly the input;
  s = 1 nearly ignores it. One batch, on one device.

  Args:
    model: from `load_model`.
    images: uint8 [N, H, W, C] of the model's image shape (or floats in [-1, 1]).
    strength: in (0, 1].
    rng: a `jax.random.PRNGKey`.
    sampler, num_steps, eta, clip_denoised, guidance_scale, **settings: as in `sample_fn`.
    labels: conditional models: one class (int or name) or one per image; None uses the null class.

  Returns:
    uint8 [N, H, W, C].
  """
  spec = _spec(model, sampler, num_steps, eta, settings)
  x0 = _float_images(model, images)
  t = samplers.strength_to_timestep(strength, model.diffusion.num_timesteps)
  out = samplers.edit(
    model.diffusion,
    _bound_model_fn(model),
    rng,
    jnp.arange(x0.shape[0], dtype=jnp.int32),
    jnp.asarray(x0),
    t=t,
    sampler=spec,
    clip_denoised=clip_denoised,
    **_guidance(model, labels, x0.shape[0], guidance_scale),
  )
  return images_lib.to_uint8(out["samples"])


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
  **settings,
) -> np.ndarray:
  """DDIM inversion: the latents x_T from which deterministic DDIM regenerates the images (approximately).

  Runs the DDIM ODE upwards on the grid of `sampler` ("ddim", η = 0) for `num_steps` (`samplers.invert`;
  the network is evaluated at the current point, so the round trip is approximate and closer with more
  steps; `timestep_spacing="trailing"` is closer than the default `even` at few steps). `decode_fn` with the
  same settings maps the latents back to images; on the `even` and `trailing` grids the latents are at
  timestep T − 1, the start of `sample_fn`'s chain.

  Args:
    model: from `load_model`.
    images: uint8 [N, H, W, C] of the model's image shape (or floats in [-1, 1]).
    sampler, num_steps, **settings: a `ddim` spec or the name "ddim" with its settings (as in `sample_fn`).
    clip_denoised: clip x_0 predictions (off: clipping is not invertible).
    labels, guidance_scale: as in `edit_fn`.
    network_t: the network's timestep label in each inverse step: "target" (the timestep the step goes to,
      as diffusers' DDIMInverseScheduler is called; the closer round trip) or "current" (the point's own).

  Returns:
    float32 [N, H, W, C] latents.
  """
  spec = _spec(model, sampler, num_steps, None, settings)
  x0 = _float_images(model, images)
  out = samplers.invert(
    model.diffusion,
    _bound_model_fn(model),
    jnp.asarray(x0),
    spec,
    clip_denoised=clip_denoised,
    network_t=network_t,
    **_guidance(model, labels, x0.shape[0], guidance_scale),
  )
  return np.asarray(out["latents"])


def decode_fn(
  model: LoadedModel,
  latents,
  *,
  sampler: str | samplers.SamplerSpec = "ddim",
  num_steps: int | None = None,
  clip_denoised: bool = False,
  labels=None,
  guidance_scale: float = 1.0,
  **settings,
) -> np.ndarray:
  """uint8 images from `encode_fn` latents: deterministic DDIM from the top of the same grid down to 0.

  Arguments as in `encode_fn` (pass the same sampler settings); latents: float [N, H, W, C].
  """
  spec = _spec(model, sampler, num_steps, None, settings)
  if spec.name != "ddim" or spec.eta != 0:
    raise errors.UserError(f"decode_fn needs the ddim sampler with eta=0, got {spec.name!r} with eta={spec.eta}.")
  x = np.asarray(latents, np.float32)
  if x.ndim != 4 or x.shape[1:] != model.image_shape:
    raise errors.UserError(f"latents has shape {x.shape}; the model takes [N, *{model.image_shape}] batches.")
  out = samplers.denoise(
    model.diffusion,
    _bound_model_fn(model),
    jax.random.PRNGKey(0),  # unused: η = 0 draws no noise
    jnp.arange(x.shape[0], dtype=jnp.int32),
    jnp.asarray(x),
    t=int(samplers.inversion.inversion_grid(spec)[-1]),
    sampler=spec,
    clip_denoised=clip_denoised,
    **_guidance(model, labels, x.shape[0], guidance_scale),
  )
  return images_lib.to_uint8(out["samples"])


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
  **settings,
) -> np.ndarray:
  """Inpainting with any sampler: fills the pixels where masks == 0, keeping those where masks == 1.

  `resample` > 1 adds RePaint's resampling (`samplers.repaint`, Lugmayr et al. 2022) to the ancestral sampler,
  on all T steps or respaced (`num_steps`; RePaint: 250 of 1000): every `jump_length` steps the chain goes back
  up `jump_length` steps and redoes them, for `resample` passes in all (RePaint: 10 and 10), multiplying the
  network calls accordingly (`samplers.repaint.schedule` counts them). `resample_range=(lo, hi)` resamples
  only the stretches at timesteps lo <= t < hi. Unconditional models only.

  Image i is sampled as `sample_fn` samples image i (x_T and step noise from (rng, i)), with the known
  pixels replaced before every network call by the forward process of the input at that call's noise
  level (`samplers.inpaint`; noise from a separate stream of the same key). The known pixels of the
  result are the input's exactly. One batch, on one device.

  Args:
    model: from `load_model`.
    images: uint8 [N, H, W, C] of the model's image shape (or floats in [-1, 1]).
    masks: [N, H, W] or [N, H, W, 1] (or [N, H, W, C]) of 0/1 (or bool): 1 = keep.
    rng: a `jax.random.PRNGKey`.
    sampler, num_steps, eta, clip_denoised, guidance_scale, **settings: as in `sample_fn`.
    labels: as in `edit_fn`.

  Returns:
    uint8 [N, H, W, C].
  """
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
  if resample != 1 or resample_range is not None:
    if spec.name != "ancestral" or model.num_classes:
      raise errors.UserError(
        "resample > 1 and resample_range (RePaint) run the ancestral sampler of an unconditional model: use "
        f"sampler='ancestral' (got {spec.folder_name}" + (", a conditional model" if model.num_classes else "") + ")."
      )
    inference.resolve_labels(model, labels, x0.shape[0])  # raises for labels on an unconditional model
    out = samplers.repaint.repaint(
      model.diffusion,
      _bound_model_fn(model),
      rng,
      jnp.arange(x0.shape[0], dtype=jnp.int32),
      jnp.asarray(x0),
      jnp.asarray(m.astype(bool)),
      timesteps=samplers.ancestral.chain_timesteps(spec, None),
      jump_length=jump_length,
      jump_n_sample=resample,
      resample_range=resample_range,
      clip_denoised=clip_denoised,
    )
  else:
    out = samplers.inpaint(
      model.diffusion,
      _bound_model_fn(model),
      rng,
      jnp.arange(x0.shape[0], dtype=jnp.int32),
      jnp.asarray(x0),
      jnp.asarray(m.astype(bool)),
      sampler=spec,
      clip_denoised=clip_denoised,
      **_guidance(model, labels, x0.shape[0], guidance_scale),
    )
  known = np.broadcast_to(m.astype(bool), x0.shape)
  given = np.asarray(images)
  original = given if given.dtype == np.uint8 else images_lib.to_uint8(x0)
  return np.where(known, original, images_lib.to_uint8(out["samples"]))


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
) -> dict[str, np.ndarray]:
  """Bits/dim of each image through the probability-flow ODE: the `ode_bpd` evaluator's computation on a batch.

  The uint8 images are dequantised with uniform noise and their log density integrated from the data to
  τ = T with diffrax (`evaluation.likelihood`: the formula, the prior and the dequantisation terms), the
  divergence by the Skilling–Hutchinson estimator; bits/dim = −log p(z)/(D ln 2) + 7. The batch is one ODE
  system on one device (one adaptive step sequence), its dequantisation noise and probes drawn from `rng`
  for the whole batch.

  Args:
    model: from `load_model`; an eps, xstart or v model.
    images: uint8 [N, H, W, C] of the model's image shape.
    rng: a `jax.random.PRNGKey`.
    labels: class-conditional models: one label or N (the conditional density; None: the null class, i.e.
      the unconditional density the model learnt with label dropout); None for unconditional models.
    rtol, atol, solver, estimator, num_probes, t_start, step_to_knots: as in the `ode_bpd` evaluator
      (docs/editing.md).

  Returns:
    dict of NumPy arrays: `bpd` [N] = `prior_bpd` + `delta_bpd` + 7, the terms −log N(x_T; 0, I) and
    −∫ ∇·f dτ in bits/dim plus the dequantisation's 7 bits; `bpd_sem` [N], the trace estimator's standard error
    in bits/dim (NaN for one probe, 0 for `estimator="exact"`); `nfe` and `num_steps`, the network evaluations
    and solver steps of the batch.
  """
  from diffusion_jax.evaluation import likelihood  # noqa: PLC0415 (diffrax: imported when first used)

  x = np.asarray(images)
  if x.dtype != np.uint8:
    raise errors.UserError(f"images must be uint8 (the 8-bit data the bits/dim are of), got {x.dtype}.")
  x = _float_images(model, x)
  cond = _guidance(model, labels, x.shape[0], 1.0).get("cond")
  settings = likelihood.solver_settings(rtol, atol, solver, estimator, num_probes, t_start, step_to_knots)
  mesh = runtime.make_mesh(devices=jax.local_devices()[:1])
  fn = likelihood.batch_fn(model.network, mesh, settings, cond is not None)
  diffusion = runtime.put_replicated(model.diffusion, mesh)
  out = fn(model.params_on(mesh), diffusion, jnp.asarray(x), rng, *(() if cond is None else (cond,)))
  out = jax.device_get(out)
  d = int(np.prod(model.image_shape))
  to_bits = lambda nats: -np.asarray(nats, np.float64) / (d * np.log(2.0))  # noqa: E731
  return dict(
    bpd=np.asarray(out["bpd"], np.float64),
    bpd_sem=np.asarray(out["delta_logp_sem_bpd"], np.float64),
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


# ----------------------------------------------------------------------------
# --mode=sample: chunked, resumable sample sets (evaluation.sample_export).
# ----------------------------------------------------------------------------


def _config_labels(model: LoadedModel, text: str):
  """`sampling.labels` ('' = every class in turn; else comma-separated ints or class names) for the model."""
  text = str(text or "").strip()
  if not text:
    return None
  if not model.num_classes:
    raise errors.UserError(
      "config.sampling.labels applies to class-conditional models; this model is unconditional "
      "(leave --config.sampling.labels='')."
    )
  return [v.strip() for v in text.split(",") if v.strip()]


def _sample_folder(model: LoadedModel, spec: samplers.SamplerSpec, sc, labels) -> str:
  name = f"step_{model.step}_{spec.folder_name}"
  if model.num_classes and float(sc.guidance_scale) != 1.0:
    name += f"_cfg{float(sc.guidance_scale):g}"
  if labels is not None:
    text = "-".join(str(v) for v in labels)
    if len(text) > 40 or not text.replace("-", "").replace("_", "").isalnum():
      text = hashlib.sha1(",".join(map(str, labels)).encode()).hexdigest()[:10]
    name += f"_labels-{text}"
  if not sc.clip_denoised:
    name += "_noclip"
  return name + ("" if sc.use_ema else "_raw")


def class_grid(images: np.ndarray, labels: np.ndarray, num_classes: int, per_class: int = 10) -> np.ndarray:
  """[K·m, H, W, C] images arranged as one row per class (the first m samples of each class, blanks if fewer)."""
  rows = []
  for c in range(num_classes):
    picked = images[labels == c][:per_class]
    pad = np.zeros((per_class - len(picked),) + images.shape[1:], images.dtype)
    rows.append(np.concatenate([picked, pad]))
  return np.concatenate(rows)


def sample_to_workdir(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> epath.Path:
  """--mode=sample: samples the workdir's newest checkpoint into workdir/samples/.

  Writes `<name>/samples_*.npz` chunks (uint8 images; labels for conditional
  models), `<name>/grid.png` (one row per class for a conditional model) and
  `<name>/progressive.png`, where <name> records the step, the sampler and its
  settings (`SamplerSpec.folder_name`), guidance and labels. An interrupted run
  resumes from the last finished chunk.
  """
  sc = config.sampling
  model = load_model(workdir, use_ema=sc.use_ema)
  newer = [s for s in checkpointing.checkpoint_steps(workdir) if s > model.step]
  if newer:
    logging.warning(
      "SAMPLING THE CHECKPOINT OF STEP %d, NOT THE NEWEST: the checkpoint(s) of step %s in %s could "
      "not be read (see the warnings above). The samples go to a folder named after step %d.",
      model.step,
      ", ".join(map(str, newer)),
      checkpointing.checkpoint_dir(workdir),
      model.step,
    )
  spec = samplers.SamplerSpec.from_config(sc, num_timesteps=model.diffusion.num_timesteps)
  labels = _config_labels(model, sc.get("labels", ""))
  if labels is not None and len(labels) not in (1, sc.num_samples):
    raise errors.UserError(
      f"config.sampling.labels lists {len(labels)} labels for num_samples={sc.num_samples}: give one "
      "label, or one per sample."
    )
  resolved = inference.resolve_labels(
    model, None if labels is None else (labels if len(labels) > 1 else labels[0]), sc.num_samples
  )
  scale = float(sc.get("guidance_scale", 1.0))
  out_dir = epath.Path(workdir) / "samples" / _sample_folder(model, spec, sc, labels)
  rng = jax.random.PRNGKey(config.eval.seed)
  logging.info(
    "Sampling step %d of %s (%s%s) into %s.",
    model.step,
    workdir,
    spec.folder_name,
    f", guidance {scale:g}" if model.num_classes else "",
    out_dir,
  )
  paths = sample_export.write_sample_chunks(
    model,
    out_dir,
    sc.num_samples,
    rng,
    spec,
    clip_denoised=sc.clip_denoised,
    chunk_size=sc.batch_size,
    labels=resolved,
    guidance_scale=scale,
  )
  if jax.process_index() == 0:
    images, chunk_labels = sample_export.read_sample_chunks(paths, with_labels=True)
    scale_px = max(1, 64 // model.image_shape[0])
    grid_path = out_dir / "grid.png"
    if not grid_path.exists():
      if model.num_classes and labels is None:
        per_class = max(1, min(10, sc.num_samples // model.num_classes))
        save_image_grid(
          class_grid(images, chunk_labels, model.num_classes, per_class), grid_path, ncols=per_class, scale=scale_px
        )
      else:
        save_image_grid(images[:256], grid_path, scale=scale_px)
    prog_path = out_dir / "progressive.png"
    if not prog_path.exists():
      n_prog = min(8, sc.num_samples)
      prog = progressive_fn(
        model, n_prog, rng, sampler=spec, labels=None if resolved is None else resolved[:n_prog], guidance_scale=scale
      )
      rows = prog["pred_xstart"]  # [N, K, H, W, C]: one row per sample, x0 predictions left to right
      k = rows.shape[1]
      save_image_grid(rows.reshape((-1,) + rows.shape[2:]), prog_path, ncols=k, scale=scale_px)
    logging.info("Wrote %d samples, %s and %s to %s.", sc.num_samples, grid_path.name, prog_path.name, out_dir)
  return out_dir


# ----------------------------------------------------------------------------
# --mode=inpaint: a folder of images and masks in, a folder and a grid out.
# ----------------------------------------------------------------------------

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
MASK_SUFFIX = "_mask"


def _read_inpaint_inputs(folder: epath.Path, model: LoadedModel):
  """(names, uint8 images [N, H, W, C], 0/1 masks [N, H, W]) of `folder`: each image X with its mask X_mask.png."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  if not folder.is_dir():
    raise errors.MissingFileError(f"--inputs={folder} is not a folder of images and masks.")
  files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
  images_in = [p for p in files if not p.stem.endswith(MASK_SUFFIX)]
  if not images_in:
    raise errors.UserError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)}) to inpaint.")
  h, w, c = model.image_shape
  names, images, masks = [], [], []
  for path in images_in:
    mask_path = next((p for p in files if p.stem == path.stem + MASK_SUFFIX), None)
    if mask_path is None:
      raise errors.MissingFileError(
        f"{path.name} has no mask: add {path.stem}{MASK_SUFFIX}.png (white = keep, black = fill) to {folder}."
      )
    with path.open("rb") as f:
      image = np.asarray(Image.open(f).convert("L" if c == 1 else "RGB"))
    with mask_path.open("rb") as f:
      mask = np.asarray(Image.open(f).convert("L"))
    image = image[..., None] if image.ndim == 2 else image
    if image.shape != (h, w, c) or mask.shape != (h, w):
      raise errors.UserError(
        f"{path.name} is {image.shape[1]}×{image.shape[0]} and its mask {mask.shape[1]}×{mask.shape[0]}; this "
        f"model inpaints {w}×{h} images: resize both first."
      )
    names.append(path.stem)
    images.append(image)
    masks.append((mask >= 128).astype(np.uint8))
  return names, np.stack(images), np.stack(masks)


def inpaint_folder(config: ml_collections.ConfigDict, workdir: str | os.PathLike, inputs: str | os.PathLike):
  """--mode=inpaint: fills the black part of each image's mask with the workdir's newest model.

  `inputs` holds images X.png (the model's size) and masks X_mask.png (white = keep, black = fill). The
  sampler is `config.sampling`'s (with RePaint's resampling for `sampling.resample` > 1 and
  `sampling.jump_length`); image i is sampled from (config.eval.seed, i) in batches of
  `config.sampling.batch_size`. Writes `workdir/inpaint/<inputs folder>_step_<step>_<sampler settings>[_n]/`:
  X.png for each image and grid.png (one row per image: the input with the fill region black, the result).
  Earlier results are never overwritten: a new run gets the next free `_n`.

  Returns:
    The output folder.
  """
  sc = config.sampling
  model = load_model(workdir, use_ema=sc.use_ema)
  spec = samplers.SamplerSpec.from_config(sc, num_timesteps=model.diffusion.num_timesteps)
  resample, jump_length = int(sc.get("resample", 1)), int(sc.get("jump_length", 10))
  settings = spec.folder_name + (f"_resample{resample}_jump{jump_length}" if resample != 1 else "")
  names, images, masks = _read_inpaint_inputs(epath.Path(inputs), model)
  base = epath.Path(workdir) / "inpaint" / f"{epath.Path(inputs).name}_step_{model.step}_{settings}"
  out_dir, n = base, 0
  while out_dir.exists():
    n += 1
    out_dir = base.parent / f"{base.name}_{n}"
  rng = jax.random.PRNGKey(config.eval.seed)
  batch = max(1, int(sc.batch_size))
  logging.info(
    "Inpainting %d images of %s with step %d (%s) into %s.", len(names), inputs, model.step, settings, out_dir
  )
  filled = np.concatenate(
    [
      inpaint_fn(
        model,
        images[i : i + batch],
        masks[i : i + batch],
        jax.random.fold_in(rng, i),
        sampler=spec,
        clip_denoised=sc.clip_denoised,
        guidance_scale=float(sc.get("guidance_scale", 1.0)),
        resample=resample,
        jump_length=jump_length,
      )
      for i in range(0, len(names), batch)
    ]
  )
  if jax.process_index() == 0:
    out_dir.mkdir(parents=True, exist_ok=False)
    for name, image in zip(names, filled):
      images_lib.save_image(image, out_dir / f"{name}.png")
    blanked = images * masks[..., None]
    scale = max(1, 64 // model.image_shape[0])
    save_image_grid(
      np.stack([blanked, filled], axis=1).reshape((-1,) + filled.shape[1:]), out_dir / "grid.png", ncols=2, scale=scale
    )
    logging.info("Wrote %d inpainted images and grid.png to %s.", len(names), out_dir)
  return out_dir


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


def _slerp_interpolation(model, x1, x2, lambdas, sampler, num_steps, label, guidance_scale, settings):
  sampler = "ddim" if sampler == "ancestral" else sampler  # the default of interpolate_fn: DDIM inverts
  both = np.stack([np.asarray(x1), np.asarray(x2)])
  labels = None if label is None else [label, label]
  kw = dict(sampler=sampler, num_steps=num_steps, labels=labels, guidance_scale=guidance_scale, **settings)
  z1, z2 = encode_fn(model, both, **kw)
  latents = np.stack([slerp(z1, z2, float(lam)) for lam in np.asarray(lambdas).reshape(-1)])
  kw["labels"] = None if label is None else [label] * len(latents)
  return decode_fn(model, latents, **kw)
