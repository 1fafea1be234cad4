"""Resumable checkpoints and the final export, without pickle: safetensors for tensors, JSON for the rest.

A checkpoint folder ``<run_dir>/checkpoints/epoch_000012/`` holds:

- ``model.safetensors``: the trainable parameters (the LoRA adapter, or the whole UNet for full fine-tuning);
- ``optimizer.safetensors`` + ``optimizer.json``: the optimizer's tensors and its hyperparameters;
- ``rng_<process>.safetensors``, one per process: its torch global, sampling and training generator states, with its
  prompt sampler's numpy state and the sha256 of the weights it held in the file's metadata;
- ``state.json``: epoch, global step, the number of processes, the stat tracker's buffers and the config.

The main process writes everything but the per-process files, once. It is all written to a temporary folder and
renamed into place, so ``latest`` never picks up a half-written one. With several nodes, the run folder must be on a
file system that every node shares (as for accelerate's ``save_state``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from trainer.advantages import PerPromptStatTracker
from trainer.distributed import check_same_weights, weights_digest

logger = get_logger(__name__)  # logs on the main process only

CHECKPOINTS = "checkpoints"
PREFIX = "epoch_"


@dataclasses.dataclass
class TrainingState:
    """Everything besides tensors that a resumed run needs to continue exactly."""

    epoch: int  # epochs completed
    global_step: int  # optimizer steps taken
    num_processes: int
    stat_tracker: dict[str, Any]  # the same on every process: it sees every process's rewards
    config: dict[str, Any]


@dataclasses.dataclass
class ProcessRandomState:
    """One process's random state: each process samples its own prompts and noise."""

    generators: dict[str, torch.Generator]
    prompt_rng: np.random.Generator


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: param.detach().cpu().contiguous() for name, param in model.named_parameters() if param.requires_grad}


def _optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, param_state in state["state"].items():
        for key, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for flat, value in [*tensors.items(), *meta["scalars"].items()]:
        index, key = flat.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_file(process: int) -> str:
    return f"rng_{process}.safetensors"


