"""Tests of the FID Inception network, the safe checkpoint reader, FID and IS.

The network test builds pytorch-fid's FID Inception in torch (torchvision's
Inception3 blocks with pytorch-fid's patches, written out here so torchvision
is not needed), gives it random weights, saves its state_dict with
`torch.save`, loads that through our restricted reader and compares the two
networks' outputs on one batch of two images.
"""

import collections
import os
import pickle
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from diffusion_jax.evaluation import fid
from diffusion_jax.evaluation import inception
from diffusion_jax.evaluation import inception_weights
from diffusion_jax.evaluation import torch_checkpoint


@pytest.fixture(scope="module")
def torch_model():
  import torch_fid_inception  # noqa: PLC0415 - PyTorch, for the tests marked `torch` only

  model = torch_fid_inception.TFIDInception()
  torch_fid_inception._randomize(model)
  return model


@pytest.fixture(scope="module")
def pth_path(torch_model, tmp_path_factory):
  import torch  # noqa: PLC0415

  path = tmp_path_factory.mktemp("inception") / "fid_inception_random.pth"
  torch.save(torch_model.state_dict(), path)
  return path


@pytest.fixture(scope="module")
def params(pth_path):
  return inception_weights.load_params(pth_path)


# ----------------------------------------------------------------------------
# The network.
# ----------------------------------------------------------------------------


@pytest.mark.torch
def test_parameter_tree_matches_pytorch_fid(torch_model):
  from torch import nn as tnn  # noqa: PLC0415

  shapes = inception.param_shapes()
  n_torch = sum(p.numel() for p in torch_model.parameters())
  # torchvision's Inception3 has 27,161,264 parameters; without AuxLogits
  # (3,326,696) and with a 1008- instead of 1000-way fc (+16,392):
  assert n_torch == inception.TORCH_PARAMETER_COUNT == 23_850_960
  assert inception.count_params(shapes) == n_torch
  n_bn_stats = sum(m.running_mean.numel() * 2 for m in torch_model.modules() if isinstance(m, tnn.BatchNorm2d))
  assert inception.count_params(shapes, include_bn_statistics=True) == n_torch + n_bn_stats
  assert shapes["Conv2d_1a_3x3"]["conv"]["kernel"].shape == (3, 3, 3, 32)
  assert shapes["Mixed_6b"]["branch7x7_2"]["conv"]["kernel"].shape == (1, 7, 128, 128)
  assert shapes["Mixed_7c"]["branch_pool"]["conv"]["kernel"].shape == (1, 1, 2048, 192)
  assert set(shapes["Mixed_5b"]["branch1x1"]["bn"]) == {"scale", "bias", "mean", "var"}
  assert shapes["fc"]["kernel"].shape == (2048, 1008)
  assert "AuxLogits" not in shapes


@pytest.mark.torch
def test_matches_torch_on_random_weights(torch_model, params, n_devices):
  """The strongest check: same random weights, same images, same features; batch sharded over 2 devices."""
  import torch  # noqa: PLC0415

  del n_devices
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, size=(2, 43, 57, 3), dtype=np.uint8)  # non-square: resize 43x57 → 299x299
  with torch.no_grad():
    t_pool, t_logits = (t.numpy() for t in torch_model(torch.from_numpy(images)))

  mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
  inception_fn = fid.make_inception_fn(params, mesh=mesh)
  batch = jax.device_put(images, NamedSharding(mesh, PartitionSpec("data")))
  pool, logits = inception_fn(batch)
  assert pool.shape == (2, 2048) and logits.shape == (2, 1008)
  assert pool.dtype == jnp.float32 and logits.dtype == jnp.float32
  assert pool.sharding.spec == PartitionSpec("data")

  pool, logits = np.asarray(pool), np.asarray(logits)
  pool_err = np.max(np.abs(pool - t_pool))
  logits_err = np.max(np.abs(logits - t_logits))
  print(
    f"max |pool - torch| = {pool_err:.3g} (scale {np.max(np.abs(t_pool)):.3g}); "
    f"max |logits - torch| = {logits_err:.3g} (scale {np.max(np.abs(t_logits)):.3g})"
  )
  assert np.std(t_pool) > 1e-2  # the random network is not degenerate
  np.testing.assert_allclose(pool, t_pool, rtol=1e-4, atol=1e-4 * np.max(np.abs(t_pool)))
  np.testing.assert_allclose(logits, t_logits, rtol=1e-4, atol=1e-4 * np.max(np.abs(t_logits)))


