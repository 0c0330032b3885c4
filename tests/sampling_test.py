"""Tests of the notebook-facing sampling API and --mode=sample exports."""

import os

import jax
import numpy as np
import pytest

from configs import tiny
from diffusion_jax import checkpointing
from diffusion_jax import config_base
from diffusion_jax import runtime
from diffusion_jax import samplers
from diffusion_jax import sampling
from diffusion_jax import workdirs
from diffusion_jax.evaluation import sample_export


def _random_params(cfg, seed=0):
  """Tiny-UNet parameters with every tensor randomised, so the output is far from zero."""
  model = runtime.build_network(cfg)
  params = runtime.init_params(model, jax.random.PRNGKey(seed), (8, 8, 1))
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
  leaves = [np.asarray(x + 0.05 * jax.random.normal(k, x.shape)) for x, k in zip(leaves, keys)]
  return jax.tree.unflatten(treedef, leaves)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  cfg = tiny.get_config()
  path = tmp_path_factory.mktemp("model")
  params = _random_params(cfg)
  ema = jax.tree.map(lambda x: x * 0.5, params)
  checkpointing.save_model_checkpoint(path, config=cfg, params=params, ema_params=ema, step=3)
  return path


def test_load_model_picks_ema_or_raw(workdir):
  ema = sampling.load_model(workdir)
  raw = sampling.load_model(workdir, use_ema=False)
  assert ema.step == 3 and ema.use_ema and not raw.use_ema
  np.testing.assert_allclose(ema.params["conv_out"]["kernel"], 0.5 * raw.params["conv_out"]["kernel"], rtol=1e-6)
  assert ema.image_shape == (8, 8, 1)
  assert "step=3" in repr(ema)
  # Also from the checkpoints folder and a step folder.
  assert sampling.load_model(workdir / "checkpoints").step == 3
  assert sampling.load_model(workdir / "checkpoints" / "3").step == 3


def test_load_model_errors(tmp_path, workdir):
  with pytest.raises(FileNotFoundError, match="holds no diffusion_jax checkpoint"):
    sampling.load_model(tmp_path)
  with pytest.raises(FileNotFoundError, match="No checkpoint of step 9"):
    sampling.load_model(workdir, step=9)


def test_sample_fn_is_independent_of_batch_size(workdir):
  model = sampling.load_model(workdir)
  rng = jax.random.PRNGKey(0)
  a = sampling.sample_fn(model, 6, rng, sampler="ddim", num_steps=5, batch_size=8, progress=False)
  b = sampling.sample_fn(model, 6, rng, sampler="ddim", num_steps=5, batch_size=4, progress=False)
  assert a.dtype == np.uint8 and a.shape == (6, 8, 8, 1)
  np.testing.assert_array_equal(a, b)
  assert len(np.unique(a.reshape(6, -1), axis=0)) == 6  # different images per index
  c = sampling.sample_fn(model, 6, jax.random.PRNGKey(1), sampler="ddim", num_steps=5, progress=False)
  assert not np.array_equal(a, c)


def test_sample_fn_ancestral_full_and_argument_errors(workdir):
  model = sampling.load_model(workdir)
  x = sampling.sample_fn(model, 4, jax.random.PRNGKey(0), progress=False)  # all T = 20 ancestral steps
  assert x.shape == (4, 8, 8, 1)
  with pytest.raises(ValueError, match="Unknown sampler 'plms'"):
    sampling.sample_fn(model, 4, jax.random.PRNGKey(0), sampler="plms")
  with pytest.raises(ValueError, match=r"num_steps=50 is out of range: use an integer in \[1, 20\]"):
    sampling.sample_fn(model, 4, jax.random.PRNGKey(0), num_steps=50)
  with pytest.raises(ValueError, match="num_samples must be an integer >= 1"):
    sampling.sample_fn(model, 0, jax.random.PRNGKey(0))


