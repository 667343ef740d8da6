"""Progress: a rich progress bar (step, loss, steps/s) on a terminal, log lines otherwise."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class LogReporter:
  """Plain lines, for CI logs and pipes."""

  def __init__(self, stream=None):
    self.stream = stream or sys.stdout

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False

  def log(self, message: str) -> None:
    print(message, file=self.stream, flush=True)

  def start(self, name: str, total: int, step: int) -> None:
    self.log(f"{name}: {'resuming at step ' + str(step) if step else 'starting'} "
             f"({total} steps)")

  def update(self, name: str, step: int, loss: float, steps_per_second: float) -> None:
    self.log(f"{name}: step {step} loss {loss:.4f} {steps_per_second:,.0f} steps/s")

  def finish(self, name: str, result: dict) -> None:
    accuracy = result.get("final_test_accuracy")
    status = (f"diverged at step {result['diverged_at']}" if result["diverged"]
              else f"test accuracy {accuracy:.4f}" if accuracy is not None else "done")
    self.log(f"{name}: {status}")


class QuietReporter(LogReporter):
  """Nothing: the processes other than process 0, which reports for all of them."""

  def log(self, message: str) -> None:
    del message


class BarReporter(LogReporter):
  """One bar per run, with the loss and speed of the last chunk."""

  def __init__(self):
    super().__init__()
    self.progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[speed]} steps/s"),
        TimeRemainingColumn(), console=Console())
    self.tasks: dict[str, int] = {}

  def __enter__(self):
    self.progress.start()
    return self

  def __exit__(self, *exc):
    self.progress.stop()
    return False

  def log(self, message: str) -> None:
    self.progress.console.print(message)

  def start(self, name, total, step):
    self.tasks[name] = self.progress.add_task(name, total=total, completed=step, loss="-",
                                              speed="-")

  def update(self, name, step, loss, steps_per_second):
    self.progress.update(self.tasks[name], completed=step, loss=f"{loss:.4f}",
                         speed=f"{steps_per_second:,.0f}")

  def finish(self, name, result):
    super().finish(name, result)


def make_reporter():
  return BarReporter() if sys.stdout.isatty() else LogReporter()
