"""The accelerator paths, proven on CPU: the batched device post-processing equals the CPU path and
reads the device back a fixed number of times per batch; pinned stacking; the OOM splitter; model and
post-processing failures become failure records; MPS fallback notices; device timing."""

import dataclasses
import warnings

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from m2f_cli.model import accel
from m2f_cli.postprocess import device as pdev
from m2f_cli.inputs.batch import Sample
from m2f_cli.model.categories import CategoryTable
from m2f_cli.engines.batches import infer_batch, segment_samples
from m2f_cli.postprocess.instance import PostprocessOptions, segment_instances
from m2f_cli.postprocess.device import host_syncs_per_batch, segment_batch
from m2f_cli.inputs.preprocess import preprocess
from m2f_cli.records import ImageRef
from m2f_cli.segmenter import Segmenter

from planted import PlantedPredictor, planted_image

COCO = CategoryTable.coco()


def _blob_logits(batch, q=30, low=24, confident=5, seed=0):
    """(B, Q, 81) class logits with `confident` object queries per image (the rest "no object"),
    and (B, Q, low, low) mask logits: a soft blob per query, so windows, boxes and overlaps vary."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(low).float(), torch.arange(low).float(), indexing="ij")
    cy, cx = (torch.rand(batch, q, 2, generator=g) * low).unbind(-1)
    r = 1 + 6 * torch.rand(batch, q, generator=g)
    d = ((yy - cy[..., None, None]) ** 2 + (xx - cx[..., None, None]) ** 2).sqrt()
    masks = 12 * (1 - d / r[..., None, None]) + torch.randn(batch, q, low, low, generator=g)
    cls = torch.randn(batch, q, 81, generator=g)
    cls[..., 80] += 6
    lab = torch.randint(0, 80, (batch, q), generator=g)
    hot = torch.zeros(batch, q, dtype=torch.bool)
    hot[:, :confident] = True
    cls += torch.nn.functional.one_hot(lab, 81) * torch.where(hot, 14.0, 0.0)[..., None]
    return cls, masks


def _assert_same(host, dev):
    """Same instances (labels, ids, boxes), scores within 1e-4, masks IoU >= 0.999, same map."""
    (hi, hmap), (di, dmap) = host, dev
    assert len(hi) == len(di)
    for a, b in zip(hi, di):
        assert (a.id, a.label_index, a.category_id) == (b.id, b.label_index, b.category_id)
        assert a.score == pytest.approx(b.score, abs=1e-4)
        if a.area or b.area:
            assert mask_utils.iou([a.rle], [b.rle], [0])[0, 0] >= 0.999
            assert abs(a.area - b.area) <= max(2, 0.001 * a.area)
    assert hmap.shape == dmap.shape and hmap.dtype == dmap.dtype
    assert (hmap == dmap).mean() >= 0.999


CASES = [((96, 96), [(96, 96), (96, 96)], [(480, 640), (333, 517)]),
         ((128, 96), [(110, 90), (128, 80)], [(37, 1000), (300, 200)]),
         ((64, 160), [(50, 160), (64, 160)], [(1, 1), (719, 1283)])]


@pytest.mark.parametrize("padded,valids,originals", CASES)
@pytest.mark.parametrize("options", [PostprocessOptions(threshold=0.5, map_threshold=0.5),
                                     PostprocessOptions(threshold=0.0, map_threshold=0.5),
                                     PostprocessOptions(threshold=0.3, map_threshold=0.6, top_k=7,
                                                        keep=frozenset({0, 5, 16, 41}))])
def test_batched_device_path_equals_the_cpu_path(padded, valids, originals, options):
    cls, masks = _blob_logits(len(originals), low=padded[0] // 4, seed=sum(padded))
    masks = masks[..., : padded[1] // 4] if masks.shape[-1] >= padded[1] // 4 else \
        torch.nn.functional.interpolate(masks, size=(padded[0] // 4, padded[1] // 4))
    if options.keep is not None:  # two classes the confident queries have, one they may not
        options = dataclasses.replace(options, keep=frozenset(cls[0, :2, :80].argmax(-1).tolist()) | {41})
    got = segment_batch(cls, masks, padded, valids, originals, COCO, options)
    compared = 0
    for b in range(len(originals)):
        want = segment_instances(cls[b], masks[b], padded, valids[b], originals[b], COCO, options)
        _assert_same(want, got[b])
        compared += len(want[0])
    assert compared > 0


def test_bfloat16_logits_and_several_groups(monkeypatch):
    """Model outputs under autocast (bf16), and a batch whose packed masks exceed PACK_BYTES: split
    into groups, two transfers each, same results."""
    cls, masks = _blob_logits(3, seed=4)
    cls, masks = cls.bfloat16(), masks.bfloat16()
    originals = [(200, 300), (250, 250), (90, 400)]
    opts = PostprocessOptions(threshold=0.0)
    whole = segment_batch(cls, masks, (96, 96), [(96, 96)] * 3, originals, COCO, opts)
    monkeypatch.setattr(pdev, "PACK_BYTES", 30 * 250 * 32)  # one image per group
    assert host_syncs_per_batch(originals, 30) == 6
    parts = segment_batch(cls, masks, (96, 96), [(96, 96)] * 3, originals, COCO, opts)
    for b in range(3):
        _assert_same(segment_instances(cls[b], masks[b], (96, 96), (96, 96), originals[b], COCO, opts), whole[b])
        _assert_same(whole[b], parts[b])


# --- host synchronisations ---------------------------------------------------------------------

_READS = {"item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__"}
# ops whose output size depends on the values: on a GPU each waits for the device
_VALUE_SHAPED = {"nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive",
                 "_local_scalar_dense", "argwhere", "nonzero_static"}


def _is_cpu(a) -> bool:
    return (isinstance(a, torch.device) and a.type == "cpu") or (isinstance(a, str) and a.startswith("cpu"))


class SyncCounter(TorchFunctionMode):
    """Counts the calls that read a tensor's values back to the host: .item(), .tolist(), .cpu(),
    .numpy(), .to("cpu"), bool()/int()/float()/index() of a tensor (each one a device sync on a GPU)."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in _READS or (name == "to" and any(_is_cpu(a) for a in [*args[1:], *kwargs.values()])):
            self.calls.append(name)
        return func(*args, **kwargs)


