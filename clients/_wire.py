"""Pure functions shared by the sync and asyncio clients: input checks, request building, channel settings.

Nothing here does I/O, so both clients build byte-identical requests and raise the same errors.
"""

from __future__ import annotations

import dataclasses
import json
import struct
import time
import zlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import grpc
import numpy as np
import numpy.typing as npt
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients.errors import RewardServiceError
from clients.generated.ddpo.reward.v1 import reward_pb2 as pb
from clients.generated.ddpo.reward.v1 import reward_pb2_grpc as pb_grpc
from clients.types import EncodedImage, ItemResult, ScoreItem

Encoding = Literal["raw", "png"]
ImageInput = npt.NDArray[np.uint8] | EncodedImage
Images = npt.NDArray[np.uint8] | Sequence[ImageInput]

SERVICE: str = pb.DESCRIPTOR.services_by_name["RewardService"].full_name
MAX_MESSAGE_BYTES = 256 << 20
STREAM_POLL_S = 1.0
"""How often a stream's reader looks at its progress clock while waiting for answers."""
# Retries are for UNAVAILABLE only (server not reachable yet, or restarting); other codes are answers.
_RETRY_POLICY = {
    "maxAttempts": 5,
    "initialBackoff": "0.1s",
    "maxBackoff": "2s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}
# Unary calls only. gRPC's transparent retries of a stream replay it from a buffer, and a stream whose server died
# before its first answer was seen to block forever, cancel() included; streams fail instead, and whoever owns the
# stream re-sends what is unanswered (the trainer does: trainer/rewards.py).
SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [
                    {"service": SERVICE, "method": "Score"},
                    {"service": SERVICE, "method": "ListRewards"},
                    {"service": "grpc.health.v1.Health", "method": "Check"},
                ],
                "retryPolicy": _RETRY_POLICY,
            }
        ]
    }
)
KEEPALIVE_TIME_MS = 20_000
"""While a call is open, the client pings the server this often, so that a peer that vanished without closing the
connection (a lost node) is noticed within KEEPALIVE_TIME_MS + KEEPALIVE_TIMEOUT_MS. ``ddpo serve`` accepts pings
this frequent (reward_server.server)."""
KEEPALIVE_TIMEOUT_MS = 10_000
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.enable_retries", 1),
    ("grpc.service_config", SERVICE_CONFIG),
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.http2.max_pings_without_data", 0),
    # a server that comes back is found within seconds; gRPC's default backoff grows to 2 minutes
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 5_000),
]
_FORMATS = {None: pb.IMAGE_FORMAT_UNSPECIFIED, "png": pb.IMAGE_FORMAT_PNG, "jpeg": pb.IMAGE_FORMAT_JPEG}


@dataclasses.dataclass(frozen=True)
class Target:
    """Where and how to connect: ``host:port`` or ``grpc://host:port`` (plaintext), ``grpcs://host:port`` (TLS)."""

    address: str
    tls: bool
    root_certificates: bytes | None
    metadata: tuple[tuple[str, str], ...]


def check_host_port(server: str, address: str, form: str) -> None:
    """ValueError unless ``address`` (the part of ``server`` after its scheme) is HOST:PORT; ``form`` shows it."""
    host, colon, port = address.rpartition(":")
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"server {server!r} must look like {form}")


def parse_target(
    server: str,
    *,
    tls: bool | None = None,
    root_certificates: bytes | str | Path | None = None,
    auth_token: str | None = None,
) -> Target:
    scheme, sep, rest = server.partition("://")
    if not sep:
        scheme, rest = "grpc", server
    if scheme not in ("grpc", "grpcs"):
        raise ValueError(f"server {server!r}: scheme must be grpc:// or grpcs://, got {scheme}://")
    check_host_port(server, rest, "HOST:PORT (e.g. 127.0.0.1:50051)")
    use_tls = (scheme == "grpcs") if tls is None else tls
    if isinstance(root_certificates, str | Path):
        root_certificates = Path(root_certificates).read_bytes()
    if root_certificates is not None and not use_tls:
        raise ValueError("root_certificates given for a plaintext connection; use grpcs:// or tls=True")
    metadata = (("authorization", f"Bearer {auth_token}"),) if auth_token else ()
    return Target(rest, use_tls, root_certificates, metadata)