@pytest.mark.torch
def test_inception_fn_without_mesh_takes_grayscale(params):
  inception_fn = fid.make_inception_fn(params, model=inception.InceptionV3(resize_input=False))
  images = np.random.default_rng(3).integers(0, 256, size=(1, 75, 75, 1), dtype=np.uint8)
  pool, logits = inception_fn(images)
  assert pool.shape == (1, 2048) and logits.shape == (1, 1008)
  assert np.all(np.isfinite(pool)) and np.all(np.asarray(pool) >= 0)  # pool3 follows a ReLU
  stats, all_logits = fid.run_inception(inception_fn, [images, images, images], num_samples=2)
  assert stats.count == 2 and all_logits.shape == (2, 1008)
  np.testing.assert_allclose(stats.mu, np.asarray(pool[0], np.float64), rtol=1e-6)


def test_logits_bias_option():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 2048)), jnp.float32)
  variables = inception.Logits().init(jax.random.key(0), x)
  p = jax.tree.map(lambda v: v + 1.0, variables["params"])  # non-zero bias
  no_bias = inception.Logits().apply({"params": p}, x)
  with_bias = inception.Logits(use_bias=True).apply({"params": p}, x)
  np.testing.assert_allclose(with_bias - no_bias, np.ones((3, 1008)), atol=1e-4)


@pytest.mark.torch
@pytest.mark.parametrize("in_hw", [(32, 32), (43, 57), (299, 299), (420, 330)])
def test_resize_matches_torch_interpolate(in_hw):
  import torch  # noqa: PLC0415
  import torch.nn.functional as F  # noqa: PLC0415

  x = np.random.default_rng(1).uniform(0, 1, size=(2, *in_hw, 3)).astype(np.float32)
  expected = (
    F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(299, 299), mode="bilinear", align_corners=False)
    .permute(0, 2, 3, 1)
    .numpy()
  )
  np.testing.assert_allclose(np.asarray(inception.resize_bilinear(jnp.asarray(x), (299, 299))), expected, atol=2e-6)


def test_preprocess_range_and_grayscale():
  rng = np.random.default_rng(2)
  gray = rng.integers(0, 256, size=(2, 16, 16, 1), dtype=np.uint8)
  gray[0, 0, 0, 0], gray[0, 0, 1, 0] = 0, 255
  out = inception.preprocess(jnp.asarray(gray), resize=False)
  assert out.shape == (2, 16, 16, 3) and out.dtype == jnp.float32
  np.testing.assert_allclose(out, np.repeat(gray, 3, -1) / 127.5 - 1.0, atol=1e-6)
  assert float(out.min()) == -1.0 and float(out.max()) == 1.0
  rgb_out = inception.preprocess(jnp.asarray(np.repeat(gray, 3, -1)))
  np.testing.assert_array_equal(inception.preprocess(jnp.asarray(gray)), rgb_out)
  assert rgb_out.shape == (2, 299, 299, 3)
  # Floats in [0, 255] are treated like uint8.
  np.testing.assert_allclose(inception.preprocess(jnp.asarray(gray, jnp.float32)), rgb_out, atol=1e-6)
  with pytest.raises(ValueError, match="NHWC"):
    inception.preprocess(jnp.zeros((2, 3, 16, 16), jnp.uint8))


# ----------------------------------------------------------------------------
# Weights: safe reading, conversion, npz, cache.
# ----------------------------------------------------------------------------


@pytest.mark.torch
@pytest.mark.parametrize("zip_format", [True, False])
def test_safe_reader_roundtrip(tmp_path, zip_format):
  import torch  # noqa: PLC0415

  base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
  sd = collections.OrderedDict(
    w=torch.randn(3, 2, 5, 5, dtype=torch.float64),
    transposed=base.T,  # non-contiguous
    sliced=base[1:, 2:5],  # storage offset
    step=torch.tensor(7),
    half=torch.ones(4, dtype=torch.float16),
    bf16=torch.full((2,), 1.5, dtype=torch.bfloat16),
    flags=torch.tensor([True, False]),
  )
  path = tmp_path / "sd.pth"
  torch.save(sd, path, _use_new_zipfile_serialization=zip_format)
  loaded = torch_checkpoint.load_torch_checkpoint(path)
  assert isinstance(loaded, collections.OrderedDict) and list(loaded) == list(sd)
  for k, v in sd.items():
    expected = v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
    assert loaded[k].shape == tuple(v.shape), k
    np.testing.assert_array_equal(np.asarray(loaded[k], expected.dtype), expected, err_msg=k)
  assert loaded["w"].dtype == np.float64 and loaded["step"].dtype == np.int64


