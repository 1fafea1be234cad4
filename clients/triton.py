"""The reward service on Triton Inference Server: ``triton://host:port`` speaks KServe v2 gRPC (``tritonclient.grpc``).

with TritonRewardClient("triton://127.0.0.1:8001") as client:     # the same API as RewardClient
    client.wait_ready(timeout=30, rewards=["aesthetic"])
    batch = client.score("aesthetic", images)

Each reward is a Triton model (``ddpo triton export``, or ``ddpo serve --frontend pytriton``), with the tensors of
``clients.triton_contract``. Items are checked here exactly as for the gRPC server. Triton takes one image size per
request, so a call sends one request per size; encoded files are decoded here (Pillow). Items Triton cannot take (1 or 4
channels, undecodable files) fail alone with INVALID_ARGUMENT; the model answers every other item on its own, and
errors of a whole request (unknown model, deadline, server down) raise ``RewardServiceError``, with the same
status codes as the gRPC server.
"""

from __future__ import annotations

import concurrent.futures
import io
import json
import queue
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
from google.protobuf import json_format

from clients import triton_contract as tc
from clients._wire import (
    Encoding,
    Images,
    StreamLedger,
    WireBatch,
    check_host_port,
    checked_items,
    not_ready,
    order_results,
)
from clients.errors import RewardServiceError
from clients.generated.ddpo.reward.v1 import reward_pb2 as pb
from clients.types import BatchResult, ItemResult, RewardInfo

SCHEME = "triton://"
_STREAM_REQUESTS_IN_FLIGHT = 4


def _tritonclient() -> Any:
    try:
        import tritonclient.grpc
    except ImportError:
        from clients.cli_support import missing_extra_message  # not at the top: cli_support imports this module

        message = missing_extra_message("a triton:// address", "tritonclient", "triton")
        raise ModuleNotFoundError(message, name="tritonclient") from None
    return tritonclient.grpc


def triton_address(server: str) -> str:
    """``host:port`` of a ``triton://host:port`` address; ValueError if it is not one."""
    address = server.removeprefix(SCHEME) if server.startswith(SCHEME) else ""
    check_host_port(server, address, "triton://HOST:PORT (Triton's gRPC port, e.g. 8001)")
    return address


def _decode_file(data: bytes) -> npt.NDArray[np.uint8]:
    """An encoded PNG/JPEG as an (H, W, C) array: Triton takes pixels, so files are decoded here (Pillow)."""
    try:
        from PIL import Image
    except ImportError:
        raise ValueError("is an encoded file, and decoding it for Triton needs Pillow (pip install pillow)") from None
    try:
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image.convert("RGB") if image.mode in ("P", "CMYK", "YCbCr") else image)
    except (OSError, SyntaxError) as error:
        raise ValueError(f"cannot be decoded as PNG or JPEG: {error}") from None


def _service_error(error: Exception, method: str) -> RewardServiceError:
    """Map a tritonclient InferenceServerException ("StatusCode.NOT_FOUND", message) to our exception."""
    status = str(getattr(error, "status", lambda: "")() or "")
    code = getattr(grpc.StatusCode, status.removeprefix("StatusCode."), grpc.StatusCode.UNKNOWN)
    message = getattr(error, "message", lambda: str(error))() or str(error)
    return RewardServiceError(code, message, method)


