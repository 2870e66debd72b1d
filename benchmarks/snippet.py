"""The model-card snippet of facebook/mask2former-swin-tiny-coco-instance, looped over a folder.

    python benchmarks/snippet.py --model CKPT --out OUT_DIR --timings T.json IMAGE_DIR_OR_FILES...

What a user copying the model card would write (plus a loop and a PNG per image, so it writes
something comparable to ``m2f segment``): one AutoImageProcessor, then per image
Image.open -> RGB, processor(images=...), model(**inputs) under no_grad,
processor.post_process_instance_segmentation(target_sizes=[img.size[::-1]]), and the segmentation
map saved as a 16-bit PNG (instance id + 1, 0 = background) plus the segments_info as JSON.

benchmarks/run.py starts it as a separate process so its peak RSS is its own. It writes per-stage
seconds (timed inside this process) to --timings; clock: time.monotonic() (system-wide on Linux,
so the parent can compare it with its own clock).
"""

import time

T_SCRIPT = time.monotonic()  # before any heavy import

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def list_images(inputs):
    out = []
    for p in inputs:
        if os.path.isdir(p):
            for root, _, files in os.walk(p):
                out += [os.path.join(root, f) for f in files if f.lower().endswith(EXTS)]
        else:
            out.append(p)
    return sorted(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+", help="image files or folders")
    ap.add_argument("--model", required=True, help="local save_pretrained folder (or hub id)")
    ap.add_argument("--out", required=True, help="output folder for <stem>.png / <stem>.json")
    ap.add_argument("--timings", required=True, help="write per-stage seconds here (JSON)")
    ap.add_argument("--device", default="cpu", help="cpu (the model card) or cuda: model.to(device), "
                    "inputs.to(device), as the card's users write it for a GPU (benchmarks/gpu.py)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="the model's weights and pixel_values in this dtype (from_pretrained torch_dtype)")
    args = ap.parse_args()

    t0 = time.monotonic()
    import numpy as np
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, Mask2FormerForUniversalSegmentation
    t_imported = time.monotonic()

    # --- the model card -----------------------------------------------------------------------
    processor = AutoImageProcessor.from_pretrained(args.model)
    model = Mask2FormerForUniversalSegmentation.from_pretrained(args.model)
    # ------------------------------------------------------------------------------------------
    dtype = getattr(torch, args.dtype)
    model = model.to(device=args.device, dtype=dtype)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    t_loaded = time.monotonic()

    paths = list_images(args.inputs)
    os.makedirs(args.out, exist_ok=True)
    stages = dict(decode=0.0, preprocess=0.0, forward=0.0, postprocess=0.0, write=0.0)
    per_image = []
    instances = 0
    last_write = t_loaded
    for p in paths:
        a = time.monotonic()
        # --- the model card, per image ----------------------------------------------------------
        image = Image.open(p).convert("RGB")
        b = time.monotonic()
        inputs = processor(images=image, return_tensors="pt")
        if args.device != "cpu" or dtype != torch.float32:
            inputs = {k: (v.to(args.device, dtype=dtype) if v.is_floating_point() else v.to(args.device))
                      for k, v in inputs.items()}
        c = time.monotonic()
        with torch.no_grad():
            outputs = model(**inputs)
        sync()  # the forward's own time, not the post-processing's
        d = time.monotonic()
        result = processor.post_process_instance_segmentation(outputs, target_sizes=[image.size[::-1]])[0]
        e = time.monotonic()
        # ----------------------------------------------------------------------------------------
        stem = os.path.splitext(os.path.basename(p))[0]
        seg = result["segmentation"]
        if seg is None:
            seg_map = np.zeros((image.size[1], image.size[0]), np.uint16)
        else:
            seg_map = (seg + 1).to(torch.int32).cpu().numpy().astype(np.uint16)  # -1 background -> 0
        Image.fromarray(seg_map).save(os.path.join(args.out, stem + ".png"))
        with open(os.path.join(args.out, stem + ".json"), "w") as f:
            json.dump({"image": p, "width": image.size[0], "height": image.size[1],
                       "segments_info": result["segments_info"]}, f)
        f_ = time.monotonic()
        last_write = f_
        for k, v in zip(stages, (b - a, c - b, d - c, e - d, f_ - e)):
            stages[k] += v
        instances += len(result["segments_info"])
        per_image.append({"path": p, "size": list(image.size), "instances": len(result["segments_info"]),
                          "decode": round(b - a, 4), "preprocess": round(c - b, 4), "forward": round(d - c, 4),
                          "postprocess": round(e - d, 4), "write": round(f_ - e, 4)})

    t_end = time.monotonic()
    doc = {
        "t_script": T_SCRIPT, "t_main": t0, "t_imported": t_imported, "t_loaded": t_loaded,
        "t_last_write": last_write, "t_end": t_end,
        "import_s": round(t_imported - t0, 4), "load_s": round(t_loaded - t_imported, 4),
        "loop_s": round(t_end - t_loaded, 4),
        "images": len(per_image), "instances": instances,
        "stages": {k: round(v, 4) for k, v in stages.items()},
        "processor_class": type(processor).__name__,
        "torch_threads": torch.get_num_threads(),
        "device": args.device, "dtype": args.dtype,
        "per_image": per_image,
    }
    with open(args.timings, "w") as f:
        json.dump(doc, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
