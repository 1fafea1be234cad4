"""The ``ddpo.reward.v1.RewardService`` servicer: call-level checks, per-item validation, and hand-off to workers.

Call-level errors (unknown reward in a unary call, server full) fail the RPC with a status; everything about one
item (missing or duplicate id, bad image, missing prompt, unknown reward in a stream, reward failure) fails that item
alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from typing import NoReturn, Protocol

import grpc

from clients.generated.ddpo.reward.v1 import reward_pb2 as pb
from clients.generated.ddpo.reward.v1 import reward_pb2_grpc as pb_grpc
from reward_server.batching import ItemOutcome, QueueFull, RewardWorker
from reward_server.composite import CompositeScorer, check_weights
from reward_server.metrics import ServerMetrics
from reward_server.rewards import ItemError, RewardSpec
from reward_server.wire import DecodedItem, ItemInvalid, decode_item, error_result, ok_result, spec_to_proto

log = logging.getLogger(__name__)

_RESULTS_PER_STREAM_MESSAGE = 256


PER_REQUEST_COMPOSITE = "weights"  # how results of ScoreRequest.weights are named in messages and metrics
LOADING = "is still loading"  # the state of a reward whose load has not finished; any other state is a failure


class Scorer(Protocol):
    """What scores a request's items: a reward's worker, or a composite of workers."""

    name: str

    @property
    def spec(self) -> RewardSpec: ...

    async def submit(self, items: list[DecodedItem]) -> list[asyncio.Future[ItemOutcome]]: ...

    async def submit_nowait(self, items: list[DecodedItem]) -> list[asyncio.Future[ItemOutcome]]: ...


def bearer_token_problem(metadata: Iterable[tuple[str, str | bytes]] | None, expected: bytes) -> str | None:
    """Check a call's ``authorization`` metadata against ``expected`` (b"Bearer <token>", compared in constant time):
    None when it matches, "missing" or "mismatch" otherwise."""
    given = dict(metadata or ()).get("authorization", "")
    given_bytes = given.encode() if isinstance(given, str) else given
    if not given_bytes:
        return "missing"
    return None if hmac.compare_digest(given_bytes, expected) else "mismatch"


def reward_health_name(reward: str) -> str:
    """The health-check service name of one reward, e.g. "reward/jpeg_compressibility"."""
    return f"reward/{reward}"


class RewardServicer(pb_grpc.RewardServiceServicer):
    def __init__(
        self,
        scorers: Mapping[str, Scorer],
        specs: Mapping[str, RewardSpec],
        unavailable: Mapping[str, str],
        metrics: ServerMetrics,
    ) -> None:
        """``scorers``: the rewards ready to score; ``specs``: every configured reward; ``unavailable``: why the
        others cannot score yet. The server updates all three as rewards load and endpoints come and go."""
        self._scorers = scorers
        self._specs = specs
        self._unavailable = unavailable
        self._metrics = metrics
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._draining = False

    async def drain(self, timeout: float) -> bool:
        """Refuse new RPCs (UNAVAILABLE, which clients retry elsewhere) and wait for in-flight ones to finish.

        Returns False if some were still running after ``timeout`` seconds.
        """
        self._draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    # --- RPCs -------------------------------------------------------------------------------------------------

    async def ListRewards(
        self, request: pb.ListRewardsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListRewardsResponse:
        async with self._track("ListRewards", context):
            return pb.ListRewardsResponse(
                rewards=[spec_to_proto(self._specs[name]) for name in sorted(self._specs)],
                load_errors={name: state for name, state in self._unavailable.items() if state != LOADING},
            )

    async def Score(self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext) -> pb.ScoreResponse:
        async with self._track("Score", context):
            started = time.perf_counter()
            worker = self._scorer(request.reward, request.weights)
            if isinstance(worker, ItemError):
                raise _CallFailed(worker.code, worker.message)
            valid, rejected = _validate(request.items, "items", worker.spec, seen=set())
            results = {index: self._answer(worker.name, item_id, error, started) for index, item_id, error in rejected}
            try:
                futures = await worker.submit_nowait([decoded for _, decoded in valid])
            except QueueFull as full:
                raise _CallFailed(grpc.StatusCode.RESOURCE_EXHAUSTED, str(full)) from full
            try:
                outcomes = await asyncio.gather(*futures)
            finally:
                for future in futures:
                    future.cancel()  # no-op once answered; drops queued work when the caller has gone
            for (index, decoded), outcome in zip(valid, outcomes, strict=True):
                results[index] = self._answer(worker.name, decoded.id, outcome, started)
            return pb.ScoreResponse(results=[results[index] for index in range(len(request.items))])

    async def ScoreStream(
        self, request_iterator: AsyncIterator[pb.ScoreStreamRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ScoreStreamResponse]:
        async with self._track("ScoreStream", context):
            answers: asyncio.Queue[pb.ScoreResult | None] = asyncio.Queue()  # None: every item is answered
            futures: list[asyncio.Future[ItemOutcome]] = []
            reader = asyncio.create_task(self._read_stream(request_iterator, answers, futures))
            try:
                ended = False
                while not ended:
                    batch: list[pb.ScoreResult] = []
                    entry = await answers.get()
                    while entry is not None:
                        batch.append(entry)
                        if answers.empty() or len(batch) >= _RESULTS_PER_STREAM_MESSAGE:
                            break
                        entry = answers.get_nowait()
                    ended = entry is None
                    if batch:
                        yield pb.ScoreStreamResponse(results=batch)
                await reader  # re-raises what stopped the reader, if anything did
            finally:
                reader.cancel()
                for future in futures:
                    future.cancel()

    # --- helpers ----------------------------------------------------------------------------------------------

    async def _read_stream(
        self,
        request_iterator: AsyncIterator[pb.ScoreStreamRequest],
        answers: asyncio.Queue[pb.ScoreResult | None],
        futures: list[asyncio.Future[ItemOutcome]],
    ) -> None:
        """Validate and queue every item of the stream, then wait for all answers and end them with None."""
        seen: set[str] = set()
        try:
            message_index = 0
            async for request in request_iterator:
                field = f"messages[{message_index}].items"
                message_index += 1
                arrived = time.perf_counter()
                worker = self._scorer(request.reward, request.weights)
                if isinstance(worker, ItemError):
                    unknown = worker
                    for index, item in enumerate(request.items):
                        error = _id_error(item.id, f"{field}[{index}].id", seen) or unknown
                        answers.put_nowait(self._answer(request.reward, item.id, error, arrived))
                    continue
                valid, rejected = _validate(request.items, field, worker.spec, seen)
                for _, item_id, error in rejected:
                    answers.put_nowait(self._answer(worker.name, item_id, error, arrived))
                decoded_items = [decoded for _, decoded in valid]
                for decoded, future in zip(decoded_items, await worker.submit(decoded_items), strict=True):
                    future.add_done_callback(self._stream_callback(answers, worker.name, decoded.id, arrived))
                    futures.append(future)
            await asyncio.gather(*futures)  # each future's callback has queued its answer before this returns
        finally:
            answers.put_nowait(None)

    def _stream_callback(
        self, answers: asyncio.Queue[pb.ScoreResult | None], reward: str, item_id: str, arrived: float
    ) -> Callable[[asyncio.Future[ItemOutcome]], None]:
        def deliver(future: asyncio.Future[ItemOutcome]) -> None:
            if not future.cancelled():
                answers.put_nowait(self._answer(reward, item_id, future.result(), arrived))

        return deliver

    def _scorer(self, reward: str, weights: Mapping[str, float]) -> Scorer | ItemError:
        """What scores ``reward``, or a weighted sum of rewards when ``weights`` is set; else why nothing can."""
        if not weights:
            return self._scorers.get(reward) or self._not_ready(reward)
        try:
            weights = check_weights(weights, "weights")
        except ValueError as error:
            return ItemError(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        workers = {}
        for component in weights:
            scorer = self._scorers.get(component)
            if scorer is None:
                return self._not_ready(component)
            if not isinstance(scorer, RewardWorker):
                return ItemError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"weights: {component!r} is itself a composite; weigh its components instead",
                )
            workers[component] = scorer
        try:
            # One name for every per-request composite: the client's label must not become a metrics label value.
            return CompositeScorer(PER_REQUEST_COMPOSITE, weights, workers)
        except ValueError as error:
            return ItemError(grpc.StatusCode.INVALID_ARGUMENT, f"weights: {error}")

    def _not_ready(self, reward: str) -> ItemError:
        """Why ``reward`` cannot score: still loading (UNAVAILABLE), failed to load, or not offered at all."""
        offered = ", ".join(sorted(self._specs))
        if not reward:
            return ItemError(grpc.StatusCode.NOT_FOUND, f"reward is empty; name one of: {offered}")
        state = self._unavailable.get(reward)
        if state is None:
            return ItemError(grpc.StatusCode.NOT_FOUND, f"unknown reward {reward!r}; this server offers: {offered}")
        code = grpc.StatusCode.UNAVAILABLE if state == LOADING else grpc.StatusCode.FAILED_PRECONDITION
        return ItemError(code, f"reward {reward!r} {state} (health service {reward_health_name(reward)!r})")

    def _answer(self, reward: str, item_id: str, outcome: ItemOutcome | ItemError, arrived: float) -> pb.ScoreResult:
        """Turn one item's outcome into its result, and count it."""
        error = outcome if isinstance(outcome, ItemError) else outcome.error
        code = error.code if error is not None else grpc.StatusCode.OK
        self._metrics.items.labels(reward, code.name).inc()
        self._metrics.item_latency.labels(reward).observe(time.perf_counter() - arrived)
        if error is not None:
            return error_result(item_id, error)
        assert isinstance(outcome, ItemOutcome)
        return ok_result(item_id, outcome.score, outcome.components, outcome.info)

    @contextlib.asynccontextmanager
    async def _track(self, method: str, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        """Count the RPC by its final status code, track it for draining, and fail it on ``_CallFailed``.

        ``context.abort`` sends the status before it raises, so a failure is counted before it is sent: a client
        that reads the metrics right after its error must see it."""
        if self._draining:
            self._metrics.requests.labels(method, "UNAVAILABLE").inc()
            await abort(context, grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
        code: str | None = "OK"  # None once counted
        self._active += 1
        self._idle.clear()
        try:
            yield
        except _CallFailed as failure:
            self._metrics.requests.labels(method, failure.code.name).inc()
            code = None
            await abort(context, failure.code, failure.message)
        except asyncio.CancelledError:
            code = "DEADLINE_EXCEEDED" if (context.time_remaining() or 1.0) <= 0 else "CANCELLED"
            raise
        except Exception:
            code = "UNKNOWN"
            log.exception("unhandled error in RPC", extra={"method": method})
            raise
        finally:
            if code is not None:
                self._metrics.requests.labels(method, code).inc()
            self._active -= 1
            if self._active == 0:
                self._idle.set()


class _CallFailed(Exception):
    """Raised inside ``_track`` to fail the whole RPC with ``code``."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


async def abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    """Fail the RPC with ``code``; ``context.abort`` raises, which its (untyped) signature does not say."""
    await context.abort(code, message)
    raise AssertionError("context.abort returned")


def _id_error(item_id: str, field: str, seen: set[str]) -> ItemError | None:
    """Ids match results to items: each must be set and unique within the call or stream. Records ``item_id``."""
    if not item_id:
        return ItemError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{field} is empty; every item needs an id, unique within the call or stream",
        )
    if item_id in seen:
        return ItemError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{field} {item_id!r} is a duplicate; ids must be unique "
            f"within the call or stream (the first item with this id "
            f"is the one answered with a score)",
        )
    seen.add(item_id)
    return None


def _validate(
    items: Sequence[pb.Item], field: str, spec: RewardSpec, seen: set[str]
) -> tuple[list[tuple[int, DecodedItem]], list[tuple[int, str, ItemError]]]:
    """Split ``items`` into decoded ones and rejected ones, each with its index in ``items``."""
    valid, rejected = [], []
    for index, item in enumerate(items):
        error = _id_error(item.id, f"{field}[{index}].id", seen)
        if error is None:
            try:
                valid.append((index, decode_item(item, f"{field}[{index}]", spec)))
                continue
            except ItemInvalid as invalid:
                error = invalid.error
        rejected.append((index, item.id, error))
    return valid, rejected