class ValueShapedCounter(TorchDispatchMode):
    """Counts, below the Python API, the aten ops that must see the data to size their output
    (nonzero, boolean-mask indexing, unique, scalar reads): hidden syncs a FunctionMode cannot see."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.__name__.split(".")[0]
        boolean_index = name == "index" and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else []))
        if name in _VALUE_SHAPED or boolean_index:
            self.calls.append(name)
        return func(*args, **kwargs)


def _count(fn):
    reads, shaped = SyncCounter(), ValueShapedCounter()
    with reads, shaped:
        out = fn()
    return len(reads.calls), len(shaped.calls), out


@pytest.mark.parametrize("threshold", [0.5, 0.0])
def test_device_path_reads_back_a_constant_number_of_times_per_batch(threshold):
    """2 transfers a batch (each .to("cpu") + .numpy() here), no value-shaped op, whether the batch
    has 0, 1, 8 or 40 instances an image; the CPU path's count grows with them (the counter works)."""
    originals = [(120, 160), (90, 200), (160, 120), (100, 100)]
    opts = PostprocessOptions(threshold=threshold, map_threshold=0.5)
    device_counts, host_counts, found = set(), [], []
    for confident in (0, 1, 8, 40):
        cls, masks = _blob_logits(4, q=40, confident=confident, seed=confident)
        r, v, out = _count(lambda: segment_batch(cls, masks, (96, 96), [(96, 96)] * 4, originals, COCO, opts))
        device_counts.add((r, v))
        found.append(sum(len(i) for i, _ in out))
        hr, hv, _ = _count(lambda: [segment_instances(cls[b], masks[b], (96, 96), (96, 96), originals[b], COCO,
                                                      opts) for b in range(4)])
        host_counts.append(hr + hv)
    assert device_counts == {(2 * host_syncs_per_batch(originals, 40), 0)} == {(4, 0)}
    if threshold > 0:
        assert found[0] == 0 and found[-1] > 40  # the instance count did vary
    if threshold > 0:
        assert host_counts[-1] > 10 * max(1, host_counts[0])  # the CPU path reads per instance
    else:
        assert min(host_counts) > 100 * 4  # top-k 100 candidates an image, all kept at threshold 0


