r"""Editing real digits with a trained quickstart model: inpainting, SDEdit and DDIM inversion, measured.

On the digits test split (297 images) and the shipped digit classifier (docs/digits_metric.md):

* inpainting: the lower half and the right half of each test digit are filled in (the other half kept) with
  the paper's ancestral sampler (1000 steps), the ancestral sampler respaced to 250 steps without and with
  RePaint's resampling (jump length 10, 10 passes: RePaint's setting), DDIM (50 steps) and DPM-Solver++(2M) SDE
  (20 steps); for each, how often the classifier gives back the digit's label, the digit metric of the 297
  results against the train split, the network calls per image and the wall time. Two reference rows: the
  unedited test digits, and the kept half with the other half black (no model);
* SDEdit (`edit_fn`): label-keeping, the mean absolute pixel change and the digit metric against the strength;
* DDIM inversion (`encode_fn` then `decode_fn`): the round-trip error against the number of steps;
* likelihood (after `--mode=eval --config.eval.metrics=bpd,ode_bpd --config.eval.drop_remainder=False` on the
  workdir): the ODE bits/dim against the variational bound from the two evaluators' JSON files, and a picture of
  the test digits ordered by their ODE bits/dim (the per-image results of the `ode_bpd` evaluator).

Prints Markdown tables; --json_out writes every figure; --pictures_dir writes the README pictures.

  python -m benchmarks.editing_digits --workdir=runs/digits --json_out=/tmp/editing.json \
    --pictures_dir=docs
"""

from __future__ import annotations

import json
import time

import jax
import numpy as np
from absl import app
from absl import flags
from etils import epath

from benchmarks import harness
from diffusion_jax import cli
from diffusion_jax import images as images_lib
from diffusion_jax import input_pipeline
from diffusion_jax import sampling
from diffusion_jax.evaluation import digits_metric
from diffusion_jax.samplers import repaint

_WORKDIR = flags.DEFINE_string("workdir", "runs/digits", "A trained digits workdir (configs/digits.py).")
_PARTS = flags.DEFINE_list("parts", ["inpaint", "sdedit", "inversion"], "What to measure.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling rng.")
_REPAINT_STEPS = flags.DEFINE_integer("repaint_steps", 250, "Steps of the respaced ancestral chain for RePaint.")
_RESAMPLE = flags.DEFINE_integer("resample", 10, "RePaint's passes over each stretch.")
_JUMP = flags.DEFINE_integer("jump_length", 10, "RePaint's jump length.")
_STRENGTHS = flags.DEFINE_list("strengths", ["0.05", "0.1", "0.2", "0.3", "0.4", "0.5", "0.6", "0.8", "1.0"], "SDEdit.")
_INVERSION_STEPS = flags.DEFINE_list(
  "inversion_steps", ["10", "20", "50", "100", "250", "1000"], "DDIM inversion steps."
)
_NETWORK_T = flags.DEFINE_enum(
  "network_t", "target", ["target", "current"], "encode_fn's network_t (the network's timestep label)."
)
_JSON_OUT = flags.DEFINE_string("json_out", "", "Write the results here as JSON.")
_PICTURES = flags.DEFINE_string("pictures_dir", "", "Write the README pictures (editing_*.png) here.")
_PICTURE_COLUMNS = 10  # test digits shown in each picture: the first of each class

# The README's step counts: the paper's 1000-step sampler, DDIM at 50 (the Colab example), DPM-Solver++(2M) SDE at 20
# (the quickstart's grids and evaluation).
INPAINT_SETTINGS = (
  ("ancestral, 1000 steps", dict(sampler="ancestral", num_steps=1000)),
  ("ancestral, 250 steps", dict(sampler="ancestral", num_steps=250)),
  ("ancestral, 250 steps, RePaint", dict(sampler="ancestral", num_steps=250, resample=None)),
  ("DDIM, 50 steps", dict(sampler="ddim", num_steps=50)),
  ("DPM-Solver++(2M) SDE, 20 steps", dict(sampler="dpmpp2m_sde", num_steps=20)),
)
SDEDIT_SETTINGS = (
  ("DPM-Solver++(2M) SDE, 20 steps", dict(sampler="dpmpp2m_sde", num_steps=20)),
  ("DDIM, 50 steps", dict(sampler="ddim", num_steps=50)),
)
PICTURE_STRENGTHS = (0.1, 0.2, 0.3, 0.4, 0.6, 1.0)
FIGURES = ("digits_fd", "digits_is", "digits_confidence", "digits_precision", "digits_recall")


def masks_for(kind: str, n: int) -> np.ndarray:
  """uint8 [n, 8, 8] masks, 1 = keep: `lower` fills the lower half, `right` the right half."""
  m = np.zeros((n, 8, 8), np.uint8)
  if kind == "lower":
    m[:, :4, :] = 1
  else:
    m[:, :, :4] = 1
  return m


