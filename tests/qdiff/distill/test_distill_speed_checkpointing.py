"""qdiff.distill.checkpointing and the trainer's `checkpoint_blocks`: which blocks are recomputed changes nothing
numerically; resume stays bit-identical. The "auto" decision is tested in test_checkpoint_auto_plan.py."""
import pytest
import torch
from torch import nn

from qdiff.api import init_weight_quantizers, quantize_model
from qdiff.config import ConfigError, QuantConfig
from qdiff.distill.trainer import distill

DEPTH = 3


class Block(nn.Module):
    def __init__(self, channels=4, hidden=16):
        super().__init__()
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)
        self.calls = 0  # forward runs, recomputes included

    def forward(self, h):
        self.calls += 1
        return h + self.fc2(torch.nn.functional.gelu(self.fc1(h)))


class ToyBlockModel(nn.Module):
    """x [B, C, T, H, W] -> [B, C, T, H, W]: residual per-pixel MLP blocks over the channels."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(DEPTH))

    def forward(self, x):
        h = x.permute(0, 2, 3, 4, 1)
        for block in self.blocks:
            h = block(h)
        return h.permute(0, 4, 1, 2, 3)


def make_config(**distill):
    base = dict(enabled=True, iterations=5, lr=1e-2, lr_delta=1e-4, checkpoint_every=2)
    return QuantConfig.from_dict({"method": "qvdit", "weight": {"bits": 3}, "act": {"bits": 8},
                                  "tqe": {"rank": 4, "rank_out": 1}, "distill": {**base, **distill}})


def batches(iteration):
    return {"x": torch.randn(4, 4, 3, 2, 2, generator=torch.Generator().manual_seed(iteration))}


def run(qcfg, ckpt_dir, **kwargs):
    """-> (result, student, forward calls per block)."""
    torch.manual_seed(0)
    teacher, student = ToyBlockModel(), ToyBlockModel()
    student.load_state_dict(teacher.state_dict())
    init_weight_quantizers(quantize_model(student, qcfg))
    result = distill(student, lambda b: teacher(**b), batches, qcfg.distill, ckpt_dir, progress=False,
                     checkpoint_modules=student.blocks, **kwargs)
    return result, student, [block.calls for block in student.blocks]


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_partial_checkpointing_equals_full_and_none(tmp_path):
    runs = {}
    for name, overrides in {"all": {}, "one": {"checkpoint_blocks": 1}, "auto": {"checkpoint_blocks": "auto"},
                            "none": {"grad_checkpointing": False}}.items():
        qcfg = make_config(iterations=4, **overrides)
        result, student, calls = run(qcfg, tmp_path / name)
        runs[name] = (result["history"], state(student))
        checkpointed = {"all": DEPTH, "one": 1, "auto": DEPTH, "none": 0}[name]  # auto on CPU: all
        assert result["checkpointed_blocks"] == checkpointed
        assert calls == [8] * checkpointed + [4] * (DEPTH - checkpointed)  # a recompute per backward
        assert all("forward" not in vars(block) for block in student.blocks)  # the wrappers are removed
    history, params = runs["all"]
    for name, (other_history, other_params) in runs.items():
        assert other_history == history, name
        assert all(torch.equal(other_params[k], params[k]) for k in params), name


def test_resume_with_other_checkpoint_blocks_is_bit_identical(tmp_path):
    full, uninterrupted, _ = run(make_config(), tmp_path / "full")

    def dying(iteration):
        if iteration == 3:
            raise KeyboardInterrupt
        return batches(iteration)

    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):
        teacher, student = ToyBlockModel(), ToyBlockModel()
        student.load_state_dict(teacher.state_dict())
        qcfg = make_config(checkpoint_blocks=1)
        init_weight_quantizers(quantize_model(student, qcfg))
        distill(student, lambda b: teacher(**b), dying, qcfg.distill, tmp_path / "run", progress=False,
                checkpoint_modules=student.blocks)
    resumed, student, _ = run(make_config(checkpoint_blocks=2), tmp_path / "run", resume=True)
    assert resumed["resumed_from"] == 2 and resumed["history"] == full["history"]
    reference = state(uninterrupted)
    assert all(torch.equal(value, reference[key]) for key, value in state(student).items())


def test_config_keys():
    assert make_config().distill.checkpoint_blocks == "auto"
    assert make_config(checkpoint_blocks="7").distill.checkpoint_blocks == 7
    assert make_config(checkpoint_blocks="all").distill.checkpoint_blocks == "all"
    for bad in ("some", -1, 1.5, True):
        with pytest.raises(ConfigError, match="checkpoint_blocks"):
            make_config(checkpoint_blocks=bad)
    with pytest.raises(ConfigError, match="fp_targets"):
        make_config(fp_targets="cached")
    with pytest.raises(ConfigError, match="fused_weights"):
        make_config(fused_weights="yes")
    assert make_config().distill.checkpoint_memory_fraction == 0.85
    assert make_config(checkpoint_memory_fraction="0.5").distill.checkpoint_memory_fraction == 0.5
    for bad in (0, 1.5, -0.1, "most"):
        with pytest.raises(ConfigError, match="checkpoint_memory_fraction"):
            make_config(checkpoint_memory_fraction=bad)
    with pytest.raises(ConfigError, match="compile"):
        make_config(compile="yes")