def test_segmenter_batch_syncs_do_not_grow_with_instances():
    """Through Segmenter.start/finish (forward + post-processing of a whole batch) on CPU with the
    device path forced: the same count for a batch of 1 or 4 instances an image."""
    counts = []
    for n_obj in (1, 4):
        pred = _ManyObjects(n_obj)
        seg = Segmenter(pred, postprocess="device", threshold=0.5)
        x, refs, valids, originals = _batch(4)
        r, v, out = _count(lambda: seg.infer(x, refs, valids, originals))
        assert [len(o.instances) for o in out] == [n_obj] * 4
        counts.append((r, v))
    # 4: the two transfers; +1: the input's .to(device), host-to-device on a GPU (on CPU the counter
    # cannot tell the directions apart)
    assert counts[0] == counts[1] == (5, 0)


class _ManyObjects:
    """n confident queries, each a square in its own place."""

    def __init__(self, n):
        self.n, self.device, self.categories = n, torch.device("cpu"), COCO

    def __call__(self, x):
        b = x.shape[0]
        h, w = x.shape[-2] // 4, x.shape[-1] // 4
        cls = torch.full((b, 10, 81), -10.0)
        cls[:, :, 80] = 10.0
        masks = torch.full((b, 10, h, w), -10.0)
        for i in range(self.n):
            cls[:, i, i] = 10.0
            cls[:, i, 80] = -10.0
            masks[:, i, 2 + 2 * i:4 + 2 * i, 3:9] = 10.0
        return cls, masks


def _batch(n, size=(64, 64)):
    x = torch.zeros(n, 3, *size)
    refs = [ImageRef(path=f"/x/{i}.jpg", name=f"{i}", rel=f"{i}", index=i) for i in range(n)]
    return x, refs, [size] * n, [(100, 120)] * n


# --- pinned memory -----------------------------------------------------------------------------

def test_stack_pixels_stacks_the_batch():
    pix = [torch.randn(3, 8, 12) for _ in range(3)]
    for pin in (False, True):
        out = accel.stack_pixels(pix, pin=pin)
        assert out.shape == (3, 3, 8, 12) and out.dtype == torch.float32
        assert torch.equal(out, torch.stack(pix))
        assert out.is_pinned() == (pin and torch.cuda.is_available())


def test_batches_for_cuda_are_pinned(monkeypatch):
    """A model on CUDA gets each batch stacked into pinned memory (the copy to the card is then
    asynchronous), a model on the CPU does not. Runs without a card: the CUDA device is faked as in
    test_segment_samples_gives_every_result_once_with_a_batch_in_flight, and the pinned allocation
    of accel.stack_pixels (torch.empty(pin_memory=True), which a CPU-only torch cannot do) is spied
    on: recorded, then made in ordinary memory."""
    pinned = []
    real_empty = torch.empty

    def empty(*args, pin_memory=False, **kwargs):
        out = real_empty(*args, **kwargs)
        if pin_memory:
            pinned.append(tuple(out.shape))
        return out
    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(accel, "pin_available", lambda: True)  # a CUDA driver
    seg = Segmenter(PlantedPredictor())
    monkeypatch.setattr(seg, "uses_device_postprocess", lambda: False)
    on_cpu = infer_batch(seg, _samples(2))
    assert pinned == [] and len(on_cpu) == 2  # a CPU model: no pinning

    monkeypatch.setattr(type(seg), "device", property(lambda self: torch.device("cuda")))
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: self)  # no card here: stay on the CPU
    monkeypatch.setattr(accel.DeviceTimer, "start", lambda self: self)
    monkeypatch.setattr(accel.DeviceTimer, "stop", lambda self: self)
    monkeypatch.setattr(accel.DeviceTimer, "elapsed", lambda self: 0.0)
    on_cuda = infer_batch(seg, _samples(2))
    assert pinned == [(2, 3, *_samples(1)[0].pixel_values.shape[-2:])]  # the batch, once, pinned
    for (_, a), (_, b) in zip(on_cuda, on_cpu):  # the same results from the pinned batch
        assert [(i.label, i.bbox) for i in a.instances] == [(i.label, i.bbox) for i in b.instances]
        assert a.instances