class _Evil:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


@pytest.mark.torch
@pytest.mark.parametrize("fmt", ["zip", "legacy", "plain_pickle"])
def test_safe_reader_refuses_other_globals(tmp_path, fmt):
  import torch  # noqa: PLC0415

  marker = tmp_path / "pwned"
  obj = {"weight": torch.zeros(2), "payload": _Evil(marker)}
  path = tmp_path / "evil.pth"
  if fmt == "plain_pickle":
    path.write_bytes(pickle.dumps({"weight": [0.0, 0.0], "payload": _Evil(marker)}))
  else:
    torch.save(obj, path, _use_new_zipfile_serialization=fmt == "zip")
  with pytest.raises(torch_checkpoint.UnsafeCheckpointError, match=r"global '(posix|os)\.system'"):
    torch_checkpoint.load_torch_checkpoint(path)
  assert not marker.exists()


@pytest.mark.torch
def test_state_dict_conversion_and_rejection(torch_model, params):
  sd = {k: v.numpy() for k, v in torch_model.state_dict().items()}
  np.testing.assert_array_equal(
    params["Mixed_6b"]["branch7x7_2"]["conv"]["kernel"], sd["Mixed_6b.branch7x7_2.conv.weight"].transpose(2, 3, 1, 0)
  )
  np.testing.assert_array_equal(
    params["Mixed_7c"]["branch_pool"]["bn"]["var"], sd["Mixed_7c.branch_pool.bn.running_var"]
  )
  np.testing.assert_array_equal(params["fc"]["kernel"], sd["fc.weight"].T)

  # torchvision's ImageNet Inception: aux classifier and a 1000-way fc.
  bad = dict(sd)
  bad["AuxLogits.conv0.conv.weight"] = np.zeros((128, 768, 1, 1), np.float32)
  bad["fc.weight"] = np.zeros((1000, 2048), np.float32)
  bad["fc.bias"] = np.zeros((1000,), np.float32)
  with pytest.raises(ValueError, match=r"not the FID Inception.*AuxLogits.*fc/kernel"):
    inception_weights.params_from_state_dict(bad)
  missing = {k: v for k, v in sd.items() if not k.startswith("Mixed_7c.")}
  with pytest.raises(ValueError, match="missing Mixed_7c"):
    inception_weights.params_from_state_dict(missing)


@pytest.mark.torch
def test_npz_roundtrip_and_cache(tmp_path, params, pth_path, monkeypatch):
  cache = tmp_path / "cache"
  monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
  with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05-6726825d.pth"):
    inception_weights.load_params(cache_dir=cache, download=False)

  # A .pth under the official name whose checksum does not match is refused.
  cache.mkdir()
  (cache / inception_weights.FID_WEIGHTS_FILENAME).write_bytes(pth_path.read_bytes())
  with pytest.raises(ValueError, match="does not start with 6726825d"):
    inception_weights.load_params(cache_dir=cache, download=False)
  inception_weights.verify_checksum(pth_path, inception_weights.sha256_of(pth_path)[:8])

  # The converted .npz is what a cache hit reads.
  inception_weights.save_params_npz(params, cache / inception_weights.FID_WEIGHTS_NPZ_FILENAME)
  reloaded = inception_weights.load_params(cache_dir=cache, download=False)
  jax.tree.map(np.testing.assert_array_equal, reloaded, params)
  jax.tree.map(
    np.testing.assert_array_equal,
    inception_weights.load_params(cache / inception_weights.FID_WEIGHTS_NPZ_FILENAME),
    params,
  )


def test_cache_dir_is_the_runtime_one_with_a_deprecated_alias(tmp_path, monkeypatch):
  """Without cache_dir the weights are looked for in runtime.default_cache_dir(): $DIFFUSION_JAX_CACHE_DIR, else
  the deprecated $DIFFUSION_JAX_CACHE (one FutureWarning naming the new variable), else the XDG default."""
  from diffusion_jax import runtime  # noqa: PLC0415

  monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
  monkeypatch.setenv("DIFFUSION_JAX_CACHE", str(tmp_path / "old"))
  monkeypatch.setenv("DIFFUSION_JAX_CACHE_DIR", str(tmp_path / "new"))
  with pytest.raises(
    FileNotFoundError, match=re.escape(str(tmp_path / "new" / inception_weights.FID_WEIGHTS_FILENAME))
  ):
    inception_weights.load_params(download=False)

  monkeypatch.delenv("DIFFUSION_JAX_CACHE_DIR")
  runtime._warn_deprecated_cache_env.cache_clear()
  with pytest.warns(FutureWarning, match=r"\$DIFFUSION_JAX_CACHE is deprecated; set \$DIFFUSION_JAX_CACHE_DIR"):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "old"))):
      inception_weights.load_params(download=False)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # once per process
    assert runtime.default_cache_dir() == str(tmp_path / "old")

  monkeypatch.delenv("DIFFUSION_JAX_CACHE")
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert runtime.default_cache_dir() == str(tmp_path / "xdg" / "diffusion_jax")
  monkeypatch.setenv("DIFFUSION_JAX_CACHE_DIR", "0")  # turns the compilation cache off; the weights keep the default
  assert runtime.default_cache_dir() == str(tmp_path / "xdg" / "diffusion_jax")


