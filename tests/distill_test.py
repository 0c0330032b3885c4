"""Progressive distillation: the nested grids, the target on an analytic teacher, a round that learns the known
ideal student, data parallelism, exact resume of a round, and --mode=distill end to end."""

import json
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import REPO_ROOT
from conftest import cli_env
from conftest import tiny_config

from diffusion_jax import config_base
from diffusion_jax import diffusion as diffusion_lib
from diffusion_jax import distill_rounds
from diffusion_jax import distill_step
from diffusion_jax import distillation
from diffusion_jax import errors
from diffusion_jax import runtime
from diffusion_jax import schedules
from diffusion_jax import train
from diffusion_jax import train_step
from diffusion_jax.samplers import grids

# ----------------------------------------------------------------------------
# Grids.
# ----------------------------------------------------------------------------


def test_the_nested_grid_of_4_and_8_steps_on_T_1000_by_hand():
  # ceil(i·1000/n) − 1 for i = n … 1.
  np.testing.assert_array_equal(grids.nested_grid(1000, 8), [999, 874, 749, 624, 499, 374, 249, 124])
  np.testing.assert_array_equal(grids.nested_grid(1000, 4), [999, 749, 499, 249])
  np.testing.assert_array_equal(grids.nested_grid(1000, 1), [999])
  # 16 does not divide 1000: ceil(62.5·i) − 1, i = 16, 15, 14, 13: 999, ceil(937.5) − 1, 874, ceil(812.5) − 1.
  np.testing.assert_array_equal(grids.nested_grid(1000, 16)[:4], [999, 937, 874, 812])
  tables = distillation.step_tables(1000, 8, 4)
  np.testing.assert_array_equal(tables["t"], [999, 749, 499, 249])
  np.testing.assert_array_equal(tables["t_mid"], [874, 624, 374, 124])
  np.testing.assert_array_equal(tables["t_next"], [749, 499, 249, -1])


@pytest.mark.parametrize("T", [1000, 999, 20, 7])
def test_nested_grids_nest_for_any_T_and_equal_trailing_where_n_divides_T(T):
  for n in range(1, T // 2 + 1):
    teacher, student = grids.nested_grid(T, 2 * n), grids.nested_grid(T, n)
    np.testing.assert_array_equal(teacher[::2], student)
    assert student[0] == T - 1 and len(set(student.tolist())) == n and np.all(np.diff(student) < 0)
    if T % n == 0:
      np.testing.assert_array_equal(student, grids.timestep_grid("trailing", T, n))


def test_grids_that_do_not_nest_are_refused():
  with pytest.raises(errors.UserError, match="does not nest.*multiple"):
    grids.check_nested(1000, 6, 4)
  with pytest.raises(errors.UserError, match="does not nest"):
    grids.check_nested(1000, 4, 4)
  with pytest.raises(errors.UserError, match="halves the steps"):
    distillation.step_tables(1000, 8, 2)
  with pytest.raises(errors.UserError, match=r"start_steps=100 does not halve to distill.num_steps=4.*\[8, 16"):
    distill_rounds.round_steps(1000, 100, 4)
  with pytest.raises(errors.UserError, match=r"start_steps must be an integer in \[1, T=1000\]"):
    distill_rounds.round_steps(1000, 2048, 4)
  assert distill_rounds.round_steps(1000, 128, 4) == [64, 32, 16, 8, 4]
  assert distill_rounds.round_steps(1000, 512, 1) == [256, 128, 64, 32, 16, 8, 4, 2, 1]


# ----------------------------------------------------------------------------
# The target, on Gaussian data whose optimal denoiser is known.
# ----------------------------------------------------------------------------

MU, S = 0.3, 0.4  # data: every pixel independently N(MU, S²)


def _diffusion(mean_type: str, T: int = 1000):
  betas = schedules.get_beta_schedule("linear", beta_start=1e-4, beta_end=0.02, num_timesteps=T)
  return diffusion_lib.GaussianDiffusion.create(
    betas, model_mean_type=mean_type, model_var_type="fixedlarge", loss_type="mse"
  )


def _ab(abar):
  return np.sqrt(abar), np.sqrt(1.0 - abar)


def _optimal_gain(abar):
  """E[x | z] = MU + k (z − α MU) for z = α x + σ ε: k = α S² / (α² S² + σ²)."""
  a, s = _ab(abar)
  return a * S**2 / (a**2 * S**2 + s**2)


class OptimalEps(nn.Module):
  """The ε-predictor of the optimal denoiser of the Gaussian data, in float32 from the diffusion's ᾱ table."""

  alphas_cumprod: tuple  # hashable, as a module attribute must be

  @nn.compact
  def __call__(self, x, t, train=False):
    abar = jnp.asarray(self.alphas_cumprod, jnp.float32)[t].reshape((-1,) + (1,) * (x.ndim - 1))
    a, s = jnp.sqrt(abar), jnp.sqrt(1.0 - abar)
    x0 = MU + a * S**2 / (a**2 * S**2 + s**2) * (x - a * MU)
    return (x - a * x0) / s


def _ideal_target_gain(abar_all, t, t_mid, t_next):
  """x̃ = MU + G·(z − α_t MU): G from composing the two teacher steps, derived on paper (float64)."""
  abar = lambda i: 1.0 if i < 0 else abar_all[i]  # noqa: E731
  a, s = _ab(abar(t))
  a1, s1 = _ab(abar(t_mid))
  a2, s2 = _ab(abar(t_next))
  k, k1 = _optimal_gain(abar(t)), _optimal_gain(abar(t_mid))
  g1 = a1 * k + (s1 / s) * (1 - a * k)  # z' − α' MU = g1 (z − α MU)
  g2 = a2 * k1 + (s2 / s1) * (1 - a1 * k1)
  return (g2 * g1 - s2 / s) / (a2 - s2 * a / s)


def test_the_target_equals_the_ideal_student_of_gaussian_data():
  diffusion = _diffusion("eps")
  abar64 = np.cumprod(1.0 - np.asarray(diffusion.betas, np.float64))
  teacher = OptimalEps(tuple(np.asarray(diffusion.alphas_cumprod).tolist()))
  teacher_fn = lambda x, t: teacher.apply({}, x, t)  # noqa: E731
  tables = distillation.step_tables(1000, 8, 4)
  z = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (4, 3, 3, 1)) * 1.3)
  t, t_mid, t_next = (jnp.asarray(tables[k]) for k in ("t", "t_mid", "t_next"))
  got = np.asarray(distillation.target(teacher_fn, diffusion, jnp.asarray(z), t, t_mid, t_next, clip=False))
  for j in range(4):
    a = np.sqrt(abar64[tables["t"][j]])
    gain = _ideal_target_gain(abar64, tables["t"][j], tables["t_mid"][j], tables["t_next"][j])
    want = MU + gain * (z[j] - a * MU)
    # The last student step ends at x_0 itself (t'' = −1): the target is the teacher's output there.
    np.testing.assert_allclose(got[j], want, rtol=2e-4, atol=2e-4, err_msg=f"student step {j}")


