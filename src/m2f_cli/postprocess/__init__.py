"""Stage 5: class and mask logits -> instances, panoptic segments or semantic maps.

One module per job: instance (the original instance inference: top_candidates, segment_instances),
sampling (a query's mask at the original size, only where it can be positive), panoptic, semantic,
masks (COCO RLE, boxes and areas), upsample (bilinear pieces shared by all of them) and device (the
instance inference batched on an accelerator, imported from m2f_cli.postprocess.device).
"""

from m2f_cli.postprocess.instance import (PostprocessOptions, instances_from_logits, segment_instances,
                                          top_candidates)
from m2f_cli.postprocess.masks import window_rle
from m2f_cli.postprocess.panoptic import PanopticOptions, is_thing, panoptic_from_logits
from m2f_cli.postprocess.semantic import semantic_from_logits

__all__ = ["PanopticOptions", "PostprocessOptions", "instances_from_logits", "is_thing", "panoptic_from_logits",
           "segment_instances", "semantic_from_logits", "top_candidates", "window_rle"]
