"""qdiff.distill.trainer on a toy video model (model-agnostic: no t2v)."""
import dataclasses
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from qdiff.api import init_weight_quantizers, quant_layers, quantize_model, set_quant_state, trainable_parameters
from qdiff.config import QuantConfig
from qdiff.distill.trainer import CHECKPOINT_NAME, DistillDivergedError, DistillStateError, distill


class ToyVideoModel(nn.Module):
    """x [B, C, T, H, W] -> [B, C, T, H, W]: a per-pixel MLP over channels plus a frame mixer."""

    def __init__(self, channels=4, hidden=32):
        super().__init__()
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)
        self.norm_scale = nn.Parameter(torch.ones(channels))  # a non-quant parameter that must stay frozen

    def forward(self, x):
        h = x.permute(0, 2, 3, 4, 1)  # [B, T, H, W, C]
        h = self.fc2(torch.nn.functional.gelu(self.fc1(h))) * self.norm_scale
        return h.permute(0, 4, 1, 2, 3)  # [B, C, T, H, W]


def make_config(**distill):
    base = dict(enabled=True, iterations=20, batch_size=4, lr=1e-2, lr_delta=1e-4, checkpoint_every=5, seed=3)
    base.update(distill)
    return QuantConfig.from_dict({
        "method": "qvdit",
        "weight": {"bits": 3},
        "act": {"bits": 8},
        "tqe": {"rank": 4, "rank_out": 1, "frame_scale": False},
        "distill": base,
    })


def make_setup(qcfg, seed=0):
    torch.manual_seed(seed)
    teacher = ToyVideoModel()
    student = ToyVideoModel()
    student.load_state_dict(teacher.state_dict())
    quantize_model(student, qcfg)
    init_weight_quantizers(student)
    return teacher, student


def batches_for(seed, rank=0):
    def batches(iteration):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + rank * 10_007 + iteration)
        return {"x": torch.randn(4, 4, 3, 2, 2, generator=gen)}
    return batches


def run(qcfg, tmp_path, teacher, student, **kwargs):
    return distill(student, lambda b: teacher(**b), batches_for(qcfg.distill.seed), qcfg.distill, tmp_path,
                   progress=False, **kwargs)


def quant_state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_loss_decreases_and_only_quant_params_train(tmp_path):
    qcfg = make_config(iterations=150, checkpoint_every=1000)
    teacher, student = make_setup(qcfg)
    frozen_before = {n: p.detach().clone() for n, p in student.named_parameters() if "lora" not in n and "delta" not in n}
    flags_before = {n: p.requires_grad for n, p in student.named_parameters()}
    logged = []
    result = run(qcfg, tmp_path, teacher, student, log_fn=logged.append, log_every=50)
    losses = [entry["loss"] for entry in result["history"]]
    assert len(losses) == 150 and [e["iteration"] for e in result["history"]] == list(range(1, 151))
    assert sum(losses[-20:]) < 0.5 * sum(losses[:20])
    assert [entry["iteration"] for entry in logged] == [50, 100, 150]
    for name, before in frozen_before.items():
        assert torch.equal(dict(student.named_parameters())[name], before), name
    assert {n: p.requires_grad for n, p in student.named_parameters()} == flags_before  # restored
    assert (tmp_path / CHECKPOINT_NAME).is_file()
    # the trained quantized student is closer to the teacher than the PTQ initialisation
    _, fresh = make_setup(qcfg)
    x = torch.randn(8, 4, 3, 2, 2)
    set_quant_state(student, True, True)
    set_quant_state(fresh, True, True)
    with torch.no_grad():
        target = teacher(x)
        assert (student(x) - target).norm() < (fresh(x) - target).norm()


def test_lr_groups_weight_decay_and_cosine_schedule(tmp_path):
    qcfg = make_config(iterations=10, lr=1e-3, lr_delta=1e-5, weight_decay=0.05, checkpoint_every=10)
    teacher, student = make_setup(qcfg)
    result = run(qcfg, tmp_path, teacher, student)
    lrs = [entry["lr"] for entry in result["history"]]
    assert lrs[0] == pytest.approx(1e-3)
    expected = [1e-3 * (1 + torch.cos(torch.tensor(torch.pi * k / 10)).item()) / 2 for k in range(10)]
    assert lrs == pytest.approx(expected, rel=1e-6)
    from safetensors import safe_open
    import json
    with safe_open(str(tmp_path / CHECKPOINT_NAME), framework="pt") as f:
        groups = json.loads(f.metadata()["param_groups"])
    assert [g["name"] for g in groups] == ["tqe", "delta"]
    assert [g["initial_lr"] for g in groups] == [1e-3, 1e-5]
    assert all(g["weight_decay"] == 0.05 for g in groups)
    assert all(g["lr"] == 0.0 for g in groups)  # annealed to 0 at the end
    trainable = trainable_parameters(student)
    assert [len(groups[0]["params"]), len(groups[1]["params"])] == [len(trainable["tqe"]), len(trainable["delta"])]