# ----------------------------------------------------------------------------
# FID.
# ----------------------------------------------------------------------------


def _random_rotation(d, rng):
  q, r = np.linalg.qr(rng.normal(size=(d, d)))
  return q * np.sign(np.diag(r))


def test_frechet_distance_closed_form():
  """Commuting covariances S_i = Q diag(a_i) Qᵀ: sqrt(S1 S2) = Q diag(sqrt(a1 a2)) Qᵀ."""
  rng = np.random.default_rng(0)
  d = 16
  q = _random_rotation(d, rng)
  a1, a2 = rng.uniform(0.2, 3.0, d), rng.uniform(0.2, 3.0, d)
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  s1, s2 = (q * a1) @ q.T, (q * a2) @ q.T
  expected = np.sum((mu1 - mu2) ** 2) + np.sum(a1 + a2 - 2 * np.sqrt(a1 * a2))
  assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-10, abs=1e-10)
  assert fid.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-10)
  with pytest.raises(ValueError, match="do not match"):
    fid.frechet_distance(mu1, s1, mu2, s2[:-1, :-1])


def test_fid_of_gaussian_samples():
  """FID between sample sets from two known Gaussians, accumulated in uneven batches."""
  rng = np.random.default_rng(1)
  d, n = 8, 40_000
  a1, a2 = rng.uniform(0.5, 2.0, d), rng.uniform(0.5, 2.0, d)
  mu1, mu2 = np.zeros(d), rng.normal(size=d) * 0.5
  expected = np.sum((mu1 - mu2) ** 2) + np.sum(a1 + a2 - 2 * np.sqrt(a1 * a2))
  x1 = mu1 + rng.normal(size=(n, d)) * np.sqrt(a1)
  x2 = mu2 + rng.normal(size=(n, d)) * np.sqrt(a2)
  stats = []
  for x in (x1, x2):
    acc = fid.ActivationStatistics(dim=d)
    for chunk in np.array_split(x.astype(np.float32), [1, 1000, 1001, 25_000]):
      acc.update(chunk)
    stats.append((acc.mu, acc.sigma))
  value = fid.frechet_distance(*stats[0], *stats[1])
  assert value == pytest.approx(expected, rel=0.05)
  assert fid.frechet_distance(*stats[0], *stats[0]) == pytest.approx(0.0, abs=1e-8)


def test_streaming_statistics_match_numpy():
  rng = np.random.default_rng(2)
  x = (rng.normal(size=(301, 32)) * 3 + 100).astype(np.float32)  # large mean: tests numerical stability
  mu, sigma = fid.compute_statistics(x)
  np.testing.assert_allclose(mu, x.astype(np.float64).mean(0), rtol=1e-12)
  np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-10, atol=1e-10)
  a, b = fid.ActivationStatistics(32), fid.ActivationStatistics(32)
  for chunk in np.array_split(x[:200], 7):
    a.update(jnp.asarray(chunk))
  b.update(x[200:])
  a.merge(b)
  assert a.count == 301
  np.testing.assert_allclose(a.mu, mu, rtol=1e-12)
  np.testing.assert_allclose(a.sigma, sigma, rtol=1e-10, atol=1e-10)
  with pytest.raises(ValueError, match=r"\[B, 32\]"):
    a.update(x[:, :3])


def test_fid_self_is_zero_with_singular_covariance():
  """More dimensions than samples: singular product, the eps retry, still ≈ 0 against itself."""
  rng = np.random.default_rng(3)
  mu, sigma = fid.compute_statistics(rng.normal(size=(40, 64)))
  assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-3


