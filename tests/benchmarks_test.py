"""The benchmark harness and the benchmarked train step: peaks, FLOP counts, donation, timing bookkeeping.

No timing is asserted: benchmarks print figures, tests check that they are computed right.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import harness
from benchmarks import programs
from configs import tiny


@pytest.mark.parametrize(
  "kind, dtype, tflops",
  [
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989.0),
    ("NVIDIA H100 80GB HBM3", "float32", 67.0),
    ("NVIDIA H100 PCIe", "bfloat16", 756.0),
    ("NVIDIA H200", "bfloat16", 989.0),
    ("NVIDIA A100-SXM4-40GB", "float32", 19.5),
    ("TPU v4", "float32", 275.0),
    ("TPU v5 lite", "bfloat16", 197.0),
    ("TPU v5p", "bfloat16", 459.0),
    ("TPU v6 lite", "bfloat16", 918.0),
  ],
)
def test_peak_table(kind, dtype, tflops):
  assert harness.peak_flops_per_device(kind, dtype) == pytest.approx(tflops * 1e12)


def test_peak_unknown_on_cpu_unless_given():
  assert harness.peak_flops_per_device("cpu", "float32") is None
  assert harness.peak_flops_per_device("cpu", "float32", override_tflops=2.5) == pytest.approx(2.5e12)


class _Fake:
  def __init__(self, result):
    self._result = result

  def cost_analysis(self):
    if isinstance(self._result, Exception):
      raise self._result
    return self._result


def test_compiled_flops_reads_dicts_lists_and_failures():
  assert harness.compiled_flops(_Fake({"flops": 10.0})) == 10.0
  assert harness.compiled_flops(_Fake([{"flops": 12.0}])) == 12.0
  assert harness.compiled_flops(_Fake([])) is None
  assert harness.compiled_flops(_Fake({"flops": -1.0})) is None
  assert harness.compiled_flops(_Fake(NotImplementedError("no cost model"))) is None
  n = 64
  compiled = jax.jit(jnp.dot).lower(jnp.ones((n, n)), jnp.ones((n, n))).compile()
  assert harness.compiled_flops(compiled) == pytest.approx(2 * n**3, rel=0.1)


def test_time_interleaved_alternates_and_takes_medians():
  calls = []

  def runner(name):
    return lambda n: calls.append((name, n))

  contenders = [harness.Contender("a", runner("a"), 4.0), harness.Contender("b", runner("b"), 2.0)]
  results = harness.time_interleaved(contenders, warmup=1, windows=3, per_window=2, log=lambda _: None)
  assert calls == [("a", 1), ("b", 1)] + [("a", 2), ("b", 2)] * 3
  for name in "ab":
    assert len(results[name]["rates"]) == 3 and results[name]["rate"] > 0
    assert results[name]["rate"] == pytest.approx(float(np.median(results[name]["rates"])))
  fake = {"x": {"rates": [2.0, 4.0, 9.0]}, "y": {"rates": [1.0, 1.0, 3.0]}}
  assert harness.paired_ratio(fake, "x", "y") == pytest.approx(3.0)


def test_benchmarked_train_step_donates_its_state_and_counts_flops():
  c = programs.train_step(tiny.get_config(), 1, 4, "float32", None)
  assert c.info["donated_state"]
  assert c.info["flops_per_step_per_device"] > 0
  assert c.items_per_run == 4
  c.run(1)  # runs under jax.transfer_guard("disallow"): no implicit host transfers in the step loop


@pytest.mark.torch
def test_digits_peer_trains_samples_and_scores(tmp_path):
  """The PyTorch digits peer end to end at toy sizes: a 2-second budget, 8 samples of 3 steps."""
  import json
  import math

  from benchmarks import digits_peer
  from configs import digits

  assert digits_peer.ema_decay(0, 0.999) == pytest.approx(0.1)
  assert digits_peer.ema_decay(10**6, 0.999) == pytest.approx(0.999)
  assert digits_peer.warmup_factor(0, 100) == 0.0 and digits_peer.warmup_factor(50, 100) == 0.5
  assert digits_peer.warmup_factor(100, 100) == 1.0
  config = digits.get_config()
  for sampler in ("ddpm", "dpmsolver"):
    payload, samples = digits_peer.run(
      config,
      seconds=2.0 if sampler == "ddpm" else 0.0,
      threads=2,
      sampler=sampler,
      num_samples=8,
      num_steps=3,
      sample_batch=5,
      log_every_s=0,
    )
    assert samples.shape == (8, 8, 8, 1) and samples.dtype == np.uint8
    assert payload["steps"] >= 1 and payload["num_samples"] == 8
    assert 900_000 < payload["num_params"] < 1_200_000  # configs/digits.py's U-Net, about 1.0M parameters
    keys = [
      "train_seconds",
      "sampling_seconds",
      "final_loss",
      "digits_fd",
      "digits_is",
      "digits_confidence",
      "digits_precision",
      "digits_recall",
      "digits_memorisation",
    ]
    for key in keys + (["steps_per_s"] if sampler == "ddpm" else []):
      assert math.isfinite(payload[key]), key
    assert len(payload["load_average_at_start"]) == 3
  assert payload["steps"] == 1  # a zero budget stops after the first step (no steps/s: nothing was timed)
  npz, png = digits_peer.save_samples(str(tmp_path / "samples.npz"), samples)
  with np.load(npz) as data:
    np.testing.assert_array_equal(data["images"], samples)
  assert (tmp_path / "samples.png").exists()
  harness.write_json(str(tmp_path / "peer.json"), payload)
  assert json.loads((tmp_path / "peer.json").read_text())["digits_fd"] == payload["digits_fd"]


def test_op_profile_inventory_counts_the_networks_layers():
  """Every layer call of the U-Net, counted from the architecture (tiny: 2 levels, 1 block each, attention at 4x4)."""
  from benchmarks import ops  # noqa: PLC0415

  config = tiny.get_config()
  m = config.model
  levels, r = len(m.ch_mult), m.num_res_blocks
  _, model, params, image_shape = programs.model_and_params(config, "float32")
  calls = ops.inventory(model, params, 4, image_shape)
  count = lambda kind: sum(n for (k, _, _), n in calls.items() if k == kind)  # noqa: E731
  blocks = levels * r + 2 + levels * (r + 1)  # down, mid, up
  # conv_in, two per residual block, the upsampling convolutions, conv_out; one stride-2 convolution per downsample.
  assert count("conv 3x3") == 1 + 2 * blocks + (levels - 1) + 1
  assert count("conv 3x3 stride 2") == levels - 1
  assert count("concatenate") == levels * (r + 1)
  # Attention at 4x4: the second level's down blocks, the middle, the second level's up blocks.
  assert count("attention core") == r + 1 + (r + 1)
  assert count("groupnorm") == count("attention core")
  assert count("groupnorm+swish") == 2 * blocks + 1  # two per block and norm_out
  assert all(shape[0] == 4 for (_, shape, _) in calls)
  hlo = jax.jit(lambda x: jnp.sin(x) @ x.T).lower(jnp.ones((4, 4))).compile().as_text()
  assert ops.hlo_op_counts(hlo)["dot"] == 1


@pytest.mark.torch
def test_digits_race_scores_both_sides_with_each_eval_seed(tmp_path, repo_root):
  """The equal-wall-time race at toy sizes: a one-step peer, a two-step run of ours, two eval seeds of 8 samples."""
  from benchmarks import digits_race  # noqa: PLC0415

  config = tiny.get_config()
  peer = digits_race.run_peer(config, 0, 0.0, [1, 2], 8, 3, str(tmp_path / "peer_seed0.npz"))
  assert peer["side"] == "peer" and peer["steps"] == 1
  assert [e["eval_seed"] for e in peer["evals"]] == [1, 2]
  assert peer["evals"][0]["digits_fd"] != peer["evals"][1]["digits_fd"]  # other seeds, other samples
  with np.load(tmp_path / "peer_seed0.npz") as weights:
    assert sum(weights[k].size for k in weights.files) == peer["stats"]["num_params"]

  flags = ["--config.training.num_train_steps=2", "--config.evals.digits.sampling.num_steps=4"]
  ours = digits_race.run_ours(str(repo_root / "configs" / "tiny.py"), 3, str(tmp_path / "ours"), flags, [1, 2], 8)
  assert ours["side"] == "ours" and ours["steps"] == 2
  assert "--config.training.seed=3" in ours["command"]
  assert (tmp_path / "ours" / "checkpoints").is_dir()
  assert [e["eval_seed"] for e in ours["evals"]] == [1, 2]

  summary = digits_race.summarize([peer, ours, {**ours, "steps": 4}])
  assert summary["peer"]["runs"] == 1 and summary["peer"]["evaluations"] == 2
  assert summary["ours"]["runs"] == 2 and summary["ours"]["steps"] == (3.0, 2, 4)
  values = [e["digits_is"] for e in ours["evals"]]
  assert summary["ours"]["digits_is"] == pytest.approx((np.mean(values), min(values), max(values)))
  for k in digits_race.FIGURES:
    assert all(math.isfinite(v) for v in summary["peer"][k]), k


def test_soak_prints_readings_growth_and_the_checkpoints_left(tmp_path, repo_root):
  import subprocess  # noqa: PLC0415
  import sys  # noqa: PLC0415

  command = [sys.executable, "-m", "benchmarks.soak", "--steps=300", "--every=100", f"--workdir={tmp_path / 'soak'}"]
  proc = subprocess.run(command, cwd=repo_root, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  readings = [line for line in proc.stdout.splitlines() if line.startswith("step ")]
  assert [line.split(":")[0] for line in readings] == ["step    100", "step    200", "step    300"], proc.stdout
  assert "growth per 1,000 steps over steps 200-300: resident memory" in proc.stdout, proc.stdout
  assert "checkpoints on disk: [200, 300] (training.keep_checkpoints=2)" in proc.stdout, proc.stdout


_HLO = """HloModule step

