"""Bilinear upsampling of mask logits (align_corners=False), computed exactly as torch does it,
in the pieces the post-processing needs: the logits at the model input with the padding cropped,
the source rows and weights of output rows, and stripes of output rows.

Panoptic and semantic inference need, for every pixel of the original image, a decision over all
queries. Holding all (Q, H0, W0) upsampled masks would take GBs on large photos, so the masks are
upsampled in stripes of output rows: bilinear interpolation is separable, so each stripe is
computed exactly from the few low-resolution rows it depends on.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

STRIPE_BYTES = 64 * 1024 * 1024


def crop_to_valid(mask_logits: torch.Tensor, padded: tuple[int, int], valid: tuple[int, int]) -> torch.Tensor:
    """(Q, h, w) logits -> (Q, vh, vw): bilinear to the padded input size, padding cropped."""
    x = F.interpolate(mask_logits[None].float(), size=padded, mode="bilinear", align_corners=False)[0]
    return x[:, : valid[0], : valid[1]]


def source_rows(out_rows: torch.Tensor, in_h: int, out_h: int, device: Optional[torch.device] = None):
    """Bilinear (align_corners=False) source rows and weights for output rows, as torch computes them.

    out_rows: (n,) int64 on the CPU. Computed in float64 there (a few thousand values), then moved to
    device (default: the CPU): MPS has no float64, and the rows are the same wherever the logits are.
    Returns y0, y1 (n,) int64 and w1 (n,) float32 on device."""
    scale = in_h / out_h
    src = ((out_rows.cpu().double() + 0.5) * scale - 0.5).clamp(min=0)
    y0 = src.floor().long().clamp(max=in_h - 1)
    y1 = (y0 + 1).clamp(max=in_h - 1)
    w1 = (src - y0.double()).float()
    dev = device or out_rows.device
    return y0.to(dev), y1.to(dev), w1.to(dev)


def upsample_stripes(logits: torch.Tensor, size: tuple[int, int], stripe_rows: Optional[int] = None):
    """Yield (r0, r1, stripe) with stripe = rows r0:r1 of the bilinear upsampling of logits
    (Q, h, w) to size (H0, W0), i.e. (Q, r1 - r0, W0) float32, stripes covering all rows."""
    q, h, w = logits.shape
    h0, w0 = size
    if stripe_rows is None:
        stripe_rows = max(1, STRIPE_BYTES // max(1, q * w0 * 4 * 3))
    # width first, at the low resolution (cheap): (Q, h, W0)
    wide = F.interpolate(logits[None].float(), size=(h, w0), mode="bilinear", align_corners=False)[0]
    for r0 in range(0, h0, stripe_rows):
        r1 = min(h0, r0 + stripe_rows)
        y0, y1, w1 = source_rows(torch.arange(r0, r1), h, h0, logits.device)
        w1 = w1.to(wide.device).view(1, -1, 1)
        yield r0, r1, wide[:, y0] * (1 - w1) + wide[:, y1] * w1
