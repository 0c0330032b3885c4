"""diffusion_jax.convert against the real formats: diffusers' UNet2DModel and TF1 checkpoints.

Equivalence is checked against the other implementation's forward pass
(diffusers in PyTorch), never by converting our own output back. TF1
checkpoints are written here with `tf.compat.v1.train.Saver` under the
original variable names, mapped from a diffusers model by a table written
independently of the converter (diffusers' UNet2DModel naming).
"""

import functools
import importlib.util
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import flax  # noqa: E402
import jax  # noqa: E402
import ml_collections  # noqa: E402

try:
  import diffusers
  import torch
except ModuleNotFoundError:  # without PyTorch: only the tests not marked `torch` run (`pytest -m "not torch"`)
  diffusers = torch = None
from safetensors import numpy as st_numpy  # noqa: E402

from diffusion_jax import convert  # noqa: E402
from diffusion_jax import errors as errors_lib  # noqa: E402
from diffusion_jax import runtime  # noqa: E402
from diffusion_jax.convert import cli as convert_cli  # noqa: E402
from diffusion_jax.convert import common as convert_common  # noqa: E402
from diffusion_jax.models import unet  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]

# The DDPM architecture in diffusers' terms (UNet2DModel with DDPM's blocks).
DDPM_FIELDS = dict(
  act_fn="silu",
  attention_head_dim=None,
  norm_num_groups=32,
  norm_eps=1e-6,
  downsample_padding=0,
  flip_sin_to_cos=False,
  freq_shift=1,
  time_embedding_type="positional",
  center_input_sample=False,
  mid_block_scale_factor=1,
)
# configs/tiny.py's network (1 channel, 8x8, ch 32, ch_mult (1, 2), attention at 4x4) with a learned variance.
TINY = dict(
  DDPM_FIELDS,
  sample_size=8,
  in_channels=1,
  out_channels=2,
  layers_per_block=1,
  block_out_channels=(32, 64),
  down_block_types=("DownBlock2D", "AttnDownBlock2D"),
  up_block_types=("AttnUpBlock2D", "UpBlock2D"),
)
CIFAR = dict(
  DDPM_FIELDS,
  sample_size=32,
  in_channels=3,
  out_channels=3,
  layers_per_block=2,
  block_out_channels=(128, 256, 256, 256),
  down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
  up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
)
ATOL = 1e-4  # float32, outputs of magnitude ~2
LEARNED = dict(model_var_type="learned", loss_type="hybrid")  # 2 output channels