def test_progressive_and_interpolation(workdir):
  model = sampling.load_model(workdir)
  prog = sampling.progressive_fn(model, 2, jax.random.PRNGKey(0), every=5)
  assert prog["pred_xstart"].shape == (2, 4, 8, 8, 1) and prog["pred_xstart"].dtype == np.uint8
  np.testing.assert_array_equal(prog["pred_xstart"][:, -1], prog["samples"])
  x1 = np.zeros((8, 8, 1), np.uint8)
  x2 = np.full((8, 8, 1), 255, np.uint8)
  out = sampling.interpolate_fn(
    model, x1, x2, jax.random.PRNGKey(0), lambdas=[0.0, 0.5, 1.0], t=10, sampler="ddim", num_steps=10
  )
  assert out.shape == (3, 8, 8, 1)
  with pytest.raises(ValueError, match=r"x1 has shape \(4, 4, 1\)"):
    sampling.interpolate_fn(model, np.zeros((4, 4, 1), np.uint8), x2, jax.random.PRNGKey(0))


def test_save_image_grid_never_overwrites(tmp_path):
  images = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 1), dtype=np.uint8)
  path = sampling.save_image_grid(images, tmp_path / "g.png", scale=2)
  from PIL import Image

  grid = np.asarray(Image.open(path))
  assert grid.shape == (2 * (16 + 2) + 2, 3 * (16 + 2) + 2)
  np.testing.assert_array_equal(grid[2:18, 2:18], images[0, :, :, 0].repeat(2, 0).repeat(2, 1))
  with pytest.raises(FileExistsError, match="refusing to overwrite"):
    sampling.save_image_grid(images, path)
  # Asked to, it replaces the file (through a temporary file and a rename, as every write).
  again = sampling.save_image_grid(images[::-1], path, scale=2, overwrite=True)
  np.testing.assert_array_equal(
    np.asarray(Image.open(again))[2:18, 2:18], images[-1, :, :, 0].repeat(2, 0).repeat(2, 1)
  )
  assert sorted(p.name for p in tmp_path.iterdir()) == ["g.png"]


def test_chunked_export_resumes_without_gaps_or_duplicates(workdir, tmp_path):
  model = sampling.load_model(workdir)
  rng = jax.random.PRNGKey(0)
  spec = samplers.resolve("ddim", num_timesteps=model.diffusion.num_timesteps, num_steps=4)
  kw = dict(spec=spec, clip_denoised=True, chunk_size=4, progress=False)
  full = sample_export.read_sample_chunks(sample_export.write_sample_chunks(model, tmp_path / "full", 10, rng, **kw))
  assert full.shape == (10, 8, 8, 1)

  # An interrupted export: two chunks written, one lost mid-write (a stray temporary file).
  out = tmp_path / "resumed"
  paths = sample_export.write_sample_chunks(model, out, 8, rng, **kw)
  paths[1].rename(out / (paths[1].name + ".tmp"))
  first_mtime = os.stat(paths[0]).st_mtime_ns
  paths = sample_export.write_sample_chunks(model, out, 10, rng, **kw)
  assert [p.name for p in paths] == [
    "samples_0000000_0000004.npz",
    "samples_0000004_0000008.npz",
    "samples_0000008_0000010.npz",
  ]
  assert os.stat(paths[0]).st_mtime_ns == first_mtime  # finished chunks are kept, not rewritten
  resumed = sample_export.read_sample_chunks(paths)
  np.testing.assert_array_equal(resumed, full)
  indices = np.concatenate([np.load(p)["indices"] for p in paths])
  np.testing.assert_array_equal(indices, np.arange(10))


def test_sample_to_workdir_writes_grid_progressive_and_chunks(workdir, tmp_path):
  import shutil

  run = tmp_path / "run"
  shutil.copytree(workdir, run)
  cfg = workdirs.read_config(run)
  cfg.sampling.sampler = "ddim"
  cfg.sampling.num_steps = 5
  cfg.sampling.num_samples = 6
  cfg.sampling.batch_size = 4
  out = sampling.sample_to_workdir(cfg, run)
  assert out.name == "step_3_ddim_5steps_eta0"
  names = sorted(p.name for p in out.iterdir())
  assert names == ["grid.png", "progressive.png", "samples_0000000_0000004.npz", "samples_0000004_0000006.npz"]
  # A second run finds everything done and changes nothing.
  before = {p.name: os.stat(p).st_mtime_ns for p in out.iterdir()}
  sampling.sample_to_workdir(cfg, run)
  assert {p.name: os.stat(p).st_mtime_ns for p in out.iterdir()} == before


