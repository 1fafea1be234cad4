"""Protobuf items to validated numpy inputs, and reward outputs back to protobuf results.

Every check names the field it rejects (``items[3].image.raw``) so that the same text works in a gRPC status and
in a per-item result.
"""

from __future__ import annotations

import dataclasses
import io
import struct
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
_KNOWN_FORMATS = set(pb.ImageFormat.values())
# Pillow modes that decode to an array of 1, 3 or 4 channels without losing information.
_MODE_CHANNELS = {"L": 1, "RGB": 3, "RGBA": 4}
QUOTE_LIMIT = 64
DECODED_BYTES_PER_PIXEL = 4  # what an encoded image may decode to at most (RGBA), for the decoding budgets
# JPEG start-of-frame markers, whose segment holds the image size
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def quote(text: str, limit: int = QUOTE_LIMIT) -> str:
    """``repr`` of a string taken from a request, cut to ``limit`` characters plus "…": a 16 KB reward name must not
    fill an error message (gRPC clients refuse metadata that large) or a log line."""
    return repr(text if len(text) <= limit else text[:limit] + "…")


def header_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) of a PNG or JPEG read from its header alone, before anything is decoded; None if the header
    does not say (a truncated or corrupt file, which decoding then reports)."""
    if data.startswith(PNG_MAGIC):
        if len(data) < 24 or data[12:16] != b"IHDR":
            return None
        width, height = struct.unpack(">II", data[16:24])
        return height, width
    position = 2  # after the start-of-image marker
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a segment
            position += 2
            continue
        (length,) = struct.unpack(">H", data[position + 2 : position + 4])
        if marker in _JPEG_SOF:
            if position + 9 > len(data):
                return None
            height, width = struct.unpack(">HH", data[position + 5 : position + 9])
            return height, width
        position += 2 + length
    return None


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
            f"{field}.dtype is {dtype}; reward {quote(spec.name)} accepts DTYPE_UINT8 only "
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


def encoded_size(encoded: pb.EncodedImage, field: str, spec: RewardSpec, max_pixels: int) -> tuple[int, int]:
    """(height, width) of an encoded image from its header, checked against ``max_pixels`` and the reward's largest
    size before anything is decoded; ItemInvalid naming the field otherwise (an unknown format value included)."""
    if encoded.format not in _KNOWN_FORMATS:
        raise ItemInvalid(
            f"{field}.format is {encoded.format}, not an ImageFormat value; use IMAGE_FORMAT_PNG, IMAGE_FORMAT_JPEG "
            "or leave it unset"
        )
    data = encoded.data
    detected = sniff_format(data)
    if detected == pb.IMAGE_FORMAT_UNSPECIFIED:
        raise ItemInvalid(f"{field}.data is not a PNG or JPEG file (starts with {data[:8]!r})")
    if encoded.format not in (pb.IMAGE_FORMAT_UNSPECIFIED, detected):
        raise ItemInvalid(
            f"{field}.format says {pb.ImageFormat.Name(encoded.format)} but the bytes are {_FORMAT_NAMES[detected]}"
        )
    name = _FORMAT_NAMES[detected]
    size = header_size(data)
    if size is None:
        raise ItemInvalid(f"{field}.data: cannot decode {name}: its header does not give the image size")
    height, width = size
    if height * width > max_pixels:
        raise ItemInvalid(
            f"{field}: {name} of size {height}x{width} has {height * width} pixels, over the server's limit of "
            f"{max_pixels} per image (max_image_pixels)"
        )
    max_h, max_w = spec.image_spec.max_size
    if height > max_h or width > max_w:
        raise ItemInvalid(
            f"{field}: {name} of size {height}x{width} exceeds the maximum {max_h}x{max_w} of reward {quote(spec.name)}"
        )
    return height, width


def _decode_encoded(encoded: pb.EncodedImage, field: str, spec: RewardSpec) -> npt.NDArray[np.uint8]:
    """Decode a PNG or JPEG whose header ``encoded_size`` has checked."""
    name = _FORMAT_NAMES[sniff_format(encoded.data)]
    try:
        with Image.open(io.BytesIO(encoded.data), formats=[name]) as opened:
            width, height = opened.size
            image: Image.Image = opened
            if image.mode == "P":
                image = image.convert("RGBA" if "transparency" in image.info else "RGB")
            if image.mode not in _MODE_CHANNELS:
                raise ItemInvalid(f"{field}: {name} has pixel mode {image.mode!r}; send 8-bit grayscale, RGB or RGBA")
            array = np.asarray(image, dtype=np.uint8)
    except UnidentifiedImageError:
        raise ItemInvalid(f"{field}.data: cannot decode {name}: not a readable {name} file") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise ItemInvalid(f"{field}.data: cannot decode {name}: {error}") from None
    array = array.reshape(height, width, _MODE_CHANNELS[image.mode])
    problem = spec.image_spec.check(*array.shape)
    if problem:
        raise ItemInvalid(f"{field}: decoded {name} {problem}")
    return array


def decoded_bytes(item: pb.Item, field: str, spec: RewardSpec, max_pixels: int) -> int:
    """How many bytes ``item``'s image takes once decoded (for the decoding budgets), found without decoding it;
    ItemInvalid if it is empty or its size is not acceptable."""
    kind = item.image.WhichOneof("kind")
    if kind == "raw":
        raw = item.image.raw
        return int(raw.height) * int(raw.width) * int(raw.channels)
    if kind == "encoded":
        height, width = encoded_size(item.image.encoded, f"{field}.image.encoded", spec, max_pixels)
        return height * width * DECODED_BYTES_PER_PIXEL
    raise ItemInvalid(
        f"{field}.image is empty; set image.raw (uint8 HWC bytes with their shape) or image.encoded (PNG/JPEG bytes)"
    )


def decode_item(item: pb.Item, field: str, spec: RewardSpec) -> DecodedItem:
    """Validate ``item`` (found at ``field``, e.g. "items[3]"), whose size ``decoded_bytes`` has checked, for the
    reward ``spec``; raise ItemInvalid."""
    if item.image.WhichOneof("kind") == "raw":
        image = _decode_raw(item.image.raw, f"{field}.image.raw", spec)
    else:
        image = _decode_encoded(item.image.encoded, f"{field}.image.encoded", spec)
    prompt = item.prompt if item.HasField("prompt") else None
    check_prompt(prompt, f"{field}.prompt", spec)
    metadata = json_format.MessageToDict(item.metadata) if item.HasField("metadata") else {}
    return DecodedItem(id=item.id, image=image, prompt=prompt, metadata=metadata)


def check_prompt(prompt: str | None, field: str, spec: RewardSpec) -> None:
    """Raise ItemInvalid if ``spec`` needs a prompt and ``prompt`` (found at ``field``) is missing or empty."""
    if spec.requires_prompt and not prompt:
        raise ItemInvalid(
            f"{field} is {'empty' if prompt == '' else 'missing'}; reward {quote(spec.name)} "
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
