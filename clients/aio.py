"""The asyncio client: the same API as ``RewardClient``, with coroutines.

async with AsyncRewardClient("127.0.0.1:50051") as client:
    await client.wait_ready()
    batch = await client.score("jpeg_compressibility", images)
    async with client.open_stream() as stream:
        await stream.send("jpeg_compressibility", images)
        await stream.close()
        async for result in stream.results():
            ...
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from clients._wire import (
    ChannelOwner,
    Encoding,
    Images,
    StreamLedger,
    checked_items,
    health_services,
    health_status,
    not_ready,
    order_results,
)
from clients.errors import RewardServiceError
from clients.generated.ddpo.reward.v1 import reward_pb2 as pb
from clients.types import BatchResult, ItemResult, RewardInfo


class AsyncRewardClient(ChannelOwner):
    """Asyncio client of a reward server. Every call has a deadline (``timeout`` seconds, overridable per call)."""

    _grpc = grpc.aio

    async def __aenter__(self) -> AsyncRewardClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def wait_ready(self, timeout: float = 30.0, rewards: Iterable[str] | None = None) -> None:
        """Wait until the server (and each reward in ``rewards``) reports SERVING; TimeoutError after ``timeout``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        for service in health_services(rewards):
            state: str | None = "no answer yet"
            while (remaining := deadline - loop.time()) > 0:
                try:
                    response = await self._health.Check(
                        health_pb2.HealthCheckRequest(service=service), timeout=min(remaining, 5.0), wait_for_ready=True
                    )
                    state = health_status(service, response.status, None)
                except grpc.aio.AioRpcError as error:
                    state = health_status(service, None, error)
                if state is None:  # SERVING
                    break
                await asyncio.sleep(min(0.1, max(0.0, deadline - loop.time())))
            else:
                raise not_ready(self.target.address, timeout, service, str(state))

    async def list_rewards(self, timeout: float | None = None) -> list[RewardInfo]:
        response = await self._call("ListRewards", self._stub.ListRewards, pb.ListRewardsRequest(), timeout)
        return RewardInfo.from_listing(response)

    async def score(
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
        response = await self._call("Score", self._score, batch, timeout)
        return BatchResult(order_results(batch.items, response.results))

    def open_stream(self, progress_timeout: float | None = None) -> AsyncScoreStream:
        """Open a ScoreStream, as ``RewardClient.open_stream``: no deadline, a progress timeout."""
        timeout = self.progress_timeout if progress_timeout is None else progress_timeout
        return AsyncScoreStream(self._score_stream, self.target.metadata, timeout)

    async def _call(self, method: str, stub_method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return await stub_method(
                request, timeout=self.timeout if timeout is None else timeout, metadata=self.target.metadata
            )
        except grpc.aio.AioRpcError as error:
            raise RewardServiceError.from_rpc_error(error, method) from None


class AsyncScoreStream:
    """One bidirectional ScoreStream. ``send`` does not wait for results; ``results`` yields them as they come."""

    def __init__(
        self,
        method: grpc.aio.StreamStreamMultiCallable,
        metadata: tuple[tuple[str, str], ...],
        progress_timeout: float,
    ) -> None:
        self._ledger = StreamLedger(progress_timeout)
        self._call = method(metadata=metadata)

    async def __aenter__(self) -> AsyncScoreStream:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if exc_type is not None or not self._ledger.done:
            self._call.cancel()

    async def send(
        self,
        reward: str,
        images: Images,
        prompts: Sequence[str | None] | None = None,
        metadata: Sequence[Mapping[str, Any] | None] | None = None,
        ids: Sequence[str] | None = None,
        encoding: Encoding = "raw",
    ) -> list[str]:
        """Send a batch for ``reward`` and return its item ids (default: "0", "1", ... over the stream)."""
        request, sent_ids = self._ledger.request(reward, images, prompts, metadata, ids, encoding)
        try:  # flow control makes a write wait while the server takes no data: not forever
            await asyncio.wait_for(self._call.write(request), self._ledger.progress_timeout)
        except grpc.aio.AioRpcError as error:
            raise RewardServiceError.from_rpc_error(error, "ScoreStream") from None
        except TimeoutError:
            self._call.cancel()
            raise RewardServiceError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"the server took no data for {self._ledger.progress_timeout:g}s",
                "ScoreStream",
            ) from None
        return sent_ids

    async def close(self) -> None:
        """No more items will be sent; results keep coming."""
        if not self._ledger.closed:
            self._ledger.closed = True
            await self._call.done_writing()

    async def results(self) -> AsyncIterator[ItemResult]:
        """Yield each sent item's result once, as it arrives; ends after ``close`` when all are answered.

        Raises as ``ScoreStream.results`` does: UNAVAILABLE, or DEADLINE_EXCEEDED after ``progress_timeout``.
        """
        read: asyncio.Future[Any] | None = (
            None  # one read in flight, kept across waits (cancelling it would end the call)
        )
        try:
            while not self._ledger.done:
                read = read or asyncio.ensure_future(self._call.read())
                finished, _ = await asyncio.wait({read}, timeout=self._ledger.wait_time())
                if not finished:
                    if (stalled := self._ledger.stalled()) is not None:
                        self._call.cancel()
                        raise stalled
                    continue
                try:
                    response = read.result()
                except grpc.aio.AioRpcError as error:
                    raise RewardServiceError.from_rpc_error(error, "ScoreStream") from None
                read = None
                if response is grpc.aio.EOF:  # after close(); a reader that started early may have had every answer
                    break
                for result in response.results:
                    yield self._ledger.answer(result)
        finally:
            if read is not None and not read.done():
                read.cancel()
        if not self._ledger.done:  # the server closed the stream before answering everything
            raise self._ledger.unanswered_error()
