"""Rewards from the reward service, streamed while sampling continues, through restarts and lost replicas.

Each epoch opens one stream over the service's replicas (``clients.replicas.BalancedStream``: one ScoreStream per
replica that serves the reward, each batch on the least loaded). ``submit`` hands a decoded batch to it and returns at
once, so the next batch is sampled while the service scores this one. ``collect`` closes the stream and waits for the
remaining answers. A failed item never becomes a number: it fails the epoch with the service's message, or
(``on_error="drop"``) is left out and counted.

A replica that restarts, crashes or drops off the network in the middle of an epoch has its unanswered items re-sent
under their ids to the others, or to itself once it is back; answers in hand are kept, and an id answered twice
counts once, so the epoch ends as if nothing had happened. Only a service that stays away for ``outage_timeout``
seconds stops the run (``ServiceUnavailableError``).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from clients import AnyRewardClient, ItemResult, RewardServiceError, open_client
from clients.connect import check_rewards
from clients.errors import ServiceUnavailableError as StreamUnavailableError

if TYPE_CHECKING:
    from trainer.sampling import SampleBatch

logger = logging.getLogger(__name__)


class RewardError(RuntimeError):
    """The reward service could not score the epoch: the message names the reward, the item and the cause."""


class ServiceUnavailableError(RewardError):
    """The reward service stayed away longer than ``reward.outage_timeout``."""


def connect(
    server: str, reward: str, token: str | None, ca_file: str | None, timeout: float, outage_timeout: float = 900.0
) -> AnyRewardClient:
    """A client for ``server`` (one or several replicas) once ``reward`` is SERVING there; RewardError at once if
    nothing answers at ``server``, if it lacks the reward, the reward failed to load or is lower-is-better; waits up to
    ``timeout`` while it loads (``clients.connect.check_rewards``)."""
    try:
        client = open_client(
            server, root_certificates=ca_file, auth_token=token, progress_timeout=timeout, outage_timeout=outage_timeout
        )
    except ValueError as error:
        raise RewardError(str(error)) from None
    try:
        logger.info("checking %s and waiting (up to %gs) until it serves %r", server, timeout, reward)
        listed = check_rewards(client, server, [reward], timeout)
        if reward in listed and not listed[reward].higher_is_better:  # {} from a Triton that cannot list rewards
            raise RewardError(
                f"reward {reward!r} is lower-is-better; DDPO maximises its reward, so serve a negated version of it"
            )
    except (RewardServiceError, TimeoutError) as error:
        client.close()
        raise RewardError(error.message if isinstance(error, RewardServiceError) else str(error)) from None
    except BaseException:
        client.close()
        raise
    return client


@dataclasses.dataclass(frozen=True)
class EpochScores:
    scores: npt.NDArray[np.float64]  # (N,) NaN where the item failed and was dropped
    failures: list[ItemResult]
    wait_s: float  # how long ``collect`` blocked: the scoring time that sampling did not hide
    ready_frac: float  # share of the answers already in hand when sampling ended (0 when not streaming)
    replicas: dict[str, dict[str, float]]  # per replica: items sent, answered, re-sent away from it, mean latency
    error: Exception | None = None  # the stream's own failure: the items it left unanswered are NaN

    @property
    def kept(self) -> npt.NDArray[np.bool_]:
        """(N,) False for the items that have no score."""
        return ~np.isnan(self.scores)

    @property
    def resent(self) -> int:
        """Items sent again after the stream of the replica that had them broke."""
        return int(sum(stats["resent"] for stats in self.replicas.values()))

    def metrics(self) -> dict[str, Any]:
        """The epoch's scoring figures, as metrics.jsonl names them."""
        return {
            "reward_wait_s": self.wait_s,
            "rewards_ready_frac": self.ready_frac,
            "reward_resent": self.resent,
            "reward_replicas": self.replicas,
        }


