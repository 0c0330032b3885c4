"""The TPU plan: slice names, the FLOP count checked against an analytic one, rematerialisation, and (with libtpu,
tests marked `tpu`) programs compiled for TPU slices on this CPU: fit, figures, cache, a quiet console, a program
that does not fit.

The `tpu` tests need `jax[tpu]` (libtpu); without it they are deselected (`-m "not tpu"`), and the TPU leg of CI
runs them alone (`-m tpu`) with DIFFUSION_JAX_REQUIRE_LIBTPU=1, which turns a missing libtpu into a failure.
"""

import functools
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import REPO_ROOT  # noqa: I001
from conftest import cli_env  # noqa: I001

from diffusion_jax import errors
from diffusion_jax import runtime
from diffusion_jax import train_step as train_step_lib


def _config(name, **changes):
  import importlib  # noqa: PLC0415

  config = importlib.import_module(f"configs.{name}").get_config()
  config.unlock()
  for dotted, value in changes.items():
    section, key = dotted.split("__")
    config[section][key] = value
  return config


# ----------------------------------------------------------------------------
# Slice names (no libtpu needed).
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
  "name,topology,devices,chips,hosts",
  [
    ("v3-8", "v3:2x2", 8, 4, 1),  # the paper's: 4 chips, 8 TensorCores, each its own device
    ("v4-8", "v4:2x2x1", 4, 4, 1),  # megacore: one device per chip
    ("v5e-8", "v5e:2x4", 8, 8, 1),
    ("v5litepod-8", "v5e:2x4", 8, 8, 1),
    ("v5p-8", "v5p:2x2x1", 4, 4, 1),
    ("v6e-8", "v6e:2x4", 8, 8, 1),
    ("v4-32", "v4:2x2x4", 16, 16, 4),
    ("v5e-16", "v5e:4x4", 16, 16, 4),
  ],
)
def test_tpu_slice_names(name, topology, devices, chips, hosts):
  s = runtime.tpu_slice(name)
  assert (s.topology, s.devices, s.chips, s.hosts) == (topology, devices, chips, hosts)
  assert np.prod(s.chips_per_host_bounds) * s.hosts == s.chips


@pytest.mark.parametrize("name", ["v7-8", "v3-6", "tpu", "v5e-3"])
def test_bad_slice_names_are_user_errors(name):
  with pytest.raises(errors.UserError, match="TPU slice"):
    runtime.tpu_slice(name)


# ----------------------------------------------------------------------------
# The FLOP count XLA reports, against one made by hand from the U-Net's layers.
# ----------------------------------------------------------------------------