def test_resume_after_kill_is_bit_identical(tmp_path):
    qcfg = make_config(iterations=17, checkpoint_every=5)
    teacher, uninterrupted = make_setup(qcfg)
    full = run(qcfg, tmp_path / "full", teacher, uninterrupted)

    # "killed" run: stops after 12 iterations (last checkpoint at 10) ...
    teacher, first = make_setup(qcfg)

    def dying_batches(iteration):
        if iteration == 12:
            raise KeyboardInterrupt
        return batches_for(qcfg.distill.seed)(iteration)

    with pytest.raises(KeyboardInterrupt):
        distill(first, lambda b: teacher(**b), dying_batches, qcfg.distill, tmp_path / "run", progress=False)
    # ... and a fresh process (fresh model, same PTQ init) resumes from iteration 10.
    teacher, resumed_model = make_setup(qcfg, seed=0)
    resumed = run(qcfg, tmp_path / "run", teacher, resumed_model, resume=True)
    assert resumed["resumed_from"] == 10
    assert resumed["history"] == full["history"]
    for (name, a), (_, b) in zip(uninterrupted.state_dict().items(), resumed_model.state_dict().items()):
        assert torch.equal(a, b), name
    # resuming a finished run changes nothing
    again = run(qcfg, tmp_path / "run", teacher, resumed_model, resume=True)
    assert again["resumed_from"] == 17 and again["history"] == full["history"]


def test_existing_checkpoint_needs_resume_or_overwrite_and_matching_config(tmp_path):
    qcfg = make_config(iterations=5, checkpoint_every=5)
    teacher, student = make_setup(qcfg)
    run(qcfg, tmp_path, teacher, student)
    with pytest.raises(FileExistsError, match="--resume"):
        run(qcfg, tmp_path, teacher, student)
    run(qcfg, tmp_path, teacher, student, overwrite=True)
    other = make_config(iterations=5, checkpoint_every=5, lr=5e-3)
    with pytest.raises(DistillStateError, match="lr"):
        run(other, tmp_path, teacher, student, resume=True)


def test_nan_loss_raises_and_keeps_last_good_checkpoint(tmp_path):
    qcfg = make_config(iterations=20, checkpoint_every=4)
    teacher, student = make_setup(qcfg)

    def teacher_fn(batch):
        out = teacher(**batch)
        return out * float("nan") if teacher_fn.calls >= 9 else out
    teacher_fn.calls = 0

    def counting(batch):
        result = teacher_fn(batch)
        teacher_fn.calls += 1
        return result

    with pytest.raises(DistillDivergedError) as info:
        distill(student, counting, batches_for(3), qcfg.distill, tmp_path, progress=False)
    message = str(info.value)
    assert "iteration 10" in message and str(tmp_path / CHECKPOINT_NAME) in message
    assert info.value.iteration == 10 and info.value.checkpoint == tmp_path / CHECKPOINT_NAME
    from safetensors import safe_open
    with safe_open(str(tmp_path / CHECKPOINT_NAME), framework="pt") as f:
        assert f.metadata()["iteration"] == "8"
        assert all(torch.isfinite(f.get_tensor(k)).all() for k in f.keys())
    assert all(torch.isfinite(p).all() for p in student.parameters())


def test_nan_before_any_checkpoint_says_so(tmp_path):
    qcfg = make_config(iterations=5, checkpoint_every=5)
    teacher, student = make_setup(qcfg)
    with pytest.raises(DistillDivergedError, match="iteration 1: .*no checkpoint"):
        distill(student, lambda b: teacher(**b) * float("inf"), batches_for(3), qcfg.distill, tmp_path, progress=False)
    assert not (tmp_path / CHECKPOINT_NAME).exists()


def test_activations_follow_config_and_switches_restored(tmp_path):
    qcfg = make_config(iterations=2, checkpoint_every=2, quantize_activations=True)
    teacher, student = make_setup(qcfg)
    seen = []

    def student_fn(batch):
        seen.append({(l.quant_weight, l.quant_act) for _, l in quant_layers(student)})
        return student(**batch)

    run(qcfg, tmp_path, teacher, student, student_fn=student_fn)
    assert seen == [{(True, True)}] * 2
    assert {(l.quant_weight, l.quant_act) for _, l in quant_layers(student)} == {(False, False)}


def test_multiple_timestep_ranges_not_supported(tmp_path):
    qcfg = dataclasses.replace(make_config(), calib={"timestep_ranges": 2})
    teacher, student = make_setup(qcfg)
    with pytest.raises(NotImplementedError, match="timestep ranges"):
        run(qcfg, tmp_path, teacher, student)


# ------------------------------------------------------------------------------ 2 gloo processes
def _ddp_worker(rank, world_size, port, outdir):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        qcfg = make_config(iterations=6, checkpoint_every=3)
        teacher, student = make_setup(qcfg)
        result = distill(student, lambda b: teacher(**b), batches_for(3, rank), qcfg.distill, outdir, progress=False)
        torch.save({"state": quant_state(student), "history": result["history"]}, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_stay_in_sync(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["history"] == ranks[1]["history"]
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), key
    assert (tmp_path / CHECKPOINT_NAME).is_file()
    # the gradients were averaged: the result differs from a 1-process run on rank 0's batches
    qcfg = make_config(iterations=6, checkpoint_every=3)
    teacher, single = make_setup(qcfg)
    run(qcfg, tmp_path / "single", teacher, single)
    assert any(not torch.equal(v, ranks[0]["state"][k]) for k, v in single.state_dict().items())
