"""The in-memory API: a loaded model plus its preprocessing and post-processing.

    from m2f_cli import Segmenter
    seg = Segmenter(model="facebook/mask2former-swin-tiny-coco-instance", device="auto")
    result = seg(Image.open("cat.jpg"))        # -> ImageResult
    for inst in result.instances: print(inst.label, inst.score, inst.bbox)

``run(config)`` in pipeline.py drives the same object over folders.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Union

import numpy as np
import torch

from .categories import CategoryTable
from .config import DEFAULT_MODEL
from .decode import _to_rgb
from .model import (HFPredictor, ModelLoadError, ModelSource, Predictor, load_model, resolve_device,
                    resolve_dtype, resolve_model)
from .postprocess import PostprocessOptions, instance_map, instances_from_logits
from .preprocess import PreprocessSpec, load_checkpoint_spec, preprocess, spec_for_resize
from .records import ImageRef, ImageResult, Instance


def read_categories(source: ModelSource) -> CategoryTable:
    """The label table from a model folder's config.json, without loading any weights."""
    try:
        with open(os.path.join(source.local_dir, "config.json"), encoding="utf-8") as f:
            id2label = json.load(f).get("id2label") or {}
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{source.local_dir}: unreadable config.json ({e})") from None
    return CategoryTable.from_id2label({int(k): v for k, v in id2label.items()}) if id2label \
        else CategoryTable.coco()


def resolve_classes(categories: CategoryTable, classes: Sequence[str]) -> Optional[frozenset[int]]:
    """--classes names/ids -> model label indices; KeyError (listing valid names) for unknown ones."""
    specs = [c for item in classes for c in item.split(",") if c.strip()]
    if not specs:
        return None
    return frozenset(categories.resolve(s).index for s in specs)


@dataclass
class BatchTimes:
    forward_s: float = 0.0
    postprocess_s: float = 0.0


class Segmenter:
    """A model ready to segment: weights on a device, a preprocessing spec, post-processing options.

    model: a hub id, a local save_pretrained folder, or a ready Predictor (tests, custom models).
    threshold: minimum score of kept instances; map_threshold: minimum score drawn in the
        instance map (defaults to threshold).
    """

    def __init__(self, model: Union[str, Predictor] = DEFAULT_MODEL, *, device: str = "auto",
                 dtype: str = "auto", revision: Optional[str] = None, allow_pickle: bool = False,
                 resize: str = "checkpoint", threshold: float = 0.5, map_threshold: Optional[float] = None,
                 top_k: int = 100, classes: Sequence[str] = (), compile: bool = False,
                 source: Optional[ModelSource] = None):
        if isinstance(model, str):
            self.source = source or resolve_model(model, revision, allow_pickle)
            dev = resolve_device(device)
            dt = resolve_dtype(dtype, dev)
            self.predictor: Predictor = HFPredictor(load_model(self.source, allow_pickle), dev, dt, compile)
            checkpoint_spec = load_checkpoint_spec(self.source.local_dir)
        else:
            self.source = source
            self.predictor = model
            checkpoint_spec = getattr(model, "preprocess_spec", PreprocessSpec())
        self.categories: CategoryTable = self.predictor.categories
        self.spec: PreprocessSpec = spec_for_resize(resize, checkpoint_spec)
        if not 1 <= top_k <= 65535:
            raise ValueError(f"--top-k {top_k}: expected 1..65535")
        self.options = PostprocessOptions(threshold=threshold,
                                          map_threshold=threshold if map_threshold is None else map_threshold,
                                          top_k=top_k, keep=resolve_classes(self.categories, classes))
        self.times = BatchTimes()

    @property
    def device(self) -> torch.device:
        return self.predictor.device

    @property
    def model_id(self) -> str:
        return self.source.spec if self.source else type(self.predictor).__name__

    def infer(self, pixel_values: torch.Tensor, valids: Sequence[tuple[int, int]],
              originals: Sequence[tuple[int, int]]) -> list[list[Instance]]:
        """pixel_values: (B, 3, Hp, Wp) float32 (same padded shape); valids/originals: per image
        (h, w) unpadded resized size and (H0, W0) original size. Returns instances per image."""
        t0 = time.perf_counter()
        x = pixel_values.to(self.device, non_blocking=True)
        class_logits, mask_logits = self.predictor(x)
        t1 = time.perf_counter()
        padded = tuple(pixel_values.shape[-2:])
        out = [instances_from_logits(class_logits[b], mask_logits[b], padded, valids[b], originals[b],
                                     self.categories, self.options) for b in range(len(valids))]
        self.times.forward_s += t1 - t0
        self.times.postprocess_s += time.perf_counter() - t1
        return out

    def result(self, ref: ImageRef, original: tuple[int, int], instances: list[Instance],
               image: Optional[np.ndarray] = None) -> ImageResult:
        h, w = original
        imap = instance_map(instances, h, w, self.options.map_threshold)
        return ImageResult(ref, w, h, instances, imap, self.options.map_threshold, image)

    def __call__(self, image) -> ImageResult:
        return self.segment([image])[0]

    def segment(self, images: Iterable) -> list[ImageResult]:
        """PIL images or (H, W, 3) uint8 RGB arrays -> ImageResults (one batch per image shape).
        PIL images are used as given: apply ImageOps.exif_transpose first if they came from a file."""
        rgbs = [_as_rgb(im) for im in images]
        results = []
        for n, rgb in enumerate(rgbs):
            mi = preprocess(rgb, self.spec)
            inst = self.infer(torch.from_numpy(mi.pixel_values)[None], [mi.valid], [rgb.shape[:2]])[0]
            ref = ImageRef(path=f"<image {n}>", name=f"image{n}", rel=f"image{n}", index=n)
            results.append(self.result(ref, rgb.shape[:2], inst, rgb))
        return results


def _as_rgb(image) -> np.ndarray:
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        if image.ndim != 3 or image.shape[2] not in (3, 4) or image.dtype != np.uint8:
            raise ValueError(f"expected an (H, W, 3) uint8 RGB array, got {image.shape} {image.dtype}")
        return np.ascontiguousarray(image[..., :3])
    return np.asarray(_to_rgb(image), dtype=np.uint8)
