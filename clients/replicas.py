"""Several reward servers that serve the same rewards, used as one; ``open_client`` returns this for any address.

    open_client("127.0.0.1:50051")                                # one server
    open_client("10.0.0.5:50051,10.0.0.6:50051")                  # a list of replicas
    open_client("dns:///ddpo-rewards-headless.ml.svc:50051")      # every address the name resolves to
    open_client("grpcs://a:50051,b:50051") / open_client("triton://a:8001,b:8001")

Balancing: each stream batch and each unary call goes to the replica with the least outstanding work, among those
that serve the reward (its ``reward/<name>`` health is SERVING), so a slow replica gets less.

Failover: a stream keeps one lane (a ScoreStream) per replica. When a lane breaks (the replica died, restarted,
stopped answering for ``progress_timeout``, or left the network), its unanswered items are re-sent under their ids to
the other lanes, and each id's answer is yielded once. With no lane left, the stream waits for a replica to come
back, probing every ``PROBE_INTERVAL_S``, and gives up with ``ServiceUnavailableError`` once no answer has come for
``outage_timeout`` seconds. A replica that comes back is used again. A one-server address gets the same: its
restarts are survived the same way.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import logging
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import grpc

from clients._wire import Encoding, ImageInput, Images, check_host_port, not_ready
from clients.client import RewardClient
from clients.errors import RewardServiceError, ServiceUnavailableError
from clients.triton import SCHEME as TRITON_SCHEME
from clients.triton import TritonRewardClient
from clients.types import BatchResult, ItemResult, RewardClientLike, RewardInfo, ScoreStreamLike

logger = logging.getLogger(__name__)

DNS_SCHEME = "dns:///"
ADDRESS_FORMS = (
    "HOST:PORT, grpc(s)://HOST:PORT or triton://HOST:PORT; several replicas as a comma-separated list "
    "(a:50051,b:50051) or dns:///NAME:PORT"
)
PROBE_INTERVAL_S = 2.0  # how often replicas without a lane are probed, and a dns:/// name resolved again
PROBE_TIMEOUT_S = 2.0
RESEND_CHUNK = 16  # items per message when re-sending
# Stream failures that another replica, or the same one later, can mend.
TRANSIENT_CODES = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}
)

T = TypeVar("T")


def expand_endpoints(server: str) -> list[tuple[str, str | None]]:
    """(address for one client, TLS server name or None) per replica of ``server``; ValueError when malformed."""
    if server.startswith(DNS_SCHEME):
        name = server.removeprefix(DNS_SCHEME)
        check_host_port(server, name, "dns:///NAME:PORT (e.g. dns:///ddpo-rewards-headless.ml.svc:50051)")
        host, port = name.rsplit(":", 1)
        try:
            found = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
        except socket.gaierror as error:
            raise ValueError(f"{server}: cannot resolve {host!r}: {error.strerror}") from None
        addresses = sorted({str(info[4][0]) for info in found})
        return [(f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}", host) for ip in addresses]
    scheme, sep, rest = server.partition("://")
    prefix = f"{scheme}://" if sep else ""
    parts = [part.strip() for part in (rest if sep else server).split(",")]
    if not all(parts):
        raise ValueError(f"server {server!r} has an empty entry; give HOST:PORT[,HOST:PORT...]")
    return [(prefix + part, None) for part in parts]


@dataclasses.dataclass
class ReplicaStats:
    """One replica's share of a stream: items sent to it (re-sent ones included), answered by it, re-sent away from
    it after its lane broke, and the mean seconds from send to answer."""

    sent: int = 0
    answered: int = 0
    resent: int = 0
    latency_total_s: float = 0.0

    @property
    def mean_latency_s(self) -> float:
        return self.latency_total_s / self.answered if self.answered else 0.0

    def as_dict(self) -> dict[str, float]:
        return {"sent": self.sent, "answered": self.answered, "resent": self.resent, "latency_s": self.mean_latency_s}


class ReplicaSet:
    """The reward servers of one address, with the client API (``wait_ready``, ``list_rewards``, ``score``,
    ``open_stream``, ``close``)."""

    def __init__(
        self,
        server: str,
        *,
        timeout: float = 60.0,
        progress_timeout: float = 600.0,
        outage_timeout: float = 900.0,
        tls: bool | None = None,
        root_certificates: str | Path | None = None,
        auth_token: str | None = None,
    ) -> None:
        """``timeout``: unary calls; ``progress_timeout``: the longest wait for a stream's next answer while items
        are outstanding; ``outage_timeout``: how long a stream waits for any replica to come back."""
        self.server = server
        self.timeout = timeout
        self.progress_timeout = progress_timeout
        self.outage_timeout = outage_timeout
        self._options: dict[str, Any] = {
            "timeout": timeout,
            "progress_timeout": progress_timeout,
            # a dns:/// name has no scheme to say TLS: a CA file does
            "tls": True if tls is None and root_certificates is not None and server.startswith(DNS_SCHEME) else tls,
            "root_certificates": root_certificates,
            "auth_token": auth_token,
        }
        self._lock = threading.Lock()
        self._clients: dict[str, RewardClientLike] = {}
        self._closed = False
        self._resolved_at = 0.0
        self._in_flight: dict[str, int] = {}
        self._turn = 0
        self.addresses()  # validates the address and opens the clients

    def _open(self, address: str, server_name: str | None) -> RewardClientLike:
        if address.startswith(TRITON_SCHEME):
            return TritonRewardClient(address, **self._options)
        return RewardClient(address, tls_server_name=server_name, **self._options)

    def addresses(self) -> list[str]:
        """The replicas' addresses; a dns:/// name is resolved again at most every PROBE_INTERVAL_S."""
        with self._lock:
            if self._clients and not self.server.startswith(DNS_SCHEME):
                return list(self._clients)
            if time.monotonic() - self._resolved_at < PROBE_INTERVAL_S:
                return list(self._clients)
            self._resolved_at = time.monotonic()
            for address, server_name in expand_endpoints(self.server):
                if address not in self._clients:
                    self._clients[address] = self._open(address, server_name)
            return list(self._clients)

    def client(self, address: str) -> RewardClientLike:
        return self._clients[address]

    def __enter__(self) -> ReplicaSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._closed = True
        for client in self._clients.values():
            client.close()

    def probe(self, reward: str | None, addresses: Iterable[str] | None = None) -> dict[str, str | None]:
        """For each replica (of ``addresses``, default all), None if its ``reward/<name>`` (or server) health is
        SERVING now, else why not (connection refused, still loading...); probed side by side, each within
        2 × PROBE_TIMEOUT_S."""
        candidates = list(addresses if addresses is not None else self.addresses())

        def why_not(address: str) -> str | None:
            try:
                return probe_one(address)
            except Exception:
                if self._closed:  # a stream's probe thread outlived the set: its channels refuse calls
                    return "the replica set is closed"
                raise

        def probe_one(address: str) -> str | None:
            client = self._clients[address]
            try:
                client.list_rewards(timeout=PROBE_TIMEOUT_S)  # fails at once, with the cause, when nothing listens
            except RewardServiceError as error:
                if error.code == grpc.StatusCode.UNAVAILABLE:
                    return str(error)  # (other answers, such as PyTriton's "cannot list", say it is up)
            try:
                client.wait_ready(timeout=PROBE_TIMEOUT_S, rewards=[reward] if reward else None)
            except (RewardServiceError, TimeoutError) as error:
                return str(error)
            return None

        if not candidates:
            return {}
        with concurrent.futures.ThreadPoolExecutor(len(candidates)) as pool:
            return dict(zip(candidates, pool.map(why_not, candidates), strict=True))

    def serving(self, reward: str | None, addresses: Iterable[str] | None = None) -> list[str]:
        """The replicas (of ``addresses``, default all) that serve ``reward`` now."""
        return [address for address, why in self.probe(reward, addresses).items() if why is None]

    def wait_ready(self, timeout: float = 30.0, rewards: Iterable[str] | None = None) -> None:
        """Block until some replica serves (each of ``rewards``); TimeoutError after ``timeout`` saying why."""
        deadline = time.monotonic() + timeout
        last: BaseException | None = None
        while True:
            for address in self.addresses():
                left = deadline - time.monotonic()
                try:
                    self._clients[address].wait_ready(timeout=max(0.1, min(left, PROBE_TIMEOUT_S * 2)), rewards=rewards)
                    return
                except (RewardServiceError, TimeoutError) as error:
                    if isinstance(error, RewardServiceError) and error.code == grpc.StatusCode.NOT_FOUND:
                        raise
                    last = error
            if time.monotonic() >= deadline:
                raise not_ready(self.server, timeout, ",".join(rewards or ()) or "", str(last))

    def list_rewards(self, timeout: float | None = None) -> list[RewardInfo]:
        """The rewards of the first replica that answers."""
        return self._each(lambda client: client.list_rewards(timeout=timeout))

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
        """``RewardClient.score`` on the replica with the fewest items in flight; another one if it is UNAVAILABLE."""
        count = len(images)

        def call(client: RewardClientLike, address: str) -> BatchResult:
            with self._lock:
                self._in_flight[address] = self._in_flight.get(address, 0) + count
            try:
                return client.score(reward, images, prompts, metadata, ids, encoding, timeout, weights)
            finally:
                with self._lock:
                    self._in_flight[address] -= count

        return self._each(call, by_load=True)

    def _each(self, call: Callable[..., T], by_load: bool = False) -> T:
        """``call`` on one replica after another (least loaded first) until one is not UNAVAILABLE."""
        addresses = self.addresses()
        if by_load:  # the least loaded first; among equals, a different one each call
            self._turn = (self._turn + 1) % len(addresses)
            turn = {address: (i - self._turn) % len(addresses) for i, address in enumerate(addresses)}
            addresses.sort(key=lambda address: (self._in_flight.get(address, 0), turn[address]))
        last: RewardServiceError | None = None
        for address in addresses:
            try:
                return call(self._clients[address], address) if by_load else call(self._clients[address])
            except RewardServiceError as error:
                if error.code != grpc.StatusCode.UNAVAILABLE:
                    raise
                last = error
        assert last is not None
        raise last

    def open_stream(self, progress_timeout: float | None = None) -> BalancedStream:
        """A stream over every replica that serves, with ``ScoreStream``'s API (see the module's docstring)."""
        return BalancedStream(self, self.progress_timeout if progress_timeout is None else progress_timeout)