class _CompileLog:
  """Counts `jax.log_compiles` records "Compiling jit(<name>)" (logged whether or not the persistent cache hits)."""

  def __init__(self):
    import logging

    self.messages = []
    self._handler = logging.Handler()
    self._handler.emit = lambda record: self.messages.append(record.getMessage())
    self._logger = logging.getLogger("jax")

  def __enter__(self):
    self._logger.addHandler(self._handler)
    self._context = jax.log_compiles()
    self._context.__enter__()
    return self

  def __exit__(self, *exc):
    self._context.__exit__(*exc)
    self._logger.removeHandler(self._handler)

  def count(self, name):
    return sum(m.startswith(f"Compiling jit({name})") for m in self.messages)


def test_one_compilation_per_sample_set_and_per_interpolation(workdir, tmp_path):
  """A three-chunk export with a partial last chunk compiles the chain once; so do two interpolate_fn calls."""
  model = sampling.load_model(workdir)
  rng = jax.random.PRNGKey(0)
  with _CompileLog() as log:
    spec = samplers.resolve("dpmpp2m", num_timesteps=model.diffusion.num_timesteps, num_steps=4)
    paths = sample_export.write_sample_chunks(
      model, tmp_path / "set", 10, rng, spec, clip_denoised=True, chunk_size=4, progress=False
    )
  assert len(paths) == 3 and log.count("sharded_sample") == 1, log.messages

  x1, x2 = np.zeros((8, 8, 1), np.uint8), np.full((8, 8, 1), 255, np.uint8)
  other = sampling.load_model(workdir, use_ema=False)  # other parameters, same shapes
  with _CompileLog() as first:  # (the module-level chain may already be compiled by another test: 0 or 1)
    a = sampling.interpolate_fn(model, x1, x2, rng, lambdas=[0.0, 0.5, 1.0], t=10, sampler="ddim", num_steps=3)
  with _CompileLog() as second:
    b = sampling.interpolate_fn(other, x2, x1, rng, lambdas=[0.0, 0.5, 1.0], t=10, sampler="ddim", num_steps=3)
  assert first.count("_run") <= 1 and first.count("_diffuse_and_mix") <= 1, first.messages
  assert second.count("_run") == 0 and second.count("_diffuse_and_mix") == 0, second.messages
  assert not np.array_equal(a, b)


def test_sampler_names_and_settings_are_validated_in_one_place(workdir):
  model = sampling.load_model(workdir)
  rng = jax.random.PRNGKey(0)
  x = np.zeros((8, 8, 1), np.uint8)
  calls = [
    lambda **kw: sampling.sample_fn(model, 2, rng, progress=False, **kw),
    lambda **kw: sampling.progressive_fn(model, 2, rng, **kw),
    lambda **kw: sampling.interpolate_fn(model, x, x, rng, t=5, **kw),
  ]
  for call in calls:
    with pytest.raises(ValueError, match="Unknown sampler 'plms'; valid choices are ancestral, ddim, dpmpp2m"):
      call(sampler="plms")
    with pytest.raises(ValueError, match=r"num_steps=0 is out of range: use an integer in \[1, 20\]"):
      call(sampler="ddim", num_steps=0)
    with pytest.raises(ValueError, match="eta must be a finite scalar >= 0"):
      call(sampler="ddim", num_steps=4, eta=-0.5)
    with pytest.raises(ValueError, match=r"needs num_steps >= 3"):
      call(sampler="dpmpp3m", num_steps=2)
    with pytest.raises(ValueError, match="timestep_spacing='sideways' is not available"):
      call(sampler="ddim", num_steps=4, timestep_spacing="sideways")
    with pytest.raises(ValueError, match="Unknown sampler settings"):
      call(sampler="ddim", num_steps=4, stepz=3)
  spec = samplers.resolve("dpmpp2m", num_timesteps=20, num_steps=8, sigma_schedule="karras")
  assert spec.folder_name == "dpmpp2m_8steps_karras" and spec.network_calls == 8
  assert samplers.resolve("heun", num_timesteps=20, num_steps=5).network_calls == 9  # 2 per step but the last
  section = config_base.sampler_section("dpmpp2m", num_steps=8)
  section.sigma_schedule = "karras"
  assert samplers.SamplerSpec.from_config(section, num_timesteps=20) == spec
  section.stepz = 3
  with pytest.raises(ValueError, match=r"Unknown sampler settings \['stepz'\]"):
    samplers.SamplerSpec.from_config(section, num_timesteps=20)


