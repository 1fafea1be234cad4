"""What the client returns: plain dataclasses, no protobuf; and ``RewardClientLike``, the API every blocking client
has."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, Protocol

import grpc
import numpy as np
import numpy.typing as npt

from clients.errors import ItemsFailedError
from clients.generated.ddpo.reward.v1 import reward_pb2 as pb

if TYPE_CHECKING:
    from clients._wire import Encoding, Images

_CODES = {code.value[0]: code for code in grpc.StatusCode}


@dataclasses.dataclass(frozen=True)
class EncodedImage:
    """An already encoded PNG or JPEG file, sent as is and decoded by the server."""

    data: bytes
    format: Literal["png", "jpeg"] | None = None  # None: the server detects it


@dataclasses.dataclass(frozen=True)
class ScoreItem:
    """One item for a stream: an (H, W, C) uint8 array or an EncodedImage, with optional prompt and metadata."""

    image: npt.NDArray[np.uint8] | EncodedImage
    prompt: str | None = None
    metadata: Mapping[str, Any] | None = None
    id: str | None = None


@dataclasses.dataclass(frozen=True)
class RewardInfo:
    """A reward the server offers (``ListRewards``)."""

    name: str
    description: str
    version: str
    units: str
    higher_is_better: bool
    requires_prompt: bool
    channels: tuple[int, ...]
    min_size: tuple[int, int]  # (height, width)
    max_size: tuple[int, int]
    component_names: tuple[str, ...]
    load_error: str = ""
    """Why the server could not load this reward ("" if it has loaded or is still loading)."""

    @classmethod
    def from_proto(cls, spec: pb.RewardSpec, load_error: str = "") -> RewardInfo:
        image = spec.image_spec
        return cls(
            name=spec.name,
            description=spec.description,
            version=spec.version,
            units=spec.units,
            higher_is_better=spec.direction != pb.DIRECTION_LOWER_IS_BETTER,
            requires_prompt=spec.requires_prompt,
            channels=tuple(image.channels),
            min_size=(image.min_height, image.min_width),
            max_size=(image.max_height, image.max_width),
            component_names=tuple(spec.component_names),
            load_error=load_error,
        )

    @classmethod
    def from_listing(cls, response: pb.ListRewardsResponse) -> list[RewardInfo]:
        return [cls.from_proto(spec, response.load_errors.get(spec.name, "")) for spec in response.rewards]


@dataclasses.dataclass(frozen=True)
class ItemResult:
    """The answer for one item. ``score`` is NaN unless ``ok``; ``code``/``message`` say why it failed."""

    id: str
    code: grpc.StatusCode
    message: str
    score: float
    components: dict[str, float]
    info: dict[str, str]

    @property
    def ok(self) -> bool:
        return bool(self.code == grpc.StatusCode.OK)

    @classmethod
    def from_proto(cls, result: pb.ScoreResult) -> ItemResult:
        code = _CODES.get(result.status.code, grpc.StatusCode.UNKNOWN)
        ok = code == grpc.StatusCode.OK
        return cls(
            id=result.id,
            code=code,
            message=result.status.message,
            score=result.score if ok else float("nan"),
            components=dict(result.components),
            info=dict(result.info),
        )


@dataclasses.dataclass(frozen=True)
class BatchResult:
    """Results of one ``score`` call, in the order of the items sent."""

    items: list[ItemResult]

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.items)

    @property
    def failed(self) -> list[ItemResult]:
        return [r for r in self.items if not r.ok]

    @property
    def scores(self) -> npt.NDArray[np.float64]:
        """Scores as an array; raises ItemsFailedError if any item failed (a failure never becomes a number)."""
        if not self.ok:
            raise ItemsFailedError(self.failed)
        return np.array([r.score for r in self.items], dtype=np.float64)

    def __len__(self) -> int:
        return len(self.items)


class ScoreStreamLike(Protocol):
    """A stream of score requests, as ``RewardClientLike.open_stream`` opens it (``clients.client.ScoreStream``)."""

    def send(
        self,
        reward: str,
        images: Images,
        prompts: Sequence[str | None] | None = None,
        metadata: Sequence[Mapping[str, Any] | None] | None = None,
        ids: Sequence[str] | None = None,
        encoding: Encoding = "raw",
    ) -> list[str]: ...

    def close(self) -> None: ...

    def cancel(self) -> None: ...

    def results(self) -> Iterator[ItemResult]: ...


class RewardClientLike(Protocol):
    """The blocking client API: ``RewardClient`` (gRPC), ``TritonRewardClient`` and ``ReplicaSet`` (any number of
    either) all have it, so code written against it takes any of them (``clients.client.RewardClient`` documents each
    method)."""

    def close(self) -> None: ...

    def wait_ready(self, timeout: float = 30.0, rewards: Iterable[str] | None = None) -> None: ...

    def list_rewards(self, timeout: float | None = None) -> list[RewardInfo]: ...

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
    ) -> BatchResult: ...

    def open_stream(self, progress_timeout: float | None = None) -> ScoreStreamLike: ...