# --- out of memory -----------------------------------------------------------------------------

class _OomAbove(PlantedPredictor):
    """Raises torch.OutOfMemoryError for batches larger than `fits` (a card that is too small)."""

    def __init__(self, fits):
        super().__init__()
        self.fits = fits

    def __call__(self, x):
        if x.shape[0] > self.fits:
            self.batch_sizes.append(-x.shape[0])
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {x.shape[0]} GiB")
        return super().__call__(x)


def _samples(n, w=160, h=120):
    out = []
    for i in range(n):
        img, _ = planted_image(w, h, seed=i)
        mi = preprocess(np.asarray(img), PlantedPredictor().preprocess_spec)
        ref = ImageRef(path=f"/in/{i}.png", name=f"{i}", rel=f"{i}", index=i)
        out.append(Sample(i, ref, torch.from_numpy(mi.pixel_values), mi.valid, (h, w)))
    return out


@pytest.mark.parametrize("fits,tries", [(4, [-8, 4, 4]), (1, [-8, -4, -2] + [1] * 8)])
def test_out_of_memory_splits_the_batch_and_no_image_fails(fits, tries):
    pred = _OomAbove(fits)
    seg = Segmenter(pred)
    notices = []
    out = infer_batch(seg, _samples(8), notify=notices.append)
    assert [seq for seq, _ in out] == list(range(8))
    assert all(not hasattr(r, "stage") for _, r in out)  # every image has its result
    assert [len(r.instances) for _, r in out] == [2] * 8
    assert pred.batch_sizes == tries
    assert notices[0] == "cpu out of memory on a batch of 8 images: retrying in batches of 4"
    assert all(len(n.splitlines()) == 1 for n in notices)
    assert seg.max_batch == max(1, fits) if fits < 8 else seg.max_batch is None
    # later batches are cut to what fitted, without another OOM
    pred.batch_sizes.clear()
    infer_batch(seg, _samples(8), notify=notices.append)
    assert pred.batch_sizes and all(b > 0 for b in pred.batch_sizes)


def test_out_of_memory_on_one_image_is_that_image_failure():
    out = infer_batch(Segmenter(_OomAbove(0)), _samples(1), notify=lambda s: None)
    assert out[0][1].stage == "model" and "out of memory" in out[0][1].error


# --- failures of the model and of the post-processing ------------------------------------------

class _Raising(PlantedPredictor):
    def __init__(self, exc):
        super().__init__()
        self.exc = exc

    def __call__(self, x):
        raise self.exc


@pytest.mark.parametrize("exc", [TypeError("Cannot convert a MPS Tensor to float64 dtype"),
                                 NotImplementedError("The operator 'aten::foo' is not currently implemented "
                                                     "for the MPS device"),
                                 KeyError("mask"), AssertionError()])
def test_any_model_exception_is_a_failure_record(exc):
    out = infer_batch(Segmenter(_Raising(exc)), _samples(3))
    assert [f.stage for _, f in out] == ["model"] * 3
    assert out[0][1].error.startswith(type(exc).__name__) and "\n" not in out[0][1].error


def test_a_postprocessing_exception_fails_only_its_image(monkeypatch):
    import m2f_cli.segmenter as segmod
    real = segmod.segment_instances

    def flaky(cls, masks, padded, valid, original, *a):
        if original == (121, 160):
            raise TypeError("float64 is not supported on this device")
        return real(cls, masks, padded, valid, original, *a)
    monkeypatch.setattr(segmod, "segment_instances", flaky)
    samples = _samples(3)
    samples[1].original = (121, 160)
    out = infer_batch(Segmenter(PlantedPredictor()), samples)
    assert [getattr(r, "stage", None) for _, r in out] == [None, "postprocess", None]
    assert out[1][1].error == "TypeError: float64 is not supported on this device"


