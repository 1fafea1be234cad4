"""Rewards from the reward service, streamed while sampling continues, through restarts of the service.

Each epoch opens one ScoreStream. ``submit`` hands a decoded batch to it and returns at once (the client serialises
and sends on gRPC's threads), so the next batch is sampled while the service scores this one. ``collect`` closes the
stream and waits for the remaining answers. A failed item never becomes a number: it fails the epoch with the
service's message, or (``on_error="drop"``) is left out and counted.

The service may restart, crash or drop off the network in the middle of an epoch. Then the stream breaks (UNAVAILABLE,
or no answer for ``progress_timeout`` seconds while items are outstanding), and a reader thread reconnects with
exponential backoff, waits until the reward is served again, and re-sends every item that has no answer yet, under
its id. Answers already in hand are kept, and an id answered twice counts once, so the epoch ends as if nothing had
happened. Only a service that stays away for ``outage_timeout`` seconds stops the run (``ServiceUnavailableError``).
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import threading
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import grpc
import numpy as np
import numpy.typing as npt

from clients import AnyRewardClient, ItemResult, RewardServiceError, ScoreStream, TritonScoreStream, open_client

if TYPE_CHECKING:
    from trainer.sampling import SampleBatch

logger = logging.getLogger(__name__)

# Stream failures that reconnecting can mend: the server went away, restarted, drained, or stopped answering.
TRANSIENT_CODES = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}
)
BACKOFF_S = (0.5, 10.0)  # first and longest wait between reconnection attempts
RESEND_CHUNK = 16  # items per message when re-sending


class RewardError(RuntimeError):
    """The reward service could not score the epoch: the message names the reward, the item and the cause."""


class ServiceUnavailableError(RewardError):
    """The reward service stayed away longer than ``reward.outage_timeout``."""


def connect(server: str, reward: str, token: str | None, ca_file: str | None, timeout: float) -> AnyRewardClient:
    """A client for ``server`` once ``reward`` is SERVING there; RewardError at once if nothing answers at
    ``server``, if it lacks the reward or the reward failed to load; waits up to ``timeout`` while it loads."""
    client = open_client(server, root_certificates=ca_file, auth_token=token, progress_timeout=timeout)
    try:
        try:
            offered = {info.name: info for info in client.list_rewards(timeout=10)}
        except RewardServiceError as error:
            if error.code != grpc.StatusCode.UNAVAILABLE:
                raise
            raise RewardError(
                f"cannot connect to the reward service at {server} ({error.message}): start one with "
                f"`ddpo serve --rewards {reward}`, or point --reward-server at one"
            ) from None
        if reward not in offered:
            raise RewardError(f"reward {reward!r} is not offered by {server}; it offers: {', '.join(sorted(offered))}")
        if offered[reward].load_error:
            raise RewardError(f"reward {reward!r} could not be loaded by {server}: {offered[reward].load_error}")
        if not offered[reward].higher_is_better:
            raise RewardError(
                f"reward {reward!r} is lower-is-better; DDPO maximises its reward, so serve a negated version of it"
            )
        logger.info("waiting (up to %gs) until %s serves %r", timeout, server, reward)
        client.wait_ready(timeout=timeout, rewards=[reward])
    except (RewardServiceError, TimeoutError) as error:
        client.close()
        raise RewardError(f"reward service at {server}: {error}") from None
    except BaseException:
        client.close()
        raise
    return client


@dataclasses.dataclass(frozen=True)
class EpochScores:
    scores: npt.NDArray[np.float64]  # (N,) NaN where the item failed and was dropped
    kept: npt.NDArray[np.bool_]  # (N,) False for dropped items
    failures: list[ItemResult]
    wait_s: float  # how long ``collect`` blocked: the scoring time that sampling did not hide
    ready_frac: float  # share of the answers already in hand when sampling ended (0 when not streaming)
    reconnects: int  # times the stream broke and was opened again
    resent: int  # items sent again after a break


class EpochRewards:
    """One epoch's reward stream: ``submit`` batches as they are decoded, then ``collect`` every answer.

    A reader thread takes answers off the stream as they arrive, and reconnects when it breaks. With
    ``stream=False`` the batches are held back and sent only by ``collect``, which is the no-overlap baseline that
    ``bench/epoch.py`` compares against.
    """

    def __init__(
        self,
        client: AnyRewardClient,
        reward: str,
        progress_timeout: float,
        outage_timeout: float,
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
        self._client = client
        self._progress_timeout = progress_timeout
        self._outage_timeout = outage_timeout
        self._streaming = stream
        self._lock = threading.Lock()  # guards what follows, which the reader thread shares
        self._held: list[list[str]] = []  # ids of batches held back until collect (stream=False)
        self._prompts: list[str] = []
        self._unanswered: dict[str, tuple[npt.NDArray[np.uint8], str]] = {}  # id -> (image, prompt)
        self._answers: dict[str, ItemResult] = {}
        self._closed = False
        self._error: Exception | None = None
        self._outage_since: tuple[float, str] | None = (
            None  # (monotonic, wall clock) of the first break since an answer
        )
        self._stopping = threading.Event()
        self.reconnects = 0
        self.resent = 0
        self._stream = client.open_stream(progress_timeout=progress_timeout)
        self._reader = threading.Thread(target=self._read, name="epoch-rewards", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        stream = self._stream
        while True:
            try:
                for result in stream.results():
                    self._outage_since = None
                    with self._lock:
                        if self._unanswered.pop(result.id, None) is not None:
                            self._answers[result.id] = result
                return  # closed, and every item on this stream answered
            except RewardServiceError as error:
                if error.code not in TRANSIENT_CODES or self._stopping.is_set():
                    self._error = error
                    return
                try:
                    stream = self._reconnect(error)
                except RewardError as outage:
                    self._error = outage
                    return
            except Exception as error:  # a broken contract (unknown or repeated ids)
                self._error = error
                return

    def _reconnect(self, error: RewardServiceError) -> ScoreStream | TritonScoreStream:
        """A new stream carrying every unanswered item, once the reward is served again; ServiceUnavailableError if
        no answer has come for the outage timeout since the first break (a service that accepts the items again
        and again but never answers runs out of time too)."""
        if self._outage_since is None:
            self._outage_since = time.monotonic(), datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        started, since = self._outage_since
        logger.warning("%s: the reward stream broke (%s); reconnecting", self.what, error)
        delay, attempts, last = BACKOFF_S[0], 0, str(error)
        while not self._stopping.is_set():
            left = started + self._outage_timeout - time.monotonic()
            if left <= 0:
                break
            attempts += 1
            try:
                # fails fast, with the cause (connection refused...), while nothing listens
                self._client.list_rewards(timeout=min(left, BACKOFF_S[1]))
                # the server is back: wait, within the budget, until it serves the reward again (it may be loading)
                remaining = started + self._outage_timeout - time.monotonic()
                self._client.wait_ready(timeout=max(remaining, 0.1), rewards=[self.reward])
                return self._reopen(time.monotonic() - started)
            except (RewardServiceError, TimeoutError) as failure:
                if not isinstance(failure, RewardServiceError) or failure.code != grpc.StatusCode.DEADLINE_EXCEEDED:
                    last = str(failure)  # a deadline cut short by the budget says less than the cause before it
            self._stopping.wait(min(delay, max(0.0, started + self._outage_timeout - time.monotonic())))
            delay = min(2 * delay, BACKOFF_S[1])
        if self._stopping.is_set():
            raise RewardError(f"{self.what}: the reward stream was cancelled while reconnecting")
        raise ServiceUnavailableError(
            f"the reward service has been unreachable since {since} ({self._outage_timeout:g}s, reward.outage_timeout):"
            f" {attempts} reconnection attempts with backoff of {BACKOFF_S[0]:g}-{BACKOFF_S[1]:g}s failed; the last "
            f"said: {last}. Start the service again, then continue the run with --resume latest"
        )

    def _reopen(self, outage_s: float) -> ScoreStream | TritonScoreStream:
        with self._lock:
            stream = self._client.open_stream(progress_timeout=self._progress_timeout)
            items = list(self._unanswered.items())
            for start in range(0, len(items), RESEND_CHUNK):
                chunk = items[start : start + RESEND_CHUNK]
                images = [image for _, (image, _) in chunk]
                prompts = [prompt for _, (_, prompt) in chunk]
                stream.send(self.reward, images, prompts=prompts, ids=[item_id for item_id, _ in chunk])
            if self._closed:
                stream.close()
            self._stream = stream
            self.reconnects += 1
            self.resent += len(items)
        logger.warning("%s: reconnected after %.1fs; re-sent %d unanswered item(s)", self.what, outage_s, len(items))
        return stream

    def submit(self, images: npt.NDArray[np.uint8], prompts: Sequence[str]) -> None:
        """Send a (B, H, W, 3) uint8 batch now; ids are the items' positions in the epoch."""
        with self._lock:
            start = len(self._prompts)
            ids = [str(start + i) for i in range(len(prompts))]
            self._prompts.extend(prompts)
            if not self._streaming:
                self._held.append(ids)
            for item_id, image, prompt in zip(ids, images, prompts, strict=True):
                self._unanswered[item_id] = (image, prompt)
            if self._streaming:
                self._stream.send(self.reward, images, prompts=list(prompts), ids=ids)

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

    def collect(self) -> EpochScores:
        """Close the stream and wait for every answer; RewardError per the on_error policy, or if no item was scored."""
        started = time.perf_counter()
        with self._lock:
            ready_frac = len(self._answers) / max(1, len(self._prompts))
            for ids in self._held:
                items = [self._unanswered[item_id] for item_id in ids]
                prompts = [prompt for _, prompt in items]
                self._stream.send(self.reward, [image for image, _ in items], prompts=prompts, ids=ids)
            self._closed = True
            self._stream.close()
        self._reader.join()
        wait_s = time.perf_counter() - started
        if self._error is not None:
            if isinstance(self._error, RewardError):
                raise self._error
            raise RewardError(f"reward {self.reward!r}: the stream failed: {self._error}")
        scores = np.full(len(self._prompts), np.nan)
        failures = sorted((r for r in self._answers.values() if not r.ok), key=lambda r: int(r.id))
        for result in self._answers.values():
            if result.ok:
                scores[int(result.id)] = result.score
        if failures and self.on_error == "fail":
            first = failures[0]
            raise RewardError(
                f"reward {self.reward!r} failed for {len(failures)} of {len(scores)} items; item {first.id} "
                f"(prompt {self._prompts[int(first.id)]!r}): {first.code.name}: {first.message}. "
                "Pass --on-reward-error=drop to train on the items that were scored."
            )
        kept = ~np.isnan(scores)
        if not kept.any():
            raise RewardError(f"reward {self.reward!r} failed for every item of {self.what}")
        return EpochScores(scores, kept, failures, wait_s, ready_frac, self.reconnects, self.resent)

    def cancel(self) -> None:
        self._stopping.set()
        with self._lock:
            self._closed = True
            self._stream.cancel()
        self._reader.join()