def encode_png(image: npt.NDArray[np.uint8]) -> bytes:
    """Losslessly encode an (H, W, C) uint8 array (C = 1, 3 or 4) as PNG with zlib only."""
    height, width, channels = image.shape
    color_type = {1: 0, 3: 2, 4: 6}[channels]
    rows = np.ascontiguousarray(image).reshape(height, width * channels)
    raw = np.concatenate([np.zeros((height, 1), np.uint8), rows], axis=1).tobytes()  # filter byte 0 per row

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")


def fill_image(target: pb.Image, image: ImageInput, field: str, encoding: Encoding) -> bytes | None:
    """Check one image and describe it in ``target``; ``field`` (e.g. "images[3]") names it in errors.

    A raw image's pixels are returned instead of being copied into the message: ``WireBatch.serialize`` splices
    them in. Encoded images go into the message and None is returned.
    """
    if isinstance(image, EncodedImage):
        if image.format not in _FORMATS:
            raise ValueError(f"{field}.format must be 'png', 'jpeg' or None, got {image.format!r}")
        target.encoded.data = image.data
        target.encoded.format = _FORMATS[image.format]
        return None
    if not isinstance(image, np.ndarray):
        raise TypeError(f"{field} must be a numpy array or EncodedImage, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(
            f"{field} has dtype {image.dtype}; images must be uint8 "
            f"(from floats in [0, 1]: (x * 255).round().clip(0, 255).astype(np.uint8))"
        )
    if image.ndim != 3:
        raise ValueError(
            f"{field} has shape {image.shape}; expected (H, W, C) (a grayscale (H, W) image needs image[..., None])"
        )
    if 0 in image.shape:
        raise ValueError(f"{field} has shape {image.shape}; every dimension must be > 0")
    if image.shape[2] not in (1, 3, 4):
        raise ValueError(
            f"{field} has {image.shape[2]} channels; expected 1, 3 or 4 in HWC layout "
            f"(is it CHW? use image.transpose(1, 2, 0))"
        )
    if encoding == "png":
        target.encoded.data = encode_png(image)
        target.encoded.format = pb.IMAGE_FORMAT_PNG
        return None
    if encoding != "raw":
        raise ValueError(f"encoding must be 'raw' or 'png', got {encoding!r}")
    target.raw.height, target.raw.width, target.raw.channels = image.shape
    target.raw.dtype = pb.DTYPE_UINT8
    return np.ascontiguousarray(image).tobytes()  # a snapshot: the caller may reuse its array after send()


def _image_list(images: Images) -> list[ImageInput]:
    if isinstance(images, np.ndarray) and images.ndim != 4:
        raise ValueError(
            f"images has shape {images.shape}; a batch array must be (N, H, W, C), or pass a list of (H, W, C) arrays"
        )
    return list(images)


def _fill_metadata(target: struct_pb2.Struct, value: Mapping[str, Any], field: str) -> None:
    if not isinstance(value, Mapping):
        raise TypeError(f"{field} must be a dict, got {type(value).__name__}")
    try:
        target.update(value)
    except (ValueError, TypeError) as error:
        raise ValueError(f"{field} must be JSON-like (str, number, bool, None, list, dict): {error}") from None


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field_header(field_number: int, length: int) -> bytes:
    """Tag and length of a length-delimited protobuf field."""
    return _varint(field_number << 3 | 2) + _varint(length)


_REWARD_FIELD = pb.ScoreRequest.DESCRIPTOR.fields_by_name["reward"].number
_ITEMS_FIELD = pb.ScoreRequest.DESCRIPTOR.fields_by_name["items"].number
_IMAGE_FIELD = pb.Item.DESCRIPTOR.fields_by_name["image"].number
_RAW_FIELD = pb.Image.DESCRIPTOR.fields_by_name["raw"].number
_DATA_FIELD = pb.RawImage.DESCRIPTOR.fields_by_name["data"].number
# WireBatch.serialize encodes both request types: their fields must stay the same.
assert [(f.name, f.number) for f in pb.ScoreStreamRequest.DESCRIPTOR.fields] == [
    (f.name, f.number) for f in pb.ScoreRequest.DESCRIPTOR.fields
]


