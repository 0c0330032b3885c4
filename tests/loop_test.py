"""The training loop's decisions: `train.step_actions`, a pure function of the step, the schedule and the clock."""

import pytest

from configs import tiny
from diffusion_jax import train
from diffusion_jax.train import Actions
from diffusion_jax.train import step_actions

SCHEDULE = train.Schedule(
  num_steps=30,
  log_every=5,
  checkpoint_every=10,
  sample_every=15,
  evals=(("fid", 10, False), ("digits", 0, True), ("bpd", 20, True)),
)


@pytest.mark.parametrize(
  "step,want",
  [
    (1, Actions()),
    (5, Actions(log=True)),
    (10, Actions(log=True, checkpoint=True, evaluate=("fid",))),
    (15, Actions(log=True, grid=True)),
    (20, Actions(log=True, checkpoint=True, evaluate=("fid", "bpd"))),
    (29, Actions()),
    # The last step: everything, and the at_end evaluations once (not also as a periodic one).
    (
      30,
      Actions(
        log=True,
        checkpoint=True,
        grid=True,
        evaluate=("fid",),
        finish="steps",
        evaluate_at_end=("digits", "bpd"),
      ),
    ),
  ],
)
def test_the_schedule(step, want):
  assert step_actions(step, SCHEDULE) == want


def test_a_stop_request_checkpoints_the_step_and_skips_evaluations():
  assert step_actions(7, SCHEDULE, stop=True) == Actions(checkpoint=True, finish="stopped")
  # On a step that would evaluate and write a grid: the grid as scheduled, no evaluation.
  assert step_actions(20, SCHEDULE, stop=True) == Actions(log=True, checkpoint=True, finish="stopped")
  assert step_actions(15, SCHEDULE, stop=True) == Actions(log=True, grid=True, checkpoint=True, finish="stopped")
  # A stop on the last step is a normal finish.
  assert step_actions(30, SCHEDULE, stop=True) == step_actions(30, SCHEDULE)


def test_the_time_budget_finishes_like_the_last_step():
  got = step_actions(7, SCHEDULE, out_of_time=True)
  assert got == Actions(log=True, checkpoint=True, grid=True, finish="time_budget", evaluate_at_end=("digits", "bpd"))
  # A stop request wins over the budget: the run is interrupted, not finished.
  assert step_actions(7, SCHEDULE, stop=True, out_of_time=True).finish == "stopped"


def test_no_grids_or_evaluations_unless_asked():
  bare = train.Schedule(num_steps=4, log_every=10, checkpoint_every=10)
  assert [step_actions(s, bare) for s in (1, 2, 3)] == [Actions()] * 3
  assert step_actions(4, bare) == Actions(log=True, checkpoint=True, finish="steps")


def test_the_schedule_from_a_config():
  config = tiny.get_config()
  config.training.update(num_train_steps=40, log_every=5, checkpoint_every=20, sample_every=10)
  config.evals.digits.update(every=20, at_end=True)

  class Entry:
    def __init__(self, name, entry):
      self.name, self.every, self.at_end = name, entry.every, entry.at_end

  schedule = train.Schedule.from_config(config, [Entry("digits", config.evals.digits)])
  assert schedule == train.Schedule(40, 5, 20, 10, (("digits", 20, True),))


def test_checkpoint_every_zero_checkpoints_only_at_the_end():
  schedule = train.Schedule(num_steps=30, log_every=5, checkpoint_every=0)
  assert not any(step_actions(step, schedule).checkpoint for step in range(1, 30))
  assert step_actions(30, schedule).checkpoint
  assert step_actions(7, schedule, stop=True).checkpoint  # a stop still saves its step
