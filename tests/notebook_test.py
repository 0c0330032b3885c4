"""Executes the Colab notebook top to bottom on a tiny model (no network)."""

import os
import pathlib

import jax
import nbformat
import numpy as np
from nbclient import NotebookClient

from configs import tiny
from diffusion_jax import checkpointing
from diffusion_jax import runtime

NOTEBOOK = pathlib.Path(__file__).resolve().parents[1] / "notebooks" / "ddpm_sampling.ipynb"


def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
  cfg = tiny.get_config()
  params = runtime.init_params(runtime.build_network(cfg), jax.random.PRNGKey(0), (8, 8, 1))
  params = jax.tree.map(lambda x: np.asarray(x) + 0.05, params)  # not the near-zero init: visible images
  checkpointing.save_model_checkpoint(tmp_path / "model", config=cfg, params=params, step=1)
  # A 4-step student of it, as --mode=distill writes one (a v-predicting network sampled on its nested grid).
  student = tiny.get_config()
  student.diffusion.model_mean_type = "v"
  student.distill.update(teacher=str(tmp_path / "model"), teacher_steps=8, student_steps=4)
  student_dir = tmp_path / "model" / "distill" / "4steps"
  checkpointing.save_model_checkpoint(student_dir, config=student, params=params, step=3)

  nb = nbformat.read(NOTEBOOK, as_version=4)
  monkeypatch.setenv("DIFFUSION_JAX_MODEL", str(tmp_path / "model"))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()

  outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
  assert not [o for o in outputs if o.output_type == "error"]
  pictures = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.get("data", {})]
  assert len(pictures) == 8  # ancestral, DDIM, the student, progressive, interpolation, inpainting, SDEdit, inversion
  text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
  assert "(16, 8, 8, 1) uint8" in text
  assert "4-step student: 4 network calls per image" in text
  assert "bits/dim per image:" in text and "network evaluations:" in text  # the likelihood cell
  assert (tmp_path / "ddim_samples.png").exists()
  assert os.path.getsize(tmp_path / "ddim_samples.png") > 0
