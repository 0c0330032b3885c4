r"""DDPM on CIFAR-10, exactly the paper's setting (Ho et al. 2020, §4 and Appendix B).

eps prediction, fixedlarge variance (σ² = β), L_simple; linear β 1e-4 → 0.02,
T = 1000; U-Net ch 128, ch_mult (1, 2, 2, 2), 2 blocks, attention at 16²,
dropout 0.1 (35,746,307 parameters); Adam 2e-4 with 5000 warmup steps from 0,
gradient clipping at 1.0, EMA 0.9999, batch 128, 800k steps, random flips.

Paper: FID 3.17 and IS 9.46 (50k samples against the training set),
NLL <= 3.75 bits/dim on the test set.

  python -m diffusion_jax.main --config=configs/cifar.py --workdir=/path/to/run

Activations in float32 (model.dtype), as the paper's. Compiled for a v5e-4, the
step moves 3.52e9 bytes of HBM per chip in float32 and 2.76e9 with
--config.model.dtype=bfloat16: 324 and 412 FLOPs per byte, both above the chip's
ridge point (240), so by the roofline bfloat16 is not faster here; it is the
option for a larger batch per chip (docs/tpu_plan.md, "bfloat16 and HBM traffic").
"""

from diffusion_jax import config_base


def get_config():
  return config_base.get_base_config()