def analytic_forward_flops(model, image_size: int, channels: int, out_ch: int, *, in_image_taps=False) -> float:
  """FLOPs of one image through the U-Net (2 per multiply-add) of its convolutions, dense layers and attention.

  Normalisation, activations and additions are left out: they are a fraction of a percent on these networks.
  `in_image_taps`: count only the 3×3 taps that fall inside the image (XLA's cost analysis does not count the
  multiply-adds with the zero padding of a SAME convolution; at 8×8 that is 16% of them).
  """
  ch, mult, nrb = model.ch, tuple(model.ch_mult), model.num_res_blocks
  temb = 4 * ch
  flops = 2 * ch * temb + 2 * temb * temb  # the timestep embedding's two dense layers

  def taps(n, k, stride):  # summed over the output positions of one axis
    if k == 1 or not in_image_taps:
      return (n // stride) * k
    return 3 * n - 2 if stride == 1 else 3 * (n // 2) - 1  # SAME padding: (1, 1), and (0, 1) at stride 2

  def conv(n, cin, cout, k=3, stride=1):
    return 2 * taps(n, k, stride) ** 2 * cin * cout

  def block(n, cin, cout):
    f = conv(n, cin, cout) + conv(n, cout, cout) + 2 * temb * cout
    if cin != cout:
      f += conv(n, cin, cout, k=1)
    return f

  def attn(n, c):
    hw = n * n
    return 4 * 2 * hw * c * c + 2 * 2 * hw * hw * c

  res = image_size
  flops += conv(res, channels, ch)
  skips = [ch]
  c = ch
  for i, m in enumerate(mult):
    for _ in range(nrb):
      flops += block(res, c, ch * m)
      c = ch * m
      if res in model.attn_resolutions:
        flops += attn(res, c)
      skips.append(c)
    if i != len(mult) - 1:
      flops += conv(res, c, c, stride=2)  # downsampling
      res //= 2
      skips.append(c)
  flops += block(res, c, c) + attn(res, c) + block(res, c, c)
  for i, m in reversed(list(enumerate(mult))):
    for _ in range(nrb + 1):
      flops += block(res, c + skips.pop(), ch * m)
      c = ch * m
      if res in model.attn_resolutions:
        flops += attn(res, c)
    if i != 0:
      res *= 2
      flops += conv(res, c, c)  # nearest upsampling, then a convolution
  assert not skips
  return flops + conv(res, c, out_ch)


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_every_program_of_a_conditional_config_lowers(guidance_scale):
  # The run's samplers take labels (and, guided, the scale): the plan's programs must take what the run passes.
  from diffusion_jax import plan  # noqa: PLC0415

  config = _config("digits_cond", sampling__guidance_scale=guidance_scale)
  programs = plan.programs_of(config, runtime.make_mesh())
  by_name = {p.name: p for p in programs}
  assert {"train", "grid", "sample", "bpd"} <= set(by_name), sorted(by_name)
  assert len(by_name["sample"].args) == (5 if guidance_scale != 1.0 else 4)
  assert len(by_name["grid"].args) == 4  # the training grid: one class per column, unguided
  for program in programs:
    assert "func.func public @main" in program.jitted.trace(*program.args).lower().as_text(), program.name


def _train_step_compiled(config, mesh):
  from diffusion_jax import plan  # noqa: PLC0415

  program = plan.programs_of(config, mesh, ("train",))[0]
  return program, program.jitted.trace(*program.args).lower().compile()


def _flops(compiled):
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0]
  return float(analysis["flops"])


def test_analytic_count_matches_the_paper_network():
  # Independent of XLA: the CIFAR-10 network's forward pass is about 6.1 G multiply-adds per 32×32 image, the figure
  # published for the DDPM CIFAR-10 U-Net (35.7M parameters) in the fast-sampling literature's cost tables.
  config = _config("cifar")
  flops = analytic_forward_flops(config.model, 32, 3, 3)
  assert 5.9e9 < flops / 2 < 6.4e9, flops


@pytest.mark.parametrize("name,clip_groups", [("digits", 1), ("tiny", 4)])
def test_compiled_train_flops_are_three_forward_passes(name, clip_groups):
  # The train step's FLOPs per image, from XLA's cost analysis of the compiled program on the CPU devices: forward
  # plus backward = 3× the analytic forward count (the backward pass computes gradients for inputs and weights),
  # within 8%: what the count leaves out (normalisation, activations, the loss) is 2% of the digits network's
  # FLOPs and 5% of the tiny one's (32 channels).
  # FLOPs per image are the difference of two batch sizes, so what a step does once (the update) drops out.
  mesh = runtime.make_mesh()
  flops = {}
  for batch in (16, 32):
    config = _config(name, optim__clip_groups=clip_groups, training__batch_size=batch)
    flops[batch // mesh.size] = _flops(_train_step_compiled(config, mesh)[1])
  per_image = (flops[8] - flops[4]) / 4
  network, _ = runtime.build(config)
  forward = analytic_forward_flops(
    config.model, config.data.image_size, config.data.channels, network.out_ch, in_image_taps=True
  )
  assert 0.97 < per_image / (3 * forward) < 1.08, (per_image, forward)


def test_remat_recomputes_the_same_training():
  # model.remat recomputes each level's activations in the backward pass: the forward pass (the losses) is bit for
  # bit the same, the gradients agree to float32 rounding (XLA fuses the recomputed forward pass differently, which
  # moves the last bits of some sums), and so does the state after a few steps.
  def run(remat):
    config = _config("tiny", model__remat=remat, optim__clip_groups=2)
    network, diffusion = runtime.build(config)
    mesh = runtime.make_mesh()
    state = train_step_lib.init_state_sharded(config, network, mesh, jax.random.PRNGKey(0))
    sharding = jax.tree.map(lambda x: x.sharding, state)
    step = train_step_lib.jit_train_step(mesh, network, diffusion, config.optim, sharding)
    images = np.random.default_rng(0).uniform(-1, 1, (8, 8, 8, 1)).astype(np.float32)
    batch = runtime.global_array({"image": images}, mesh)
    rng = runtime.put_replicated(jax.random.PRNGKey(1), mesh)
    losses = []
    for _ in range(3):
      state, metrics = step(state, batch, rng)
      losses.append(float(metrics["loss"]))
    return runtime.to_host(state), losses, network

  state, losses, network = run(False)
  state_remat, losses_remat, network_remat = run(True)
  assert network_remat.remat and not network.remat
  assert losses[0] == losses_remat[0]  # the first step's forward pass: same parameters, same arithmetic
  np.testing.assert_allclose(losses, losses_remat, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(state.opt_state), jax.tree.leaves(state_remat.opt_state)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-9)
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(state_remat.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-7)


@pytest.mark.parametrize(
  "fixed,per_image,remat_from,unit,start",
  [
    (1.0, 0.05, None, 8, 128),  # memory linear in the batch: the line finds it in 4 compiles
    (1.0, 0.05, 0.8, 8, 128),  # the compiler rematerialises near the limit: stepping down from above
    (0.5, 0.002, 0.9, 4, 8),  # a small network: thousands of images
    (20.0, 0.05, None, 8, 128),  # nothing fits
    (1.0, 0.05, None, 8, 4096),  # the asked batch does not fit
    (5.0, 0.5, 1.0, 8, 64),  # ... nor half of it
  ],
)
@pytest.mark.parametrize("tolerance", [0.0, 0.125])
def test_batch_search_finds_the_largest_batch_that_fits(fixed, per_image, remat_from, unit, start, tolerance):
  # A program's HBM in GiB: `fixed` + `per_image` per image; past `remat_from` of the capacity the compiler
  # recomputes instead of storing, and the program still fits up to twice the linear limit.
  from diffusion_jax import plan  # noqa: PLC0415

  gib, capacity = 2**30, 15.75

  def truth(batch):
    need = fixed + per_image * batch
    limit = capacity if remat_from is None else capacity + (capacity - fixed)
    return need <= limit, need

  calls = []

  def figures_at(batch):
    calls.append(batch)
    ok, need = truth(batch)
    if ok:
      return plan.Figures(fits=True, compile_s=0.0, temp_bytes=min(need, capacity) * gib)
    return plan.Figures(fits=False, compile_s=0.0, required_bytes=need * gib, available_bytes=capacity * gib)

  m = plan.search_batch(figures_at, start=start, unit=unit, available=16 * gib, devices=4, tolerance=tolerance)
  fits_all = [b for b in range(unit, 200_000, unit) if truth(b)[0]]
  best = max(fits_all, default=0)
  assert truth(m.largest_fitting)[0] or m.largest_fitting == 0
  if best == 0:
    assert m.largest_fitting == 0
    return
  assert m.smallest_failing is not None and not truth(m.smallest_failing)[0]
  assert m.smallest_failing - m.largest_fitting <= max(unit, tolerance * m.largest_fitting)
  assert best - m.largest_fitting <= max(0, tolerance * m.largest_fitting)
  assert m.per_device == m.largest_fitting // 4
  assert len(calls) == len(set(calls)) <= (12 if tolerance else 20)  # each batch compiled once
  # A batch that fits is compiled to the end (minutes to an hour), one that does not gives up early: few fit.
  fitting = [b for b in calls if truth(b)[0]]
  assert len(fitting) <= (7 if tolerance else 12)
  if remat_from is None:
    # The line through the asked batch and a batch that fails gives the limit: compiled, and one step up.
    assert len(calls) == 4 and len(fitting) <= 2


@pytest.mark.parametrize("limit", [17704, 17800, 30000])
@pytest.mark.parametrize("start", [128, 1000, 16664])
@pytest.mark.parametrize("tolerance", [0.0625, 0.125])
def test_batch_search_follows_the_failures_down_where_the_compiler_squeezes(limit, start, tolerance):
  # As libtpu 0.0.50.1 compiles CIFAR-10 for a v6e-8: batches fit up to `limit` (the compiler recomputing to
  # squeeze them in, so HBM grows slowly), and one that does not says what it needs after trying, just above the
  # 31.24 GiB it has at the limit and 2.1 MB more per image beyond it.
  from diffusion_jax import plan  # noqa: PLC0415

  gib, capacity, unit = 2**30, 31.24, 8
  calls = []

  def figures_at(batch):
    calls.append(batch)
    if batch <= limit:
      return plan.Figures(fits=True, compile_s=0.0, temp_bytes=min(capacity, 0.5 + 0.0018 * batch) * gib)
    need = capacity + 0.01 + 0.0021 * (batch - limit)
    return plan.Figures(fits=False, compile_s=0.0, required_bytes=need * gib, available_bytes=capacity * gib)

  m = plan.search_batch(figures_at, start=start, unit=unit, available=32 * gib, devices=8, tolerance=tolerance)
  assert m.largest_fitting <= limit < m.smallest_failing
  assert m.smallest_failing - m.largest_fitting <= max(unit, tolerance * m.largest_fitting)
  assert len(calls) == len(set(calls)) <= 7  # stepping down a fraction at a time from the first failure: up to 25
  assert len([b for b in calls if b <= limit]) <= 4


@pytest.mark.parametrize(
  "crash_from,crash_to,start",
  [
    (240, 296, 128),  # the compiler crashes just below the limit (libtpu 0.0.42.1 on a v6e-8)
    (1000, 2000, 128),  # ... where the search overshoots: no HBM figure to draw its line through
    (96, 200, 128),  # ... at the asked batch and below it
  ],
)
@pytest.mark.parametrize("tolerance", [0.0, 0.125])
def test_batch_search_steps_down_from_a_compiler_crash(crash_from, crash_to, start, tolerance):
  # Memory linear in the batch (the limit is 295 images); batches in [crash_from, crash_to) crash the compiler.
  from diffusion_jax import plan  # noqa: PLC0415

  gib, capacity, unit = 2**30, 15.75, 8

  def need(batch):
    return 1.0 + 0.05 * batch

  def crashes(batch):
    return crash_from <= batch < crash_to

  calls = []

  def figures_at(batch):
    calls.append(batch)
    if crashes(batch):
      return plan.Figures(fits=False, compile_s=0.0, crashed=True, error="the compiler crashed (SIGSEGV)")
    if need(batch) <= capacity:
      return plan.Figures(fits=True, compile_s=0.0, temp_bytes=need(batch) * gib)
    return plan.Figures(fits=False, compile_s=0.0, required_bytes=need(batch) * gib, available_bytes=capacity * gib)

  m = plan.search_batch(figures_at, start=start, unit=unit, available=16 * gib, devices=4, tolerance=tolerance)
  works = [b for b in range(unit, 4096, unit) if need(b) <= capacity and not crashes(b)]
  assert m.largest_fitting in works
  assert m.smallest_failing is not None and m.smallest_failing not in works
  assert m.smallest_failing - m.largest_fitting <= max(unit, tolerance * m.largest_fitting)
  if max(works) < crash_from:  # below a crash the answer is the largest batch that works
    assert max(works) - m.largest_fitting <= tolerance * m.largest_fitting
  assert m.crashed == [b for b in calls if crashes(b)] and m.crashed
  assert len(calls) == len(set(calls)) <= (12 if tolerance else 20)
  report = plan.Plan("tiny", runtime.tpu_slice("v5e-4"), 1, plan.CHIPS["v5e"], [], max_batch=m).table()
  if m.smallest_failing in m.crashed:
    assert f"{m.smallest_failing} does not (the compiler crashes compiling it)" in report


def _crash(signum):
  os.kill(os.getpid(), signum)


def _fail(message):
  raise errors.UserError(message)


def _fail_unpicklably():
  import threading  # noqa: PLC0415

  raise errors.UserError("with a lock", threading.Lock())


def test_run_isolated_survives_a_crash_and_passes_on_results_and_errors():
  import signal  # noqa: PLC0415

  from diffusion_jax import plan  # noqa: PLC0415

  assert plan.run_isolated(os.getpid) != os.getpid()
  assert plan.run_isolated(divmod, 7, 2) == (3, 1)
  with pytest.raises(errors.UserError, match="named problem"):
    plan.run_isolated(_fail, "named problem")
  with pytest.raises(RuntimeError, match="UserError: .*with a lock"):  # its type and message, where it won't pickle
    plan.run_isolated(_fail_unpicklably)
  with pytest.raises(plan.ChildCrashed, match="SIGSEGV") as crash:
    plan.run_isolated(_crash, signal.SIGSEGV)
  assert crash.value.signum == signal.SIGSEGV


def test_a_compiler_crash_is_cached_and_a_kill_is_not(plan_cache):
  import signal  # noqa: PLC0415

  from diffusion_jax import plan  # noqa: PLC0415

  x = jax.ShapeDtypeStruct((4, 4), np.float32)
  program = plan.Program("train", "a test program", jax.jit(lambda a: a @ a), (x,), 4, 1, "step")

  def ended_by(signum):
    def elsewhere(lowered, key):
      assert "dot" in lowered.as_text() and len(key) == 32
      raise plan.ChildCrashed(signum)

    return elsewhere

  with pytest.raises(plan.ChildCrashed):  # killed (out of host memory, by a person): not the program's fault
    plan.compile_figures(program, "v5e-4", elsewhere=ended_by(signal.SIGKILL))
  assert not plan_cache.exists() or not list(plan_cache.iterdir())
  figures, cached = plan.compile_figures(program, "v5e-4", elsewhere=ended_by(signal.SIGSEGV))
  assert (figures.crashed, figures.fits, cached) == (True, False, False)
  assert "the compiler crashed (SIGSEGV" in figures.error
  again, cached = plan.compile_figures(program, "v5e-4", elsewhere=ended_by(signal.SIGKILL))  # not called
  assert cached and again == figures


# ----------------------------------------------------------------------------
# Compiled for TPU slices (libtpu).
# ----------------------------------------------------------------------------

requires_libtpu = pytest.mark.skipif(
  not runtime.libtpu_installed() and os.environ.get("DIFFUSION_JAX_REQUIRE_LIBTPU") != "1",
  reason="needs jax[tpu] (libtpu); CI's TPU leg runs these",
)


@pytest.fixture
def plan_cache(tmp_path, monkeypatch):
  monkeypatch.setenv("DIFFUSION_JAX_CACHE_DIR", str(tmp_path / "cache"))
  return tmp_path / "cache" / "plan"


@pytest.mark.parametrize("slice_name", ["v5e-4", "v3-8"])
@pytest.mark.tpu
@requires_libtpu
def test_tiny_config_compiles_for_tpu(slice_name, plan_cache):
  from diffusion_jax import plan  # noqa: PLC0415

  config = _config("tiny", training__sample_every=10)
  report = plan.plan(config, slice_name, programs=("train", "sample", "bpd", "grid"))
  assert report.fits
  assert [p.program for p in report.programs] == ["train", "grid", "sample", "bpd"]
  devices = runtime.tpu_slice(slice_name).devices
  network, _ = runtime.build(config)
  params = jax.eval_shape(
    functools.partial(runtime.init_params, network, shape=runtime.image_shape(config)), jax.random.PRNGKey(0)
  )
  param_bytes = sum(x.size * 4 for x in jax.tree.leaves(params))
  train = report.programs[0]
  assert train.batch_per_device == 8 // devices if devices <= 8 else 1
  # The state the step holds: parameters, their EMA and Adam's two moments, all float32.
  assert train.figures.argument_bytes >= 4 * param_bytes
  assert train.figures.total_bytes >= 4 * param_bytes
  # The state crosses HBM at least twice a step: the parameters, both Adam moments and the EMA, read and written.
  assert train.figures.hbm_bytes >= 8 * param_bytes
  for p in report.programs:
    assert p.figures.flops > 0 and p.figures.bytes_accessed > 0, p
    assert 0 < p.figures.hbm_bytes, p
    lo, hi = p.trip_s
    assert 0 < lo <= hi
  # The train step's FLOPs as XLA's TPU cost model counts them: 3 forward passes per image, counted with or without
  # the taps on the padding (within 5% of the two counts).
  inside = analytic_forward_flops(config.model, 8, 1, network.out_ch, in_image_taps=True)
  whole = analytic_forward_flops(config.model, 8, 1, network.out_ch)
  per_image = train.figures.flops / train.batch_per_device
  assert 0.95 * 3 * inside < per_image < 1.05 * 3 * whole, (per_image, inside, whole)
  # A sampler step is one network call (the loop body counted once).
  sample = report.programs[2]
  assert 0.95 * inside < sample.figures.flops / sample.batch_per_device < 1.05 * whole
  text = report.table()
  assert slice_name in text and "DOES NOT FIT" not in text
  # The second plan comes from the cache, with the same figures.
  again = plan.plan(config, slice_name, programs=("train", "sample", "bpd", "grid"))
  assert all(p.cached for p in again.programs)
  assert [p.figures for p in again.programs] == [p.figures for p in report.programs]
  assert len(list(plan_cache.glob("*.json"))) == 4


@pytest.mark.tpu
@requires_libtpu
def test_identical_programs_share_one_compile(plan_cache):
  from diffusion_jax import plan  # noqa: PLC0415

  first = plan.plan(_config("tiny"), "v5e-4", programs=("train",))
  # Another dataset, its own flips and step count: the same train step, so the same cache entry.
  other = plan.plan(
    _config("tiny", data__random_flip=False, training__num_train_steps=99), "v5e-4", programs=("train",)
  )
  assert not first.programs[0].cached and other.programs[0].cached


def _plan_cli(*args, cache_in=None, env=None):
  """`python -m diffusion_jax.plan` with `args`; its figures cached under `cache_in` (a test's tmp_path)."""
  env = {**os.environ, **(env or {})}
  if cache_in is not None:
    env["DIFFUSION_JAX_CACHE_DIR"] = str(cache_in / "cache")
  return subprocess.run(
    [sys.executable, "-m", "diffusion_jax.plan", *args],
    cwd=REPO_ROOT,
    capture_output=True,
    text=True,
    env=env,
    timeout=600,
    check=False,
  )


@pytest.mark.tpu
@requires_libtpu
def test_cli_prints_the_plan_quietly(tmp_path):
  out = _plan_cli(
    "--config=configs/tiny.py",
    "--topology=v5e-4",
    "--programs=train,sample",
    f"--json_out={tmp_path / 'plan.json'}",
    cache_in=tmp_path,
  )
  assert out.returncode == 0, out.stderr
  assert "Plan of configs/tiny.py on v5e-4" in out.stdout
  assert "roofline" in out.stdout
  # libtpu's start-up complaints on a host that is not a TPU VM stay off the console.
  for noise in ("TPU_WORKER_HOSTNAMES", "InitGoogle", "could not determine"):
    assert noise not in out.stderr + out.stdout
  assert (tmp_path / "plan.json").exists()


@pytest.mark.tpu
@requires_libtpu
def test_a_program_that_does_not_fit_is_one_message(tmp_path):
  # The tiny network at 256×256 with 32,768 images per step: far beyond a v5e chip's 16 GiB.
  out = _plan_cli(
    "--config=configs/tiny.py",
    "--topology=v5e-4",
    "--programs=train",
    "--config.data.image_size=256",
    "--config.model.attn_resolutions=()",
    "--config.training.batch_size=32768",
    "--noadvise",
    cache_in=tmp_path,
  )
  assert out.returncode == errors.EXIT_USER_ERROR, out.stderr
  assert "Traceback" not in out.stderr
  assert "DOES NOT FIT" in out.stdout
  assert "error: train does not fit on v5e-4: it needs" in out.stderr
  assert "GiB of HBM per device and the compiler has 15.75 GiB" in out.stderr


@pytest.mark.tpu
@requires_libtpu
def test_largest_batch_is_found_by_compiling(tmp_path):
  import json  # noqa: PLC0415

  # A one-level tiny network on 16×16 images: thousands of images fit a v5e chip, and each compile is short.
  # Tolerance 1 (the failing batch within twice the fitting one) keeps it to a few compiles; the search itself is
  # tested to one batch step above (test_batch_search_finds_the_largest_batch_that_fits). From the command line,
  # whose module is __main__, the search's compile processes get functions of the imported module.
  out = _plan_cli(
    "--config=configs/tiny.py",
    "--topology=v5e-4",
    "--programs=train",
    "--config.data.image_size=16",
    "--config.model.ch_mult=(1,)",
    "--config.model.attn_resolutions=()",
    "--config.training.batch_size=64",
    "--max_batch",
    "--max_batch_tolerance=1.0",
    f"--json_out={tmp_path / 'plan.json'}",
    cache_in=tmp_path,
  )
  assert out.returncode == 0, out.stderr
  (report,) = json.loads((tmp_path / "plan.json").read_text())
  m = report["max_batch"]
  assert m["largest_fitting"] > 64 and m["smallest_failing"] <= 2 * m["largest_fitting"], m
  verdicts = {b: ok for b, ok, _ in m["compiles"]}
  assert verdicts[m["largest_fitting"]] and not verdicts[m["smallest_failing"]]
  assert len(verdicts) > 2 and not m["crashed"]  # compiled in their own processes
  assert f"Largest train batch that fits: {m['largest_fitting']}" in out.stdout


def test_plan_without_libtpu_says_so_in_one_line(tmp_path):
  # A host without libtpu: the plan says so and how to install it (run where libtpu is hidden from Python).
  code = (
    "import importlib.util, sys; real = importlib.util.find_spec; "
    "importlib.util.find_spec = lambda n, *a: None if n == 'libtpu' else real(n, *a); "
    "sys.argv = ['plan', '--config=configs/tiny.py', '--topology=v5e-8']; "
    "from diffusion_jax import plan; from absl import app; plan._define_flags(); app.run(plan.main)"
  )
  out = subprocess.run(
    [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False
  )
  assert out.returncode == errors.EXIT_USER_ERROR, out.stderr
  lines = [line for line in out.stderr.splitlines() if line.strip()]
  assert lines[-1].startswith("error: The plan compiles for TPUs with libtpu, which is not installed here: pip install")
  assert "Traceback" not in out.stderr


@pytest.mark.tpu
@requires_libtpu
def test_command_line_with_libtpu_and_no_tpu_is_quiet(tmp_path):
  # jax[tpu] installed for the plan on a machine without a TPU: JAX would load libtpu when it starts its backends
  # and libtpu would print its warnings (no accelerator type, no worker hostnames); the command line leaves the
  # TPU out and trains on the CPU with the console it has without libtpu.
  env = cli_env(1)
  del env["JAX_PLATFORMS"]
  command = [
    sys.executable, "-m", "diffusion_jax.main", "--config=configs/tiny.py", f"--workdir={tmp_path / 'run'}",
    "--config.training.num_train_steps=1",
  ]  # fmt: skip
  out = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
  assert out.returncode == 0, out.stderr
  console = (out.stdout + out.stderr).replace(str(tmp_path), "WORKDIR")  # the test's name is in its tmp_path
  for noise in ("TPU", "libtpu", "InitGoogle", "INVALID_ARGUMENT"):
    assert noise not in console
  # JAX itself, in the same environment, does print them: what the test guards against is there to see.
  code = "import jax; jax.devices()"
  jax_alone = subprocess.run(
    [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=True
  )
  assert "TPU" in jax_alone.stderr


def test_importing_the_package_does_not_touch_libtpu():
  code = "import sys, diffusion_jax, diffusion_jax.main, diffusion_jax.plan; print('libtpu' in sys.modules)"
  out = subprocess.run(
    [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=True
  )
  assert out.stdout.strip() == "False"


@pytest.mark.tpu
@requires_libtpu
def test_clip_groups_that_repeat_work_are_pointed_out(plan_cache):
  from diffusion_jax import plan  # noqa: PLC0415

  # 2 groups on 4 devices with dropout: the global grouped form (train_step), which the figures show as more FLOPs.
  report = plan.plan(_config("tiny", optim__clip_groups=2), "v5e-4", programs=("train",))
  assert report.fits and not report.advice
  assert report.notes and "--config.optim.clip_groups=4" in report.notes[0]
  assert plan.plan(_config("tiny", optim__clip_groups=4), "v5e-4", programs=("train",)).notes == []