def test_one_ddim_step_on_the_target_lands_where_the_teachers_two_land():
  diffusion = _diffusion("eps")
  teacher = OptimalEps(tuple(np.asarray(diffusion.alphas_cumprod).tolist()))
  teacher_fn = lambda x, t: teacher.apply({}, x, t)  # noqa: E731
  tables = distillation.step_tables(1000, 16, 8)
  z = jax.random.normal(jax.random.PRNGKey(1), (8, 2, 2, 1))
  t, t_mid, t_next = (jnp.asarray(tables[k]) for k in ("t", "t_mid", "t_next"))
  x_tilde = distillation.target(teacher_fn, diffusion, z, t, t_mid, t_next, clip=False)
  # The teacher's two steps and the student's one, with the DDIM sampler's own step function.
  from diffusion_jax.samplers import ddim
  from diffusion_jax.samplers.base import StepContext

  def sampler_step(x, x0, t_from, t_to):
    ctx = StepContext(
      diffusion=diffusion,
      tables=None,
      coef={},
      t_vec=t_from,
      noise=jnp.zeros_like(x),
      eta=jnp.float32(0.0),
      clip_denoised=False,
      static=(),
      predict_xstart=lambda out, x_, **kw: out,  # the model output handed in is x̂ itself
    )
    out, _ = ddim.DDIM_SAMPLER.step(x, x0, t_from[0], t_to[0], ctx)
    return out

  for j in range(8):
    sl = slice(j, j + 1)
    x0 = diffusion.p_mean_variance(teacher_fn(z[sl], t[sl]), z[sl], t[sl], clip_denoised=False)["pred_xstart"]
    mid = sampler_step(z[sl], x0, t[sl], t_mid[sl])
    x0m = diffusion.p_mean_variance(teacher_fn(mid, t_mid[sl]), mid, t_mid[sl], clip_denoised=False)["pred_xstart"]
    two = sampler_step(mid, x0m, t_mid[sl], t_next[sl])
    one = sampler_step(z[sl], x_tilde[sl], t[sl], t_next[sl])
    np.testing.assert_allclose(np.asarray(one), np.asarray(two), rtol=1e-4, atol=1e-5, err_msg=f"step {j}")


