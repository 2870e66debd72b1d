"""--compile/--no-compile/auto: the rule, and that the pipeline applies it. torch.compile runs for
real (TorchDynamo traces the model and its graph runs), with the "eager" backend: the inductor
code generation behind the default backend takes minutes on 2 cores and is torch's to test."""

import pytest
import torch

from m2f_cli import RunConfig, run
from m2f_cli import choices
from m2f_cli.engines import local
from m2f_cli.choices import resolve_compile

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_auto_compiles_long_fixed_size_cpu_runs_only():
    n = choices.COMPILE_AUTO_MIN_IMAGES
    assert resolve_compile(None, CPU, n, fixed_size=True)
    assert not resolve_compile(None, CPU, n - 1, fixed_size=True)   # too short to pay back
    assert not resolve_compile(None, CPU, n, fixed_size=False)      # one compile per input shape
    assert not resolve_compile(None, CUDA, n, fixed_size=True)      # unmeasured there
    assert resolve_compile(True, CPU, 1, fixed_size=False)          # the user decides
    assert not resolve_compile(False, CPU, 10 * n, fixed_size=True)


@pytest.mark.parametrize("choice, expect", [(None, True), (False, False)])
def test_pipeline_applies_the_rule(tmp_path, image_dir, tiny_model, monkeypatch, choice, expect):
    import torch._dynamo
    compiled = []
    real_compile = torch.compile

    def eager_compile(model, *a, **k):
        compiled.append(model)
        return real_compile(model, backend="eager")

    monkeypatch.setattr(torch, "compile", eager_compile)
    monkeypatch.setattr(choices, "COMPILE_AUTO_MIN_IMAGES", 2)
    batches = []
    real = local.start_batch  # every batch goes through it (engines.local.segment_samples)
    monkeypatch.setattr(local, "start_batch",
                        lambda seg, batch, notify=None: batches.append(len(batch)) or real(seg, batch, notify))
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    s = run(RunConfig(inputs=[str(image_dir)], out=str(tmp_path / "out"), model=tiny_model, workers=0,
                      compile=choice))
    assert s.images == 4
    assert bool(compiled) == expect
    if expect:
        assert counters["stats"]["unique_graphs"] >= 1  # dynamo really traced and ran the model
        assert set(batches) == {1}  # compiled on CPU: one input shape, never a partial batch
        plain = run(RunConfig(inputs=[str(image_dir)], out=str(tmp_path / "plain"), model=tiny_model,
                              workers=0, compile=False, startup_cache="off"))
        assert plain.instances == s.instances  # the compiled graph computes what the model does
    else:
        assert not counters["stats"]["unique_graphs"]
