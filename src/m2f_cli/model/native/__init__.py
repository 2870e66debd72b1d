"""Mask2Former with a Swin backbone, defined here: the model m2f runs eagerly, without importing
transformers (whose import costs ~2 s of a first run: it pulls in torch.distributed.tensor,
torch._dynamo and scipy.optimize, docs/performance.md).

It reads the same folders (config.json + model.safetensors, the hub's or save_pretrained's
layout) and computes the same outputs as transformers' ``Mask2FormerForUniversalSegmentation``
to float rounding (tests/test_native_model.py compares them on random models and the trained
fixture). ``load`` answers None for anything it does not cover exactly (another backbone, pre-norm
decoders, a weight it does not know or miss): the caller then loads transformers' model, as it
does with ``M2F_NATIVE_MODEL=0``.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Optional

import torch
from torch import nn

from m2f_cli.model.native.heads import PixelDecoder, TransformerModule
from m2f_cli.model.native.swin import SwinBackbone

log = logging.getLogger(__name__)

# weights in checkpoints that inference does not use (the loss's class weights, the Swin model's
# final norm that the backbone does not apply, index buffers older versions saved)
_UNUSED = ("criterion.", "model.pixel_level_module.encoder.swin.layernorm.",
           "model.pixel_level_module.encoder.layernorm.")


class _PixelLevel(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.encoder = SwinBackbone(cfg["backbone_config"])
        self.decoder = PixelDecoder(cfg, self.encoder.channels)


class _Model(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.pixel_level_module = _PixelLevel(cfg)
        self.transformer_module = TransformerModule(cfg)


class Mask2Former(nn.Module):
    """pixel_values (B, 3, H, W) -> (class logits (B, Q, C+1), mask logits (B, Q, H/4, W/4))."""

    def __init__(self, cfg: dict):
        super().__init__()
        # as transformers' config: without id2label, num_labels classes named LABEL_i
        self.id2label = {int(k): v for k, v in (cfg.get("id2label") or {}).items()} or \
            {i: f"LABEL_{i}" for i in range(_num_labels(cfg))}
        self.model = _Model(cfg)
        self.class_predictor = nn.Linear(int(cfg["hidden_dim"]), _num_labels(cfg) + 1)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pixel = self.model.pixel_level_module
        mask_features, levels = pixel.decoder(pixel.encoder(pixel_values))
        queries, masks = self.model.transformer_module(levels, mask_features)
        return self.class_predictor(queries), masks


def enabled() -> bool:
    return os.environ.get("M2F_NATIVE_MODEL", "1") != "0"


def unsupported(cfg: dict) -> Optional[str]:
    """Why this config is not one this definition computes exactly, or None."""
    bb = cfg.get("backbone_config") or {}
    checks = {
        "model_type": cfg.get("model_type") == "mask2former",
        "backbone": bb.get("model_type") == "swin" and not cfg.get("use_timm_backbone")
        and not cfg.get("backbone"),
        "backbone features": list(bb.get("out_features") or []) == [f"stage{i + 1}" for i in
                                                                     range(len(bb.get("depths") or []))],
        "absolute position embeddings": not bb.get("use_absolute_embeddings"),
        "activations": bb.get("hidden_act", "gelu") == "gelu" and cfg.get("activation_function") == "relu",
        "pre-norm decoder": not cfg.get("pre_norm"),
        "feature strides": list(cfg.get("feature_strides") or []) == [4, 8, 16, 32],
    }
    bad = [name for name, ok in checks.items() if not ok]
    return ", ".join(bad) if bad else None


def load(folder: str, allow_pickle: bool = False) -> Optional[Mask2Former]:
    """The model of a saved folder, or None (logged at debug level) where this definition does not
    cover it: the caller loads transformers' model instead. Errors reading the files propagate."""
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    why = unsupported(cfg)
    if why:
        log.debug("m2f: %s: not the native model (%s); loading transformers'", folder, why)
        return None
    state = _read_weights(folder, allow_pickle)
    if state is None:
        return None
    with torch.device("meta"):
        model = Mask2Former(cfg)
    # float weights in float32, as transformers' model holds them in m2f (autocast does the rest)
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()
             if not k.startswith(_UNUSED) and not k.endswith("relative_position_index")}
    expected = set(model.state_dict())
    if set(state) != expected:
        log.debug("m2f: %s: weights differ from the native model (%d missing, %d unknown); loading transformers'",
                  folder, len(expected - set(state)), len(set(state) - expected))
        return None
    model.load_state_dict(state, assign=True)
    return model.eval()


def _read_weights(folder: str, allow_pickle: bool) -> Optional[dict]:
    names = sorted(os.listdir(folder))
    shards = [n for n in names if n.endswith(".safetensors")]
    if shards:
        from safetensors.torch import load_file
        state: dict = {}
        for name in shards:
            state.update(load_file(os.path.join(folder, name)))
        return state
    if allow_pickle and "pytorch_model.bin" in names:
        return torch.load(os.path.join(folder, "pytorch_model.bin"), map_location="cpu", weights_only=True)
    return None


def _num_labels(cfg: dict) -> int:
    return len(cfg["id2label"]) if cfg.get("id2label") else int(cfg.get("num_labels") or 2)
