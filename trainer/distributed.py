"""What the processes of a run (``accelerate launch``, torchrun) agree on, exchanged as tensors (never pickled).

Every function here is a collective: every process must call it at the same point of the run, or the others wait.
A process that fails on its own (a reward error, a non-finite sample) therefore does not raise at once: it brings its
error to the next ``fail_together``, where every process learns of it and stops, instead of the healthy ones waiting
forever at the next gradient all-reduce.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator

import numpy as np
import numpy.typing as npt
import torch
from accelerate import Accelerator

MESSAGE_BYTES = 4000


class ProcessFailedError(RuntimeError):
    """Another process of the run failed; the message is its error."""


def fail_together(accelerator: Accelerator, error: Exception | None) -> None:
    """If any process brings an error, every process raises: the one that failed its own error, the others
    ProcessFailedError with the message of the first process that failed."""
    if accelerator.num_processes == 1:
        if error is not None:
            raise error
        return
    payload = torch.zeros(MESSAGE_BYTES + 1, dtype=torch.uint8)
    if error is not None:
        text = f"{type(error).__name__}: {error}".encode()[:MESSAGE_BYTES]
        payload[0] = 1
        payload[1 : 1 + len(text)] = torch.frombuffer(bytearray(text), dtype=torch.uint8)
    gathered = accelerator.gather(payload.to(accelerator.device)).cpu().view(accelerator.num_processes, -1)
    failed = gathered[:, 0].nonzero().flatten().tolist()
    if not failed:
        return
    if error is not None:
        raise error
    message = bytes(gathered[failed[0], 1:].numpy()).rstrip(b"\0").decode(errors="replace")
    raise ProcessFailedError(f"process {failed[0]} of {accelerator.num_processes} failed: {message}")


@contextlib.contextmanager
def failing_together(accelerator: Accelerator, errors: tuple[type[Exception], ...]) -> Iterator[None]:
    """Run the block on every process; if it raised one of ``errors`` on any, every process raises with it."""
    try:
        yield
    except errors as error:
        fail_together(accelerator, error)
        raise
    fail_together(accelerator, None)


def gather_rewards(
    accelerator: Accelerator, prompt_ids: list[int], rewards: npt.NDArray[np.float64]
) -> tuple[list[int], npt.NDArray[np.float64], slice]:
    """Every process's prompt ids and rewards (NaN: dropped), in process order, and the slice that is this one's."""
    if accelerator.num_processes == 1:
        return prompt_ids, rewards, slice(0, len(prompt_ids))
    all_ids = accelerator.gather(torch.tensor(prompt_ids, device=accelerator.device)).cpu().tolist()
    all_rewards = accelerator.gather(torch.as_tensor(rewards, device=accelerator.device)).cpu().numpy()
    start = accelerator.process_index * len(prompt_ids)
    return all_ids, all_rewards, slice(start, start + len(prompt_ids))


def any_process(accelerator: Accelerator, flag: bool) -> bool:
    """True on every process if ``flag`` is true on any."""
    if accelerator.num_processes == 1:
        return flag
    total = accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), "sum")
    return bool(total.item() > 0)


def mean_over_processes(accelerator: Accelerator, values: dict[str, float]) -> dict[str, float]:
    """Each value averaged over the processes (every process passes the same keys)."""
    if accelerator.num_processes == 1 or not values:
        return values
    keys = sorted(values)
    tensor = torch.tensor([values[key] for key in keys], dtype=torch.float64, device=accelerator.device)
    reduced = accelerator.reduce(tensor, "mean").cpu().tolist()
    return dict(zip(keys, reduced, strict=True))


def max_over_processes(accelerator: Accelerator, value: float) -> float:
    """The largest ``value`` of any process; NaN counts as infinite, so that it is never hidden."""
    value = value if value == value else float("inf")
    if accelerator.num_processes == 1:
        return value
    return float(accelerator.reduce(torch.tensor([value], device=accelerator.device), "max").item())


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 of the trainable parameters, by name: equal on every process after every optimizer step."""
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        if param.requires_grad:
            digest.update(name.encode())
            digest.update(param.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_same_weights(accelerator: Accelerator, digest: str) -> None:
    """RuntimeError on every process if the processes' trainable weights differ (they must never)."""
    if accelerator.num_processes == 1:
        return
    mine = torch.frombuffer(bytearray(bytes.fromhex(digest)), dtype=torch.uint8).to(accelerator.device)
    everyone = accelerator.gather(mine).cpu().view(accelerator.num_processes, -1)
    if not (everyone == everyone[0]).all():
        digests = [bytes(row.numpy()).hex()[:12] for row in everyone]
        raise RuntimeError(f"the processes' trainable weights differ (sha256 prefixes {digests}); this is a bug")