# ----------------------------------------------------------------------------
# A round whose ideal student is known: an affine student learns it.
# ----------------------------------------------------------------------------


class AffineV(nn.Module):
  """v = a[t]·z + b[t]: for Gaussian data the ideal student (an affine x̂) is of this form exactly."""

  num_timesteps: int

  @nn.compact
  def __call__(self, x, t, train=False):
    a = self.param("a", nn.initializers.zeros, (self.num_timesteps,))
    b = self.param("b", nn.initializers.zeros, (self.num_timesteps,))
    shape = (-1,) + (1,) * (x.ndim - 1)
    return a[t].reshape(shape) * x + b[t].reshape(shape)


def _optim(lr: float) -> ml_collections.ConfigDict:
  optim = config_base.get_base_config().optim
  optim.update(learning_rate=lr, warmup_steps=0, grad_clip=0.0, ema_decay=0.0, epsilon_hat=False)
  return optim


def test_a_round_trains_an_affine_student_to_the_ideal_student_of_gaussian_data():
  T = 1000
  teacher_diffusion, student_diffusion = _diffusion("eps", T), _diffusion("v", T)
  abar64 = np.cumprod(1.0 - np.asarray(teacher_diffusion.betas, np.float64))
  tables = distillation.step_tables(T, 4, 2)
  teacher, student = OptimalEps(tuple(np.asarray(teacher_diffusion.alphas_cumprod).tolist())), AffineV(T)
  params = student.init(jax.random.PRNGKey(0), jnp.zeros((1, 2, 2, 1)), jnp.zeros((1,), jnp.int32))["params"]
  optim = _optim(0.05)
  import optax

  state = train_step.TrainState.create(apply_fn=student.apply, params=params, tx=optax.adam(0.05))
  state = state.replace(ema_params=params, step=jnp.zeros((), jnp.int32))
  step = jax.jit(
    lambda s, batch, rng: distill_step.distill_step(
      s,
      {},
      batch,
      rng,
      network=student,
      diffusion=student_diffusion,
      teacher_network=teacher,
      teacher_diffusion=teacher_diffusion,
      tables=tables,
      optim_config=optim,
      weighting="truncated_snr",
      clip=False,
    )
  )
  rng = jax.random.PRNGKey(1)
  for i in range(600):
    x = MU + S * jax.random.normal(jax.random.fold_in(rng, 10_000 + i), (64, 2, 2, 1))
    state, metrics = step(state, {"image": x}, rng)
  assert float(metrics["loss"]) < 1e-3, metrics
  for j in range(2):
    t = int(tables["t"][j])
    a, s = _ab(abar64[t])
    gain = _ideal_target_gain(abar64, t, int(tables["t_mid"][j]), int(tables["t_next"][j]))
    # x̂ = α z − σ v (v-prediction), so x̂ = MU + G (z − α MU) is v = ((α − G) z − MU (1 − G α)) / σ.
    want_a, want_b = (a - gain) / s, -(MU - gain * a * MU) / s
    got_a, got_b = float(state.params["a"][t]), float(state.params["b"][t])
    np.testing.assert_allclose([got_a, got_b], [want_a, want_b], rtol=2e-2, atol=2e-2, err_msg=f"step {j}, t={t}")


# ----------------------------------------------------------------------------
# Rounds of the tiny model: data parallelism, resume, the command line.
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher_workdir(tmp_path_factory):
  from conftest import write_model_workdir

  return write_model_workdir(tmp_path_factory.mktemp("teacher"), step=4, scale=0.02)


def _round_config(teacher, steps: int = 6):
  base = tiny_config()
  base.distill.update(start_steps=4, num_steps=2, steps_per_round=steps, learning_rate=1e-3)
  return distill_rounds.plan(base, teacher)[0].config


