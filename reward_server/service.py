"""The ``ddpo.reward.v1.RewardService`` servicer: call-level checks, per-item validation, and hand-off to workers.

Call-level errors (a body that does not parse, an unknown reward in a unary call, a call too large to ever queue,
server full) fail the RPC with a status; everything about one item (missing or duplicate id, bad image, an image
over a decoding budget, missing prompt, unknown reward in a stream, reward failure, and any unexpected error while
checking it) fails that item alone, and the other items are answered.

The event loop does no per-item work: request bodies arrive as bytes, and parsing, validation and decoding run in a
thread pool, so that health checks and ListRewards answer at once while the server decodes at full load. Decoded
bytes are bounded per image, per request and across the server (``reward_server.budget``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import hmac
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import NoReturn, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from clients.generated.ddpo.reward.v1 import reward_pb2 as pb
from reward_server.batching import ItemOutcome, QueueFull
from reward_server.budget import DecodeBudget, RateLimitedLog
from reward_server.config import MiB
from reward_server.metrics import ServerMetrics
from reward_server.registry import RewardRegistry
from reward_server.rewards import ItemError, RewardSpec
from reward_server.wire import (
    DecodedItem,
    ItemInvalid,
    decode_item,
    decoded_bytes,
    error_result,
    ok_result,
    quote,
    spec_to_proto,
)

log = logging.getLogger(__name__)

_RESULTS_PER_STREAM_MESSAGE = 256

UNKNOWN_REWARD_LABEL = "unknown"  # the metrics label of items naming a reward the server lacks: not their name
SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["RewardService"].full_name
MessageT = TypeVar("MessageT", bound=Message)


@dataclasses.dataclass(frozen=True)
class DecodeLimits:
    """The decoding budgets (``reward_server.budget``); None pixels: the largest image any served reward takes."""

    max_image_pixels: int | None = None
    max_request_bytes: int = 512 * MiB
    max_in_flight_bytes: int = 2048 * MiB


@dataclasses.dataclass
class _Checked:
    """One call's or stream message's items after validation: decoded ones with the bytes they reserved, and
    rejected ones with their error; each with its index in the message."""

    valid: list[tuple[int, DecodedItem, int]] = dataclasses.field(default_factory=list)
    rejected: list[tuple[int, str, ItemError]] = dataclasses.field(default_factory=list)


def bearer_token_problem(metadata: Iterable[tuple[str, str | bytes]] | None, expected: bytes) -> str | None:
    """Check a call's ``authorization`` metadata against ``expected`` (b"Bearer <token>", compared in constant time):
    None when it matches, "missing" or "mismatch" otherwise."""
    given = dict(metadata or ()).get("authorization", "")
    given_bytes = given.encode() if isinstance(given, str) else given
    if not given_bytes:
        return "missing"
    return None if hmac.compare_digest(given_bytes, expected) else "mismatch"


class RewardServicer:
    def __init__(self, registry: RewardRegistry, metrics: ServerMetrics, limits: DecodeLimits) -> None:
        """``registry`` says what scores each request; it changes as rewards load and endpoints come and go."""
        self._registry = registry
        self._metrics = metrics
        self._limits = limits
        self._budget = DecodeBudget(limits.max_in_flight_bytes)
        self._decoder = concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="decode")
        self._undecodable = RateLimitedLog(log, "undecodable request body")
        self._unexpected = RateLimitedLog(log, "unexpected error while checking an item (a server bug)")
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._draining = False

    def handler(self) -> grpc.GenericRpcHandler:
        """The service's RPCs, taking request bodies as bytes: the servicer parses them off the event loop, and a
        body that does not parse is its INVALID_ARGUMENT, not gRPC's UNKNOWN."""
        handlers = {
            "ListRewards": grpc.unary_unary_rpc_method_handler(
                self.ListRewards, response_serializer=pb.ListRewardsResponse.SerializeToString
            ),
            "Score": grpc.unary_unary_rpc_method_handler(
                self.Score, response_serializer=pb.ScoreResponse.SerializeToString
            ),
            "ScoreStream": grpc.stream_stream_rpc_method_handler(
                self.ScoreStream, response_serializer=pb.ScoreStreamResponse.SerializeToString
            ),
        }
        return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)

    def close(self) -> None:
        self._decoder.shutdown(wait=False, cancel_futures=True)

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

    async def ListRewards(self, body: bytes, context: grpc.aio.ServicerContext) -> pb.ListRewardsResponse:
        async with self._track("ListRewards", context):
            self._parse(pb.ListRewardsRequest, body, "ListRewardsRequest", context)  # small: parsed on the loop
            specs = self._registry.specs
            return pb.ListRewardsResponse(
                rewards=[spec_to_proto(specs[name]) for name in sorted(specs)],
                load_errors=self._registry.load_errors(),
            )

    async def Score(self, body: bytes, context: grpc.aio.ServicerContext) -> pb.ScoreResponse:
        async with self._track("Score", context):
            started = time.perf_counter()
            loop = asyncio.get_running_loop()
            request = await loop.run_in_executor(
                self._decoder, self._parse, pb.ScoreRequest, body, "ScoreRequest", context
            )
            worker = self._registry.scorer(request.reward, request.weights)
            if isinstance(worker, ItemError):
                raise _CallFailed(worker.code, worker.message)
            if len(request.items) > worker.capacity:
                raise _CallFailed(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"{len(request.items)} items can never be queued at once for reward {quote(worker.name)}, which "
                    f"holds at most {worker.capacity} (max_queued_items); send them in smaller calls, or use "
                    "ScoreStream",
                )
            checked = await loop.run_in_executor(
                self._decoder, self._check, request.items, "items", worker.spec, set(), context.time_remaining()
            )
            results = {i: self._answer(worker.name, item_id, error, started) for i, item_id, error in checked.rejected}
            try:
                futures = await worker.submit_nowait([decoded for _, decoded, _ in checked.valid])
            except QueueFull as full:
                for _, _, size in checked.valid:
                    self._budget.release(size)
                raise _CallFailed(grpc.StatusCode.RESOURCE_EXHAUSTED, str(full)) from full
            self._release_when_done(futures, checked)
            try:
                outcomes = await asyncio.gather(*futures)
            finally:
                for future in futures:
                    future.cancel()  # no-op once answered; drops queued work when the caller has gone
            for (index, decoded, _), outcome in zip(checked.valid, outcomes, strict=True):
                results[index] = self._answer(worker.name, decoded.id, outcome, started)
            return pb.ScoreResponse(results=[results[index] for index in range(len(request.items))])

    async def ScoreStream(
        self, request_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ScoreStreamResponse]:
        async with self._track("ScoreStream", context):
            answers: asyncio.Queue[pb.ScoreResult | None] = asyncio.Queue()  # None: every item is answered
            futures: list[asyncio.Future[ItemOutcome]] = []
            reader = asyncio.create_task(self._read_stream(request_iterator, answers, futures, context))
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
        request_iterator: AsyncIterator[bytes],
        answers: asyncio.Queue[pb.ScoreResult | None],
        futures: list[asyncio.Future[ItemOutcome]],
        context: grpc.aio.ServicerContext,
    ) -> None:
        """Validate and queue every item of the stream, then wait for all answers and end them with None.

        A message that does not parse is skipped; once every other item is answered, the stream ends with
        INVALID_ARGUMENT naming it."""
        seen: set[str] = set()
        loop = asyncio.get_running_loop()
        undecodable: list[str] = []
        try:
            message_index = 0
            async for body in request_iterator:
                field = f"messages[{message_index}].items"
                message_index += 1
                arrived = time.perf_counter()
                try:
                    request = await loop.run_in_executor(
                        self._decoder, self._parse, pb.ScoreStreamRequest, body, "ScoreStreamRequest", context
                    )
                except _CallFailed as failure:
                    undecodable.append(f"messages[{message_index - 1}]: {failure.message}")
                    continue
                worker = self._registry.scorer(request.reward, request.weights)
                if isinstance(worker, ItemError):
                    unknown = worker
                    for index, item in enumerate(request.items):
                        error = _id_error(item.id, f"{field}[{index}].id", seen) or unknown
                        answers.put_nowait(self._answer(UNKNOWN_REWARD_LABEL, item.id, error, arrived))
                    continue
                checked = await loop.run_in_executor(
                    self._decoder, self._check, request.items, field, worker.spec, seen, None
                )
                for _, item_id, error in checked.rejected:
                    answers.put_nowait(self._answer(worker.name, item_id, error, arrived))
                decoded_items = [decoded for _, decoded, _ in checked.valid]
                queued = await worker.submit(decoded_items)
                self._release_when_done(queued, checked)
                for decoded, future in zip(decoded_items, queued, strict=True):
                    future.add_done_callback(self._stream_callback(answers, worker.name, decoded.id, arrived))
                    futures.append(future)
            await asyncio.gather(*futures)  # each future's callback has queued its answer before this returns
            if undecodable:
                raise _CallFailed(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"{len(undecodable)} stream message(s) could not be parsed and their items were not scored; "
                    f"the first: {undecodable[0]}",
                )
        finally:
            answers.put_nowait(None)

    def _parse(
        self, message_type: type[MessageT], body: bytes, name: str, context: grpc.aio.ServicerContext
    ) -> MessageT:
        """Parse a request body; _CallFailed (INVALID_ARGUMENT, a short message, one log line a minute)."""
        try:
            return message_type.FromString(body)
        except (DecodeError, RecursionError, ValueError) as error:
            reason = str(error).splitlines()[0][:120] if str(error) else type(error).__name__
            self._undecodable.warning(f"{name}: {reason}", str(context.peer()))
            raise _CallFailed(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the request body is not a valid ddpo.reward.v1.{name} ({reason}); check the client's proto version",
            ) from None

    def _max_pixels(self) -> int:
        if self._limits.max_image_pixels is not None:
            return self._limits.max_image_pixels
        specs = self._registry.specs.values()
        return max((s.image_spec.max_size[0] * s.image_spec.max_size[1] for s in specs), default=1)

    def _check(
        self, items: Sequence[pb.Item], field: str, spec: RewardSpec, seen: set[str], timeout: float | None
    ) -> _Checked:
        """Validate and decode ``items`` within the decoding budgets, in a decoding thread; no exception escapes an
        item. A valid item keeps its reserved bytes until ``_release_when_done`` gives them back."""
        checked = _Checked()
        request_bytes = 0
        max_pixels = self._max_pixels()
        for index, item in enumerate(items):
            item_field = f"{field}[{index}]"
            error = _id_error(item.id, f"{item_field}.id", seen)
            reserved = 0
            try:
                if error is None:
                    size = decoded_bytes(item, item_field, spec, max_pixels)
                    error = self._over_budget(item_field, size, request_bytes)
                if error is None and not self._budget.acquire(size, timeout):
                    error = ItemError(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"{item_field}: the server holds {self._budget.limit // MiB} MB of decoded images waiting to "
                        "be scored (max_decoded_mb_in_flight) and none freed up before the deadline; retry",
                    )
                if error is None:
                    reserved = size
                    checked.valid.append((index, decode_item(item, item_field, spec), size))
                    request_bytes += size
                    continue
            except ItemInvalid as invalid:
                error = invalid.error
            except Exception as unexpected:  # a bug must cost its item, never the call or stream
                self._unexpected.warning(f"{item_field}: {type(unexpected).__name__}: {unexpected}", "")
                error = ItemError(
                    grpc.StatusCode.INTERNAL,
                    f"{item_field}: unexpected {type(unexpected).__name__} while checking the item (a server bug)",
                )
            if reserved:
                self._budget.release(reserved)
            checked.rejected.append((index, item.id, error))
        return checked

    def _over_budget(self, field: str, size: int, request_bytes: int) -> ItemError | None:
        """Why an item that decodes to ``size`` bytes can never be taken, after ``request_bytes`` of its request."""
        limits = self._limits
        if size > limits.max_in_flight_bytes:
            return ItemError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{field}: its image decodes to {size / MiB:.0f} MB, more than the server ever holds "
                f"({limits.max_in_flight_bytes // MiB} MB, max_decoded_mb_in_flight)",
            )
        if request_bytes + size > limits.max_request_bytes:
            return ItemError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{field}: the images of this request decode to more than {limits.max_request_bytes // MiB} MB "
                "(max_request_decoded_mb); send fewer or smaller images per request or stream message",
            )
        return None

    def _release_when_done(self, futures: Sequence[asyncio.Future[ItemOutcome]], checked: _Checked) -> None:
        """Give each item's reserved decoding bytes back once it is answered (or dropped)."""
        for future, (_, _, size) in zip(futures, checked.valid, strict=True):
            future.add_done_callback(self._releaser(size))

    def _releaser(self, size: int) -> Callable[[asyncio.Future[ItemOutcome]], None]:
        def release(_: asyncio.Future[ItemOutcome]) -> None:
            self._budget.release(size)

        return release

    def _stream_callback(
        self, answers: asyncio.Queue[pb.ScoreResult | None], reward: str, item_id: str, arrived: float
    ) -> Callable[[asyncio.Future[ItemOutcome]], None]:
        def deliver(future: asyncio.Future[ItemOutcome]) -> None:
            if not future.cancelled():
                answers.put_nowait(self._answer(reward, item_id, future.result(), arrived))

        return deliver

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
            f"{field} {quote(item_id)} is a duplicate; ids must be unique "
            f"within the call or stream (the first item with this id "
            f"is the one answered with a score)",
        )
    seen.add(item_id)
    return None