%body (p: (s32[], f32[8,16])) -> (s32[], f32[8,16]) {
  %p = (s32[], f32[8,16]{1,0}) parameter(0)
  %w = f32[8,16]{1,0} get-tuple-element(%p), index=1
  %add.9 = f32[8,16]{1,0} add(%w, %w)
}

ENTRY %main (a: f32[8,16], b: bf16[2,8,8,16]) -> f32[8,16] {
  %a = f32[8,16]{1,0} parameter(0)
  %b = bf16[2,8,8,16]{3,2,1,0} parameter(1)
  %fusion.1 = bf16[2,8,8,16]{3,2,1,0:T(8,128)(2,1)S(1)} fusion(%b), kind=kLoop, calls=%f
  %fusion.2 = bf16[2,8,8,16]{3,2,1,0:T(8,128)(2,1)} fusion(%fusion.1), kind=kLoop, calls=%f
  %copy-start.1 = (f32[8,16]{1,0}, f32[8,16]{1,0:S(1)}, u32[]{:S(2)}) copy-start(%a)
  %copy-done.1 = f32[8,16]{1,0:S(1)} copy-done(%copy-start.1)
  %multiply_add_fusion.3 = f32[8,16]{1,0} fusion(%copy-done.1, %a), kind=kLoop, calls=%g
  %while.4 = (s32[], f32[8,16]{1,0}) while(%t), condition=%cond, body=%body
}
"""


def test_hlo_traffic_counts_hbm_bytes_only():
  from diffusion_jax import plan  # noqa: PLC0415

  comps = plan.hlo_computations(_HLO)
  assert set(comps) == {"body", "ENTRY"}
  assert plan.hlo_loop_bodies(comps["ENTRY"]) == ["body"]
  t = plan.hlo_traffic(comps["ENTRY"], {(8, 16)})
  activation = 2 * 8 * 8 * 16 * 2  # one bf16 [2, 8, 8, 16] array
  weight = 8 * 16 * 4  # one f32 [8, 16] parameter
  # fusion.1 reads b from HBM and writes VMEM (not counted); fusion.2 reads VMEM and writes HBM.
  assert t["by_class"][("activations", "bf16")] == 2 * activation
  # The prefetch moves the parameter once; the update reads the prefetched copy (VMEM) and a, and writes its output.
  assert t["by_class"][("weights", "f32")] == weight + 2 * weight
  assert t["by_kind"]["optimizer/EMA update fusion"] == 2 * weight
  body = plan.hlo_traffic(comps["body"], {(8, 16)})
  assert body["by_class"][("weights", "f32")] == 3 * weight  # add: two reads, one write
  # The module's HBM bytes: the entry computation and the loop body once, whatever the classes.
  assert plan.hbm_bytes(_HLO) == 2 * activation + 3 * weight + 3 * weight
