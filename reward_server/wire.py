"""Protobuf items to validated numpy inputs, and reward outputs back to protobuf results.

Every check names the field it rejects (``items[3].image.raw``) so that the same text works in a gRPC status and
in a per-item result.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
from google.protobuf import json_format
from PIL import Image, UnidentifiedImageError

from clients.generated.ddpo.reward.v1 import reward_pb2 as pb
from reward_server.rewards import ItemError, RewardSpec

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
_FORMAT_NAMES: dict[int, str] = {pb.IMAGE_FORMAT_PNG: "PNG", pb.IMAGE_FORMAT_JPEG: "JPEG"}
# Pillow modes that decode to an array of 1, 3 or 4 channels without losing information.
_MODE_CHANNELS = {"L": 1, "RGB": 3, "RGBA": 4}


@dataclasses.dataclass(frozen=True)
class DecodedItem:
    """One validated item, ready for ``Reward.score``."""

    id: str
    image: npt.NDArray[np.uint8]  # (H, W, C)
    prompt: str | None
    metadata: dict[str, Any]


class ItemInvalid(Exception):
    """An item that fails validation; it carries the per-item INVALID_ARGUMENT error."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.error = ItemError(grpc.StatusCode.INVALID_ARGUMENT, message)


def sniff_format(data: bytes) -> int:
    """The ImageFormat of encoded bytes, or IMAGE_FORMAT_UNSPECIFIED when they are neither PNG nor JPEG."""
    if data.startswith(PNG_MAGIC):
        return int(pb.IMAGE_FORMAT_PNG)
    if data.startswith(JPEG_MAGIC):
        return int(pb.IMAGE_FORMAT_JPEG)
    return int(pb.IMAGE_FORMAT_UNSPECIFIED)


def _decode_raw(raw: pb.RawImage, field: str, spec: RewardSpec) -> npt.NDArray[np.uint8]:
    if raw.dtype not in (pb.DTYPE_UNSPECIFIED, pb.DTYPE_UINT8):
        dtype = pb.DType.Name(raw.dtype) if raw.dtype in pb.DType.values() else f"unknown value {raw.dtype}"
        raise ItemInvalid(
            f"{field}.dtype is {dtype}; reward {spec.name!r} accepts DTYPE_UINT8 only "
            f"(convert floats in [0, 1] with (x * 255).round().clip(0, 255).astype(uint8))"
        )
    problem = spec.image_spec.check(raw.height, raw.width, raw.channels)
    if problem:
        raise ItemInvalid(f"{field}: {problem}")
    expected = raw.height * raw.width * raw.channels
    data = raw.data  # each attribute read copies the bytes out of the message: read once
    if len(data) != expected:
        raise ItemInvalid(
            f"{field}.data has {len(data)} bytes; a {raw.height}x{raw.width}x{raw.channels} "
            f"uint8 image (HWC) needs exactly {expected}"
        )
    return np.frombuffer(data, dtype=np.uint8).reshape(raw.height, raw.width, raw.channels)


def _decode_encoded(encoded: pb.EncodedImage, field: str, spec: RewardSpec) -> npt.NDArray[np.uint8]:
    detected = sniff_format(encoded.data)
    if detected == pb.IMAGE_FORMAT_UNSPECIFIED:
        raise ItemInvalid(f"{field}.data is not a PNG or JPEG file (starts with {encoded.data[:8]!r})")
    if encoded.format not in (pb.IMAGE_FORMAT_UNSPECIFIED, detected):
        raise ItemInvalid(
            f"{field}.format says {pb.ImageFormat.Name(encoded.format)} but the bytes are {_FORMAT_NAMES[detected]}"
        )
    name = _FORMAT_NAMES[detected]
    try:
        with Image.open(io.BytesIO(encoded.data), formats=[name]) as opened:
            width, height = opened.size  # read from the header: the size is checked before anything is decoded
            max_h, max_w = spec.image_spec.max_size
            if height > max_h or width > max_w:
                raise ItemInvalid(
                    f"{field}: {name} of size {height}x{width} exceeds the maximum {max_h}x{max_w} "
                    f"of reward {spec.name!r}"
                )
            image: Image.Image = opened
            if image.mode == "P":
                image = image.convert("RGBA" if "transparency" in image.info else "RGB")
            if image.mode not in _MODE_CHANNELS:
                raise ItemInvalid(f"{field}: {name} has pixel mode {image.mode!r}; send 8-bit grayscale, RGB or RGBA")
            array = np.asarray(image, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as error:
        raise ItemInvalid(f"{field}.data: cannot decode {name}: {error}") from None
    array = array.reshape(height, width, _MODE_CHANNELS[image.mode])
    problem = spec.image_spec.check(*array.shape)
    if problem:
        raise ItemInvalid(f"{field}: decoded {name} {problem}")
    return array


def decode_item(item: pb.Item, field: str, spec: RewardSpec) -> DecodedItem:
    """Validate ``item`` (found at ``field``, e.g. "items[3]") for the reward ``spec``; raise ItemInvalid."""
    kind = item.image.WhichOneof("kind")
    if kind == "raw":
        image = _decode_raw(item.image.raw, f"{field}.image.raw", spec)
    elif kind == "encoded":
        image = _decode_encoded(item.image.encoded, f"{field}.image.encoded", spec)
    else:
        raise ItemInvalid(
            f"{field}.image is empty; set image.raw (uint8 HWC bytes with their shape) or "
            f"image.encoded (PNG/JPEG bytes)"
        )
    prompt = item.prompt if item.HasField("prompt") else None
    check_prompt(prompt, f"{field}.prompt", spec)
    metadata = json_format.MessageToDict(item.metadata) if item.HasField("metadata") else {}
    return DecodedItem(id=item.id, image=image, prompt=prompt, metadata=metadata)


def check_prompt(prompt: str | None, field: str, spec: RewardSpec) -> None:
    """Raise ItemInvalid if ``spec`` needs a prompt and ``prompt`` (found at ``field``) is missing or empty."""
    if spec.requires_prompt and not prompt:
        raise ItemInvalid(
            f"{field} is {'empty' if prompt == '' else 'missing'}; reward {spec.name!r} "
            f"requires the prompt the image was generated from"
        )


def spec_to_proto(spec: RewardSpec) -> pb.RewardSpec:
    image_spec = spec.image_spec
    return pb.RewardSpec(
        name=spec.name,
        description=spec.description,
        version=spec.version,
        units=spec.units,
        direction=pb.DIRECTION_HIGHER_IS_BETTER if spec.higher_is_better else pb.DIRECTION_LOWER_IS_BETTER,
        requires_prompt=spec.requires_prompt,
        image_spec=pb.ImageSpec(
            channels=image_spec.channels,
            dtypes=[pb.DTYPE_UINT8],
            min_height=image_spec.min_size[0],
            min_width=image_spec.min_size[1],
            max_height=image_spec.max_size[0],
            max_width=image_spec.max_size[1],
        ),
        component_names=spec.component_names,
    )


def error_result(item_id: str, error: ItemError) -> pb.ScoreResult:
    return pb.ScoreResult(id=item_id, status=pb.Status(code=error.code.value[0], message=error.message))


def ok_result(item_id: str, score: float, components: dict[str, float], info: dict[str, str]) -> pb.ScoreResult:
    return pb.ScoreResult(id=item_id, status=pb.Status(code=0), score=score, components=components, info=info)
