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
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients._wire import (
    CHANNEL_OPTIONS,
    Encoding,
    ImageInput,
    Images,
    StreamLedger,
    build_items,
    check_ids,
    items_from,
    order_results,
    parse_target,
)
from clients.errors import RewardServiceError
from clients.generated.ddpo.reward.v1 import reward_pb2 as pb
from clients.generated.ddpo.reward.v1 import reward_pb2_grpc as pb_grpc
from clients.types import BatchResult, ItemResult, RewardInfo, ScoreItem

_CLOSE = object()


def health_services(rewards: Iterable[str] | None) -> list[str]:
    """Health-check names to wait for: the whole server, then each named reward."""
    return ["", *(f"reward/{name}" for name in rewards or ())]


class RewardClient:
    """Blocking client of a reward server. Every call has a deadline (``timeout`` seconds, overridable per call)."""

    def __init__(
        self,
        server: str,
        *,
        timeout: float = 60.0,
        stream_timeout: float = 3600.0,
        tls: bool | None = None,
        root_certificates: bytes | str | Path | None = None,
        auth_token: str | None = None,
    ) -> None:
        self.target = parse_target(server, tls=tls, root_certificates=root_certificates, auth_token=auth_token)
        self.timeout = timeout
        self.stream_timeout = stream_timeout
        if self.target.tls:
            credentials = grpc.ssl_channel_credentials(self.target.root_certificates)
            self._channel = grpc.secure_channel(self.target.address, credentials, options=CHANNEL_OPTIONS)
        else:
            self._channel = grpc.insecure_channel(self.target.address, options=CHANNEL_OPTIONS)
        self._stub = pb_grpc.RewardServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

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
            last = "no answer yet"
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"{self.target.address} not ready after {timeout:g}s ({service or 'server'}: {last})"
                    )
                try:
                    response = self._health.Check(
                        health_pb2.HealthCheckRequest(service=service), timeout=min(remaining, 5.0), wait_for_ready=True
                    )
                    if response.status == health_pb2.HealthCheckResponse.SERVING:
                        break
                    last = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
                except grpc.RpcError as error:
                    if error.code() == grpc.StatusCode.NOT_FOUND:
                        raise RewardServiceError(
                            error.code(), f"the server has no reward {service[7:]!r}", "wait_ready"
                        ) from None
                    last = f"{error.code().name}: {error.details()}"
                time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))

    def list_rewards(self, timeout: float | None = None) -> list[RewardInfo]:
        response = self._call("ListRewards", self._stub.ListRewards, pb.ListRewardsRequest(), timeout)
        return [RewardInfo.from_proto(spec) for spec in response.rewards]

    def score(
        self,
        reward: str,
        images: Images,
        prompts: Sequence[str | None] | None = None,
        metadata: Sequence[Mapping[str, Any] | None] | None = None,
        ids: Sequence[str] | None = None,
        encoding: Encoding = "raw",
        timeout: float | None = None,
    ) -> BatchResult:
        """Score a batch in one call; results are in the order of ``images``. Per-item failures are in the result."""
        request = score_request(reward, images, prompts, metadata, ids, encoding)
        response = self._call("Score", self._stub.Score, request, timeout)
        return BatchResult(order_results(request.items, response.results))

    def open_stream(self, timeout: float | None = None) -> ScoreStream:
        """Open a ScoreStream: send batches as they are produced, read results as they come."""
        return ScoreStream(self._stub, self.target.metadata, self.stream_timeout if timeout is None else timeout)

    def score_stream(
        self,
        reward: str,
        items: Iterable[ScoreItem | ImageInput],
        encoding: Encoding = "raw",
        timeout: float | None = None,
    ) -> Iterator[ItemResult]:
        """Send ``items`` one by one as the iterable yields them; yield results as they arrive (any order)."""
        with self.open_stream(timeout) as stream:

            def send_all() -> None:
                try:
                    for item in items_from(items):
                        ids = [item.id] if item.id is not None else None
                        stream.send(reward, [item.image], [item.prompt], [item.metadata], ids, encoding)
                finally:
                    stream.close()

            sender = threading.Thread(target=send_all, name="score-stream-sender", daemon=True)
            sender.start()
            yield from stream.results()
            sender.join()

    def _call(self, method: str, stub_method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return stub_method(
                request, timeout=self.timeout if timeout is None else timeout, metadata=self.target.metadata
            )
        except grpc.RpcError as error:
            raise RewardServiceError.from_rpc_error(error, method) from None


def score_request(
    reward: str,
    images: Images,
    prompts: Sequence[str | None] | None,
    metadata: Sequence[Mapping[str, Any] | None] | None,
    ids: Sequence[str] | None,
    encoding: Encoding,
) -> pb.ScoreRequest:
    """The checked ScoreRequest of a batch; ids default to "0", "1", ..."""
    if not reward:
        raise ValueError("reward must be a non-empty reward name")
    count = len(images)
    ids = [str(i) for i in range(count)] if ids is None else ids
    check_ids(ids, set())
    return pb.ScoreRequest(reward=reward, items=build_items(images, prompts, metadata, ids, encoding))


class ScoreStream:
    """One bidirectional ScoreStream. ``send`` never waits for results; ``results`` yields them as they come."""

    def __init__(self, stub: pb_grpc.RewardServiceStub, metadata: tuple[tuple[str, str], ...], timeout: float) -> None:
        self._ledger = StreamLedger()
        self._lock = threading.Lock()
        self._requests: queue.Queue[Any] = queue.Queue()
        self._answers: queue.Queue[Any] = queue.Queue()
        self._call = stub.ScoreStream(iter(self._requests.get, _CLOSE), timeout=timeout, metadata=metadata)
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
        """Yield each sent item's result once, as it arrives; ends after ``close`` when all are answered."""
        while not self._ledger.done:
            answer = self._answers.get()
            if isinstance(answer, pb.ScoreResult):
                yield self._ledger.answer(answer)
            elif isinstance(answer, grpc.RpcError):
                raise RewardServiceError.from_rpc_error(answer, "ScoreStream")
            else:  # the server closed the stream before answering everything
                raise self._ledger.unanswered_error()

    def _read(self) -> None:
        try:
            for response in self._call:
                for result in response.results:
                    self._answers.put(result)
            self._answers.put(None)
        except grpc.RpcError as error:
            self._answers.put(error)