def test_device_postprocessing_failure_falls_back_to_the_cpu_once(monkeypatch):
    import m2f_cli.segmenter as segmod

    def missing(*a, **k):
        raise NotImplementedError("aten::topk with k > 16 is not implemented for MPS")
    monkeypatch.setattr(segmod, "launch_batch", missing)
    notices = []
    seg = Segmenter(PlantedPredictor(), postprocess="device", notify=notices.append)
    for _ in range(2):
        out = infer_batch(seg, _samples(2))
        assert [len(r.instances) for _, r in out] == [2, 2]
    assert len(notices) == 1 and "post-processing on the CPU from now on" in notices[0]
    assert seg.postprocess == "host"


def test_cli_run_with_a_failing_model_writes_failures_not_a_traceback(tmp_path, image_dir):
    from m2f_cli import RunConfig, run
    seg = Segmenter(_Raising(TypeError("Trying to convert Double to the MPS backend")))
    s = run(RunConfig(inputs=[str(image_dir)], out=str(tmp_path / "o"), workers=0), segmenter=seg)
    assert (s.images, s.failed, s.exit_code) == (0, 4, 3)
    lines = (tmp_path / "o" / "failures.jsonl").read_text().splitlines()
    assert len(lines) == 4 and all('"stage": "model"' in ln and "TypeError" in ln for ln in lines)


# --- MPS notices, device timing, batch size ----------------------------------------------------

def test_mps_fallback_warnings_become_one_notice_per_op():
    notices = []
    watch = accel.MpsFallbackNotices(notices.append)
    msg = ("The operator 'aten::upsample_bicubic2d.out' is not currently supported on the MPS backend and "
           "will fall back to run on the CPU. This may have performance implications.")
    with warnings.catch_warnings(record=True) as other:
        warnings.simplefilter("always")
        for _ in range(3):
            with watch.watching():
                warnings.warn(msg, UserWarning)
                warnings.warn("something else", DeprecationWarning)
    assert notices == ["aten::upsample_bicubic2d.out is not implemented on MPS: it runs on the CPU (slower)"]
    assert [str(w.message) for w in other] == ["something else"] * 3  # passed on


def test_segmenter_reports_mps_fallbacks_of_the_forward():
    class Warns(PlantedPredictor):
        def __call__(self, x):
            warnings.warn("The operator 'aten::grid_sampler_2d_backward' is not currently supported on the MPS "
                          "backend and will fall back to run on the CPU.", UserWarning)
            return super().__call__(x)
    notices = []
    seg = Segmenter(Warns(), notify=notices.append)
    infer_batch(seg, _samples(2))
    infer_batch(seg, _samples(2))
    assert notices == ["aten::grid_sampler_2d_backward is not implemented on MPS: it runs on the CPU (slower)"]


def test_forward_timer_synchronises_mps_and_uses_events_on_cuda(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.mps, "synchronize", lambda: calls.append("mps"))
    t = accel.DeviceTimer(torch.device("mps")).start()
    assert calls == []
    t.stop()
    assert calls == ["mps"] and t.elapsed() >= 0
    cpu = accel.DeviceTimer(torch.device("cpu")).start().stop()
    assert cpu.elapsed() >= 0 and calls == ["mps"]  # nothing to wait for on CPU
    if torch.cuda.is_available():
        c = accel.DeviceTimer(torch.device("cuda")).start()
        torch.randn(1024, 1024, device="cuda") @ torch.randn(1024, 1024, device="cuda")
        assert c.stop().elapsed() > 0


def test_cuda_batch_size_follows_the_card_memory():
    gib = 1024 ** 3
    assert accel.cuda_batch_size(141 * gib, (384, 384), torch.bfloat16) == 32
    assert accel.cuda_batch_size(8 * gib, (384, 384), torch.bfloat16) == 8
    assert accel.cuda_batch_size(8 * gib, (384, 384), torch.float32) == 4
    assert accel.cuda_batch_size(8 * gib, (800, 1088), torch.float32) == 1
    assert accel.cuda_batch_size(1 * gib, (800, 1088), torch.float32) == 1