def score(images: np.ndarray, labels: np.ndarray, reference: np.ndarray) -> dict:
  """Label-keeping and the digit metric of uint8 [N, 8, 8, 1] images against the train split."""
  _, logits = digits_metric.classify(images)
  metrics = digits_metric.compute_digit_metrics(images, reference)
  out = {k: float(metrics[k]) for k in FIGURES}
  out["label_kept"] = float(np.mean(logits.argmax(axis=1) == labels))
  return out


def _row(first, s, rest=()):
  return [*first, *rest, f"{s['label_kept']:.3f}", *(f"{s[k]:.3f}" for k in FIGURES)]


def _picture(path, rows, scale=8):
  """One PNG: each entry of `rows` is uint8 [C, 8, 8, 1], one picture row."""
  grid = np.concatenate(rows)
  images_lib.save_image(images_lib.make_grid(grid, ncols=rows[0].shape[0], scale=scale), path, overwrite=True)
  print(f"wrote {path}", flush=True)


def _show(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """The kept part of uint8 images with the part to fill shown mid-grey."""
  return np.where(mask[..., None].astype(bool), x, np.uint8(128))


def inpaint(model, test, labels, reference, rng, show, results):
  header = ["fill", "sampler", "network calls", "s (one run, incl. compilation)", "label kept", *FIGURES]
  table, pictures = [], {}
  for kind in ("lower", "right"):
    masks = masks_for(kind, len(test))
    blank = np.where(masks[..., None].astype(bool), test, np.uint8(0))
    for name, images in (("unedited test digits", test), ("kept half, other half black", blank)):
      s = score(images, labels, reference)
      results[f"inpaint/{kind}/{name}"] = s
      table.append(_row((kind, name), s, ("", "")))
    pictures[kind] = [test[show], _show(test, masks)[show]]
    for name, settings in INPAINT_SETTINGS:
      settings = dict(settings)
      calls = settings["num_steps"]
      if "resample" in settings:
        settings.update(resample=_RESAMPLE.value, jump_length=_JUMP.value)
        calls = repaint.schedule(_REPAINT_STEPS.value, _JUMP.value, _RESAMPLE.value)[2]
        settings["num_steps"] = _REPAINT_STEPS.value
      start = time.perf_counter()
      filled = sampling.inpaint_fn(model, test, masks, rng, **settings)
      seconds = time.perf_counter() - start
      known = masks[..., None].astype(bool)
      assert np.array_equal(np.where(known, filled, 0), np.where(known, test, 0))  # the mask invariant
      s = score(filled, labels, reference)
      s.update(network_calls=int(calls), seconds=seconds, settings={k: v for k, v in settings.items()})
      results[f"inpaint/{kind}/{name}"] = s
      table.append(_row((kind, name), s, (str(calls), f"{seconds:.1f}")))
      pictures[kind].append(filled[show])
      print(f"  inpaint {kind} half, {name}: label kept {s['label_kept']:.3f} ({seconds:.1f} s)", flush=True)
  _table("Inpainting the digits test split", header, table)
  return pictures


def sdedit(model, test, labels, reference, rng, show, results):
  header = ["sampler", "strength", "mean |change| (0-255)", "label kept", *FIGURES]
  table, picture = [], [test[show]]
  for name, settings in SDEDIT_SETTINGS:
    for strength in [float(v) for v in _STRENGTHS.value]:
      start = time.perf_counter()
      edited = sampling.edit_fn(model, test, strength, rng, **settings)
      seconds = time.perf_counter() - start
      s = score(edited, labels, reference)
      change = float(np.mean(np.abs(edited.astype(np.float64) - test.astype(np.float64))))
      s.update(strength=strength, mean_abs_change=change, seconds=seconds)
      results[f"sdedit/{name}/{strength:g}"] = s
      table.append(_row((name, f"{strength:g}", f"{change:.1f}"), s))
      if name == SDEDIT_SETTINGS[0][0] and strength in PICTURE_STRENGTHS:
        picture.append(edited[show])
      print(f"  SDEdit {name}, strength {strength:g}: label kept {s['label_kept']:.3f}", flush=True)
  _table("SDEdit on the digits test split", header, table)
  return picture


def inversion(model, test, labels, results):
  header = ["steps", "network calls", "s", "RMSE (0-255)", "max |error| (0-255)", "PSNR (dB)", "label kept"]
  table, decoded = [], {}
  for steps in [int(v) for v in _INVERSION_STEPS.value]:
    start = time.perf_counter()
    latents = sampling.encode_fn(model, test, num_steps=steps, network_t=_NETWORK_T.value)
    again = sampling.decode_fn(model, latents, num_steps=steps)
    seconds = time.perf_counter() - start
    err = again.astype(np.float64) - test.astype(np.float64)
    rmse = float(np.sqrt(np.mean(err**2)))
    _, logits = digits_metric.classify(again)
    s = dict(
      steps=steps,
      network_calls=2 * steps,
      seconds=seconds,
      rmse=rmse,
      max_abs_error=float(np.abs(err).max()),
      psnr=float(20 * np.log10(255.0 / max(rmse, 1e-12))),
      label_kept=float(np.mean(logits.argmax(axis=1) == labels)),
      latent_std=float(np.std(latents)),
    )
    results[f"inversion/{steps}"] = s
    decoded[steps] = (latents, again)
    table.append(
      [steps, 2 * steps, f"{seconds:.1f}", f"{rmse:.2f}", f"{s['max_abs_error']:.0f}", f"{s['psnr']:.1f}"]
      + [f"{s['label_kept']:.3f}"]
    )
    print(f"  inversion {steps} steps: RMSE {rmse:.2f}", flush=True)
  _table("DDIM inversion round trip on the digits test split (encode_fn, then decode_fn)", header, table)
  return decoded


def _field(result: dict, key: str):
  """A figure or setting of an evaluator's JSON (the schema of evaluation/evaluators/)."""
  for part in ("figures", "settings", "details"):
    if key in result.get(part, {}):
      return result[part][key]
  raise KeyError(f"{key} is not in {result['name']}'s results")


def likelihood(workdir, test, step, results):
  """The ode_bpd and bpd evaluators' figures at `step`, and the test digits ordered by per-image ODE bits/dim."""
  eval_dir = epath.Path(workdir) / "eval"
  ode = json.loads((eval_dir / f"ode_bpd_step_{step:06d}.json").read_text())
  bound = json.loads((eval_dir / f"bpd_step_{step:06d}.json").read_text())
  folder = epath.Path(_field(ode, "out_dir"))
  per_image = [np.load(p) for p in sorted(folder.glob("batch_*.npz"))]
  bpd = np.concatenate([b["bpd"] for b in per_image])
  index = np.concatenate([b["index"] for b in per_image])
  results["likelihood"] = dict(ode_bpd=ode["figures"], bound=bound["figures"], ode_settings=ode["settings"])
  header = ["", "bits/dim", "± (s.e.m. over images)", "images", "s"]
  rows = [
    ["probability-flow ODE (ode_bpd)", f"{ode['figures']['ode_bpd']:.3f}", f"{ode['figures']['ode_bpd_sem']:.3f}"]
    + [_field(ode, "num_examples"), f"{sum(ode['seconds'].values()):.0f}"],
    [
      "variational bound (bpd)",
      f"{bound['figures']['total_bpd']:.3f}",
      f"{bound['figures']['total_bpd_sem']:.3f}",
    ]
    + [_field(bound, "num_examples"), f"{sum(bound['seconds'].values()):.0f}"],
  ]
  _table(f"Bits/dim of the digits test split, step {step}", header, rows)
  order = index[np.argsort(bpd)]
  n = _PICTURE_COLUMNS
  middle = len(order) // 2 - n // 2
  print(f"ODE bits/dim per image: lowest {np.sort(bpd)[:n].round(2)}, highest {np.sort(bpd)[-n:].round(2)}")
  return [test[order[:n]], test[order[middle : middle + n]], test[order[-n:]]]


def _table(title, header, rows):
  print(f"\n### {title}\n")
  print("| " + " | ".join(header) + " |")
  print("|" + "---|" * len(header))
  for row in rows:
    print("| " + " | ".join(str(v) for v in row) + " |")
  print(flush=True)


def main(argv):
  del argv
  cli.quiet_logging()
  model = sampling.load_model(_WORKDIR.value)
  test, labels = input_pipeline.load_digits("test")
  reference, _ = input_pipeline.load_digits("train")
  rng = jax.random.PRNGKey(_SEED.value)
  show = np.array([int(np.flatnonzero(labels == c)[0]) for c in range(_PICTURE_COLUMNS)])
  print(f"{model!r}: {len(test)} test digits, seed {_SEED.value}", flush=True)
  results = {"workdir": _WORKDIR.value, "step": int(model.step), "seed": _SEED.value, "num_images": len(test)}
  pictures = _PICTURES.value
  if "inpaint" in _PARTS.value:
    rows = inpaint(model, test, labels, reference, rng, show, results)
    if pictures:
      for kind, picture in rows.items():
        _picture(f"{pictures}/editing_inpaint_{kind}.png", picture)
  if "sdedit" in _PARTS.value:
    picture = sdedit(model, test, labels, reference, rng, show, results)
    if pictures:
      _picture(f"{pictures}/editing_sdedit.png", picture)
  if "inversion" in _PARTS.value:
    decoded = inversion(model, test, labels, results)
    if pictures:
      steps = sorted(decoded)
      latent = images_lib.to_uint8(np.clip(decoded[steps[-1]][0][show] / 3.0, -1.0, 1.0))  # x_T / 3, clipped
      rows = [test[show], latent] + [decoded[s][1][show] for s in (steps[0], steps[-1])]
      _picture(f"{pictures}/editing_inversion.png", rows)
  if "likelihood" in _PARTS.value:
    rows = likelihood(_WORKDIR.value, test, int(model.step), results)
    if pictures:
      _picture(f"{pictures}/editing_likelihood.png", rows)
  harness.write_json(_JSON_OUT.value, results)


if __name__ == "__main__":
  app.run(main)
