"""Prompt-image alignment with LLaVA, as in the DDPO paper.

- ``llava_bertscore``: LLaVA-1.5 answers a question about the image (by default "what is going on in this image?",
  answered concisely), greedily; BERTScore recall compares that caption with "The image contains {prompt}".
- ``llava_vqa``: LLaVA answers the item's own questions (metadata ``{"questions": [...], "answers": [...]}``); the
  score is the fraction answered correctly (the paper's strict, counting variant).

Both run one batched ``generate`` call per scored batch (questions of every item together, padded on the left), and
``llava_bertscore`` one batched BERTScore call. LLaVA loads with transformers' LLaVA-1.5 classes from a hub id or a
folder; BERTScore takes any model ``bert_score`` accepts, with ``num_layers`` given explicitly for a local folder.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt

from reward_server.rewards.base import (
    ImageSpec,
    ItemError,
    Metadata,
    Reward,
    RewardOutput,
    RewardSpec,
    check_placement,
)

logger = logging.getLogger(__name__)

LLAVA_MODEL = "llava-hf/llava-1.5-7b-hf"
BERTSCORE_MODEL = "microsoft/deberta-xlarge-mnli"
CAPTION_QUESTION = "What is going on in this image? Answer concisely."


class LlavaAnswerer:
    """LLaVA-1.5 answering one question per image, greedily, for a whole batch in one ``generate`` call."""

    def __init__(self, model: str, max_new_tokens: int, device: str, dtype: str) -> None:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        check_placement(device, dtype)
        self.model_id = model
        self.max_new_tokens = max_new_tokens
        self.device = device
        self.dtype = dtype
        self._model: Any = None
        self._processor: Any = None

    def load(self) -> None:
        import torch
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        model = LlavaForConditionalGeneration.from_pretrained(self.model_id, dtype=getattr(torch, self.dtype))
        self._model = model.to(self.device).eval()
        self._processor = AutoProcessor.from_pretrained(self.model_id)
        self._processor.tokenizer.padding_side = "left"  # decoder-only generation continues from the right end

    def answer(self, images: Sequence[npt.NDArray[np.uint8]], questions: Sequence[str]) -> list[str]:
        """The answer to ``questions[i]`` about ``images[i]``, stripped (possibly empty)."""
        import torch

        if self._model is None:
            raise RuntimeError(f"LLaVA model {self.model_id!r} is not loaded; call load() first")
        prompts = [f"USER: <image>\n{question} ASSISTANT:" for question in questions]  # LLaVA-1.5's format
        inputs = self._processor(images=list(images), text=prompts, return_tensors="pt", padding=True)
        inputs = inputs.to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self._model.dtype)
        with torch.inference_mode():
            output = self._model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        return [text.strip() for text in self._processor.batch_decode(new_tokens, skip_special_tokens=True)]


class LlavaBertScore(Reward):
    """BERTScore recall of LLaVA's caption against "The image contains {prompt}"."""

    preferred_max_batch_size = 8

    def __init__(
        self,
        name: str,
        llava_model: str = LLAVA_MODEL,
        question: str = CAPTION_QUESTION,
        max_new_tokens: int = 64,
        bertscore_model: str = BERTSCORE_MODEL,
        bertscore_num_layers: int | None = None,
        device: str = "cpu",
        dtype: str = "float32",
        bertscore_device: str | None = None,
    ) -> None:
        self.llava = LlavaAnswerer(llava_model, max_new_tokens, device, dtype)
        self.question = question
        self.bertscore_model = bertscore_model
        self.bertscore_num_layers = bertscore_num_layers
        self.bertscore_device = bertscore_device or device
        self._scorer: Any = None
        self.spec = RewardSpec(
            name=name,
            description="Prompt-image alignment: BERTScore recall of LLaVA's answer to "
            f"{question!r} against 'The image contains <prompt>'",
            version="1",
            units="BERTScore recall",
            requires_prompt=True,
            image_spec=ImageSpec(channels=(3,), min_size=(8, 8), max_size=(4096, 4096)),
            component_names=("precision", "recall", "f1"),
        )

    def load(self) -> None:
        from bert_score import BERTScorer

        self.llava.load()
        self._scorer = BERTScorer(
            model_type=self.bertscore_model, num_layers=self.bertscore_num_layers, device=self.bertscore_device
        )

    def bertscore(self, captions: Sequence[str], prompts: Sequence[str]) -> npt.NDArray[np.float64]:
        """(3, B) precision, recall and F1 of each caption against "The image contains {prompt}".

        An empty caption scores 0, as bert_score itself defines it (its transformers-5 code path for an empty
        candidate raises), and is left out of the batched call.
        """
        if self._scorer is None:
            raise RuntimeError(f"reward {self.spec.name!r} is not loaded; call load() first")
        result = np.zeros((3, len(captions)))
        present = [i for i, caption in enumerate(captions) if caption]
        if present:
            references = [f"The image contains {prompts[i]}" for i in present]
            scores = self._scorer.score([captions[i] for i in present], references)
            result[:, present] = np.stack([s.double().cpu().numpy() for s in scores])
        return result

    def score(
        self,
        images: Sequence[npt.NDArray[np.uint8]],
        prompts: Sequence[str | None],
        metadata: Sequence[Metadata],
    ) -> RewardOutput:
        texts = [prompt or "" for prompt in prompts]  # the server has checked that every prompt is present
        captions = self.llava.answer(images, [self.question] * len(images))
        precision, recall, f1 = self.bertscore(captions, texts)
        info = []
        for i, caption in enumerate(captions):
            entry = {"caption": caption, "precision": f"{precision[i]:.6f}", "recall": f"{recall[i]:.6f}"}
            entry["f1"] = f"{f1[i]:.6f}"
            if not caption:
                entry["empty_caption"] = "true"
                logger.warning(
                    "reward %s: LLaVA gave an empty caption for prompt %r; BERTScore is 0", self.spec.name, texts[i]
                )
            info.append(entry)
        return RewardOutput(scores=recall, components={"precision": precision, "recall": recall, "f1": f1}, info=info)