class TritonRewardClient:
    """Blocking client of rewards served by Triton, with ``RewardClient``'s API and per-item results."""

    def __init__(
        self,
        server: str,
        *,
        timeout: float = 60.0,
        progress_timeout: float = 600.0,
        tls: bool | None = None,
        root_certificates: str | Path | None = None,
        auth_token: str | None = None,
    ) -> None:
        """Connect to ``server`` (``triton://host:port``, Triton's gRPC port). ``tls`` or ``root_certificates`` (a
        PEM file) turn on TLS; ``auth_token`` is sent as ``authorization: Bearer <token>``."""
        self.address = triton_address(server)
        self.timeout = timeout
        self.progress_timeout = progress_timeout
        self._headers = {"authorization": f"Bearer {auth_token}"} if auth_token else None
        use_tls = bool(tls) or root_certificates is not None
        self._client = _tritonclient().InferenceServerClient(
            self.address,
            ssl=use_tls,
            root_certificates=str(root_certificates) if root_certificates is not None else None,
        )

    def __enter__(self) -> TritonRewardClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    def _call(self, method: str, function: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, headers=self._headers, **kwargs)
        except Exception as error:  # tritonclient raises InferenceServerException for every failure
            if type(error).__name__ != "InferenceServerException":
                raise
            raise _service_error(error, method) from None

    def wait_ready(self, timeout: float = 30.0, rewards: Iterable[str] | None = None) -> None:
        """Block until the server (and each model in ``rewards``) is ready; TimeoutError after ``timeout``."""
        deadline = time.monotonic() + timeout
        for model in [None, *(rewards or [])]:
            state = "no answer yet"
            while time.monotonic() < deadline:
                try:
                    ready = self._call(
                        "ServerReady" if model is None else "ModelReady",
                        self._client.is_server_ready if model is None else self._client.is_model_ready,
                        *([] if model is None else [model]),
                        client_timeout=max(0.1, min(5.0, deadline - time.monotonic())),
                    )
                    state = "not ready"
                except RewardServiceError as error:
                    ready, state = False, f"{error.code.name}: {error.message}"
                if ready:
                    break
                time.sleep(0.1)
            else:
                raise not_ready(f"triton://{self.address}", timeout, model or "", state)

    def list_rewards(self, timeout: float | None = None) -> list[RewardInfo]:
        """The ddpo rewards in the repository (models with a ``ddpo_reward_spec`` parameter); a model that failed to
        load is listed with Triton's reason in ``load_error``."""
        deadline = self.timeout if timeout is None else timeout
        index = self._call("RepositoryIndex", self._client.get_model_repository_index, as_json=True)
        if not index.get("models"):
            raise RewardServiceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"triton://{self.address} has no models in its repository index (PyTriton, for one, loads them "
                "through the load API), so its rewards cannot be listed; serve an exported repository with "
                "`ddpo triton serve` to list them",
                "RepositoryIndex",
            )
        rewards = []
        for model in index["models"]:
            name, state, reason = model["name"], model.get("state", ""), model.get("reason", "")
            try:
                config = self._call(
                    "ModelConfig", self._client.get_model_config, name, as_json=True, client_timeout=deadline
                )["config"]
            except RewardServiceError as error:
                if state == "READY":
                    raise
                rewards.append(RewardInfo.from_proto(pb.RewardSpec(name=name), reason or error.message))
                continue
            spec = config.get("parameters", {}).get(tc.SPEC_PARAMETER, {}).get("string_value")
            if spec is not None:
                load_error = reason if state == "UNAVAILABLE" else ""
                rewards.append(RewardInfo.from_proto(json_format.Parse(spec, pb.RewardSpec()), load_error))
        return rewards

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
        """Score a batch; results are in the order of ``images``. Per-item failures are in the result.

        ``weights`` (a composite computed per request) is ``RewardClient``'s; Triton has no such request, so anything
        but None is a ValueError."""
        if weights is not None:
            raise ValueError(
                "weights (a composite computed per request) are not available through Triton: call each reward and "
                "add the scores up, or use a ddpo server (`ddpo serve`), which computes composites"
            )
        batch = checked_items(reward, images, prompts, metadata, ids, encoding, taken=set())
        results = self._score_batch(batch, self.timeout if timeout is None else timeout)
        return BatchResult(order_results(batch.items, results))

    def open_stream(self, progress_timeout: float | None = None) -> TritonScoreStream:
        """Send batches as they are produced (a few Triton requests in flight), read results as they come.

        Each request has ``progress_timeout`` (default: the client's) as its deadline, and ``results`` raises
        DEADLINE_EXCEEDED when items are outstanding and no answer has come for that long."""
        return TritonScoreStream(self, self.progress_timeout if progress_timeout is None else progress_timeout)

    def _score_batch(self, batch: WireBatch, timeout: float) -> list[pb.ScoreResult]:
        """One Triton request per image size; items Triton cannot take are answered here."""
        answers: dict[str, pb.ScoreResult] = {}
        by_size: dict[tuple[int, ...], list[int]] = {}
        arrays: dict[int, npt.NDArray[np.uint8]] = {}
        for index, (item, pixels) in enumerate(zip(batch.items, batch.pixels, strict=True)):
            raw = item.image.raw
            try:
                if pixels is None:
                    arrays[index] = _decode_file(item.image.encoded.data)
                else:
                    arrays[index] = np.frombuffer(pixels, np.uint8).reshape(raw.height, raw.width, raw.channels)
                if arrays[index].ndim != 3 or arrays[index].shape[2] != 3:
                    raise ValueError(f"has shape {arrays[index].shape}; Triton rewards take (H, W, 3) RGB images")
            except ValueError as problem:
                answers[item.id] = _error(item.id, f"images[{index}] {problem}")
                continue
            by_size.setdefault(arrays[index].shape, []).append(index)
        for indices in by_size.values():
            images = np.stack([arrays[i] for i in indices])
            items = [batch.items[i] for i in indices]
            prompts = np.array([[item.prompt.encode()] for item in items], dtype=np.object_)
            metadata = np.array(
                [[json.dumps(json_format.MessageToDict(item.metadata)).encode()] for item in items], dtype=np.object_
            )
            scores, info = self._infer(batch.reward, images, prompts, metadata, timeout=timeout)
            for item, score, entry in zip(items, scores.reshape(-1), info.reshape(-1), strict=True):
                answers[item.id] = _result(item.id, float(score), entry)
        return [answers[item.id] for item in batch.items]

    def _infer(self, model: str, *tensors: np.ndarray[Any, Any], timeout: float) -> tuple[np.ndarray[Any, Any], ...]:
        grpcclient = _tritonclient()
        inputs = []
        for name, tensor in zip((tc.IMAGES, tc.PROMPTS, tc.METADATA), tensors, strict=True):
            tensor_input = grpcclient.InferInput(name, list(tensor.shape), "UINT8" if name == tc.IMAGES else "BYTES")
            tensor_input.set_data_from_numpy(tensor)
            inputs.append(tensor_input)
        outputs = [grpcclient.InferRequestedOutput(name) for name in (tc.SCORES, tc.INFO)]
        response = self._call("Infer", self._client.infer, model, inputs, outputs=outputs, client_timeout=timeout)
        scores, info = response.as_numpy(tc.SCORES), response.as_numpy(tc.INFO)
        if scores is None or info is None or len(scores) != len(tensors[0]) or len(info) != len(tensors[0]):
            raise RewardServiceError(
                grpc.StatusCode.INTERNAL, f"model {model!r} did not answer SCORES and INFO for every image", "Infer"
            )
        return scores, info


