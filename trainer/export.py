"""The final artefact of a run: a LoRA that ``StableDiffusionPipeline.load_lora_weights`` loads, or a full UNet."""

from __future__ import annotations

import json
from pathlib import Path

from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils import convert_state_dict_to_diffusers
from peft.utils import get_peft_model_state_dict

from trainer.config import Config, to_dict


def export_final(pipeline: StableDiffusionPipeline, unet: UNet2DConditionModel, config: Config, run_dir: Path) -> Path:
    """Write ``<run_dir>/final``: ``pytorch_lora_weights.safetensors`` (LoRA) or ``unet/`` (full fine-tuning)."""
    out = run_dir / "final"
    out.mkdir(parents=True, exist_ok=True)
    if config.lora.enabled:
        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
        StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=layers, safe_serialization=True)
    else:
        unet.save_pretrained(out / "unet")
    (out / "training_config.json").write_text(json.dumps(to_dict(config), indent=1))
    return out
