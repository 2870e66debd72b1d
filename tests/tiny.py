"""Tiny Mask2Former checkpoints for tests, built from a config and saved with save_pretrained so
the real loading path (config.json + safetensors + preprocessor_config.json) is exercised."""

from __future__ import annotations

import json
import os
from typing import Optional

import torch

from m2f_cli.model.categories import COCO_NAMES

CHECKPOINT_PREPROCESSOR = {
    # the keys of facebook/mask2former-swin-tiny-coco-instance's preprocessor_config.json
    "do_normalize": True, "do_resize": True, "do_rescale": True, "ignore_index": 255,
    "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
    "image_processor_type": "Mask2FormerImageProcessor", "num_labels": 80, "reduce_labels": False,
    "resample": 2, "rescale_factor": 1 / 255, "size": {"height": 384, "width": 384}, "size_divisor": 32,
}


def tiny_config(num_labels: int = 80, id2label: Optional[dict] = None, num_queries: int = 20):
    from transformers import Mask2FormerConfig, SwinConfig
    backbone = SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=4,
                          image_size=384, out_features=["stage1", "stage2", "stage3", "stage4"])
    if id2label is None:
        id2label = {i: COCO_NAMES[i] for i in range(num_labels)} if num_labels == 80 else \
            {i: f"class{i}" for i in range(num_labels)}
    return Mask2FormerConfig(
        backbone_config=backbone, hidden_dim=32, mask_feature_size=32, feature_size=32,
        num_queries=num_queries, encoder_layers=1, decoder_layers=3, dim_feedforward=64,
        encoder_feedforward_dim=64, num_attention_heads=2, num_labels=len(id2label),
        id2label=id2label, label2id={v: k for k, v in id2label.items()})


def make_tiny_model(path: str, seed: int = 0, confident: bool = True, preprocessor: Optional[dict] = None,
                    **config_kwargs) -> str:
    """Save a random tiny Mask2Former to path and return path.

    confident: scale the class head and the last mask-embedder layer so that the random model
    gives confident, image-dependent instances (otherwise every score sits near 1/81 x 0.5).
    """
    from transformers import Mask2FormerForUniversalSegmentation
    torch.manual_seed(seed)
    model = Mask2FormerForUniversalSegmentation(tiny_config(**config_kwargs)).eval()
    if confident:
        with torch.no_grad():
            model.class_predictor.weight.mul_(40)
            emb = model.model.transformer_module.decoder.mask_predictor.mask_embedder
            getattr(getattr(emb, "2"), "0").weight.mul_(30)
    model.save_pretrained(path, safe_serialization=True)
    with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
        json.dump(preprocessor if preprocessor is not None else CHECKPOINT_PREPROCESSOR, f)
    return path
