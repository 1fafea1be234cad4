"""Python client of the DDPO reward service (grpcio, protobuf and numpy only).

from clients import RewardClient
with RewardClient("127.0.0.1:50051") as client:
    scores = client.score("jpeg_compressibility", images).scores
"""

from clients.aio import AsyncRewardClient, AsyncScoreStream
from clients.client import RewardClient, ScoreStream
from clients.connect import AnyRewardClient, open_client
from clients.errors import ItemsFailedError, RewardServiceError
from clients.triton import TritonRewardClient, TritonScoreStream
from clients.types import (
    BatchResult,
    EncodedImage,
    ItemResult,
    RewardClientLike,
    RewardInfo,
    ScoreItem,
    ScoreStreamLike,
)

__all__ = [
    "AnyRewardClient",
    "AsyncRewardClient",
    "AsyncScoreStream",
    "BatchResult",
    "EncodedImage",
    "ItemResult",
    "ItemsFailedError",
    "RewardClient",
    "RewardClientLike",
    "RewardInfo",
    "RewardServiceError",
    "ScoreItem",
    "ScoreStream",
    "ScoreStreamLike",
    "TritonRewardClient",
    "TritonScoreStream",
    "open_client",
]