@dataclasses.dataclass(frozen=True)
class WireBatch:
    """The checked items of one ScoreRequest or ScoreStreamRequest, with raw pixels kept beside the messages.

    Building ``pb.ScoreRequest(items=...)`` around megabytes of pixels copies them several times (every nested
    constructor copies its argument, and the encoder copies again); ``serialize`` copies them once.
    """

    reward: str
    items: list[pb.Item]  # raw images carry their shape and dtype but not their bytes
    pixels: list[bytes | None]  # each raw image's bytes, None for encoded images
    weights: Mapping[str, float] | None = None  # a composite of rewards (ScoreRequest.weights)

    def serialize(self) -> bytes:
        """The request's wire bytes; they parse as either request type."""
        reward = self.reward.encode()
        parts = [_field_header(_REWARD_FIELD, len(reward)), reward]
        for item, pixels in zip(self.items, self.pixels, strict=True):
            body = item.SerializeToString()
            if pixels is None:
                parts += [_field_header(_ITEMS_FIELD, len(body)), body]
                continue
            # The pixels follow as a second occurrence of `image`. Protobuf parsers merge repeated occurrences of a
            # message field, so they land in the raw image that the first occurrence describes.
            data = _field_header(_DATA_FIELD, len(pixels))
            raw = _field_header(_RAW_FIELD, len(data) + len(pixels))
            image = _field_header(_IMAGE_FIELD, len(raw) + len(data) + len(pixels))
            size = len(body) + len(image) + len(raw) + len(data) + len(pixels)
            parts += [_field_header(_ITEMS_FIELD, size), body, image, raw, data, pixels]
        if self.weights:
            parts.append(pb.ScoreRequest(weights=self.weights).SerializeToString())  # field 3 of both request types
        return b"".join(parts)


def build_items(
    images: Images,
    prompts: Sequence[str | None] | None,
    metadata: Sequence[Mapping[str, Any] | None] | None,
    ids: Sequence[str],
    encoding: Encoding,
) -> tuple[list[pb.Item], list[bytes | None]]:
    """Check a batch and turn it into protobuf items, with the raw pixels of each item beside it."""
    image_list = _image_list(images)
    n = len(image_list)
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list with one prompt per image, not a single string")
    for name, values in (("prompts", prompts), ("metadata", metadata), ("ids", ids)):
        if values is not None and len(values) != n:
            raise ValueError(f"{name} has {len(values)} entries for {n} images; give one per image")
    items, pixels = [], []
    for i, image in enumerate(image_list):
        prompt = prompts[i] if prompts is not None else None
        if prompt is not None and not isinstance(prompt, str):
            raise TypeError(f"prompts[{i}] must be a str or None, got {type(prompt).__name__}")
        item = pb.Item(id=ids[i], prompt=prompt)  # filled in place: nested constructors would copy
        pixels.append(fill_image(item.image, image, f"images[{i}]", encoding))
        if metadata is not None and metadata[i] is not None:
            _fill_metadata(item.metadata, metadata[i], f"metadata[{i}]")  # type: ignore[arg-type]
        items.append(item)
    return items, pixels


def checked_items(
    reward: str,
    images: Images,
    prompts: Sequence[str | None] | None,
    metadata: Sequence[Mapping[str, Any] | None] | None,
    ids: Sequence[str] | None,
    encoding: Encoding,
    taken: set[str],
    first_id: int = 0,
    weights: Mapping[str, float] | None = None,
) -> WireBatch:
    """Check a batch for ``reward`` (or for a weighted sum of rewards, then labelled ``reward``) and build its items;
    ids default to consecutive numbers from ``first_id``."""
    if not reward:
        raise ValueError("reward must be a non-empty reward name (a label, with weights)")
    if weights is not None:
        if not weights or not all(isinstance(w, int | float) and not isinstance(w, bool) for w in weights.values()):
            raise ValueError(f"weights must map reward names to numbers, got {weights!r}")
        weights = {name: float(weight) for name, weight in weights.items()}
    if ids is None:
        ids = [str(first_id + i) for i in range(len(images))]
    check_ids(ids, taken)
    return WireBatch(reward, *build_items(images, prompts, metadata, ids, encoding), weights=weights)