def test_sample_to_workdir_names_folders_by_sampler_settings(workdir, tmp_path):
  import shutil

  run = tmp_path / "run"
  shutil.copytree(workdir, run)
  cfg = workdirs.read_config(run)
  cfg.sampling.sampler, cfg.sampling.num_steps, cfg.sampling.sigma_schedule = "dpmpp2m", 5, "karras"
  cfg.sampling.num_samples, cfg.sampling.batch_size = 4, 4
  out = sampling.sample_to_workdir(cfg, run)
  assert out.name == "step_3_dpmpp2m_5steps_karras"
  images = sample_export.read_sample_chunks(sorted(out.glob("samples_*.npz")))
  model = sampling.load_model(run)
  want = sampling.sample_fn(
    model, 4, jax.random.PRNGKey(cfg.eval.seed), sampler="dpmpp2m", num_steps=5, sigma_schedule="karras", progress=False
  )
  np.testing.assert_array_equal(images, want)
  cfg.sampling.labels = "3"
  with pytest.raises(ValueError, match="applies to class-conditional models"):
    sampling.sample_to_workdir(cfg, run)


def test_inpaint_folder_fills_the_masked_part_and_keeps_earlier_results(workdir, tmp_path):
  from PIL import Image  # noqa: PLC0415

  inputs = tmp_path / "digits_in"
  inputs.mkdir()
  rng = np.random.default_rng(0)
  originals = {}
  for name in ("a", "b", "c"):
    image = rng.integers(0, 256, (8, 8), np.uint8)
    mask = np.zeros((8, 8), np.uint8)
    mask[:4] = 255  # keep the upper half
    Image.fromarray(image).save(inputs / f"{name}.png")
    Image.fromarray(mask).save(inputs / f"{name}_mask.png")
    originals[name] = image
  run = tmp_path / "run"
  import shutil  # noqa: PLC0415

  shutil.copytree(workdir, run)
  cfg = workdirs.read_config(run)
  cfg.sampling.sampler, cfg.sampling.num_steps, cfg.sampling.batch_size = "ddim", 4, 2
  out = sampling.inpaint_folder(cfg, run, inputs)
  assert out.name == "digits_in_step_3_ddim_4steps_eta0"
  assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png", "c.png", "grid.png"]
  for name, image in originals.items():
    got = np.asarray(Image.open(out / f"{name}.png"))
    np.testing.assert_array_equal(got[:4], image[:4])  # the known half is the input's exactly
    assert not np.array_equal(got[4:], image[4:])
  again = sampling.inpaint_folder(cfg, run, inputs)  # a second run never overwrites the first
  assert again.name == out.name + "_1"
  np.testing.assert_array_equal(np.asarray(Image.open(again / "a.png")), np.asarray(Image.open(out / "a.png")))
  cfg.sampling.sampler, cfg.sampling.resample, cfg.sampling.jump_length = "ancestral", 2, 2  # RePaint
  repainted = sampling.inpaint_folder(cfg, run, inputs)
  assert repainted.name == "digits_in_step_3_ancestral_4steps_resample2_jump2"
  got = np.asarray(Image.open(repainted / "a.png"))
  np.testing.assert_array_equal(got[:4], originals["a"][:4])

  (inputs / "c_mask.png").unlink()
  with pytest.raises(FileNotFoundError, match="c.png has no mask: add c_mask.png"):
    sampling.inpaint_folder(cfg, run, inputs)
  Image.fromarray(np.zeros((16, 16), np.uint8)).save(inputs / "c_mask.png")
  with pytest.raises(ValueError, match="this model inpaints 8×8 images"):
    sampling.inpaint_folder(cfg, run, inputs)


