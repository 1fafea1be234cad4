"""A reward computed elsewhere: the server forwards each batch to a remote endpoint and serves it as its own.

    grpc://host:port/REWARD     another ddpo reward server (grpcs:// for TLS)
    triton://host:port/MODEL    a Triton model with the ddpo tensor contract (``ddpo triton export``)
    http(s)://host/PATH         a plain HTTP endpoint speaking the JSON contract below (docs/custom-rewards.md)

Every forwarded call has a deadline (``timeout_s``). Items answered UNAVAILABLE, and calls that fail with
UNAVAILABLE, are retried with exponential backoff, ``max_attempts`` times in all, within that deadline; every other
answer passes through as it is, an error included (its message says which endpoint gave it). ``check_health`` lets
the server mirror the endpoint's health in its own health service.

The HTTP JSON contract: ``POST`` to the URL

    {"reward": "NAME", "items": [{"id": "0", "prompt": "a cat" | null, "metadata": {...},
                                  "image": {"format": "png", "data": "<base64 PNG>"}}]}
    (or "image": {"format": "raw", "data": "<base64 of H*W*C uint8, row-major HWC>", "shape": [H, W, C],
                  "dtype": "uint8"} with image_format = "raw")

answered with ``200`` and

    {"results": [{"id": "0", "score": 1.5, "components": {"x": 1.0}, "info": {"caption": "..."}},
                 {"id": "1", "error": {"code": "INVALID_ARGUMENT", "message": "why"}}]}
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import math
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
from PIL import Image

from clients import AnyRewardClient, ItemResult, RewardInfo, RewardServiceError, open_client
from clients.cli_support import read_token_file
from reward_server.rewards.base import ImageSpec, ItemError, Metadata, Reward, RewardOutput, RewardSpec

REMOTE = "remote"  # the reward type
SCHEMES = ("grpc", "grpcs", "triton", "http", "https")
_RETRY_BACKOFF_S = 0.1
_HEALTH_TIMEOUT_S = 2.0
_CODES = {code.name: code for code in grpc.StatusCode}
# HTTP statuses a call as a whole may fail with, as gRPC codes (https://grpc.github.io/grpc/core/md_doc_http-grpc-status-mapping.html)
_HTTP_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    429: grpc.StatusCode.UNAVAILABLE,
    502: grpc.StatusCode.UNAVAILABLE,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


@dataclasses.dataclass(frozen=True)
class EndpointUrl:
    scheme: str
    address: str  # host:port for grpc and triton, the whole URL for http
    remote_name: str


def parse_endpoint_url(url: str, served_name: str) -> EndpointUrl:
    """Split an endpoint URL; ValueError, with the accepted forms, when it is not one."""
    parts = urllib.parse.urlsplit(url)
    forms = "grpc://HOST:PORT/REWARD, grpcs://HOST:PORT/REWARD, triton://HOST:PORT/MODEL or http(s)://HOST[:PORT]/PATH"
    if parts.scheme not in SCHEMES or not parts.hostname:
        raise ValueError(f"endpoint url {url!r} is not one of {forms}")
    if parts.username is not None or parts.password is not None:  # the URL is saved and logged: no secrets in it
        raise ValueError(
            f"endpoint url {parts._replace(netloc=parts.hostname).geturl()!r} carries credentials; "
            "put the token in a file and pass it as the auth_token_file option"
        )
    if parts.scheme in ("http", "https"):
        return EndpointUrl(parts.scheme, url, served_name)
    try:
        port = parts.port
    except ValueError:
        port = None
    if port is None or parts.query or parts.fragment or parts.path.count("/") > 1:
        raise ValueError(f"endpoint url {url!r} is not one of {forms} (a port is required)")
    return EndpointUrl(parts.scheme, parts.netloc, parts.path.strip("/") or served_name)


class RemoteReward(Reward):
    """Forwards batches to ``url``; see the module docstring."""

    preferred_instances = 4  # waiting on the network: several batches in flight
    preferred_max_batch_size = 32

    def __init__(
        self,
        name: str,
        url: str,
        timeout_s: float = 30.0,
        max_attempts: int = 3,
        auth_token_file: str | None = None,
        root_certificates: str | None = None,
        image_format: str = "png",
        health_url: str | None = None,
        description: str | None = None,
        units: str | None = None,
        higher_is_better: bool | None = None,
        requires_prompt: bool | None = None,
    ) -> None:
        self.endpoint = parse_endpoint_url(url, name)
        self.url = url
        if not (isinstance(timeout_s, int | float) and 0 < timeout_s <= 3600):
            raise ValueError(f"timeout_s must be in (0, 3600] seconds, got {timeout_s!r}")
        if not (isinstance(max_attempts, int) and 1 <= max_attempts <= 10):
            raise ValueError(f"max_attempts must be an int in 1..10, got {max_attempts!r}")
        if image_format not in ("png", "raw"):
            raise ValueError(f"image_format must be 'png' or 'raw', got {image_format!r}")
        is_http = self.endpoint.scheme in ("http", "https")
        own_spec = {
            "description": description,
            "units": units,
            "higher_is_better": higher_is_better,
            "requires_prompt": requires_prompt,
        }
        given = {key: value for key, value in own_spec.items() if value is not None}
        if given and not is_http:
            raise ValueError(
                f"option(s) {', '.join(given)} describe HTTP endpoints; {self.endpoint.scheme}:// endpoints report "
                "their own spec"
            )
        if (health_url is not None or image_format != "png") and not is_http:
            raise ValueError("health_url and image_format are options of HTTP endpoints")
        if root_certificates is not None and is_http:
            raise ValueError("root_certificates is an option of grpcs:// and triton:// endpoints")
        self.timeout_s = float(timeout_s)
        self.max_attempts = max_attempts
        self._token_file = auth_token_file
        self._root_certificates = root_certificates
        self._image_format = image_format
        self._health_url = health_url
        self.spec = RewardSpec(
            name=name,
            description=description or f"remote reward at {url}",
            version="remote",
            units=units or "",
            higher_is_better=True if higher_is_better is None else higher_is_better,
            requires_prompt=bool(requires_prompt),
        )
        self._client: AnyRewardClient | None = None
        self._token: str | None = None

    # --- lifecycle ----------------------------------------------------------------------------------------------

    def load(self) -> None:
        """Open the connection and, for grpc and triton, take the remote reward's spec (served under our name)."""
        if self._token_file is not None:
            self._token = read_token_file(self._token_file, f"reward {self.spec.name!r}: auth_token_file")
        scheme, remote = self.endpoint.scheme, self.endpoint.remote_name
        if scheme in ("http", "https"):
            return
        client = open_client(
            f"{scheme}://{self.endpoint.address}",
            timeout=self.timeout_s,
            root_certificates=self._root_certificates,
            auth_token=self._token,
        )
        try:
            offered = {info.name: info for info in client.list_rewards()}
        except RewardServiceError as error:  # keeps its code: UNAVAILABLE says to try again later
            client.close()
            raise RewardServiceError(error.code, f"endpoint {self.url} cannot be used: {error.message}") from None
        if remote not in offered:
            client.close()
            raise RuntimeError(f"endpoint {self.url}: no reward {remote!r}; it offers {', '.join(sorted(offered))}")
        if offered[remote].load_error:
            client.close()
            reason = offered[remote].load_error
            raise RuntimeError(f"endpoint {self.url}: reward {remote!r} failed to load there: {reason}")
        self.spec = _spec_from_info(self.spec.name, offered[remote])
        self._client = client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def check_health(self) -> str | None:
        """None when the endpoint serves the reward, else why not."""
        try:
            if self._client is not None:
                self._client.wait_ready(timeout=_HEALTH_TIMEOUT_S, rewards=[self.endpoint.remote_name])
            elif self._health_url is not None:
                request = urllib.request.Request(self._health_url, headers=self._headers())
                with urllib.request.urlopen(request, timeout=_HEALTH_TIMEOUT_S) as response:
                    response.read()
        except urllib.error.HTTPError as error:
            return f"{self._health_url} answered HTTP {error.code}"
        except (TimeoutError, OSError, RewardServiceError) as error:
            return f"endpoint {self.url} is not serving: {error}"
        return None

    # --- scoring ------------------------------------------------------------------------------------------------

    def score(
        self,
        images: Sequence[npt.NDArray[np.uint8]],
        prompts: Sequence[str | None],
        metadata: Sequence[Metadata],
    ) -> RewardOutput:
        deadline = time.monotonic() + self.timeout_s
        answers: list[ItemResult | ItemError | None] = [None] * len(images)
        pending = list(range(len(images)))
        for attempt in range(1, self.max_attempts + 1):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                subset = [images[i] for i in pending], [prompts[i] for i in pending], [metadata[i] for i in pending]
                results = self._forward(*subset, remaining)
            except RewardServiceError as error:
                results = [ItemError(error.code, error.message)] * len(pending)
            for index, result in zip(pending, results, strict=True):
                answers[index] = result
            pending = [i for i in pending if _code(answers[i]) == grpc.StatusCode.UNAVAILABLE]
            if not pending or attempt == self.max_attempts:
                break
            time.sleep(min(_RETRY_BACKOFF_S * 2 ** (attempt - 1), max(0.0, deadline - time.monotonic())))
        return self._output(answers)

    def _output(self, answers: Sequence[ItemResult | ItemError | None]) -> RewardOutput:
        scores = np.full(len(answers), np.nan)
        errors: list[ItemError | None] = []
        info: list[dict[str, str]] = []
        components: dict[str, npt.NDArray[np.float64]] = {}
        for i, answer in enumerate(answers):
            info.append({})
            if answer is None:
                answer = ItemError(grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer within timeout_s={self.timeout_s}")
            if isinstance(answer, ItemError):
                errors.append(ItemError(answer.code, f"endpoint {self.url}: {answer.message}"))
                continue
            if not answer.ok:
                errors.append(ItemError(answer.code, f"endpoint {self.url}: {answer.message}"))
                continue
            errors.append(None)
            scores[i] = answer.score
            info[i] = dict(answer.info)
            for key, value in answer.components.items():
                components.setdefault(key, np.full(len(answers), np.nan))[i] = value
        return RewardOutput(scores=scores, components=components, info=info, errors=errors)

    def _forward(
        self,
        images: list[npt.NDArray[np.uint8]],
        prompts: list[str | None],
        metadata: list[Metadata],
        timeout: float,
    ) -> list[ItemResult | ItemError]:
        if self._client is not None:
            batch = self._client.score(
                self.endpoint.remote_name, images, prompts=prompts, metadata=list(metadata), timeout=timeout
            )
            return list(batch.items)
        return self._post_json(images, prompts, metadata, timeout)

    # --- HTTP JSON ------------------------------------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._token}"} if self._token else {}

    def _post_json(
        self,
        images: list[npt.NDArray[np.uint8]],
        prompts: list[str | None],
        metadata: list[Metadata],
        timeout: float,
    ) -> list[ItemResult | ItemError]:
        ids = [str(i) for i in range(len(images))]
        body = {
            "reward": self.endpoint.remote_name,
            "items": [
                {"id": item_id, "image": self._encode(image), "prompt": prompt, "metadata": dict(meta)}
                for item_id, image, prompt, meta in zip(ids, images, prompts, metadata, strict=True)
            ],
        }
        request = urllib.request.Request(
            self.url,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", **self._headers()},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                payload = response.read()
        except urllib.error.HTTPError as error:
            detail = error.read()[:500].decode(errors="replace").strip()
            code = _HTTP_CODES.get(error.code, grpc.StatusCode.INTERNAL)
            raise RewardServiceError(code, f"HTTP {error.code} {error.reason}: {detail}") from None
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            if isinstance(reason, TimeoutError):
                raise RewardServiceError(grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer in {timeout:.1f} s") from None
            raise RewardServiceError(grpc.StatusCode.UNAVAILABLE, f"cannot reach it: {reason}") from None
        return _parse_answer(payload, ids)

    def _encode(self, image: npt.NDArray[np.uint8]) -> dict[str, Any]:
        if self._image_format == "raw":
            data = np.ascontiguousarray(image).tobytes()
            encoded = base64.b64encode(data).decode()
            return {"format": "raw", "data": encoded, "shape": list(image.shape), "dtype": "uint8"}
        buffer = io.BytesIO()
        Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(buffer, format="PNG")
        return {"format": "png", "data": base64.b64encode(buffer.getvalue()).decode()}


def _code(answer: ItemResult | ItemError | None) -> grpc.StatusCode | None:
    return None if answer is None else answer.code


def _spec_from_info(name: str, info: RewardInfo) -> RewardSpec:
    return RewardSpec(
        name=name,
        description=info.description,
        version=info.version,
        units=info.units,
        higher_is_better=info.higher_is_better,
        requires_prompt=info.requires_prompt,
        image_spec=ImageSpec(channels=info.channels, min_size=info.min_size, max_size=info.max_size),
        component_names=info.component_names,
    )


def _parse_answer(payload: bytes, ids: list[str]) -> list[ItemResult | ItemError]:
    """One answer per id from an HTTP endpoint's JSON; a malformed answer is the endpoint's bug (INTERNAL)."""

    def broken(why: str) -> RewardServiceError:
        return RewardServiceError(grpc.StatusCode.INTERNAL, f"malformed answer: {why}")

    try:
        document = json.loads(payload)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise broken(f"not JSON ({error})") from None
    results = document.get("results") if isinstance(document, dict) else None
    if not isinstance(results, list):
        raise broken('expected an object with a "results" list')
    by_id: dict[str, ItemResult | ItemError] = {}
    for position, result in enumerate(results):
        if not isinstance(result, dict) or result.get("id") not in ids:
            raise broken(f"results[{position}] has no id of the request's items")
        by_id[result["id"]] = _item_answer(result, position, broken)
    return [
        by_id.get(item_id, ItemError(grpc.StatusCode.INTERNAL, f"malformed answer: item {item_id!r} has no result"))
        for item_id in ids
    ]


def _item_answer(
    result: dict[str, Any], position: int, broken: Callable[[str], RewardServiceError]
) -> ItemResult | ItemError:
    error = result.get("error")
    if error is not None:
        if not isinstance(error, dict) or error.get("code") not in _CODES or error.get("code") == "OK":
            raise broken(f'results[{position}].error must be {{"code": "<gRPC code name>", "message": "..."}}')
        return ItemError(_CODES[error["code"]], str(error.get("message", "")))
    score = result.get("score")
    if isinstance(score, bool) or not isinstance(score, int | float) or not math.isfinite(score):
        raise broken(f"results[{position}].score must be a finite number, got {score!r}")
    components, info = result.get("components", {}), result.get("info", {})
    if not isinstance(components, dict) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in components.values()
    ):
        raise broken(f"results[{position}].components must map names to numbers")
    if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
        raise broken(f"results[{position}].info must map names to strings")
    return ItemResult(
        id=result["id"],
        code=grpc.StatusCode.OK,
        message="",
        score=float(score),
        components={str(k): float(v) for k, v in components.items()},
        info={str(k): v for k, v in info.items()},
    )