def _load_config(name: str, **diffusion) -> ml_collections.ConfigDict:
  spec = importlib.util.spec_from_file_location(f"_config_{name}", REPO / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.diffusion.update(diffusion)
  return config


def _random_diffusers(cfg: dict, seed: int) -> "diffusers.UNet2DModel":
  """A UNet2DModel with every parameter random (also those initialised to zero)."""
  torch.manual_seed(seed)
  model = diffusers.UNet2DModel(**cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1:
        base = 1.0 if re.search(r"norm[^.]*\.weight$", name) else 0.0
        p.copy_(base + 0.1 * torch.randn_like(p))
      else:
        p.copy_(torch.randn_like(p) / np.sqrt(p[0].numel()))
  return model


def _torch_forward(model, x: np.ndarray, t: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    out = model(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t).long()).sample
  return out.numpy().transpose(0, 2, 3, 1)


@functools.cache
def _jitted(ch, ch_mult, num_res_blocks, attn_resolutions, out_ch):
  model = unet.UNet(
    ch=ch, out_ch=out_ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, attn_resolutions=attn_resolutions, dropout=0.0
  )
  return jax.jit(lambda params, x, t: model.apply({"params": params}, x, t, train=False))


def _our_forward(params, x: np.ndarray, t: np.ndarray) -> np.ndarray:
  arch = convert.infer_architecture(params)
  size = x.shape[1]
  fn = _jitted(
    arch["ch"],
    arch["ch_mult"],
    arch["num_res_blocks"],
    tuple(size // 2**i for i in arch["attn_levels"]),
    arch["out_ch"],
  )
  return np.asarray(fn(params, x, t))


def _inputs(cfg: dict, batch: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  size, ch = cfg["sample_size"], cfg["in_channels"]
  x = rng.standard_normal((batch, size, size, ch)).astype(np.float32)
  t = np.array([0, 999, 417, 3][:batch], np.int32)
  return x, t


def _report(name: str, ours: np.ndarray, ref: np.ndarray) -> None:
  diff = float(np.max(np.abs(ours - ref)))
  print(f"\n{name}: max |ours - reference| = {diff:.3g} (max |reference| = {np.max(np.abs(ref)):.3g})")
  np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=0)


def _state(model) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _write_diffusers(folder: pathlib.Path, config: dict, tensors: dict[str, np.ndarray]) -> pathlib.Path:
  folder.mkdir(parents=True, exist_ok=True)
  (folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", **config}))
  st_numpy.save_file(
    {k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(folder / "diffusion_pytorch_model.safetensors")
  )
  return folder


def _assert_trees_equal(a, b) -> None:
  fa, fb = convert_common.flatten(a), convert_common.flatten(b)
  assert set(fa) == set(fb)
  for k in fa:
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg="/".join(k))


@pytest.fixture(scope="module")
def tiny():
  model = _random_diffusers(TINY, seed=1)
  return types.SimpleNamespace(model=model, state=_state(model))


@pytest.fixture(scope="module")
def tiny_folder(tiny, tmp_path_factory):
  folder = tmp_path_factory.mktemp("tiny_diffusers")
  tiny.model.save_pretrained(folder)
  return folder


# ----------------------------------------------------------------------------
# diffusers -> ours.
# ----------------------------------------------------------------------------


@pytest.mark.torch
def test_diffusers_tiny_matches_diffusers_forward(tiny, tiny_folder):
  params, overrides = convert.diffusers_to_params(tiny_folder)
  assert overrides == dict(
    model=dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), resamp_with_conv=True, num_classes=0),
    data=dict(image_size=8, channels=1),
    out_ch=2,
  )
  convert.validate_params(params, _load_config("tiny", **LEARNED))
  x, t = _inputs(TINY, batch=4)
  _report("diffusers tiny", _our_forward(params, x, t), _torch_forward(tiny.model, x, t))


@pytest.mark.torch
def test_diffusers_cifar_layout_matches_diffusers_forward(tmp_path):
  model = _random_diffusers(CIFAR, seed=2)
  model.save_pretrained(tmp_path)
  params, overrides = convert.diffusers_to_params(tmp_path)
  config = _load_config("cifar")
  convert.check_config_matches(config, overrides)
  convert.validate_params(params, config)
  assert sum(v.size for v in convert_common.flatten(params).values()) == 35_746_307
  x, t = _inputs(CIFAR, batch=1)
  _report("diffusers CIFAR-10 layout", _our_forward(params, x, t), _torch_forward(model, x, t))


@pytest.mark.torch
def test_diffusers_bin_with_old_attention_names_and_pipeline_folder(tiny, tiny_folder, tmp_path):
  old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  state = {}
  for k, v in tiny.model.state_dict().items():
    for new, name in old.items():
      k = k.replace(f".{new}.", f".{name}.")
    state[k] = v
  assert any(".proj_attn." in k for k in state)
  unet_dir = tmp_path / "unet"
  unet_dir.mkdir()
  shutil.copy(tiny_folder / "config.json", unet_dir / "config.json")
  torch.save(state, unet_dir / "diffusion_pytorch_model.bin")
  (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline"}))
  expected, _ = convert.diffusers_to_params(tiny_folder)
  params, _ = convert.diffusers_to_params(tmp_path)  # the pipeline folder: its unet/ is used
  _assert_trees_equal(params, expected)


@pytest.mark.torch
def test_diffusers_bin_without_torch_is_a_clear_error(tiny, tiny_folder, tmp_path, monkeypatch):
  shutil.copy(tiny_folder / "config.json", tmp_path / "config.json")
  torch.save(tiny.model.state_dict(), tmp_path / "diffusion_pytorch_model.bin")
  monkeypatch.setitem(sys.modules, "torch", None)
  with pytest.raises(ImportError, match="needs torch"):
    convert.diffusers_to_params(tmp_path)


@pytest.mark.parametrize(
  "field,value",
  [
    ("norm_num_groups", 16),
    ("norm_eps", 1e-5),
    ("flip_sin_to_cos", True),
    ("freq_shift", 0),
    ("time_embedding_type", "fourier"),
    ("attention_head_dim", 8),
    ("resnet_time_scale_shift", "scale_shift"),
    ("class_embed_type", "timestep"),
    ("class_embed_type", "identity"),
    ("class_embed_type", "projection"),
    ("num_class_embeds", 1),
    ("downsample_padding", 1),
    ("add_attention", False),
    ("up_block_types", ["UpBlock2D", "AttnUpBlock2D"]),
    ("down_block_types", ["DownBlock2D", "SkipDownBlock2D"]),
  ],
)
@pytest.mark.torch
def test_diffusers_unsupported_config_field_is_named(tiny, field, value, tmp_path):
  _write_diffusers(tmp_path, dict(TINY, **{field: value}), tiny.state)
  with pytest.raises(convert.ConversionError, match=re.escape(field.split("_types")[0])):
    convert.diffusers_to_params(tmp_path)


@pytest.mark.torch
def test_diffusers_missing_field_takes_unet2dmodel_default(tiny, tmp_path):
  cfg = {k: v for k, v in TINY.items() if k != "freq_shift"}  # UNet2DModel's default is 0, not DDPM's 1
  _write_diffusers(tmp_path, cfg, tiny.state)
  with pytest.raises(convert.ConversionError, match="freq_shift=0"):
    convert.diffusers_to_params(tmp_path)


@pytest.mark.torch
def test_diffusers_corrupt_or_mismatched_weights(tiny, tiny_folder, tmp_path):
  truncated = tmp_path / "truncated"
  truncated.mkdir()
  shutil.copy(tiny_folder / "config.json", truncated / "config.json")
  data = (tiny_folder / "diffusion_pytorch_model.safetensors").read_bytes()
  (truncated / "diffusion_pytorch_model.safetensors").write_bytes(data[: len(data) // 2])
  with pytest.raises(convert.ConversionError, match="corrupt or truncated"):
    convert.diffusers_to_params(truncated)

  key = "down_blocks.1.attentions.0.to_q.weight"
  missing = {k: v for k, v in tiny.state.items() if k != key}
  with pytest.raises(convert.ConversionError, match=r"missing \(1\):\s+" + re.escape(key)):
    convert.diffusers_to_params(_write_diffusers(tmp_path / "missing", TINY, missing))

  extra = dict(tiny.state, **{"class_embedding.weight": np.zeros((10, 128), np.float32)})
  with pytest.raises(convert.ConversionError, match=r"unused \(1\):\s+class_embedding\.weight"):
    convert.diffusers_to_params(_write_diffusers(tmp_path / "extra", TINY, extra))

  key = "up_blocks.0.resnets.1.conv1.weight"
  wrong = dict(tiny.state, **{key: np.zeros((64, 96, 1, 3), np.float32)})
  with pytest.raises(convert.ConversionError, match=re.escape(f"{key}: (64, 96, 1, 3), expected (64, 96, 3, 3)")):
    convert.diffusers_to_params(_write_diffusers(tmp_path / "wrong", TINY, wrong))


@pytest.mark.torch
def test_params_against_wrong_config_list_paths(tiny_folder):
  params, _ = convert.diffusers_to_params(tiny_folder)
  with pytest.raises(convert.ConversionError) as e:
    convert.validate_params(params, _load_config("cifar"))
  message = str(e.value)
  assert "conv_in/kernel: checkpoint (3, 3, 1, 32), model (3, 3, 3, 128)" in message
  assert "missing from the checkpoint" in message and "down_0/block_1/conv1/kernel" in message
  assert "model.ch=32, model.ch_mult=(1, 2)" in message and "levels" not in message
  assert "pass --config.model.ch=32 --config.model.ch_mult='(1,2)' --config.model.num_res_blocks=1 " in message
  assert "--config.data.channels=1" in message
  with pytest.raises(
    convert.ConversionError,
    match=r"model_var_type='fixedlarge'(.|\n)*"
    r"conv_out/kernel: checkpoint \(3, 3, 32, 2\), model \(3, 3, 32, 1\)",
  ):
    convert.validate_params(params, _load_config("tiny"))  # fixedlarge: 1 output channel


# ----------------------------------------------------------------------------
# ours -> diffusers.
# ----------------------------------------------------------------------------


def _random_params(config, seed: int):
  rng = np.random.default_rng(seed)
  params = {}
  for name, shape in convert.expected_shapes(config).items():
    path = tuple(name.split("/"))
    if len(shape) == 1:
      base = 1.0 if path[-1] == "scale" else 0.0
      value = base + 0.1 * rng.standard_normal(shape)
    else:
      value = rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
    params[path] = value.astype(np.float32)
  return convert_common.unflatten(params)


@pytest.mark.torch
def test_export_loads_in_diffusers_and_computes_the_same(tmp_path):
  config = _load_config("tiny", **LEARNED)
  params = _random_params(config, seed=3)
  folder = convert.params_to_diffusers(params, config, tmp_path / "unet")
  model = diffusers.UNet2DModel.from_pretrained(folder).eval()
  x, t = _inputs(TINY, batch=4, seed=1)
  _report("export to diffusers", _torch_forward(model, x, t), _our_forward(params, x, t))
  with pytest.raises(FileExistsError):
    convert.params_to_diffusers(params, config, folder)


# ----------------------------------------------------------------------------
# Original TF1 checkpoints.
# ----------------------------------------------------------------------------

_TF_RESNET = {
  "norm1": "norm1",
  "conv1": "conv1",
  "time_emb_proj": "temb_proj",
  "norm2": "norm2",
  "conv2": "conv2",
  "conv_shortcut": "nin_shortcut",
}
_TF_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _tf_from_diffusers(state: dict[str, np.ndarray], num_levels: int) -> dict[str, np.ndarray]:
  """diffusers state dict -> the original TF variables (pesser's scripts/convert.py, inverted)."""
  out = {}
  for key, value in state.items():
    module, leaf = key.rsplit(".", 1)
    if m := re.fullmatch(r"time_embedding\.linear_(\d)", module):
      scope = f"temb/dense{int(m[1]) - 1}"
    elif module in ("conv_in", "conv_out"):
      scope = module
    elif module == "conv_norm_out":
      scope = "norm_out"
    elif m := re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", module):
      level = int(m[2]) if m[1] == "down" else num_levels - 1 - int(m[2])
      kind = "block" if m[3] == "resnets" else "attn"
      scope = f"{m[1]}_{level}/{kind}_{m[4]}/{(_TF_RESNET if kind == 'block' else _TF_ATTN)[m[5]]}"
    elif m := re.fullmatch(r"(down|up)_blocks\.(\d+)\.(down|up)samplers\.0\.conv", module):
      level = int(m[2]) if m[1] == "down" else num_levels - 1 - int(m[2])
      scope = f"{m[1]}_{level}/{m[3]}sample/conv"
    elif m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d)\.?(.*)", module):
      block = {"resnets.0": "block_1", "resnets.1": "block_2", "attentions.0": "attn_1"}[f"{m[1]}.{m[2]}"]
      scope = f"mid/{block}/{(_TF_RESNET if m[1] == 'resnets' else _TF_ATTN)[m[3]]}"
    else:
      raise AssertionError(f"unmapped diffusers key {key}")
    if "norm" in scope.rsplit("/", 1)[-1]:  # GroupNorm weight/bias -> gamma/beta
      name = "gamma" if leaf == "weight" else "beta"
    elif leaf == "bias":
      name = "b"
    elif value.ndim == 4 and value.shape[2:] == (1, 1):  # conv_shortcut -> nin W [in, out]
      name, value = "W", value[:, :, 0, 0].T
    elif value.ndim == 4:  # conv [out, in, kh, kw] -> W [kh, kw, in, out]
      name, value = "W", value.transpose(2, 3, 1, 0)
    else:  # Linear [out, in] -> dense / nin W [in, out]
      name, value = "W", value.T
    out[f"model/{scope}/{name}"] = np.ascontiguousarray(value)
  return out


def _write_tf(prefix: pathlib.Path, tensors: dict[str, np.ndarray], *, saver: bool = False) -> str:
  """Writes a TF1 checkpoint with these variable names.

  With `saver`, through `tf.compat.v1.train.Saver` in a graph, as the original
  code did; otherwise with the SaveV2 op that Saver runs (the same files, and
  much faster).
  """
  import tensorflow as tf  # noqa: PLC0415

  prefix.parent.mkdir(parents=True, exist_ok=True)
  if not saver:
    tf.raw_ops.SaveV2(
      prefix=str(prefix),
      tensor_names=list(tensors),
      shape_and_slices=[""] * len(tensors),
      tensors=[tf.constant(v) for v in tensors.values()],
    )
    return str(prefix)
  graph = tf.Graph()
  with graph.as_default():
    variables = {name: tf.compat.v1.Variable(value, name=f"v{i}") for i, (name, value) in enumerate(tensors.items())}
    tf_saver = tf.compat.v1.train.Saver(var_list=variables)
    with tf.compat.v1.Session(graph=graph) as sess:
      sess.run(tf.compat.v1.global_variables_initializer())
      return tf_saver.save(sess, str(prefix), write_meta_graph=False)


@pytest.fixture(scope="module")
def tf_vars(tiny):
  """The tiny model as original TF variables: EMA copies = the diffusers model, raw = different values."""
  ema = _tf_from_diffusers(tiny.state, num_levels=2)
  rng = np.random.default_rng(4)
  raw = {k: (v + rng.standard_normal(v.shape)).astype(np.float32) for k, v in ema.items()}
  return types.SimpleNamespace(ema=ema, raw=raw)


def _tf_checkpoint(tf_vars, *, drop=(), extra=None, ema=True, slots=True) -> dict[str, np.ndarray]:
  tensors = {}
  rng = np.random.default_rng(5)
  for name, value in tf_vars.raw.items():
    if name in drop:
      continue
    tensors[name] = value
    if ema:
      tensors[f"{name}/ExponentialMovingAverage"] = tf_vars.ema[name]
    if slots:
      tensors[f"{name}/Adam"] = rng.standard_normal(value.shape).astype(np.float32)
      tensors[f"{name}/Adam_1"] = rng.random(value.shape).astype(np.float32)
  if slots:
    tensors.update(global_step=np.int64(790000), beta1_power=np.float32(0.5), beta2_power=np.float32(0.9))
  tensors.update(extra or {})
  return tensors


@pytest.mark.torch
def test_tf_checkpoint_ema_matches_diffusers_and_raw_on_request(tiny, tf_vars, tmp_path):
  prefix = _write_tf(tmp_path / "model.ckpt-790000", _tf_checkpoint(tf_vars), saver=True)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  names = dict(tf.train.list_variables(prefix))
  assert names["model/down_1/attn_0/q/W/ExponentialMovingAverage"] == [64, 64]
  assert names["model/up_0/block_0/nin_shortcut/W"] == [96, 32]

  params = convert.tf_checkpoint_to_params(prefix)  # EMA by default
  x, t = _inputs(TINY, batch=4, seed=2)
  _report("TF checkpoint (EMA)", _our_forward(params, x, t), _torch_forward(tiny.model, x, t))

  raw = convert.tf_checkpoint_to_params(str(tmp_path), use_ema=False)  # the directory works too
  flat = convert_common.flatten(raw)
  assert len(flat) == len(tf_vars.raw)
  leaf = {"W": "kernel", "b": "bias", "gamma": "scale", "beta": "bias"}
  for name, value in tf_vars.raw.items():  # same layout as TF: HWIO convs, [in, out] dense and nin
    parts = name.split("/")[1:]
    np.testing.assert_array_equal(flat[tuple(parts[:-1]) + (leaf[parts[-1]],)], value, err_msg=name)
  assert convert.read_tf_checkpoint(prefix)["step"] == 790000


@pytest.mark.torch
def test_tf_checkpoint_errors(tf_vars, tmp_path):
  conv1 = "model/down_0/block_0/conv1/W"
  prefix = _write_tf(tmp_path / "missing" / "model.ckpt-1", _tf_checkpoint(tf_vars, drop=[conv1], slots=False))
  with pytest.raises(convert.ConversionError, match=r"missing from the checkpoint \(1\):\s+" + conv1):
    convert.tf_checkpoint_to_params(prefix)

  extra_name = "model/down_0/block_0/conv_shortcut/W"
  extra = {
    extra_name: np.zeros((1, 1, 32, 32), np.float32),
    extra_name + "/ExponentialMovingAverage": np.zeros((1, 1, 32, 32), np.float32),
  }
  prefix = _write_tf(tmp_path / "extra" / "model.ckpt-1", _tf_checkpoint(tf_vars, extra=extra, slots=False))
  with pytest.raises(convert.ConversionError, match=r"not in the model \(1\):\s+" + extra_name):
    convert.tf_checkpoint_to_params(prefix)

  q = "model/mid/attn_1/q/W"
  bad = dict(tf_vars.raw, **{q: np.zeros((64, 32), np.float32)})
  prefix = _write_tf(
    tmp_path / "shape" / "model.ckpt-1", _tf_checkpoint(types.SimpleNamespace(raw=bad, ema=bad), slots=False)
  )
  with pytest.raises(convert.ConversionError, match=re.escape(f"{q}: checkpoint (64, 32), model (64, 64)")):
    convert.tf_checkpoint_to_params(prefix)

  odd = {"model/down_0/block_0/conv1/scale_factor": np.ones((), np.float32)}
  prefix = _write_tf(tmp_path / "odd" / "model.ckpt-1", _tf_checkpoint(tf_vars, extra=odd, slots=False))
  with pytest.raises(convert.ConversionError, match=r"unused \(1\):\s+model/down_0/block_0/conv1/scale_factor"):
    convert.tf_checkpoint_to_params(prefix)

  prefix = _write_tf(tmp_path / "noema" / "model.ckpt-1", _tf_checkpoint(tf_vars, ema=False, slots=False))
  with pytest.raises(convert.ConversionError, match="no ExponentialMovingAverage copies.*--raw"):
    convert.tf_checkpoint_to_params(prefix)
  assert convert.tf_checkpoint_to_params(prefix, use_ema=False)

  partial = _tf_checkpoint(tf_vars, slots=False)
  del partial[conv1 + "/ExponentialMovingAverage"]
  prefix = _write_tf(tmp_path / "partial" / "model.ckpt-1", partial)
  with pytest.raises(convert.ConversionError, match=r"without an EMA copy \(1\):\s+" + conv1):
    convert.tf_checkpoint_to_params(prefix)

  with pytest.raises(FileNotFoundError, match="model.ckpt-790000"):
    convert.tf_checkpoint_to_params(tmp_path / "nowhere" / "model.ckpt-790000")


def test_tf_missing_tensorflow_names_the_extra(monkeypatch, tmp_path):
  monkeypatch.setitem(sys.modules, "tensorflow", None)
  with pytest.raises(ImportError, match=re.escape('pip install "diffusion_jax[tf]"')):
    convert.tf_checkpoint_to_params(tmp_path / "model.ckpt-1")


# ----------------------------------------------------------------------------
# Command line: our checkpoint directories.
# ----------------------------------------------------------------------------


def _flags(**values):
  names = ("config", "preset", "image_size", "checkpoint", "raw", "folder", "workdir", "step", "out")
  defaults = dict(raw=False)
  return {n: types.SimpleNamespace(value=values.get(n, defaults.get(n))) for n in names}


@pytest.mark.torch
def test_cli_tf2jax_then_jax2diffusers(tiny, tf_vars, tmp_path):
  from diffusion_jax import checkpointing  # pylint: disable=g-import-not-at-top

  prefix = _write_tf(tmp_path / "tf" / "model.ckpt-790000", _tf_checkpoint(tf_vars))
  config = _load_config("tiny", **LEARNED)
  out = tmp_path / "ours"
  convert_cli._run("tf2jax", _flags(config=config, checkpoint=prefix, out=str(out)))
  saved_config, ema, step = checkpointing.load_params(out)
  _, raw, _ = checkpointing.load_params(out, use_ema=False)
  assert step == 790000
  assert tuple(saved_config.model.ch_mult) == (1, 2)
  _assert_trees_equal(ema, convert.tf_checkpoint_to_params(prefix))
  _assert_trees_equal(raw, convert.tf_checkpoint_to_params(prefix, use_ema=False))

  folder = tmp_path / "exported"
  convert_cli._run("jax2diffusers", _flags(workdir=str(out), out=str(folder)))
  model = diffusers.UNet2DModel.from_pretrained(folder).eval()
  x, t = _inputs(TINY, batch=2, seed=3)
  _report("TF -> ours -> diffusers", _torch_forward(model, x, t), _torch_forward(tiny.model, x, t))

  with pytest.raises(convert.ConversionError, match="conv_out/kernel"):  # fixedlarge: 1 output channel
    convert_cli._run("tf2jax", _flags(config=_load_config("tiny"), checkpoint=prefix, out=str(tmp_path / "bad")))


@pytest.mark.torch
def test_cli_diffusers2jax_checks_the_config(tiny_folder, tmp_path):
  from diffusion_jax import checkpointing  # pylint: disable=g-import-not-at-top

  with pytest.raises(
    convert.ConversionError,
    match=r"model\.ch: config 128, checkpoint 32(.|\n)*"
    r"--config\.model\.ch=32 --config\.model\.ch_mult='\(1,2\)'",
  ):
    convert_cli._run(
      "diffusers2jax", _flags(config=_load_config("cifar"), folder=str(tiny_folder), out=str(tmp_path / "a"))
    )
  with pytest.raises(
    convert.ConversionError,
    match=r"output channels: config 1 \(diffusion.model_var_type="
    r"'fixedlarge'\), checkpoint 2(.|\n)*learned_range",
  ):
    convert_cli._run(
      "diffusers2jax", _flags(config=_load_config("tiny"), folder=str(tiny_folder), out=str(tmp_path / "a"))
    )
  out = tmp_path / "b"
  convert_cli._run(
    "diffusers2jax", _flags(config=_load_config("tiny", **LEARNED), folder=str(tiny_folder), out=str(out))
  )
  _, params, step = checkpointing.load_params(out)
  assert step == 0
  _assert_trees_equal(params, convert.diffusers_to_params(tiny_folder)[0])


def test_cli_help_and_lazy_imports():
  env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  result = subprocess.run(
    [sys.executable, "-m", "diffusion_jax.convert", "--help"],
    check=False,
    capture_output=True,
    text=True,
    env=env,
    cwd=REPO,
    timeout=120,
  )  # --help exits with 1
  for word in ("tf2jax", "diffusers2jax", "jax2diffusers", "ExponentialMovingAverage", "--checkpoint", "--raw"):
    assert word in result.stdout, (word, result.stdout, result.stderr)
  result = subprocess.run(
    [sys.executable, "-m", "diffusion_jax.convert", "tf2torch", "--out=/tmp/x"],
    check=False,
    capture_output=True,
    text=True,
    env=env,
    cwd=REPO,
    timeout=120,
  )
  assert result.returncode != 0 and "one of tf2jax, diffusers2jax" in result.stderr, result.stderr
  result = subprocess.run(
    [
      sys.executable,
      "-c",
      (
        "import sys, diffusion_jax.convert; "
        "print(sorted(m for m in ('torch', 'tensorflow', 'diffusers', 'jax') "
        "if m in sys.modules))"
      ),
    ],
    check=False,
    capture_output=True,
    text=True,
    env=env,
    cwd=REPO,
    timeout=120,
  )
  assert result.stdout.strip() == "[]", result.stdout + result.stderr


# ----------------------------------------------------------------------------
# Configs built from the checkpoint (no --config), and messages in flag terms.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("preset,name", [("cifar10", "cifar"), ("celebahq", "celebahq"), ("lsun", "lsun_bedroom")])
def test_presets_are_the_config_files(preset, name):
  assert convert.preset_config(preset).to_dict() == _load_config(name).to_dict()
  assert convert.PRESETS[preset] == f"configs/{name}.py"


@pytest.mark.torch
def test_cli_tf2jax_without_config_infers_the_architecture(tf_vars, tmp_path):
  from diffusion_jax import checkpointing  # pylint: disable=g-import-not-at-top

  prefix = _write_tf(tmp_path / "tf" / "model.ckpt-790000", _tf_checkpoint(tf_vars, slots=False))
  with pytest.raises(convert.ConversionError, match=r"needs the image size(.|\n)*--image_size=N"):
    convert_cli._run("tf2jax", _flags(checkpoint=prefix, out=str(tmp_path / "a")))
  with pytest.raises(convert.ConversionError, match="either --config or --preset"):
    convert_cli._run(
      "tf2jax", _flags(config=_load_config("tiny"), image_size=8, checkpoint=prefix, out=str(tmp_path / "a"))
    )
  with pytest.raises(convert.ConversionError, match=r"Unknown preset 'cifar'(.|\n)*--preset=cifar10"):
    convert_cli._run("tf2jax", _flags(preset="cifar", checkpoint=prefix, out=str(tmp_path / "a")))

  out = tmp_path / "ours"
  convert_cli._run("tf2jax", _flags(image_size=8, checkpoint=prefix, out=str(out)))
  config, ema, step = checkpointing.load_params(out)
  assert step == 790000
  expected = _load_config("cifar")  # a bare --image_size: configs/cifar.py with the checkpoint's network
  expected.data.update(image_size=8, channels=1)
  expected.model.update(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,))
  expected.diffusion.update(model_var_type="learned", loss_type="hybrid")  # 2 output channels; the paper's 'learned'
  assert config.to_dict() == json.loads(json.dumps(expected.to_dict())), config
  assert json.loads((out / "config.json").read_text())["model"]["attn_resolutions"] == [4]
  _assert_trees_equal(ema, convert.tf_checkpoint_to_params(prefix))

  out = tmp_path / "lsun"
  convert_cli._run("tf2jax", _flags(preset="lsun", checkpoint=prefix, out=str(out)))
  config, _, _ = checkpointing.load_params(out)
  assert (config.data.dataset, config.data.image_size, config.model.dropout) == ("lsun_bedroom", 256, 0.0)
  assert tuple(config.model.attn_resolutions) == (128,) and tuple(config.model.ch_mult) == (1, 2)


@pytest.mark.torch
def test_mismatch_messages_give_the_config_overrides(tiny_folder, tf_vars, tmp_path):
  params, overrides = convert.diffusers_to_params(tiny_folder)
  config = _load_config("tiny")
  config.model.attn_resolutions = (8,)  # attention at full resolution; the checkpoint has it at 4x4
  with pytest.raises(convert.ConversionError) as e:
    convert.validate_params(params, config)
  message = str(e.value)
  assert (
    "pass --config.model.attn_resolutions='(4,)' --config.diffusion.model_var_type=learned_range "
    "--config.diffusion.loss_type=hybrid"
  ) in message, message
  assert "levels" not in message and "model.attn_resolutions=(4,)" in message
  with pytest.raises(convert.ConversionError) as e:
    convert.check_config_matches(config, overrides)
  message = str(e.value)
  assert "model.attn_resolutions: config (8,), checkpoint (4,)" in message
  assert (
    "pass --config.model.attn_resolutions='(4,)' --config.diffusion.model_var_type=learned_range "
    "--config.diffusion.loss_type=hybrid"
  ) in message, message

  prefix = _write_tf(tmp_path / "tf" / "model.ckpt-1", _tf_checkpoint(tf_vars, slots=False))
  with pytest.raises(
    convert.ConversionError,
    match=re.escape(
      "--config.model.attn_resolutions='(4,)' --config.diffusion.model_var_type=learned "
      "--config.diffusion.loss_type=hybrid"
    ),
  ):
    convert_cli._run("tf2jax", _flags(config=config, checkpoint=prefix, out=str(tmp_path / "a")))

  config = _load_config("tiny", model_var_type="learned_range", loss_type="hybrid")
  fixed = dict(convert_common.flatten(params))
  fixed[("conv_out", "kernel")] = fixed[("conv_out", "kernel")][..., :1]
  fixed[("conv_out", "bias")] = fixed[("conv_out", "bias")][:1]
  with pytest.raises(
    convert.ConversionError,
    match=re.escape("pass --config.diffusion.model_var_type=fixedlarge --config.diffusion.loss_type=mse"),
  ):
    convert.validate_params(convert_common.unflatten(fixed), config)


@pytest.mark.torch
def test_cli_diffusers2jax_without_config_reads_the_scheduler(tiny_folder, tmp_path):
  from diffusion_jax import checkpointing  # pylint: disable=g-import-not-at-top

  out = tmp_path / "plain"
  convert_cli._run("diffusers2jax", _flags(folder=str(tiny_folder), out=str(out)))
  config, params, _ = checkpointing.load_params(out)
  assert (config.diffusion.model_var_type, config.diffusion.loss_type) == ("learned_range", "hybrid")
  assert (config.data.image_size, config.data.channels, tuple(config.model.attn_resolutions)) == (8, 1, (4,))
  _assert_trees_equal(params, convert.diffusers_to_params(tiny_folder)[0])
  with pytest.raises(convert.ConversionError, match="sample_size is 8"):
    convert_cli._run("diffusers2jax", _flags(folder=str(tiny_folder), image_size=16, out=str(tmp_path / "x")))

  pipeline = tmp_path / "pipeline"
  shutil.copytree(tiny_folder, pipeline / "unet")
  (pipeline / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline"}))
  (pipeline / "scheduler").mkdir()
  scheduler = pipeline / "scheduler" / "scheduler_config.json"
  scheduler.write_text(
    json.dumps({"_class_name": "DDPMScheduler", "variance_type": "learned", "prediction_type": "epsilon"})
  )
  with pytest.raises(convert.ConversionError, match=r"variance_type='learned'(.|\n)*variance itself"):
    convert_cli._run("diffusers2jax", _flags(folder=str(pipeline), out=str(tmp_path / "x")))
  scheduler.write_text(json.dumps({"variance_type": "fixed_small"}))
  with pytest.raises(convert.ConversionError, match="2 x 1 output channels.*fixed variance 'fixedsmall'"):
    convert_cli._run("diffusers2jax", _flags(folder=str(pipeline), out=str(tmp_path / "x")))
  scheduler.write_text(json.dumps({"variance_type": "learned_range", "prediction_type": "v_prediction"}))
  out = tmp_path / "from_pipeline"
  convert_cli._run("diffusers2jax", _flags(folder=str(pipeline), preset="celebahq", out=str(out)))
  config, _, _ = checkpointing.load_params(out)
  assert (config.diffusion.model_var_type, config.diffusion.model_mean_type) == ("learned_range", "v")
  assert (config.data.dataset, config.data.image_size, config.model.dropout) == ("celeb_a_hq", 8, 0.0)


@pytest.mark.torch
def test_cli_user_error_is_one_line_without_traceback(tf_vars, tmp_path):
  prefix = _write_tf(tmp_path / "tf" / "model.ckpt-1", _tf_checkpoint(tf_vars, slots=False))
  env = dict(
    os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), DIFFUSION_JAX_CACHE_DIR="0"
  )
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "diffusion_jax.convert",
      "tf2jax",
      f"--checkpoint={prefix}",
      "--config=configs/tiny.py",
      "--config.diffusion.model_var_type=learned",
      f"--out={tmp_path / 'out'}",
    ],
    check=False,
    capture_output=True,
    text=True,
    env=env,
    cwd=REPO,
    timeout=300,
  )
  assert result.returncode == 2, result.stderr[-3000:]
  assert "Traceback" not in result.stderr, result.stderr
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and result.stderr.strip().splitlines()[-1] == errors[0], result.stderr
  assert "--config.diffusion.loss_type=hybrid" in errors[0] and "kl" in errors[0], errors[0]
  assert not (tmp_path / "out").exists()
  assert issubclass(convert.ConversionError, errors_lib.UserError)


# ----------------------------------------------------------------------------
# Class-conditional networks: diffusers' num_class_embeds.
# ----------------------------------------------------------------------------


def _our_conditional_forward(params, config, x, t, y) -> np.ndarray:
  from diffusion_jax import runtime  # pylint: disable=g-import-not-at-top

  model = runtime.build_network(config)
  assert model.num_classes == 3
  fn = jax.jit(lambda params, x, t, y: model.apply({"params": params}, x, t, train=False, y=y))
  return np.asarray(fn(params, x, t, y))


def _torch_conditional_forward(model, x, t, y) -> np.ndarray:
  with torch.no_grad():
    out = model(
      torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t).long(), class_labels=torch.from_numpy(y).long()
    ).sample
  return out.numpy().transpose(0, 2, 3, 1)