def health_status(service: str, status: int | None, error: grpc.RpcError | None) -> str | None:
    """Interpret one readiness probe: None when ``service`` is SERVING, else the state to report while waiting.

    A NOT_FOUND answer means the server has no such reward, which waiting cannot fix.
    """
    if error is not None:
        if error.code() == grpc.StatusCode.NOT_FOUND:
            raise RewardServiceError(
                error.code(), f"the server has no reward {service.removeprefix('reward/')!r}", "wait_ready"
            )
        return f"{error.code().name}: {error.details()}"
    if status == health_pb2.HealthCheckResponse.SERVING:
        return None
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(status or 0))


def health_services(rewards: Iterable[str] | None) -> list[str]:
    """Health-check names to wait for: the whole server, then each named reward."""
    return ["", *(f"reward/{name}" for name in rewards or ())]


def not_ready(address: str, timeout: float, service: str, last: str) -> TimeoutError:
    return TimeoutError(f"{address} not ready after {timeout:g}s ({service or 'server'}: {last})")


class ChannelOwner:
    """What both clients share: the parsed target, deadlines, the channel and its stubs.

    ``_grpc`` is the module whose ``secure_channel``/``insecure_channel`` open the channel: grpc or grpc.aio.
    """

    _grpc: Any = grpc

    def __init__(
        self,
        server: str,
        *,
        timeout: float = 60.0,
        progress_timeout: float = 600.0,
        tls: bool | None = None,
        root_certificates: bytes | str | Path | None = None,
        auth_token: str | None = None,
        tls_server_name: str | None = None,
    ) -> None:
        """Connect to ``server`` (``host:port``, ``grpc://host:port`` or ``grpcs://host:port`` for TLS;
        ``tls_server_name``: the name the certificate must carry when ``server`` is an address it was resolved to).

        ``timeout`` is the default deadline of unary calls, in seconds. A stream has no deadline: it fails when items
        are outstanding and no answer has come for ``progress_timeout`` seconds (default of ``open_stream``), so that
        a slow producer never times it out. ``auth_token`` is sent as ``authorization: Bearer <token>``.
        """
        self.target = parse_target(server, tls=tls, root_certificates=root_certificates, auth_token=auth_token)
        self.timeout = timeout
        self.progress_timeout = progress_timeout
        if self.target.tls:
            credentials = grpc.ssl_channel_credentials(self.target.root_certificates)
            options = [
                *CHANNEL_OPTIONS,
                *((("grpc.ssl_target_name_override", tls_server_name),) if tls_server_name else ()),
            ]
            self._channel = self._grpc.secure_channel(self.target.address, credentials, options=options)
        else:
            self._channel = self._grpc.insecure_channel(self.target.address, options=CHANNEL_OPTIONS)
        self._stub = pb_grpc.RewardServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        # Scoring calls serialize WireBatch themselves (see WireBatch.serialize) instead of the generated stub's way.
        self._score = self._channel.unary_unary(
            f"/{SERVICE}/Score",
            request_serializer=WireBatch.serialize,
            response_deserializer=pb.ScoreResponse.FromString,
        )
        self._score_stream = self._channel.stream_stream(
            f"/{SERVICE}/ScoreStream",
            request_serializer=WireBatch.serialize,
            response_deserializer=pb.ScoreStreamResponse.FromString,
        )


