"""FP targets computed once per calibration row (t2v.pipeline.calib_data.fp_targets) and their use in stage 4."""
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from qdiff.api import init_weight_quantizers, quantize_model
from qdiff.config import QuantConfig, apply_overrides
from qdiff.distill.trainer import distill
from t2v.pipeline.build import build_model
from t2v.pipeline.calib_data import CalibDataset, capture_calib_data, fp_targets, model_fingerprint
from t2v.pipeline.config import load_inference_config
from t2v.pipeline.ptq import calibrate, open_calib_data
from t2v.pipeline.sample import build_pipeline
from t2v.pipeline.text_embeds import read_prompts

pytestmark = pytest.mark.usefixtures("one_torch_thread")

W4A6 = ["calib.n_steps=5", "calib.n_prompts=2", "distill.lr=5e-4", "distill.lr_delta=1e-5", "distill.iterations=3"]


@pytest.fixture(scope="module")
def tiny():
    cfg = load_inference_config("configs/opensora/tiny.py")
    return cfg, build_pipeline(cfg, num_sampling_steps=5)


@pytest.fixture(scope="module")
def calib_dir(tiny, tmp_path_factory):
    cfg, pipe = tiny
    outdir = tmp_path_factory.mktemp("calib_data")
    return capture_calib_data(pipe, read_prompts(cfg.prompt_path)[:2], [0, 1], outdir, seed=42, progress=False)


def fp_model(tiny):
    cfg, pipe = tiny
    return build_model(cfg, pipe.model_input_size)


def forward(model, batch):
    return model(batch["x"], batch["timestep"], batch["y"], mask=batch["mask"])


def counting_teacher(model):
    def teacher(batch):  # with grad on, as a careless caller would: the targets must not keep a graph
        teacher.calls += 1
        return forward(model, batch)
    teacher.calls = 0
    return teacher


def test_targets_equal_the_teacher_and_are_cached(tiny, calib_dir, caplog):
    model = fp_model(tiny)
    calib = CalibDataset(calib_dir, n_steps=5)
    for path in calib_dir.glob("fp_targets_*"):
        path.unlink()
    teacher = counting_teacher(model)
    key = model_fingerprint(model)
    targets = fp_targets(calib, teacher, key, batch_size=4, progress=False)
    assert targets.shape == (len(calib), 8, 4, 16, 16) and targets.dtype == torch.float32
    assert not targets.requires_grad and teacher.calls == len(calib) // 4
    with torch.no_grad():
        for start in range(0, len(calib), 4):  # the batches it ran: exactly the teacher's values
            rows = torch.arange(start, start + 4)
            assert torch.equal(targets[rows], forward(model, calib.get(rows)))
        for row in (0, 7, 13):  # alone, or in another batch: equal up to fp32 rounding
            assert torch.allclose(targets[row], forward(model, calib.get([row]))[0], rtol=1e-5, atol=1e-6)
    cached = list(calib_dir.glob("fp_targets_*.safetensors"))
    assert len(cached) == 1
    again = fp_targets(calib, teacher, key, batch_size=4, progress=False)
    assert torch.equal(again, targets) and teacher.calls == len(calib) // 4  # read, not recomputed
    # another model, other kept steps, or a damaged file: recomputed
    fp_targets(calib, teacher, "another model", batch_size=4, progress=False)
    assert teacher.calls == 2 * len(calib) // 4 and len(list(calib_dir.glob("fp_targets_*"))) == 2
    fewer = CalibDataset(calib_dir, n_steps=1)
    assert len(fp_targets(fewer, teacher, key, batch_size=3, progress=False)) == len(fewer) == 4
    cached[0].write_bytes(b"not safetensors")
    assert torch.equal(fp_targets(calib, teacher, key, batch_size=4, progress=False), targets)
    assert "unreadable" in caplog.text
    calls = teacher.calls
    assert torch.equal(fp_targets(calib, teacher, key, batch_size=4, progress=False, cache=False), targets)
    assert teacher.calls == calls + len(calib) // 4


def test_precomputed_targets_give_the_online_teachers_loss_and_gradients(tiny, calib_dir, tmp_path):
    qconfig = apply_overrides(QuantConfig.from_yaml("configs/quant/w4a6_qvdit.yaml"), W4A6)
    calib = CalibDataset(calib_dir, n_steps=5)
    teacher_model = fp_model(tiny).requires_grad_(False)
    targets = fp_targets(calib, lambda batch: forward(teacher_model, batch), "tiny", batch_size=4,
                         progress=False, cache=False)

    def batches(iteration):  # the rows of one precompute batch: the online teacher sees the same batch
        batch = calib.get(torch.arange(4) + 4 * (iteration % (len(calib) // 4)))
        return {**batch, "target": targets[batch["index"]]}

    runs = []
    for teacher_fn in (lambda batch: forward(teacher_model, batch), lambda batch: batch["target"]):
        student = fp_model(tiny)
        with torch.random.fork_rng():
            torch.manual_seed(qconfig.distill.seed)
            quantize_model(student, qconfig, adapter="stdit")
        init_weight_quantizers(student)
        result = distill(student, teacher_fn, batches, qconfig.distill, tmp_path / str(len(runs)), progress=False,
                         student_fn=lambda batch: forward(student, batch), checkpoint_modules=student.blocks)
        runs.append((result["history"], {k: v.clone() for k, v in student.state_dict().items()}))
    (history, state), (history_online, state_online) = runs
    assert history == history_online
    assert all(torch.equal(state[k], state_online[k]) for k in state)


def test_stage4_precompute_and_online_agree(tiny, calib_dir, tmp_path):
    reports = {}
    for mode in ("precompute", "online"):
        qconfig = apply_overrides(QuantConfig.from_yaml("configs/quant/w4a6_qvdit.yaml"),
                                  W4A6 + [f"distill.fp_targets={mode}"])
        calibrate(fp_model(tiny), qconfig, open_calib_data(calib_dir, qconfig), tmp_path / mode, progress=False)
        reports[mode] = json.loads((tmp_path / mode / "distill_history.json").read_text())
    precomputed, online = reports["precompute"], reports["online"]
    assert precomputed["ptq_init"] == online["ptq_init"]
    assert precomputed["checkpointed_blocks"] == online["checkpointed_blocks"] == 2
    for a, b in zip(precomputed["history"], online["history"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    # W4A6 grid rounding turns the fp32-level differences of the targets into small output differences
    assert precomputed["final"]["relative_error"] == pytest.approx(online["final"]["relative_error"], rel=1e-2)
    assert list(calib_dir.glob("fp_targets_*.safetensors"))  # the cache sits beside the shards


# ------------------------------------------------------------------------------ 2 gloo processes
def _gather_worker(rank, world_size, port, calib_dir, outdir):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        calib = CalibDataset(calib_dir, n_steps=5)
        targets = fp_targets(calib, _fake_teacher, "fake", batch_size=3, progress=False, cache=False)
        torch.save(targets, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _fake_teacher(batch):
    return batch["x"] * 2 + batch["timestep"][:, None, None, None, None]


def test_ranks_share_the_work_and_gather_all_targets(calib_dir, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_gather_worker, args=(2, port, str(calib_dir), str(tmp_path)), nprocs=2, join=True)
    calib = CalibDataset(calib_dir, n_steps=5)
    expected = _fake_teacher(calib.get(torch.arange(len(calib))))
    for rank in range(2):
        assert torch.equal(torch.load(tmp_path / f"rank{rank}.pt", weights_only=True), expected)
