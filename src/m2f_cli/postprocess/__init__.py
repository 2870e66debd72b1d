"""Stage 5: class and mask logits -> instances, panoptic segments or semantic maps."""
