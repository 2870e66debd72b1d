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
4. ``merge.merge_parts`` (merge.py, links.py; the rules in merge.py's docstring and
   docs/large-images.md): parts whose masks agree (mask IoU, or one inside the other) are linked;
   greedy in score order, a part some tile saw whole is an object and takes its duplicates (other
   tiles, queries, classes) and the pieces of it other tiles cut, a whole mask inside it is held at
   half its score, and its score counts the tiles that see it whole and found nothing there; parts
   no tile saw whole are joined across seams, scored by the paper's rule over their pixels.
   Full-pass parts (``--tile-full``) are merged in afterwards (seams._with_full_pass); seams.py
   keeps the merge this replaced, for ``benchmarks/tile_merge_bench.py --merge legacy``. Then
   threshold, top-k (per model pass: an image of N tiles keeps its best top_k x N) and map
   painting as usual.

Cost grows with the number of tiles: every comparison is between neighbouring tiles, and memory
holds one tile's logits plus RLE crops of the parts.
"""