@pytest.mark.torch
def test_conditional_export_matches_diffusers_and_imports_back(tmp_path):
  from diffusion_jax import checkpointing  # pylint: disable=g-import-not-at-top

  config = _load_config("tiny", **LEARNED)
  config.model.num_classes = 3
  params = _random_params(config, seed=7)
  assert convert_common.flatten(params)[("class_embed", "embedding")].shape == (4, 128)  # 3 classes + the null class
  assert convert.infer_architecture(params)["num_classes"] == 3
  folder = convert.params_to_diffusers(params, config, tmp_path / "unet")
  assert json.loads((folder / "config.json").read_text())["num_class_embeds"] == 4
  model = diffusers.UNet2DModel.from_pretrained(folder).eval()
  assert model.class_embedding.weight.shape == (4, 128)
  x, t = _inputs(TINY, batch=4, seed=4)
  y = np.array([0, 1, 2, 3], np.int32)  # 3 = the null class (guidance's unconditional pass)
  ours = _our_conditional_forward(params, config, x, t, y)
  _report("conditional export to diffusers", _torch_conditional_forward(model, x, t, y), ours)
  other = _our_conditional_forward(params, config, x, t, np.array([1, 2, 3, 0], np.int32))
  assert np.max(np.abs(other - ours)) > 1e-2  # the labels matter

  back, overrides = convert.diffusers_to_params(folder)
  assert overrides["model"]["num_classes"] == 3
  _assert_trees_equal(back, params)
  convert.check_config_matches(config, overrides)
  out = tmp_path / "ours"
  convert_cli._run("diffusers2jax", _flags(folder=str(folder), out=str(out)))  # config built from the folder
  saved, loaded, _ = checkpointing.load_params(out)
  assert saved.model.num_classes == 3
  _assert_trees_equal(loaded, params)

  unconditional = _load_config("tiny", **LEARNED)
  with pytest.raises(convert.ConversionError, match=re.escape("pass --config.model.num_classes=3")):
    convert.check_config_matches(unconditional, overrides)
  with pytest.raises(convert.ConversionError, match=re.escape("--config.model.num_classes=3")):
    convert.validate_params(params, unconditional)