def test_oom_detection():
    assert accel.is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert accel.is_out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated: 9 GB)"))
    assert not accel.is_out_of_memory(RuntimeError("shape mismatch"))


def test_segment_samples_gives_every_result_once_with_a_batch_in_flight(monkeypatch):
    """The CUDA loop keeps one batch in flight; faked here by a predictor that says it is on cuda."""
    seg = Segmenter(PlantedPredictor())
    monkeypatch.setattr(type(seg), "device", property(lambda self: torch.device("cuda")))
    monkeypatch.setattr(seg, "uses_device_postprocess", lambda: False)
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: self)  # no card here: stay on the CPU
    monkeypatch.setattr(accel.DeviceTimer, "start", lambda self: self)
    monkeypatch.setattr(accel.DeviceTimer, "stop", lambda self: self)
    monkeypatch.setattr(accel.DeviceTimer, "elapsed", lambda self: 0.0)
    monkeypatch.setattr("m2f_cli.engines.batches.stack_pixels", lambda px, pin=False: torch.stack(px))
    order = []
    real_start = seg.start

    def start(*a):
        order.append("start")
        flight = real_start(*a)
        real_finish = flight.finish
        flight.finish = lambda: (order.append("finish"), real_finish())[1]
        return flight
    monkeypatch.setattr(seg, "start", start)
    out = list(segment_samples(seg, _samples(5), batch_size=2))
    assert sorted(seq for seq, _ in out) == list(range(5))
    assert order == ["start", "start", "finish", "start", "finish", "finish"]  # batch n+1 queued first


def test_cuda_auto_settings_follow_the_card(monkeypatch):
    import os
    from types import SimpleNamespace
    from m2f_cli import RunConfig
    from m2f_cli.choices import auto_settings
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=8 * 1024 ** 3))
    monkeypatch.setattr(os, "cpu_count", lambda: 32)
    cfg = RunConfig(inputs=[], out="o")
    assert auto_settings(torch.device("cuda"), cfg, (384, 384), torch.bfloat16)[:2] == (8, 16)
    assert auto_settings(torch.device("cuda"), cfg, (800, 1088), torch.float32)[0] == 1
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    assert auto_settings(torch.device("cuda"), cfg, (384, 384), torch.bfloat16)[1] == 2
    import dataclasses as dc
    assert auto_settings(torch.device("cuda"), dc.replace(cfg, batch_size=3, workers=1), (384, 384))[:2] == (3, 1)


def test_a_run_with_the_device_path_writes_what_the_cpu_path_writes(tmp_path, image_dir):
    """The whole pipeline (batches of images of several sizes, png + coco + jsonl) with the batched
    device post-processing forced on CPU: the same files as the default CPU path."""
    from m2f_cli import RunConfig, run
    from test_never_lose_work import _snapshot
    outs = {}
    for mode in ("host", "device"):
        cfg = RunConfig(inputs=[str(image_dir)], out=str(tmp_path / mode), formats=("png", "coco", "jsonl"),
                        workers=0, batch_size=4)
        s = run(cfg, segmenter=Segmenter(PlantedPredictor(), postprocess=mode))
        assert (s.images, s.failed) == (4, 0)
        outs[mode] = _snapshot(tmp_path / mode)
    assert outs["host"].keys() == outs["device"].keys()
    for name in outs["host"]:
        _close(outs["host"][name], outs["device"][name], name)


def _close(a, b, where):
    """Equal, except floats (scores, written to 6 decimals) within 1e-4: the two paths sum a mask's
    sigmoid in a different order, which can move the 6th decimal."""
    if isinstance(a, float) or isinstance(b, float):
        assert a == pytest.approx(b, abs=1e-4), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _close(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{where}[{i}]")
    elif isinstance(a, str) and a.startswith("{") and "score" in a:  # a JSON Lines record
        import json
        _close(json.loads(a), json.loads(b), where)
    else:
        assert a == b, where