def test_statistics_file_roundtrip(tmp_path):
  rng = np.random.default_rng(4)
  mu, sigma = fid.compute_statistics(rng.normal(size=(50, 6)))
  path = tmp_path / "ref" / "stats.npz"
  fid.save_statistics(path, mu, sigma)
  with np.load(path) as data:
    assert sorted(data.files) == ["mu", "sigma"]
  mu2, sigma2 = fid.load_statistics(path)
  np.testing.assert_array_equal(mu2, mu)
  np.testing.assert_array_equal(sigma2, sigma)
  np.savez(tmp_path / "bad.npz", mean=mu)
  with pytest.raises(ValueError, match="'mu' and 'sigma'"):
    fid.load_statistics(tmp_path / "bad.npz")


# ----------------------------------------------------------------------------
# Inception Score.
# ----------------------------------------------------------------------------


def _openai_inception_score(logits, splits):
  """OpenAI improved-gan `get_inception_score` on softmax(logits)."""
  e = np.exp(logits - logits.max(1, keepdims=True))
  preds = e / e.sum(1, keepdims=True)
  scores = []
  for i in range(splits):
    part = preds[(i * preds.shape[0] // splits) : ((i + 1) * preds.shape[0] // splits), :]
    kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
    kl = np.mean(np.sum(kl, 1))
    scores.append(np.exp(kl))
  return np.mean(scores), np.std(scores)


def test_inception_score_limits_and_reference():
  n, k = 1000, 1008
  mean, std = fid.inception_score(np.zeros((n, k)))
  assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)

  num_classes = 10
  logits = np.zeros((n, k))
  logits[np.arange(n), np.arange(n) % num_classes] = 100.0  # confident, every class equally often per split
  mean, std = fid.inception_score(logits, splits=10)
  assert mean == pytest.approx(num_classes, rel=1e-9) and std == pytest.approx(0.0, abs=1e-9)

  random_logits = np.random.default_rng(5).normal(size=(997, k)) * 3  # N not divisible by splits
  np.testing.assert_allclose(fid.inception_score(random_logits), _openai_inception_score(random_logits, 10), rtol=1e-10)


# ----------------------------------------------------------------------------
# User errors: one message that names the problem and the fix.
# ----------------------------------------------------------------------------


def test_weights_that_are_not_a_torch_checkpoint_are_named(tmp_path):
  from diffusion_jax import errors  # noqa: PLC0415

  bad = tmp_path / "weights.pth"
  bad.write_text('{"not": "a checkpoint"}')
  with pytest.raises(errors.UserError, match=r"weights\.pth is not a PyTorch checkpoint of the FID Inception weights"):
    inception_weights.load_params(bad)
  with pytest.raises(errors.UserError, match=r"missing\.pth do not exist"):
    inception_weights.load_params(tmp_path / "missing.pth")


def test_offline_download_says_where_to_put_the_weights(tmp_path, monkeypatch):
  import urllib.error  # noqa: PLC0415
  import urllib.request  # noqa: PLC0415

  from diffusion_jax import errors  # noqa: PLC0415

  def offline(*args, **kwargs):
    raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

  monkeypatch.setattr(urllib.request, "urlopen", offline)
  monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
  with pytest.raises(
    errors.UserError,
    match=r"(?s)Could not download the FID Inception weights.*"
    r"copy it to .*pt_inception-2015-12-05-6726825d\.pth.*inception_weights",
  ):
    inception_weights.load_params(cache_dir=tmp_path / "cache")
  assert not list((tmp_path / "cache").glob("*.part"))  # no half-written file left behind


@pytest.mark.torch
def test_float_images_outside_pixel_range_are_refused(params):
  from diffusion_jax import errors  # noqa: PLC0415

  fn = fid.make_inception_fn(params, model=inception.InceptionV3(resize_input=False))
  rng = np.random.default_rng(0)
  for images, where in [(rng.uniform(-1, 1, (2, 75, 75, 3)), r"\[-1, 1\]"), (rng.uniform(0, 1, (2, 75, 75, 3)), "")]:
    with pytest.raises(errors.UserError, match=r"Inception takes uint8 images or floats in \[0, 255\]"):
      fn(jnp.asarray(images, jnp.float32))
  pixels = rng.integers(0, 256, (2, 75, 75, 3))
  a, _ = fn(jnp.asarray(pixels, jnp.uint8))
  b, _ = fn(jnp.asarray(pixels, jnp.float32))  # floats in [0, 255] are pixels
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  fn(jnp.zeros((2, 75, 75, 3), jnp.float32))  # a black image is a valid image