@pytest.mark.torch
def test_conditional_diffusers_import_matches_diffusers_forward(tmp_path):
  model = _random_diffusers(dict(TINY, num_class_embeds=4), seed=8)
  model.save_pretrained(tmp_path)
  params, overrides = convert.diffusers_to_params(tmp_path)
  config = _load_config("tiny", **LEARNED)
  config.model.num_classes = 3
  convert.check_config_matches(config, overrides)
  convert.validate_params(params, config)
  x, t = _inputs(TINY, batch=4, seed=5)
  y = np.array([3, 2, 1, 0], np.int32)
  _report(
    "conditional diffusers import",
    _our_conditional_forward(params, config, x, t, y),
    _torch_conditional_forward(model, x, t, y),
  )


@pytest.mark.torch
def test_pytorch_init_draws_like_a_fresh_unet2dmodel(tmp_path):
  """model.init='pytorch' against the real thing: a fresh UNet2DModel (PyTorch's defaults), converted, layer by layer.

  Each kernel and bias lies in ±1/√fan_in (fan_in from the torch tensor's
  shape, [out, in, kh, kw] or [out, in]) and has the torch layer's spread;
  nothing starts near zero, unlike the paper's initialisation.
  """
  torch.manual_seed(0)
  fresh = diffusers.UNet2DModel(**TINY)
  fresh.save_pretrained(tmp_path / "fresh")
  theirs, _ = convert.diffusers_to_params(tmp_path / "fresh")
  network = unet.UNet(ch=32, out_ch=2, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0)
  ours = runtime.init_params(network, jax.random.PRNGKey(0), (8, 8, 1), "pytorch")
  flat_ours = flax.traverse_util.flatten_dict(ours)
  flat_theirs = flax.traverse_util.flatten_dict(theirs)
  assert set(flat_ours) == set(flat_theirs)
  checked = 0
  for path, mine in flat_ours.items():
    mine, ref = np.asarray(mine, np.float64), np.asarray(flat_theirs[path], np.float64)
    assert mine.shape == ref.shape, path
    if path[-1] == "scale":
      np.testing.assert_array_equal(mine, 1.0, err_msg=str(path))
    elif path[-1] == "bias" and "norm" in "/".join(path):
      np.testing.assert_array_equal(mine, 0.0, err_msg=str(path))
    else:
      # The range of torch's draw of the layer's kernel (its 1/√fan_in, to a few percent): biases share it.
      bound = np.abs(np.asarray(flat_theirs[path[:-1] + ("kernel",)])).max() if path[-1] == "bias" else None
      if bound is not None:
        assert np.abs(mine).max() <= bound * 1.05 and np.abs(ref).max() <= bound * 1.05, path
      if mine.size >= 256:
        ref_max = np.abs(ref).max()
        assert 0.9 * ref_max < np.abs(mine).max() <= 1.05 * ref_max, path
        np.testing.assert_allclose(mine.std(), ref.std(), rtol=0.15, err_msg=str(path))
        checked += 1
  assert checked > 30
  conv_in = np.asarray(ours["conv_in"]["kernel"])  # fan_in 3·3·1 = 9: U(±1/3), as torch's conv_in.weight
  assert 0.3 < np.abs(conv_in).max() <= 1 / 3 and 0.3 < fresh.conv_in.weight.abs().max().item() <= 1 / 3
