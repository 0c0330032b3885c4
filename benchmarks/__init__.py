"""Throughput benchmarks: training, sampling and bits/dim, with a same-architecture PyTorch baseline.

Every benchmark runs with the XLA:CPU options of the package's command lines
(diffusion_jax/xla_flags.py), set here before any of them starts JAX.
"""

from diffusion_jax import xla_flags as _xla_flags

_xla_flags.apply()
