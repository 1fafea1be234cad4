"""A run's lifecycle: claiming its folder, stopping on SIGINT/SIGTERM at a safe point, and what a stop leaves.

- A folder that already holds a run is refused unless the run resumes it (``--resume``) or starts over
  (``--overwrite``, which deletes the run's files and nothing else). Nothing is overwritten silently.
- The first SIGINT or SIGTERM asks the run to stop at the next safe point: before the next sampling batch or after
  the current optimizer step. The trainer then puts back the state of the last finished epoch and checkpoints it, so
  ``--resume latest`` continues exactly as if the run had not stopped. A second signal exits at once.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the CLI checks the run folder before torch and accelerate load
    from accelerate import Accelerator

logger = logging.getLogger(__name__)

# What a run writes into its folder (trainer.tracking, trainer.checkpoint, trainer.export).
RUN_FILES = ("metrics.jsonl", "eval.jsonl", "reward_curve.png", "eval_before_after.png")
RUN_FOLDERS = ("checkpoints", "tensorboard", "images", "eval", "final", "wandb")
SAME_REQUEST_S = 2.0
"""A second signal this soon after the first is the same request: launchers (torchrun, accelerate) forward the
terminal's Ctrl-C to processes that got it already."""


class RunFolderInUseError(ValueError):
    """The run folder holds another run."""


class StopRequested(Exception):
    """SIGINT or SIGTERM asked the run to stop; ``exit_code`` is 128 + the signal number, as a shell reports it."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")


def run_files(run_dir: Path) -> list[str]:
    """The names of the run files and folders ``run_dir`` holds."""
    return [name for name in (*RUN_FILES, *RUN_FOLDERS) if (run_dir / name).exists()]


def check_run_dir(run_dir: Path, resume: str | None, overwrite: bool) -> list[str]:
    """The run files in ``run_dir``; RunFolderInUseError if there are some and the run neither resumes them nor
    overwrites them. Reads only, so it can run before anything loads."""
    found = run_files(run_dir)
    if found and not resume and not overwrite:
        raise RunFolderInUseError(
            f"{run_dir} already holds a run ({', '.join(found)}): continue it with --resume latest, start over with "
            "--overwrite (which deletes those files), or choose another --run-dir"
        )
    return found


def claim_run_dir(accelerator: Accelerator, run_dir: Path, resume: str | None, overwrite: bool) -> None:
    """``check_run_dir``, then with ``overwrite`` (and no ``resume``) delete the previous run's files."""
    found = check_run_dir(run_dir, resume, overwrite)
    if not found or resume:
        return
    if accelerator.is_main_process:
        logger.warning("--overwrite: deleting the previous run's %s from %s", ", ".join(found), run_dir)
        for name in found:
            path = run_dir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    accelerator.wait_for_everyone()


class GracefulStop:
    """Turns SIGINT and SIGTERM into a request to stop at the next safe point, while the run is inside ``with``."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._at = 0.0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():  # Python delivers signals to the main thread only
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.signum is None:
            self.signum, self._at = signum, time.monotonic()
            print(
                f"ddpo train: {name}: stopping after the current step and saving a checkpoint "
                "(send it again to exit at once)",
                file=sys.stderr,
                flush=True,
            )
        elif time.monotonic() - self._at > SAME_REQUEST_S:
            print(f"ddpo train: {name} again: exiting at once, without a checkpoint", file=sys.stderr, flush=True)
            os._exit(128 + signum)

    def check(self, accelerator: Accelerator) -> None:
        """At a safe point, on every process at once: StopRequested if any process was signalled."""
        from trainer.distributed import any_process

        if any_process(accelerator, self.signum is not None):
            raise StopRequested(self.signum or signal.SIGTERM)