def _normalize(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9 ]", " ", text.lower()).split())


def is_correct(answer: str, expected: str) -> bool:
    """Whether ``expected`` appears in ``answer`` as whole words, ignoring case and punctuation ("Two." ~ "two")."""
    wanted = _normalize(expected)
    return bool(wanted) and f" {wanted} " in f" {_normalize(answer)} "


class LlavaVqa(Reward):
    """The fraction of the item's questions that LLaVA answers correctly (metadata questions / answers)."""

    preferred_max_batch_size = 8

    def __init__(
        self,
        name: str,
        llava_model: str = LLAVA_MODEL,
        max_new_tokens: int = 16,
        device: str = "cpu",
        dtype: str = "float32",
    ) -> None:
        self.llava = LlavaAnswerer(llava_model, max_new_tokens, device, dtype)
        self.spec = RewardSpec(
            name=name,
            description='Fraction of the questions in metadata {"questions": [...], "answers": [...]} that LLaVA '
            "answers correctly (the expected answer appears in its answer as whole words)",
            version="1",
            units="fraction correct",
            image_spec=ImageSpec(channels=(3,), min_size=(8, 8), max_size=(4096, 4096)),
        )

    def load(self) -> None:
        self.llava.load()

    @staticmethod
    def questions_of(item: Metadata) -> tuple[list[str], list[str]] | str:
        """The item's (questions, answers), or why its metadata is unusable."""
        questions, answers = item.get("questions"), item.get("answers")
        if not isinstance(questions, list) or not isinstance(answers, list):
            return 'metadata needs "questions" and "answers", two lists of strings'
        if not questions or len(questions) != len(answers):
            return f"metadata has {len(questions)} questions and {len(answers)} answers; need as many, at least one"
        if not all(isinstance(x, str) and x.strip() for x in [*questions, *answers]):
            return "every question and answer must be a non-empty string"
        return questions, answers

    def score(
        self,
        images: Sequence[npt.NDArray[np.uint8]],
        prompts: Sequence[str | None],
        metadata: Sequence[Metadata],
    ) -> RewardOutput:
        errors: list[ItemError | None] = [None] * len(images)
        asked: list[tuple[int, str, str]] = []  # (item, question, expected answer)
        for i, item in enumerate(metadata):
            parsed = self.questions_of(item)
            if isinstance(parsed, str):
                errors[i] = ItemError(grpc.StatusCode.INVALID_ARGUMENT, parsed)
            else:
                asked += [(i, question, answer) for question, answer in zip(*parsed, strict=True)]
        scores = np.full(len(images), np.nan)
        info: list[dict[str, str]] = [{} for _ in images]
        if asked:
            answers = self.llava.answer([images[i] for i, _, _ in asked], [question for _, question, _ in asked])
            correct: dict[int, list[bool]] = {}
            for (i, _, expected), answer in zip(asked, answers, strict=True):
                correct.setdefault(i, []).append(is_correct(answer, expected))
                info[i][f"answer_{len(correct[i])}"] = answer
            for i, marks in correct.items():
                scores[i] = float(np.mean(marks))
        return RewardOutput(scores=scores, info=info, errors=errors)