@dataclasses.dataclass
class _Item:
    reward: str
    image: ImageInput
    prompt: str | None
    metadata: Mapping[str, Any] | None
    encoding: Encoding
    lane: _Lane | None  # the lane it was last sent on; None while it waits for one
    sent_at: float = 0.0


class _Lane:
    """One replica's ScoreStream within a BalancedStream, and a thread that hands over its answers (at once, so that
    the balance sees them) and reports its end."""

    def __init__(self, address: str, stream: ScoreStreamLike, owner: BalancedStream) -> None:
        self.address = address
        self.stream = stream
        self.outstanding: set[str] = set()
        self.sent = 0
        self.sending = True
        self._owner = owner
        threading.Thread(target=self._read, name=f"lane-{address}", daemon=True).start()

    def close(self) -> None:
        if self.sending:
            self.sending = False
            self.stream.close()

    def _read(self) -> None:
        try:
            for result in self.stream.results():
                self._owner._answer(self, result)
            self._owner._events.put(("ended", self, None))
        except Exception as error:  # RewardServiceError, or a broken contract
            self._owner._events.put(("broken", self, error))


class BalancedStream:
    """Items spread over one stream per serving replica, by outstanding work; ``results`` yields each item's answer
    once, whatever breaks (see the module's docstring). Thread-safe: ``send`` and ``results`` may run in different
    threads, as in the trainer."""

    def __init__(self, replicas: ReplicaSet, progress_timeout: float) -> None:
        self._replicas = replicas
        self._progress_timeout = progress_timeout
        self._lock = threading.Lock()
        self._events: queue.Queue[tuple[str, _Lane, Any]] = queue.Queue()
        self._lanes: list[_Lane] = []
        self._items: dict[str, _Item] = {}
        self._answered: set[str] = set()
        self._next_id = 0
        self._closed = False
        self._cancelled = False
        self._probed_at = 0.0
        self._probing = False  # a probe of the replicas without a lane runs in its own thread
        self._outage: tuple[float, str, str] | None = None  # (monotonic, wall clock, last error) since the last answer
        self.stats: dict[str, ReplicaStats] = {}

    def __enter__(self) -> BalancedStream:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if exc_type is not None or not self.done:
            self.cancel()

    @property
    def done(self) -> bool:
        return self._closed and len(self._answered) == len(self._items)

    def send(
        self,
        reward: str,
        images: Images,
        prompts: Sequence[str | None] | None = None,
        metadata: Sequence[Mapping[str, Any] | None] | None = None,
        ids: Sequence[str] | None = None,
        encoding: Encoding = "raw",
    ) -> list[str]:
        """Queue a batch for ``reward`` on the least loaded lane and return its item ids ("0", "1", ... by default).
        The first batch opens a lane on every replica that serves the reward."""
        if not self._items and not self._lanes:
            serving = self._replicas.serving(reward)
            with self._lock:
                for address in serving:
                    self._add_lane(address)
                self._probed_at = time.monotonic()
        with self._lock:
            if self._closed:
                raise RuntimeError("the stream is closed; open a new one to send more items")
            batch = list(images)
            if ids is None:
                ids = [str(self._next_id + i) for i in range(len(batch))]
            if len(set(ids)) != len(ids) or any(item_id in self._items for item_id in ids):
                raise ValueError(f"ids must be unique within the stream; {list(ids)[:3]}... repeat")
            lane = self._least_loaded()
            if lane is not None:
                lane.stream.send(reward, batch, prompts, metadata, ids, encoding)  # checks the input, or raises
                lane.outstanding.update(ids)
                lane.sent += len(ids)
                self.stats[lane.address].sent += len(ids)
            now = time.monotonic()
            for i, item_id in enumerate(ids):
                prompt = prompts[i] if prompts is not None else None
                item_metadata = metadata[i] if metadata is not None else None
                self._items[item_id] = _Item(reward, batch[i], prompt, item_metadata, encoding, lane, now)
            self._next_id += len(batch)
            return list(ids)

    def close(self) -> None:
        """No more items will be sent; results keep coming."""
        with self._lock:
            self._closed = True
            for lane in self._lanes:
                lane.close()

    def cancel(self) -> None:
        with self._lock:
            self._closed = self._cancelled = True
            for lane in self._lanes:
                lane.stream.cancel()

    def results(self) -> Iterator[ItemResult]:
        """Yield each item's result once, as it arrives; ends after ``close`` when all are answered.

        RewardServiceError for a failure no replica can mend (UNAUTHENTICATED, say); ServiceUnavailableError when
        no answer came for ``outage_timeout`` while no replica could take the unanswered items."""
        yielded = 0
        while not (self._closed and yielded == len(self._items)):
            if self._cancelled:
                raise RewardServiceError(grpc.StatusCode.CANCELLED, "the stream was cancelled", "ScoreStream")
            try:
                kind, lane, payload = self._events.get(timeout=PROBE_INTERVAL_S / 2)
            except queue.Empty:
                self._maintain()
                continue
            if kind == "answer":
                yielded += 1
                yield payload
            elif kind == "ended":
                with self._lock:
                    self._lanes.remove(lane)
            else:
                self._broken(lane, payload)
            self._maintain()

    def _answer(self, lane: _Lane, result: ItemResult) -> None:
        """A lane's answer, in its thread: counted at once, and handed to ``results`` unless the id had one."""
        with self._lock:
            self._outage = None
            lane.outstanding.discard(result.id)
            item = self._items.get(result.id)
            if item is None or result.id in self._answered:
                return  # an answer from a lane the item had left
            self._answered.add(result.id)
            stats = self.stats[lane.address]
            stats.answered += 1
            stats.latency_total_s += time.monotonic() - item.sent_at
            self._events.put(("answer", lane, result))

    def _broken(self, lane: _Lane, error: Exception) -> None:
        """A lane broke: its unanswered items wait for another lane (or for a replica to come back)."""
        if self._cancelled:
            return
        if not isinstance(error, RewardServiceError) or error.code not in TRANSIENT_CODES:
            raise error
        with self._lock:
            self._lanes.remove(lane)
            lost = [item_id for item_id in lane.outstanding if item_id not in self._answered]
            self.stats[lane.address].resent += len(lost)
            logger.warning(
                "replica %s: the stream broke (%s); %d unanswered item(s) go again", lane.address, error, len(lost)
            )
            for item_id in lost:
                self._items[item_id].lane = None
            if self._outage is None:
                since = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
                self._outage = (time.monotonic(), since, "")
            self._outage = (*self._outage[:2], str(error))
        self._probed_at = 0.0  # look for replicas at once
        self._maintain()

    def _maintain(self) -> None:
        """Start a probe of the replicas without a lane (every PROBE_INTERVAL_S, in its own thread), place the
        waiting items, and give up once no answer has come for the outage timeout."""
        if time.monotonic() - self._probed_at >= PROBE_INTERVAL_S and not self._probing:
            self._probed_at = time.monotonic()
            with self._lock:
                waiting = self._waiting()
                rewards = [item.reward for item in self._items.values()]
                busy = {lane.address for lane in self._lanes if lane.sending}
            wanted = bool(waiting) or not self._closed  # after close, new lanes only carry what waits
            missing = [address for address in self._replicas.addresses() if address not in busy]
            if wanted and rewards and missing:
                self._probing = True
                threading.Thread(target=self._probe, args=(rewards[0], missing), name="probe", daemon=True).start()
        with self._lock:
            self._place_waiting()
            if not self._waiting():
                return
            if self._outage is None:  # items wait and no replica took them: the outage starts now
                since = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
                self._outage = (time.monotonic(), since, "no replica serves the reward")
            started, since, last = self._outage
            if time.monotonic() - started > self._replicas.outage_timeout:
                raise ServiceUnavailableError(
                    f"no reward server of {self._replicas.server} has answered since {since} "
                    f"({self._replicas.outage_timeout:g}s, outage_timeout; probed every {PROBE_INTERVAL_S:g}s); "
                    f"the last error: {last}",
                    "ScoreStream",
                )

    def _probe(self, reward: str, addresses: list[str]) -> None:
        """Open a lane to each of ``addresses`` that serves ``reward``, and give it what waits."""
        try:
            probed = self._replicas.probe(reward, addresses)
            with self._lock:
                if self._cancelled:
                    return
                for address, why_not in probed.items():
                    if why_not is None:
                        self._add_lane(address)
                        logger.info("replica %s serves: a new stream to it", address)
                    elif self._outage is not None:
                        self._outage = (*self._outage[:2], f"{address}: {why_not}")
                self._place_waiting()
        finally:
            self._probing = False

    def _waiting(self) -> list[str]:
        return [item_id for item_id, item in self._items.items() if item.lane is None and item_id not in self._answered]

    def _least_loaded(self) -> _Lane | None:
        """The sending lane with the fewest unanswered items; among equals, the one that was sent the fewest."""
        lanes = (lane for lane in self._lanes if lane.sending)
        return min(lanes, key=lambda lane: (len(lane.outstanding), lane.sent), default=None)

    def _add_lane(self, address: str) -> None:
        stream = self._replicas.client(address).open_stream(progress_timeout=self._progress_timeout)
        self._lanes.append(_Lane(address, stream, self))
        self.stats.setdefault(address, ReplicaStats())

    def _place_waiting(self) -> None:
        """Send the items that wait for a lane to the least loaded lanes, in chunks (with the lock held); after
        ``close``, every lane is closed again once it has them."""
        waiting = self._waiting()
        now = time.monotonic()
        for start in range(0, len(waiting), RESEND_CHUNK):
            lane = self._least_loaded()
            if lane is None:
                break
            chunk = waiting[start : start + RESEND_CHUNK]
            for reward in dict.fromkeys(self._items[item_id].reward for item_id in chunk):
                ids = [item_id for item_id in chunk if self._items[item_id].reward == reward]
                items = [self._items[item_id] for item_id in ids]
                prompts = [item.prompt for item in items]
                metadata = [item.metadata for item in items]
                lane.stream.send(reward, [item.image for item in items], prompts, metadata, ids, items[0].encoding)
                lane.outstanding.update(ids)
                lane.sent += len(ids)
                self.stats[lane.address].sent += len(ids)
                for item in items:
                    item.lane, item.sent_at = lane, now
        if self._closed:
            for lane in self._lanes:
                lane.close()
