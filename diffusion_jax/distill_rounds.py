"""--mode=distill: the rounds of progressive distillation, each a training run of a student in its own workdir.

From a trained workdir (the teacher: its config.json and EMA parameters), round r trains a student of
n_r = start_steps / 2^r steps to take two of its teacher's steps in one (`distillation`, `distill_step`), until
n = distill.num_steps. Round 1's teacher is the trained model with its DDIM sampler on the `nested` grid of
start_steps; round r > 1's teacher is round r − 1's student. Student n lives in `<workdir>/distill/<n>steps/`,
a normal workdir (config.json, checkpoints, TensorBoard, grids, evaluations) whose config samples with its
own grid (`ddim`, n steps, `nested` spacing), so `load_model`, `sample_fn`, `--mode=sample` and `--mode=eval`
take it as they take any workdir. Running the command again skips finished rounds and resumes the one that
was interrupted, from its checkpoint, bit for bit as training resumes.
"""

from __future__ import annotations

import dataclasses

import ml_collections
from etils import epath

from diffusion_jax import checkpointing
from diffusion_jax import config_base
from diffusion_jax import errors
from diffusion_jax import workdirs
from diffusion_jax.samplers import grids

DISTILL_DIR = "distill"
SPACING = "nested"
# Evaluations that score samples: they run in the rounds with the student's sampler; the others (bits/dim of
# the training bound, the ODE likelihood) are properties of an ε-model's training, not of a few-step sampler.
SAMPLE_EVALS = ("fid", "digits")


@dataclasses.dataclass(frozen=True)
class Round:
  """One round: its number (from 1), teacher, the steps of teacher and student, the student's workdir and config."""

  index: int
  teacher: str
  teacher_steps: int
  student_steps: int
  workdir: epath.Path
  config: ml_collections.ConfigDict

  @property
  def name(self) -> str:
    return f"round {self.index}: {self.teacher_steps} -> {self.student_steps} steps"


def student_sampler(num_steps: int) -> ml_collections.ConfigDict:
  """A student's sampler section: deterministic DDIM on its `nested` grid."""
  section = config_base.sampler_section("ddim", num_steps=num_steps)
  section.timestep_spacing = SPACING
  return section


def student_workdir(workdir, num_steps: int) -> epath.Path:
  return epath.Path(workdir) / DISTILL_DIR / f"{num_steps}steps"


def round_steps(num_timesteps: int, start_steps: int, num_steps: int) -> list[int]:
  """The students' steps, start/2, start/4, …, num_steps; `UserError` unless start = num_steps · 2^k, k ≥ 1."""
  for name, value in (("distill.start_steps", start_steps), ("distill.num_steps", num_steps)):
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= num_timesteps:
      raise errors.UserError(f"{name} must be an integer in [1, T={num_timesteps}], got {value!r}.")
  steps, n = [], start_steps
  while n > num_steps and n % 2 == 0:
    n //= 2
    steps.append(n)
  if not steps or steps[-1] != num_steps:
    fits = [num_steps * 2**k for k in range(1, 20) if num_steps * 2**k <= num_timesteps]
    raise errors.UserError(
      f"distill.start_steps={start_steps} does not halve to distill.num_steps={num_steps}: each round halves "
      f"the steps, so start_steps must be num_steps·2^k (here one of {fits})."
    )
  for n in steps:  # every student grid nests in its teacher's (checked, not assumed)
    grids.check_nested(num_timesteps, 2 * n, n)
  return steps


def round_config(
  base: ml_collections.ConfigDict, distill, *, teacher: str, teacher_steps: int, student_steps: int
) -> ml_collections.ConfigDict:
  """The config of a student: the teacher's, with the student's output, optimizer, length, sampler and teacher."""
  c = ml_collections.ConfigDict(base.to_dict())
  steps = int(distill.steps_per_round)
  if steps < 1:
    raise errors.UserError(f"distill.steps_per_round must be at least 1, got {steps}.")
  c.diffusion.model_mean_type = str(distill.parameterisation)
  c.optim.update(
    learning_rate=float(distill.learning_rate),
    warmup_steps=0,
    lr_decay="cosine",
    decay_steps=steps,
    end_learning_rate=0.0,
    clip_groups=1,
    ema_decay=float(distill.ema_decay),
    ema_warmup=True,
  )
  tc = c.training
  tc.update(
    num_train_steps=steps,
    batch_size=int(distill.batch_size) or int(tc.batch_size),
    time_budget_s=0.0,
    init_from="",
    log_every=max(1, min(int(tc.log_every), steps)),
    checkpoint_every=min(int(tc.checkpoint_every) or steps, steps),
    sample_every=steps,
  )
  tc.grid = student_sampler(student_steps)
  c.sampling.update(student_sampler(student_steps).to_dict())
  for name, entry in c.evals.items():
    if entry.kind in SAMPLE_EVALS:
      entry.sampling = student_sampler(student_steps)
    else:
      entry.update(every=0, at_end=False)
  c.eval.metrics = tuple(m for m in c.eval.metrics if c.evals.get(m, {}).get("kind") in SAMPLE_EVALS) or ("fid",)
  c.distill = ml_collections.ConfigDict(
    dict(distill.to_dict(), teacher=str(teacher), teacher_steps=int(teacher_steps), student_steps=int(student_steps))
  )
  return c


def plan(config: ml_collections.ConfigDict, workdir) -> list[Round]:
  """The rounds of distilling the model in `workdir` with `config.distill`'s settings (nothing is run)."""
  workdir = epath.Path(workdir)
  if not checkpointing.checkpoint_steps(workdir):
    raise errors.MissingFileError(
      f"--mode=distill distils a trained model, and {workdir} holds no checkpoint: train it first "
      f"(the same command with --mode=train)."
    )
  base = config_base.upgrade(workdirs.read_config(workdir))
  d = config.distill
  own = int(base.distill.get("student_steps", 0) or 0)
  if own and int(d.start_steps) != own:
    raise errors.UserError(
      f"{workdir} is a {own}-step student, trained for its own grid: distil it further from there with "
      f"--config.distill.start_steps={own}."
    )
  T = int(base.diffusion.num_timesteps)
  rounds, teacher, teacher_steps = [], str(workdir), int(d.start_steps)
  for i, n in enumerate(round_steps(T, int(d.start_steps), int(d.num_steps)), start=1):
    student = student_workdir(workdir, n)
    cfg = round_config(base, d, teacher=teacher, teacher_steps=teacher_steps, student_steps=n)
    rounds.append(Round(i, teacher, teacher_steps, n, student, cfg))
    teacher, teacher_steps = str(student), n
  return rounds


def finished(r: Round) -> bool:
  """Whether the round's student has its final checkpoint."""
  steps = checkpointing.checkpoint_steps(r.workdir) if r.workdir.exists() else []
  return bool(steps) and steps[-1] >= int(r.config.training.num_train_steps)