def save_checkpoint(
    accelerator: Accelerator,
    run_dir: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    random_state: ProcessRandomState,
    state: TrainingState,
    keep: int,
) -> Path:
    """Write the checkpoint for ``state.epoch`` and prune all but the newest ``keep`` (0 keeps all).

    Every process calls this: each writes its own random state, the main process the rest.
    """
    root = run_dir / CHECKPOINTS
    final = root / f"{PREFIX}{state.epoch:06d}"
    partial = root / f".partial-{final.name}"
    main = accelerator.is_main_process
    if main:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    generators = random_state.generators
    rng = {"torch": torch.get_rng_state()} | {name: gen.get_state() for name, gen in generators.items()}
    metadata = {
        "prompt_rng": json.dumps(dict(random_state.prompt_rng.bit_generator.state)),
        "weights_sha256": weights_digest(model),
    }
    save_file(rng, partial / rng_file(accelerator.process_index), metadata=metadata)
    accelerator.wait_for_everyone()
    if main:
        save_file(trainable_state_dict(model), partial / "model.safetensors")
        optimizer_tensors, optimizer_meta = _optimizer_to_files(optimizer)
        save_file(optimizer_tensors, partial / "optimizer.safetensors")
        (partial / "optimizer.json").write_text(json.dumps(optimizer_meta))
        (partial / "state.json").write_text(json.dumps(dataclasses.asdict(state), indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        if keep:
            for old in list_checkpoints(run_dir)[:-keep]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def resolve_checkpoint(resume: str, run_dir: Path) -> Path:
    """``latest`` (the newest in ``run_dir``) or a checkpoint folder; ValueError naming what is missing."""
    if resume == "latest":
        found = list_checkpoints(run_dir)
        if not found:
            raise ValueError(f"--resume latest: no checkpoint in {run_dir / CHECKPOINTS}")
        return found[-1]
    path = Path(resume)
    missing = [name for name in ("model.safetensors", "state.json") if not (path / name).is_file()]
    if missing:
        raise ValueError(f"--resume {resume}: not a checkpoint folder (missing {', '.join(missing)})")
    return path


def load_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    random_state: ProcessRandomState,
    process: int,
    num_processes: int,
) -> TrainingState:
    """Restore the model, optimizer and this process's random state in place; return the rest."""
    state = TrainingState(**json.loads((path / "state.json").read_text()))
    if state.num_processes != num_processes:
        raise ValueError(
            f"checkpoint {path} was written by {state.num_processes} process(es) and this run has {num_processes}: "
            f"resume it with {state.num_processes} (accelerate launch --num_processes {state.num_processes} ...), "
            "so that every process continues its own prompts and noise"
        )
    weights = load_file(path / "model.safetensors")
    expected = set(trainable_state_dict(model))
    if set(weights) != expected:
        missing, extra = sorted(expected - set(weights)), sorted(set(weights) - expected)
        raise ValueError(
            f"checkpoint {path} does not match this model's trainable parameters (missing {missing[:3]}, "
            f"unexpected {extra[:3]}): was it saved with another model or LoRA setting?"
        )
    model.load_state_dict(weights, strict=False)
    meta = json.loads((path / "optimizer.json").read_text())
    optimizer.load_state_dict(_optimizer_from_files(load_file(path / "optimizer.safetensors"), meta))
    rng_path = path / rng_file(process)
    rng = load_file(rng_path)
    with safe_open(rng_path, "pt") as file:
        metadata = file.metadata()
    if metadata["weights_sha256"] != weights_digest(model):
        raise ValueError(f"checkpoint {path}: model.safetensors is not the model its processes saved (corrupt?)")
    torch.set_rng_state(rng.pop("torch"))
    for name, generator in random_state.generators.items():
        generator.set_state(rng[name])
    random_state.prompt_rng.bit_generator.state = json.loads(metadata["prompt_rng"])
    return state


@dataclasses.dataclass
class Snapshot:
    """What an epoch changes, copied in memory when the state is that after ``epoch`` finished epochs.

    A run that stops in the middle of an epoch (a signal, a reward service that stays away) puts it back before it
    checkpoints, so the checkpoint is exactly the state after the last finished epoch and the resumed run equals an
    uninterrupted one. With full fine-tuning it holds the UNet and both Adam moments in host memory.
    """

    epoch: int
    global_step: int
    weights: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    torch_rng: torch.Tensor
    generators: dict[str, torch.Tensor]
    prompt_rng: dict[str, Any]
    stat_tracker: dict[str, Any]


def _host_copy(value: Any) -> Any:
    """A deep copy with every tensor copied to the CPU (never a view of the live tensor)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: _host_copy(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_host_copy(item) for item in value)
    return value


def take_snapshot(
    epoch: int,
    global_step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    random_state: ProcessRandomState,
    stat_tracker: dict[str, Any],
) -> Snapshot:
    return Snapshot(
        epoch=epoch,
        global_step=global_step,
        weights=_host_copy(trainable_state_dict(model)),
        optimizer=_host_copy(optimizer.state_dict()),
        torch_rng=torch.get_rng_state(),
        generators={name: gen.get_state() for name, gen in random_state.generators.items()},
        prompt_rng=_host_copy(dict(random_state.prompt_rng.bit_generator.state)),
        stat_tracker=_host_copy(stat_tracker),
    )


def restore_snapshot(
    snapshot: Snapshot, model: torch.nn.Module, optimizer: torch.optim.Optimizer, random_state: ProcessRandomState
) -> None:
    """Put the model, optimizer and random state back as ``snapshot`` found them (the rest is the caller's)."""
    model.load_state_dict(snapshot.weights, strict=False)
    optimizer.load_state_dict(_host_copy(snapshot.optimizer))
    torch.set_rng_state(snapshot.torch_rng)
    for name, generator in random_state.generators.items():
        generator.set_state(snapshot.generators[name])
    random_state.prompt_rng.bit_generator.state = snapshot.prompt_rng


class RunCheckpoints:
    """A run's checkpoints, and the state after its last finished epoch, kept in memory while no checkpoint holds
    it: a run that stops mid-epoch checkpoints that state (``save_last_finished``), so that ``--resume latest``
    continues as if it had not stopped."""

    def __init__(
        self,
        accelerator: Accelerator,
        run_dir: Path,
        model: torch.nn.Module,  # unwrapped
        optimizer: torch.optim.Optimizer,
        random_state: ProcessRandomState,
        stat_tracker: PerPromptStatTracker,
        config: dict[str, Any],
        keep: int,
    ) -> None:
        self.accelerator, self.run_dir, self.model, self.optimizer = accelerator, run_dir, model, optimizer
        self.random_state, self.stat_tracker, self.config, self.keep = random_state, stat_tracker, config, keep
        self._unsaved: Snapshot | None = None

    def load(self, path: Path) -> TrainingState:
        acc = self.accelerator
        state = load_checkpoint(
            path, self.model, self.optimizer, self.random_state, acc.process_index, acc.num_processes
        )
        self.stat_tracker.load_state_dict(state.stat_tracker)
        return state

    def save(self, epoch: int, global_step: int) -> Path:
        """A checkpoint of ``epoch``, after checking that every process holds the same weights."""
        check_same_weights(self.accelerator, weights_digest(self.model))
        state = TrainingState(
            epoch=epoch,
            global_step=global_step,
            num_processes=self.accelerator.num_processes,
            stat_tracker=self.stat_tracker.state_dict(),
            config=self.config,
        )
        path = save_checkpoint(
            self.accelerator, self.run_dir, self.model, self.optimizer, self.random_state, state, self.keep
        )
        logger.info("saved checkpoint %s", path)
        return path

    def finished(self, epoch: int, global_step: int, saved: bool) -> None:
        """``epoch`` epochs are done: remember their state in memory unless a checkpoint holds it."""
        self._unsaved = None
        if not saved:
            tracker = self.stat_tracker.state_dict()
            self._unsaved = take_snapshot(epoch, global_step, self.model, self.optimizer, self.random_state, tracker)

    def save_last_finished(self) -> Snapshot | None:
        """Put back the state of the last finished epoch and checkpoint it (every process, as they all stop);
        returns what was put back, None if a checkpoint already held it."""
        snapshot, self._unsaved = self._unsaved, None
        if snapshot is not None:
            restore_snapshot(snapshot, self.model, self.optimizer, self.random_state)
            self.stat_tracker.load_state_dict(snapshot.stat_tracker)
            self.save(snapshot.epoch, snapshot.global_step)
        return snapshot
