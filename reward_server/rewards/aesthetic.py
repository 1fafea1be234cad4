"""The LAION aesthetic predictor v2, the DDPO paper's aesthetic reward.

score = head(e / ‖e‖), where e is the CLIP ViT-L/14 image embedding (768-d, OpenAI weights) and the head is the
published MLP ``sac+logos+ava1-l14-linearMSE.pth`` (768 → 1024 → 128 → 64 → 16 → 1, dropout between layers and no
nonlinearity, so in eval mode it is one affine map). Scores are on the AVA scale, roughly 1-10.

The backbone is transformers' ``CLIPVisionModelWithProjection``, preprocessed as its ``CLIPImageProcessor`` says
(resize the short side to 224 bicubic, centre-crop 224, OpenAI mean/std): the same weights and preprocessing as
open_clip's ``ViT-L-14`` / ``openai`` (QuickGELU), without open_clip's torchvision dependency. ``clip_pixels`` does
those steps in torch, batched per image size and on the reward's device, because the processor's Pillow path costs
about 2 ms per image on a CPU, as much as a small model's forward pass, and would cap what micro-batching gains.

The head comes from a local path or is downloaded once from upstream into a cache; either way its sha256 must match
before it is loaded.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from reward_server.rewards.base import ImageSpec, Metadata, Reward, RewardOutput, RewardSpec, check_placement

HEAD_FILE = "sac+logos+ava1-l14-linearMSE.pth"
HEAD_URL = f"https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/{HEAD_FILE}"
HEAD_SHA256 = "21dd590f3ccdc646f0d53120778b296013b096a035a2718c9cb0d511bff0f1e0"
CLIP_MODEL = "openai/clip-vit-large-patch14"
EMBEDDING_DIM = 768


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ddpo"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_head(path: str | None, url: str, sha256: str, cache_dir: Path) -> Path:
    """The head's file: ``path`` if given, else the cached download of ``url`` (fetched now if missing).

    Either way the file's sha256 must equal ``sha256``; a mismatch is a ValueError that names both digests. A
    download goes to a temporary file first, so an interrupted or wrong one never lands in the cache.
    """
    if path is not None:
        local = Path(path)
        if not local.is_file():
            raise ValueError(f"aesthetic head file {path!r} does not exist")
        _check_digest(local, sha256, f"aesthetic head file {path!r}")
        return local
    cached = cache_dir / f"{sha256}-{HEAD_FILE}"
    if cached.is_file():
        _check_digest(cached, sha256, f"cached aesthetic head {cached}")
        return cached
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=cache_dir, delete=False) as partial:
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                shutil.copyfileobj(response, partial)
        except OSError as error:
            Path(partial.name).unlink(missing_ok=True)
            raise ValueError(f"could not download the aesthetic head from {url}: {error}") from None
    try:
        _check_digest(Path(partial.name), sha256, f"the aesthetic head downloaded from {url}")
    except ValueError:
        Path(partial.name).unlink(missing_ok=True)
        raise
    os.replace(partial.name, cached)
    return cached


def _check_digest(path: Path, expected: str, what: str) -> None:
    actual = sha256_of(path)
    if actual != expected:
        raise ValueError(f"{what} has sha256 {actual}, expected {expected}: wrong or corrupted file")


def clip_pixels(images: Sequence[npt.NDArray[np.uint8]], processor: Any, device: str) -> Any:
    """(B, 3, crop, crop) float32 CLIP inputs: ``processor``'s resize (short side, bicubic with antialiasing, rounded
    to uint8 levels as Pillow does), centre crop, rescale and normalisation, in torch.

    Matches ``processor(images)`` to a mean absolute difference of about 0.003 (a fifth of one uint8 level after
    normalisation) on photographs; Pillow's and torch's bicubic kernels differ slightly at sharp edges.
    """
    import torch
    import torch.nn.functional as F

    shortest, crop = processor.size["shortest_edge"], (processor.crop_size["height"], processor.crop_size["width"])
    mean = torch.tensor(processor.image_mean, device=device)[:, None, None]
    std = torch.tensor(processor.image_std, device=device)[:, None, None]
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, image in enumerate(images):
        by_size.setdefault((image.shape[0], image.shape[1]), []).append(i)
    out: list[Any] = [None] * len(images)
    for (height, width), indices in by_size.items():
        batch = torch.from_numpy(np.stack([images[i] for i in indices])).to(device).permute(0, 3, 1, 2).float()
        long_side = int(shortest * max(height, width) / min(height, width))
        size = (shortest, long_side) if height <= width else (long_side, shortest)
        batch = F.interpolate(batch, size=size, mode="bicubic", antialias=True, align_corners=False)
        top, left = (size[0] - crop[0]) // 2, (size[1] - crop[1]) // 2
        batch = batch.round().clamp(0, 255)[:, :, top : top + crop[0], left : left + crop[1]]
        for j, i in enumerate(indices):
            out[i] = batch[j]
    return (torch.stack(out) / 255 - mean) / std


def load_head(path: Path) -> Any:
    """The MLP head as a torch module in eval mode, on the CPU (the published file's tensors are on cuda:0).

    ``weights_only=True`` loads tensors only: no pickled code runs.
    """
    import torch

    head = torch.nn.Sequential(
        torch.nn.Linear(EMBEDDING_DIM, 1024),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(1024, 128),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(128, 64),
        torch.nn.Dropout(0.1),
        torch.nn.Linear(64, 16),
        torch.nn.Linear(16, 1),
    )
    state = torch.load(path, map_location="cpu", weights_only=True)
    prefix = "layers."
    if not isinstance(state, dict) or not all(isinstance(k, str) and k.startswith(prefix) for k in state):
        raise ValueError(f"{path} is not an aesthetic head state dict (keys layers.0.weight ... layers.7.bias)")
    head.load_state_dict({key.removeprefix(prefix): value for key, value in state.items()})
    return head.eval()


class Aesthetic(Reward):
    """LAION aesthetic score of each image (no prompt needed)."""

    preferred_max_batch_size = 16

    def __init__(
        self,
        name: str,
        clip_model: str = CLIP_MODEL,
        head_path: str | None = None,
        head_url: str = HEAD_URL,
        head_sha256: str = HEAD_SHA256,
        cache_dir: str | None = None,
        device: str = "cpu",
        dtype: str = "float32",
    ) -> None:
        check_placement(device, dtype)
        self.clip_model = clip_model
        self.head_path = head_path
        self.head_url = head_url
        self.head_sha256 = head_sha256
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.device = device
        self.dtype = dtype
        self.spec = RewardSpec(
            name=name,
            description="LAION aesthetic predictor v2: CLIP ViT-L/14 image embedding, L2-normalised, then the "
            "sac+logos+ava1 MLP head",
            version="2",
            units="aesthetic score (AVA scale, about 1-10)",
            image_spec=ImageSpec(channels=(3,), min_size=(8, 8), max_size=(4096, 4096)),
        )
        self._model: Any = None
        self._processor: Any = None
        self._head: Any = None

    def load(self) -> None:
        import torch
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        dtype = getattr(torch, self.dtype)
        model = CLIPVisionModelWithProjection.from_pretrained(self.clip_model, dtype=dtype)
        if model.config.projection_dim != EMBEDDING_DIM:
            raise ValueError(
                f"CLIP model {self.clip_model!r} embeds to {model.config.projection_dim} dimensions; the aesthetic "
                f"head needs ViT-L/14's {EMBEDDING_DIM}"
            )
        self._model = model.to(self.device).eval()
        processor = CLIPImageProcessor.from_pretrained(self.clip_model)
        steps = (processor.do_resize, processor.do_center_crop, processor.do_rescale, processor.do_normalize)
        if not all(steps) or processor.size.get("shortest_edge") is None:
            raise ValueError(
                f"CLIP model {self.clip_model!r}: its image processor is not CLIP's usual resize (shortest_edge), "
                "centre crop, rescale and normalise, which is what this reward reproduces"
            )
        self._processor = processor
        head_file = fetch_head(self.head_path, self.head_url, self.head_sha256, self.cache_dir)
        self._head = load_head(head_file).to(self.device)

    def embed(self, images: Sequence[npt.NDArray[np.uint8]]) -> Any:
        """L2-normalised CLIP image embeddings, (B, 768) float32."""
        import torch

        if self._model is None:
            raise RuntimeError(f"reward {self.spec.name!r} is not loaded; call load() first")
        with torch.inference_mode():
            pixels = clip_pixels(images, self._processor, self.device)
            embeds = self._model(pixel_values=pixels.to(self._model.dtype)).image_embeds.float()
        return embeds / embeds.norm(dim=-1, keepdim=True)

    def score(
        self,
        images: Sequence[npt.NDArray[np.uint8]],
        prompts: Sequence[str | None],
        metadata: Sequence[Metadata],
    ) -> RewardOutput:
        import torch

        embeds = self.embed(images)
        with torch.inference_mode():
            scores = self._head(embeds).squeeze(-1)
        return RewardOutput(scores=scores.double().cpu().numpy())
