"""The benchmark harness and the benchmarked train step: peaks, FLOP counts, donation, timing bookkeeping.

No timing is asserted: benchmarks print figures, tests check that they are computed right.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import harness
from benchmarks import programs
from configs import tiny


@pytest.mark.parametrize("kind, dtype, tflops", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989.0),
    ("NVIDIA H100 80GB HBM3", "float32", 67.0),
    ("NVIDIA H100 PCIe", "bfloat16", 756.0),
    ("NVIDIA H200", "bfloat16", 989.0),
    ("NVIDIA A100-SXM4-40GB", "float32", 19.5),
    ("TPU v4", "float32", 275.0),
    ("TPU v5 lite", "bfloat16", 197.0),
    ("TPU v5p", "bfloat16", 459.0),
    ("TPU v6 lite", "bfloat16", 918.0),
])
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
