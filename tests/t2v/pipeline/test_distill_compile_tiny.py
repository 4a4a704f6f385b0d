"""`distill.compile` on the tiny preset (CPU): torch.compile of every block (checkpointed or not) trains the same.

The compiled blocks may graph-break on the quantized layers; whatever inductor fuses, the losses and trained
parameters must equal the eager run's up to float rounding.
"""
import dataclasses
import functools
import os

import pytest
import torch

from qdiff.api import init_weight_quantizers, quantize_model, trainable_parameters
from qdiff.config import QuantConfig, apply_overrides
from qdiff.distill import trainer
from qdiff.distill.checkpointing import compiled
from qdiff.distill.trainer import distill
from t2v.pipeline.build import build_model
from t2v.pipeline.config import load_inference_config

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.slow]

ITERATIONS = 2


def tiny_student():
    cfg = load_inference_config("configs/opensora/tiny_qvdit.py")
    model = build_model(cfg, (4, 16, 16))  # the tiny VAE halves 32x32
    qcfg = apply_overrides(QuantConfig.from_yaml("configs/quant/w4a6_qvdit.yaml"),
                           ["distill.lr=5e-3", "distill.lr_delta=1e-4", f"distill.iterations={ITERATIONS}"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        quantize_model(model, qcfg, adapter="stdit")
    init_weight_quantizers(model)
    return model, qcfg


def batch(iteration):
    gen = torch.Generator().manual_seed(iteration)
    mask = torch.ones(4, 8, dtype=torch.long)
    mask[:, 5:] = 0
    return {"x": torch.randn(4, 4, 4, 16, 16, generator=gen), "timestep": torch.randint(0, 1000, (4,), generator=gen),
            "y": torch.randn(4, 1, 8, 32, generator=gen), "mask": mask,
            "target": torch.randn(4, 8, 4, 16, 16, generator=gen) * 0.5}


def train(tmp_path, compile_blocks: bool, checkpoint_blocks):
    model, qcfg = tiny_student()
    cfg = dataclasses.replace(qcfg.distill, compile=compile_blocks, checkpoint_blocks=checkpoint_blocks)
    result = distill(model, lambda b: b["target"], batch, cfg, tmp_path, progress=False,
                     student_fn=lambda b: model(b["x"], b["timestep"], b["y"], mask=b["mask"]),
                     checkpoint_modules=model.blocks)
    groups = trainable_parameters(model)
    assert all("forward" not in vars(block) for block in model.blocks)  # eager forwards are back
    return [e["loss"] for e in result["history"]], [p.detach().clone() for p in groups["tqe"] + groups["delta"]]


INDUCTOR = pytest.param("inductor", marks=pytest.mark.skipif(
    not os.environ.get("QVDIT_TEST_INDUCTOR"),
    reason="inductor compiles C++ kernels for ~2 min on a cold 2-core CPU; set QVDIT_TEST_INDUCTOR=1"))


@pytest.mark.parametrize("backend", ["aot_eager", INDUCTOR])
def test_compiled_blocks_train_like_eager(tmp_path, monkeypatch, backend):
    """aot_eager: dynamo capture, graph breaks and AOT autograd under checkpointing; inductor (what
    `distill.compile` uses; opt-in here for its compile time): generated kernels too."""
    monkeypatch.setattr(trainer, "compiled", functools.partial(compiled, backend=backend))
    torch._dynamo.reset()
    eager_losses, eager_params = train(tmp_path / "eager", False, 1)
    compiled_losses, compiled_params = train(tmp_path / "compiled", True, 1)  # block 0 checkpointed, block 1 not
    assert len(compiled_losses) == ITERATIONS
    torch.testing.assert_close(torch.tensor(compiled_losses), torch.tensor(eager_losses), rtol=1e-4, atol=0)
    for got, want in zip(compiled_params, eager_params):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5)


def test_compile_config_key():
    qcfg = QuantConfig.from_yaml("configs/quant/w4a6_qvdit.yaml")
    cfg = qcfg.distill
    assert cfg.compile == "auto" and cfg.iterations == 10_000  # auto: compile long runs on CUDA, never on a CPU
    assert cfg.compiles("cuda") and cfg.compiles(torch.device("cuda", 1)) and not cfg.compiles("cpu")
    assert not apply_overrides(qcfg, ["distill.iterations=999"]).distill.compiles("cuda")
    assert apply_overrides(qcfg, ["distill.iterations=1000"]).distill.compiles("cuda")
    forced = apply_overrides(qcfg, ["distill.compile=true", "distill.iterations=5"]).distill
    assert forced.compile is True and forced.compiles("cpu") and forced.compiles("cuda")
    off = apply_overrides(qcfg, ["distill.compile=false"]).distill
    assert off.compile is False and not off.compiles("cuda")
    assert apply_overrides(qcfg, ["distill.compile=auto"]).distill.compile == "auto"
