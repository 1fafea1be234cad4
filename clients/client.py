"""The synchronous client.

with RewardClient("127.0.0.1:50051") as client:
    client.wait_ready(timeout=30)
    batch = client.score("jpeg_compressibility", images)       # (N, H, W, 3) uint8 or a list of HWC arrays
    print(batch.scores)                                         # raises ItemsFailedError if any item failed

    with client.open_stream() as stream:                        # send while you produce, read as results come
        stream.send("jpeg_compressibility", first_images)
        stream.send("jpeg_compressibility", more_images)
        stream.close()
        for result in stream.results():
            ...
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from clients._wire import (
    ChannelOwner,
    Encoding,
    ImageInput,
    Images,
    StreamLedger,
    checked_items,
    health_services,
    health_status,
    items_from,
    not_ready,
    order_results,
)
from clients.errors import RewardServiceError
from clients.generated.ddpo.reward.v1 import reward_pb2 as pb
from clients.types import BatchResult, ItemResult, RewardInfo, ScoreItem

_CLOSE = object()


class RewardClient(ChannelOwner):
    """Blocking client of a reward server. Every call has a deadline (``timeout`` seconds, overridable per call)."""

    def __enter__(self) -> RewardClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def wait_ready(self, timeout: float = 30.0, rewards: Iterable[str] | None = None) -> None:
        """Block until the server (and each reward in ``rewards``) reports SERVING; TimeoutError after ``timeout``."""
        deadline = time.monotonic() + timeout
        for service in health_services(rewards):
            state: str | None = "no answer yet"
            while (remaining := deadline - time.monotonic()) > 0:
                try:
                    response = self._health.Check(
                        health_pb2.HealthCheckRequest(service=service), timeout=min(remaining, 5.0), wait_for_ready=True
                    )
                    state = health_status(service, response.status, None)
                except grpc.RpcError as error:
                    state = health_status(service, None, error)
                if state is None:  # SERVING
                    break
                time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
            else:
                raise not_ready(self.target.address, timeout, service, str(state))

    def list_rewards(self, timeout: float | None = None) -> list[RewardInfo]:
        response = self._call("ListRewards", self._stub.ListRewards, pb.ListRewardsRequest(), timeout)
        return RewardInfo.from_listing(response)

    def score(
        self,
        reward: str,
        images: Images,
        prompts: Sequence[str | None] | None = None,
        metadata: Sequence[Mapping[str, Any] | None] | None = None,
        ids: Sequence[str] | None = None,
        encoding: Encoding = "raw",
        timeout: float | None = None,
        weights: Mapping[str, float] | None = None,
    ) -> BatchResult:
        """Score a batch in one call; results are in the order of ``images``. Per-item failures are in the result.

        With ``weights`` (e.g. ``{"aesthetic": 1.0, "llava_bertscore": 0.5}``), each score is that weighted sum,
        computed by the server (``reward`` is then unused: the server names these results "weights"); each result's
        components hold every reward's score."""
        batch = checked_items(reward, images, prompts, metadata, ids, encoding, taken=set(), weights=weights)
        response = self._call("Score", self._score, batch, timeout)
        return BatchResult(order_results(batch.items, response.results))

    def open_stream(self, progress_timeout: float | None = None) -> ScoreStream:
        """Open a ScoreStream: send batches as they are produced, read results as they come.

        The stream has no deadline; ``results`` raises DEADLINE_EXCEEDED when items are outstanding and no answer has
        come for ``progress_timeout`` seconds (default: the client's), and UNAVAILABLE when the connection breaks.
        """
        timeout = self.progress_timeout if progress_timeout is None else progress_timeout
        return ScoreStream(self._score_stream, self.target.metadata, timeout)

    def score_stream(
        self,
        reward: str,
        items: Iterable[ScoreItem | ImageInput],
        encoding: Encoding = "raw",
        progress_timeout: float | None = None,
    ) -> Iterator[ItemResult]:
        """Send ``items`` one by one as the iterable yields them; yield results as they arrive (any order).

        If producing or checking an item fails, the results of the items sent before it are yielded, then that
        error is raised.
        """
        failures: list[BaseException] = []
        with self.open_stream(progress_timeout) as stream:

            def send_all() -> None:
                try:
                    for item in items_from(items):
                        ids = [item.id] if item.id is not None else None
                        stream.send(reward, [item.image], [item.prompt], [item.metadata], ids, encoding)
                except BaseException as error:  # re-raised in the caller's thread below
                    failures.append(error)
                finally:
                    stream.close()

            sender = threading.Thread(target=send_all, name="score-stream-sender", daemon=True)
            sender.start()
            yield from stream.results()
            sender.join()
        if failures:
            raise failures[0]

    def _call(self, method: str, stub_method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return stub_method(
                request, timeout=self.timeout if timeout is None else timeout, metadata=self.target.metadata
            )
        except grpc.RpcError as error:
            raise RewardServiceError.from_rpc_error(error, method) from None


class ScoreStream:
    """One bidirectional ScoreStream. ``send`` never waits for results; ``results`` yields them as they come."""

    def __init__(
        self, method: grpc.StreamStreamMultiCallable, metadata: tuple[tuple[str, str], ...], progress_timeout: float
    ) -> None:
        self._ledger = StreamLedger(progress_timeout)
        self._lock = threading.Lock()
        self._requests: queue.Queue[Any] = queue.Queue()
        self._answers: queue.Queue[Any] = queue.Queue()
        self._call = method(iter(self._requests.get, _CLOSE), metadata=metadata)
        self._reader = threading.Thread(target=self._read, name="score-stream-reader", daemon=True)
        self._reader.start()

    def __enter__(self) -> ScoreStream:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if exc_type is not None or not self._ledger.done:
            self.cancel()

    def send(
        self,
        reward: str,
        images: Images,
        prompts: Sequence[str | None] | None = None,
        metadata: Sequence[Mapping[str, Any] | None] | None = None,
        ids: Sequence[str] | None = None,
        encoding: Encoding = "raw",
    ) -> list[str]:
        """Queue a batch for ``reward`` and return its item ids (default: "0", "1", ... over the stream)."""
        with self._lock:
            request, sent_ids = self._ledger.request(reward, images, prompts, metadata, ids, encoding)
            self._requests.put(request)
        return sent_ids

    def close(self) -> None:
        """No more items will be sent; results keep coming."""
        with self._lock:
            if not self._ledger.closed:
                self._ledger.closed = True
                self._requests.put(_CLOSE)

    def cancel(self) -> None:
        self.close()
        self._call.cancel()

    def results(self) -> Iterator[ItemResult]:
        """Yield each sent item's result once, as it arrives; ends after ``close`` when all are answered.

        RewardServiceError: the call failed (UNAVAILABLE when the server went away), it ended with items unanswered
        (UNAVAILABLE), or items waited ``progress_timeout`` for an answer (DEADLINE_EXCEEDED; the call is cancelled).
        """
        while not self._ledger.done:
            try:
                answer = self._answers.get(timeout=self._ledger.wait_time())
            except queue.Empty:
                if (stalled := self._ledger.stalled()) is not None:
                    self._call.cancel()
                    raise stalled from None
                continue
            if isinstance(answer, pb.ScoreResult):
                yield self._ledger.answer(answer)
            elif isinstance(answer, grpc.RpcError):
                raise RewardServiceError.from_rpc_error(answer, "ScoreStream")
            elif not self._ledger.done:  # the server closed the stream before answering everything
                raise self._ledger.unanswered_error()

    def _read(self) -> None:
        try:
            for response in self._call:
                for result in response.results:
                    self._answers.put(result)
            self._answers.put(None)
        except grpc.RpcError as error:
            self._answers.put(error)