def _error(item_id: str, message: str, code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT) -> pb.ScoreResult:
    return pb.ScoreResult(id=item_id, status=pb.Status(code=code.value[0], message=message))


def _result(item_id: str, score: float, entry: bytes) -> pb.ScoreResult:
    """One item's answer from its SCORES and INFO entries."""
    answer = tc.decode_answer(entry)
    if "error" in answer:
        code = getattr(grpc.StatusCode, answer["error"]["code"], grpc.StatusCode.UNKNOWN)
        return _error(item_id, answer["error"]["message"], code)
    return pb.ScoreResult(
        id=item_id, status=pb.Status(code=0), score=score, components=answer["components"], info=answer["info"]
    )


class TritonScoreStream:
    """``ScoreStream``'s API over Triton: each ``send`` becomes requests run by a few threads; results come as
    each request is answered."""

    def __init__(self, client: TritonRewardClient, progress_timeout: float) -> None:
        self._client = client
        self._ledger = StreamLedger(progress_timeout)
        self._lock = threading.Lock()
        self._answers: queue.Queue[list[pb.ScoreResult] | BaseException] = queue.Queue()
        self._pool = concurrent.futures.ThreadPoolExecutor(_STREAM_REQUESTS_IN_FLIGHT, "triton-stream")
        self._cancelled = False

    def __enter__(self) -> TritonScoreStream:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if exc_type is not None or not self._ledger.done:
            self.cancel()
        self._pool.shutdown(wait=False)

    def send(
        self,
        reward: str,
        images: Images,
        prompts: Sequence[str | None] | None = None,
        metadata: Sequence[Mapping[str, Any] | None] | None = None,
        ids: Sequence[str] | None = None,
        encoding: Encoding = "raw",
    ) -> list[str]:
        """Queue a batch for ``reward`` and return its item ids (default: "0", "1", ... over the stream)."""
        with self._lock:
            batch, sent_ids = self._ledger.request(reward, images, prompts, metadata, ids, encoding)
        self._pool.submit(self._run, batch)
        return sent_ids

    def _run(self, batch: WireBatch) -> None:
        try:
            if self._cancelled:
                raise RewardServiceError(grpc.StatusCode.CANCELLED, "the stream was cancelled", "ScoreStream")
            self._answers.put(self._client._score_batch(batch, self._ledger.progress_timeout))
        except BaseException as error:  # handed to the reader in results()
            self._answers.put(error)

    def close(self) -> None:
        """No more items will be sent; results keep coming."""
        with self._lock:
            self._ledger.closed = True

    def cancel(self) -> None:
        self.close()
        self._cancelled = True

    def results(self) -> Iterator[ItemResult]:
        """Yield each sent item's result once, as its request is answered; ends after ``close`` when all are."""
        while not self._ledger.done:
            try:
                answer = self._answers.get(timeout=self._ledger.wait_time())
            except queue.Empty:
                if (stalled := self._ledger.stalled()) is not None:
                    self.cancel()
                    raise stalled from None
                continue
            if isinstance(answer, BaseException):
                raise answer
            for result in answer:
                yield self._ledger.answer(result)