def check_ids(ids: Sequence[str], taken: set[str]) -> None:
    """Ids must be non-empty strings, unique among themselves and not in ``taken``."""
    seen = set()
    for i, item_id in enumerate(ids):
        if not isinstance(item_id, str) or not item_id:
            raise ValueError(f"ids[{i}] must be a non-empty string, got {item_id!r}")
        if item_id in seen or item_id in taken:
            raise ValueError(
                f"ids[{i}] {item_id!r} is a duplicate; ids must be unique "
                f"{'within the stream' if item_id in taken else 'within the call'}"
            )
        seen.add(item_id)


def order_results(items: Sequence[pb.Item], results: Iterable[pb.ScoreResult]) -> list[ItemResult]:
    """Results of a unary Score call, checked to answer each item exactly once, in order."""
    parsed = [ItemResult.from_proto(r) for r in results]
    if [r.id for r in parsed] != [item.id for item in items]:
        raise RuntimeError(
            f"the server answered ids {[r.id for r in parsed][:10]} for items "
            f"{[item.id for item in items][:10]}; the contract is one result per item, in order"
        )
    return parsed


class StreamLedger:
    """Bookkeeping of one score stream: which ids were sent, which were answered, and since when it has waited.

    The progress clock restarts at every answer and whenever items go out while none was outstanding.
    """

    def __init__(self, progress_timeout: float) -> None:
        if not progress_timeout > 0:
            raise ValueError(f"progress_timeout must be > 0 seconds, got {progress_timeout}")
        self._next = 0
        self.sent: set[str] = set()
        self.answered: set[str] = set()
        self.closed = False
        self.progress_timeout = progress_timeout
        self._progress_at = time.monotonic()

    def request(
        self,
        reward: str,
        images: Images,
        prompts: Sequence[str | None] | None,
        metadata: Sequence[Mapping[str, Any] | None] | None,
        ids: Sequence[str] | None,
        encoding: Encoding,
    ) -> tuple[WireBatch, list[str]]:
        if self.closed:
            raise RuntimeError("the stream is closed; open a new one to send more items")
        batch = checked_items(reward, images, prompts, metadata, ids, encoding, taken=self.sent, first_id=self._next)
        self._next += len(batch.items)
        if not self.outstanding:
            self._progress_at = time.monotonic()
        self.sent.update(item.id for item in batch.items)
        return batch, [item.id for item in batch.items]

    def answer(self, result: pb.ScoreResult) -> ItemResult:
        if result.id not in self.sent or result.id in self.answered:
            raise RuntimeError(
                f"the server answered id {result.id!r} "
                f"{'twice' if result.id in self.answered else 'which was never sent'}"
            )
        self.answered.add(result.id)
        self._progress_at = time.monotonic()
        return ItemResult.from_proto(result)

    @property
    def done(self) -> bool:
        return self.closed and self.answered == self.sent

    @property
    def outstanding(self) -> int:
        return len(self.sent) - len(self.answered)

    def wait_time(self) -> float:
        """How long a reader may wait for the next answer before checking ``stalled`` again (0: check now)."""
        if not self.outstanding:
            return STREAM_POLL_S  # nothing is owed; look again soon, in case items go out meanwhile
        return max(0.0, min(self._progress_at + self.progress_timeout - time.monotonic(), STREAM_POLL_S * 10))

    def stalled(self) -> RewardServiceError | None:
        """DEADLINE_EXCEEDED if items are outstanding and no answer came for ``progress_timeout`` seconds."""
        if self.outstanding and time.monotonic() - self._progress_at >= self.progress_timeout:
            return RewardServiceError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"no answer for {self.progress_timeout:g}s with {self.outstanding} item(s) outstanding",
                "ScoreStream",
            )
        return None

    def unanswered_error(self) -> RewardServiceError:
        """The server ended the stream (as when it shuts down) before answering every item."""
        missing = sorted(self.sent - self.answered)
        return RewardServiceError(
            grpc.StatusCode.UNAVAILABLE,
            f"the server ended the stream with {len(missing)} item(s) unanswered, e.g. {missing[:5]}",
            "ScoreStream",
        )


def items_from(entries: Iterable[ScoreItem | ImageInput]) -> Iterable[ScoreItem]:
    for entry in entries:
        yield entry if isinstance(entry, ScoreItem) else ScoreItem(image=entry)