class EpochRewards:
    """One epoch's reward stream: ``submit`` batches as they are decoded, then ``collect`` every answer.

    A reader thread takes answers off the stream as they arrive. With ``stream=False`` the batches are held back
    and sent only by ``collect``, which is the no-overlap baseline that ``bench/epoch.py`` compares against.
    """

    def __init__(
        self,
        client: AnyRewardClient,
        reward: str,
        progress_timeout: float,
        on_error: str,
        what: str,
        stream: bool = True,
    ) -> None:
        """``what`` names the samples in errors, e.g. "epoch 3"."""
        if on_error not in ("fail", "drop"):
            raise ValueError(f"on_error must be 'fail' or 'drop', got {on_error!r}")
        self.reward = reward
        self.what = what
        self.on_error = on_error
        self._streaming = stream
        self._held: list[tuple[npt.NDArray[np.uint8], list[str], list[str]]] = []
        self._prompts: list[str] = []
        self._answers: list[ItemResult] = []
        self._error: Exception | None = None
        self._stream = client.open_stream(progress_timeout=progress_timeout)
        self._reader = threading.Thread(target=self._read, name="epoch-rewards", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            for result in self._stream.results():
                self._answers.append(result)
        except Exception as error:  # RewardServiceError: the service stayed away, or refused the stream
            self._error = error

    def submit(self, images: npt.NDArray[np.uint8], prompts: Sequence[str]) -> None:
        """Send a (B, H, W, 3) uint8 batch now; ids are the items' positions in the epoch."""
        start = len(self._prompts)
        ids = [str(start + i) for i in range(len(prompts))]
        self._prompts.extend(prompts)
        if self._streaming:
            self._stream.send(self.reward, images, prompts=list(prompts), ids=ids)
        else:
            self._held.append((images, list(prompts), ids))

    def stream(self, batches: Iterable[SampleBatch]) -> list[SampleBatch]:
        """Submit each batch as the iterable yields it; given a lazy sampler, scoring overlaps the next batch's
        sampling. If sampling fails, the stream is cancelled. Returns the batches, in order."""
        sampled = []
        try:
            for batch in batches:
                self.submit(batch.images, batch.prompts)
                sampled.append(batch)
        except BaseException:
            self.cancel()
            raise
        return sampled

    def finish(self) -> EpochScores:
        """Close the stream and wait for every answer; returns them whatever failed. Items the service failed are in
        ``failures``; if the stream itself failed (``error``: the service stayed away, or refused the stream), the
        items it left unanswered are NaN and in no list. ``collect`` applies the training policy to this;
        an evaluation records it all."""
        started = time.perf_counter()
        ready_frac = len(self._answers) / max(1, len(self._prompts))
        for images, prompts, ids in self._held:
            self._stream.send(self.reward, images, prompts=prompts, ids=ids)
        self._stream.close()
        self._reader.join()
        wait_s = time.perf_counter() - started
        scores = np.full(len(self._prompts), np.nan)
        failures = sorted((r for r in self._answers if not r.ok), key=lambda r: int(r.id))
        for result in self._answers:
            if result.ok:
                scores[int(result.id)] = result.score
        replicas = {address: stats.as_dict() for address, stats in self._stream.stats.items()}
        return EpochScores(scores, failures, wait_s, ready_frac, replicas, self._error)

    def collect(self) -> EpochScores:
        """``finish``, then ``check``: every answer of a stream that worked, by the on_error policy."""
        return self.check(self.finish())

    def check(self, epoch: EpochScores) -> EpochScores:
        """The on_error policy over ``finish``'s answers: RewardError if the stream failed, if an item failed and
        on_error is "fail", or if no item was scored."""
        if isinstance(epoch.error, StreamUnavailableError):
            raise ServiceUnavailableError(
                f"{epoch.error.message}. Start the service again (reward.outage_timeout says how long to wait for it), "
                "then continue the run with --resume latest"
            )
        if epoch.error is not None:
            raise RewardError(f"reward {self.reward!r}: the stream failed: {epoch.error}")
        if epoch.failures and self.on_error == "fail":
            first = epoch.failures[0]
            raise RewardError(
                f"reward {self.reward!r} failed for {len(epoch.failures)} of {len(epoch.scores)} items; item "
                f"{first.id} (prompt {self._prompts[int(first.id)]!r}): {first.code.name}: {first.message}. "
                "Pass --on-reward-error=drop to train on the items that were scored."
            )
        if not epoch.kept.any():
            raise RewardError(f"reward {self.reward!r} failed for every item of {self.what}")
        return epoch

    def cancel(self) -> None:
        self._stream.cancel()
        self._reader.join()