def _host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def test_the_distill_step_on_one_and_on_four_devices_agree(teacher_workdir, n_devices):
  config = _round_config(teacher_workdir)
  network, diffusion = runtime.build(config)
  teacher = distill_step.load_teacher(config)
  results = []
  for devices in (jax.devices()[:1], jax.devices()):
    mesh = runtime.make_mesh(devices=devices)
    state = train_step.init_state_sharded(
      config, network, mesh, jax.random.PRNGKey(0), params=teacher.params, ema_params=teacher.params
    )
    fn = distill_step.jit_distill_step(
      mesh, network, diffusion, teacher, config, jax.tree.map(lambda x: x.sharding, state)
    )
    x = jax.random.uniform(jax.random.PRNGKey(3), (8, 8, 8, 1), minval=-1, maxval=1)
    batch = jax.device_put({"image": x}, runtime.batch_sharding(mesh))
    for _ in range(2):
      state, metrics = fn(state, batch, jax.random.PRNGKey(5))
    results.append((_host(state.params), float(metrics["loss"])))
  (p1, l1), (p4, l4) = results
  assert np.isfinite(l1) and l1 > 0
  np.testing.assert_allclose(l4, l1, rtol=1e-5)
  # Two Adam steps of rate 1e-3 move each parameter by up to 2e-3 whatever its gradient's size; where a gradient
  # is near zero the devices' summation order shows, so the parameters agree to 1e-5 (1% of a step), not bitwise.
  teacher_leaves = jax.tree.leaves(teacher.params)
  moved = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(p1), teacher_leaves))
  assert moved > 1e-3, moved
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5), p4, p1)


def test_a_round_resumed_midway_ends_bit_for_bit_as_an_uninterrupted_one(teacher_workdir, tmp_path):
  config = _round_config(teacher_workdir)
  whole = train.train_and_evaluate(config, str(tmp_path / "whole"))
  assert whole.steps == 6
  stopped_config = ml_collections.ConfigDict(config.to_dict())
  stopped_config.training.num_train_steps = 3  # as if stopped after step 3's checkpoint
  first = train.train_and_evaluate(stopped_config, str(tmp_path / "resumed"))
  assert first.steps == 3
  resumed = train.train_and_evaluate(config, str(tmp_path / "resumed"))
  assert resumed.steps == 6
  jax.tree.map(np.testing.assert_array_equal, _host(resumed.state.params), _host(whole.state.params))
  jax.tree.map(np.testing.assert_array_equal, _host(resumed.state.ema_params), _host(whole.state.ema_params))
  # The student moved away from its teacher.
  teacher = distill_step.load_teacher(config).params
  assert any(
    not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(teacher), jax.tree.leaves(_host(whole.state.params)))
  )


def test_a_student_with_another_network_is_refused(teacher_workdir):
  config = _round_config(teacher_workdir)
  config.model.ch = 64
  network, _ = runtime.build(config)
  shapes = jax.eval_shape(lambda r: runtime.init_params(network, r, runtime.image_shape(config)), jax.random.PRNGKey(0))
  with pytest.raises(errors.UserError, match="differs from the teacher"):
    distill_step.load_teacher(config, shapes)


def test_a_workdir_written_before_the_distill_section_continues_and_a_rounds_teacher_is_checked(tmp_path):
  from diffusion_jax import workdirs

  config = tiny_config()
  old = json.loads(config.to_json())
  del old["distill"]  # a config.json of a run started before this version
  (tmp_path / "config.json").write_text(json.dumps(old))
  workdirs.write_config(tmp_path, config)  # continues: the section takes its defaults
  config.distill.update(num_steps=2, steps_per_round=99)  # the rounds to come may change
  workdirs.write_config(tmp_path, config)
  config.distill.teacher = str(tmp_path / "another")
  with pytest.raises(errors.UserError, match="distill.teacher"):
    workdirs.write_config(tmp_path, config)