def test_slerp_interpolation_between_inverted_images(workdir):
  a, b = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])
  np.testing.assert_allclose(sampling.slerp(a, b, 0.0), a, atol=1e-7)
  np.testing.assert_allclose(sampling.slerp(a, b, 1.0), b, atol=1e-7)
  mid = sampling.slerp(a, b, 0.5)
  np.testing.assert_allclose(mid, [np.sqrt(0.5), np.sqrt(0.5), 0.0], atol=1e-6)  # on the sphere, unlike (a+b)/2
  np.testing.assert_allclose(sampling.slerp(a, 2 * a, 0.25), 1.25 * a, atol=1e-6)  # parallel: linear

  model = sampling.load_model(workdir)
  x1, x2 = np.zeros((8, 8, 1), np.uint8), np.full((8, 8, 1), 200, np.uint8)
  rows = sampling.interpolate_fn(
    model, x1, x2, jax.random.PRNGKey(0), lambdas=[0.0, 0.5, 1.0], method="slerp", num_steps=4
  )
  assert rows.shape == (3, 8, 8, 1) and rows.dtype == np.uint8
  round_trip = sampling.decode_fn(model, sampling.encode_fn(model, np.stack([x1, x2]), num_steps=4), num_steps=4)
  # The same latents decoded in a batch of 3 instead of 2: equal up to float rounding (one uint8 level).
  assert np.abs(rows[[0, 2]].astype(int) - round_trip.astype(int)).max() <= 1
  with pytest.raises(ValueError, match="method='slerp' takes no t"):
    sampling.interpolate_fn(model, x1, x2, jax.random.PRNGKey(0), method="slerp", t=5)
  with pytest.raises(ValueError, match="method='lerp'"):
    sampling.interpolate_fn(model, x1, x2, jax.random.PRNGKey(0), method="lerp")


def test_inpaint_fn_with_repaint_resampling(workdir):
  model = sampling.load_model(workdir)
  images = np.random.default_rng(1).integers(0, 256, (2, 8, 8, 1), np.uint8)
  masks = np.zeros((2, 8, 8), np.uint8)
  masks[:, :, :4] = 1  # keep the left half
  out = sampling.inpaint_fn(model, images, masks, jax.random.PRNGKey(0), resample=2, jump_length=5)
  np.testing.assert_array_equal(out[:, :, :4], images[:, :, :4])
  plain = sampling.inpaint_fn(model, images, masks, jax.random.PRNGKey(0))
  assert not np.array_equal(out, plain)  # the resampled passes change the filled half
  with pytest.raises(ValueError, match="resample > 1 \\(RePaint\\) runs the ancestral sampler"):
    sampling.inpaint_fn(model, images, masks, jax.random.PRNGKey(0), sampler="ddim", num_steps=5, resample=2)
  # Respaced (RePaint's own setting: fewer steps than T), resampling only at the low-noise end.
  kw = dict(num_steps=5, resample=3, jump_length=2)
  respaced = sampling.inpaint_fn(model, images, masks, jax.random.PRNGKey(0), **kw)
  np.testing.assert_array_equal(respaced[:, :, :4], images[:, :, :4])
  # T = 20 on 5 steps: timesteps 0, 5, 10, 14, 19; the window [0, 6) holds the stretch at 0 and 5 only.
  windowed = sampling.inpaint_fn(model, images, masks, jax.random.PRNGKey(0), resample_range=(0, 6), **kw)
  np.testing.assert_array_equal(windowed[:, :, :4], images[:, :, :4])
  plain = sampling.inpaint_fn(model, images, masks, jax.random.PRNGKey(0), num_steps=5)
  assert not np.array_equal(windowed, respaced) and not np.array_equal(windowed, plain)
  with pytest.raises(ValueError, match="resample must be an integer >= 1"):
    sampling.inpaint_fn(model, images, masks, jax.random.PRNGKey(0), resample=0)
  with pytest.raises(ValueError, match="and resample=1 does none"):  # a window without resampling: refused
    sampling.inpaint_fn(model, images, masks, jax.random.PRNGKey(0), resample_range=(0, 6), num_steps=5)
  with pytest.raises(ValueError, match="holds no stretch"):
    sampling.inpaint_fn(model, images, masks, jax.random.PRNGKey(0), resample_range=(0, 5), **kw)
  with pytest.raises(ValueError, match="labels= applies to class-conditional models"):
    sampling.inpaint_fn(model, images, masks, jax.random.PRNGKey(0), labels=[1, 2], **kw)
