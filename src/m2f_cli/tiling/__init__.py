"""Tiled inference (``--tile SIZE[,OVERLAP]``, ``--tile-full``): small objects in large images.

The checkpoint squashes every image to its input size (384x384): on a 12 MP photo a 40 px object
becomes 4 px. With ``--tile`` each image is cut into overlapping square tiles, every tile goes
through the model like an image (preprocessed by the checkpoint's own rules, batched with the
other tiles of its image), and the tiles' instances are merged back at the original resolution.

Stages, one image at a time (an image's tiles travel as one unit: a DataLoader worker or a Ray
actor cuts them, ``driver.segment_tiled`` runs them all, so an image's result depends on nothing else):

1. ``grid.tile_grid``: tile boxes of SIZE px (clamped to the image), spread evenly so that neighbours
   overlap by at least OVERLAP x SIZE; ``auto`` = ``AUTO_FACTOR`` x the model's input side.
2. ``grid.cut_tiles`` (worker side): each tile resized to the model's input, kept as uint8 (4x less
   than float32 in the DataLoader queue); ``tile_pixels`` normalises it when its batch is built,
   giving exactly the pixel values ``preprocess`` would (it skips a resize already done).
3. ``parts.tile_parts``: per tile, segment_instances' candidate rule (postprocess.py: top-k over
   (query, class) pairs, mask = logit > 0 on the query's window, score = class prob x mean mask
   probability), kept down to ``PART_FLOOR`` x the threshold: a cut half may score lower than the
   whole. Each part is stored as a tight crop encoded as RLE, never as a full-size mask.
4. ``merge.merge_parts``: parts of different tiles with the same class are one object when their masks
   agree where both tiles see the image (mask IoU >= ``SEAM_IOU`` inside the tiles' overlap; for
   tiles that only meet, on the two pixel lines either side of the seam). Objects are the
   connected components of that relation (union-find: independent of tile order), their mask the
   union of their parts, their score the best part's score. Full-pass parts (``--tile-full``)
   join an object when they are its duplicate (IoU >= ``FULL_IOU``, or a coarse full-pass mask
   mostly inside it) or when the object is a fragment no single tile saw whole and lies mostly
   inside the full-pass mask (``FULL_INSIDE``). Then threshold, top-k (per model pass: an image
   of N tiles keeps its best top_k x N) and map painting as usual.

Cost grows with the number of tiles: every comparison is between neighbouring tiles, on their
shared strip, and memory holds one tile's logits plus RLE crops of the parts.
"""