def _cli(command, *, devices: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
  """Runs a command from the repository's root with `cli_env(devices)`, capturing its output."""
  return subprocess.run(command, cwd=REPO_ROOT, env=cli_env(devices), capture_output=True, text=True, timeout=timeout)


def _distill_command(workdir, *extra):
  return [
    sys.executable,
    "-m",
    "diffusion_jax.main",
    "--config=configs/tiny.py",
    f"--workdir={workdir}",
    "--mode=distill",
    "--config.distill.start_steps=4",
    "--config.distill.num_steps=1",
    "--config.distill.steps_per_round=3",
    *extra,
  ]


def test_mode_distill_end_to_end_then_sample_fn_takes_the_students(teacher_workdir, tmp_path, caplog):
  import shutil

  workdir = tmp_path / "run"
  shutil.copytree(teacher_workdir, workdir)
  proc = _cli(_distill_command(workdir))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Distillation finished: 2 round(s)" in proc.stderr
  assert "round 1: 4 -> 2 steps" in proc.stderr and "round 2: 2 -> 1 steps" in proc.stderr
  assert "round 2/2 (2 -> 1 steps): 100%" in proc.stderr  # the progress bar
  for n in (2, 1):
    student = workdir / "distill" / f"{n}steps"
    assert (student / "config.json").exists() and (student / "samples" / "grid_step_00000003.png").exists()
  # Again: both rounds are finished and skipped, nothing is redone.
  again = _cli(_distill_command(workdir))
  assert again.returncode == 0, again.stderr[-3000:]
  assert again.stderr.count("finished before, in") == 2, again.stderr[-2000:]
  assert "step 3/3" in proc.stderr and "step 3/3" not in again.stderr  # no step was trained again

  import diffusion_jax

  student = diffusion_jax.load_model(workdir / "distill" / "1steps")
  assert student.diffusion.model_mean_type == "v" and student.config.distill.student_steps == 1
  images = diffusion_jax.sample_fn(
    student, 4, jax.random.PRNGKey(0), sampler="ddim", num_steps=1, timestep_spacing="nested", progress=False
  )
  assert images.shape == (4, 8, 8, 1) and images.dtype == np.uint8
  with caplog.at_level("WARNING"):
    diffusion_jax.sample_fn(student, 1, jax.random.PRNGKey(0), sampler="ddim", num_steps=1, progress=False)
  assert "1-step distilled student" in caplog.text and "ddim_1steps_eta0 samples it off that grid" in caplog.text
  # A student distils further from its own grid only.
  further = tiny_config()
  further.distill.update(start_steps=4, num_steps=1)
  with pytest.raises(errors.UserError, match="is a 2-step student.*start_steps=2"):
    distill_rounds.plan(further, workdir / "distill" / "2steps")
  further.distill.start_steps = 2
  (only,) = distill_rounds.plan(further, workdir / "distill" / "2steps")
  assert (only.teacher_steps, only.student_steps) == (2, 1) and only.workdir.parent.parent.name == "2steps"
  # The benchmark that puts the students beside the teacher's samplers runs on them.
  bench = _cli(
    [
      sys.executable,
      "-m",
      "benchmarks.distill_quality",
      f"--workdir={workdir}",
      "--students=2,1",
      "--num_samples=8",
      "--batch_size=8",
      f"--pictures={tmp_path / 'pic'}",
      f"--json_out={tmp_path / 'quality.json'}",
    ]
  )
  assert bench.returncode == 0, bench.stderr[-3000:]
  rows = json.loads((tmp_path / "quality.json").read_text())["rows"]
  settings = [r["setting"] for r in rows]
  assert settings[:4] == [
    "student 2",
    "teacher ddim_2steps_eta0_nested",
    "teacher dpmpp2m_2steps",
    "teacher dpmpp2m_sde_2steps",
  ]
  assert {r["calls"] for r in rows if r["setting"] == "student 1"} == {1} and rows[-1]["calls"] == 20  # ancestral, T
  assert all(np.isfinite(r["digits_fd"]) for r in rows)
  for name in ("pic_2steps.png", "pic_1steps.png", "pic_compare.png"):
    assert (tmp_path / name).exists()
  # The student's own config.json is a --config: --mode=sample samples it on its grid with no sampler flags.
  one = workdir / "distill" / "1steps"
  sample = _cli(
    [
      sys.executable,
      "-m",
      "diffusion_jax.main",
      f"--config={one / 'config.json'}",
      f"--workdir={one}",
      "--mode=sample",
      "--config.sampling.num_samples=4",
    ],
    timeout=300,
  )
  assert sample.returncode == 0, sample.stderr[-2000:]
  assert (one / "samples" / "step_3_ddim_1steps_eta0_nested" / "grid.png").exists()
  assert f"--config={one / 'config.json'} --workdir={one} --mode=sample" in proc.stderr  # the round's summary
  # The student's own config samples with its grid.
  spec = diffusion_jax.samplers.SamplerSpec.from_config(student.config.sampling, num_timesteps=20)
  assert (spec.name, spec.num_steps, spec.timestep_spacing) == ("ddim", 1, "nested")


def test_mode_distill_errors_are_one_line(tmp_path, teacher_workdir):
  proc = _cli(_distill_command(tmp_path / "empty"), devices=1, timeout=300)
  assert proc.returncode == 2 and "holds no checkpoint: train it first" in proc.stderr, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  proc = _cli(_distill_command(teacher_workdir, "--config.distill.start_steps=6"), devices=1, timeout=300)
  assert proc.returncode == 2 and "does not halve to distill.num_steps=1" in proc.stderr, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
