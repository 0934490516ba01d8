"""The training loss, kept on the device, and the NaN policy.

The loss of each step stays on the device (`StepLosses`) until the trainer logs, evaluates or saves, so a step costs
no host sync and no collective. The NaN policy: a NaN/inf loss stops the run (`NonFiniteLossError`) before any
evaluation, checkpoint or adapter comes after it, naming the step, the learning rates and the last good checkpoint;
with `skip_nan_steps` the step is checked before it is taken (`finite_on_every_process`), then skipped and counted.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from accelerate import Accelerator

from dept.errors import UserError


class NonFiniteLossError(UserError, FloatingPointError):
    """The training loss became NaN or infinite and `skip_nan_steps` is off."""


class StepLosses:
    """Training losses summed on the device, so that a step costs no host sync and no collective.

    Per micro-batch `add_micro_batch(loss)`; per optimizer step `end_window()` (the window's mean) and
    `add_step(step_loss, step)`; `collect(accelerator)` brings the sum to the host when the trainer logs, evaluates
    or saves. The figures equal a per-step `.item()` of the mean over processes: a mean over processes of sums is
    the sum of the means. Sums are float64, as Python's floats were.
    """

    def __init__(self):
        self._window: torch.Tensor | None = None
        self._window_size = 0
        # The step losses' sum and the lowest step with a NaN/inf loss (inf if none), since the last collect.
        self._totals: tuple[torch.Tensor, torch.Tensor] | None = None
        self._steps = 0

    def add_micro_batch(self, loss: torch.Tensor) -> None:
        loss = loss.detach().to(torch.float64)
        self._window = loss if self._window is None else self._window + loss
        self._window_size += 1

    def end_window(self) -> torch.Tensor:
        """The mean loss of the micro-batches since the last call (one optimizer step's)."""
        mean = self._window / self._window_size
        self._window, self._window_size = None, 0
        return mean

    def add_step(self, step_loss: torch.Tensor, step: int) -> None:
        non_finite_at = torch.where(torch.isfinite(step_loss), math.inf, float(step))
        if self._totals is None:
            self._totals = (step_loss, non_finite_at)
        else:
            steps_sum, first_non_finite = self._totals
            self._totals = (steps_sum + step_loss, torch.minimum(first_non_finite, non_finite_at))
        self._steps += 1

    def collect(self, accelerator: Accelerator) -> tuple[float, int, int | None]:
        """(the step losses added since the last call, summed and averaged over processes; how many steps; the
        first step with a NaN/inf loss on any process, or None). One gather and one host sync, on every process
        at once (the step counts agree, so all skip it together when nothing was added)."""
        if self._totals is None:
            return 0.0, 0, None
        gathered = accelerator.gather(torch.stack(self._totals)).tolist()
        sums, first = gathered[0::2], min(gathered[1::2])
        steps, self._totals, self._steps = self._steps, None, 0
        return sum(sums) / len(sums), steps, None if math.isinf(first) else int(first)


def finite_on_every_process(accelerator: Accelerator, loss: torch.Tensor) -> bool:
    """Whether `loss` is finite on every process: one collective and one host sync per optimizer step, the price of
    deciding on a step before it is taken (`skip_nan_steps`)."""
    return math.isfinite(accelerator.reduce(loss.clone(), reduction="sum").item())


def non_finite_loss_error(loss: float, step: int, *, found_at_step: int, epoch: float, learning_rates: dict[str, float],
                          last_checkpoint: Path | None) -> NonFiniteLossError:
    """The error that stops a run whose loss was NaN/inf at optimizer `step`, found when the losses reached the host
    at `found_at_step`; it says how to go on from `last_checkpoint`."""
    rates = ", ".join(f"{name}={lr:.3g}" for name, lr in learning_rates.items())
    kept = (
        f"The last good checkpoint, {last_checkpoint}, is intact: resume from it with --resume_from_checkpoint "
        f"{last_checkpoint} "
        if last_checkpoint
        else "No checkpoint was written yet: restart "
    )
    return NonFiniteLossError(
        f"The training loss is {loss} at optimizer step {step}: found at step {found_at_step} (epoch {epoch}, "
        f"learning rates {rates}), before any evaluation, checkpoint or adapter after it was written. {kept}after "
        "lowering the learning rates (or with mixed_precision='no'), or set skip_nan_steps=True to skip such steps "
        "(checked before each optimizer step)."
    )
