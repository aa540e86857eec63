"""bf16 autocast on the CPU (`--precision`) and schedules laid over the steps that run
(`--steps`), with the warning when `--max-steps` stops a run inside a warm-up phase."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from pretrain_fixtures import make_store, one_thread, pretrain_args
from typer.testing import CliRunner

from odis_cli.app import app
from odis_core import precision
from odis_core.train.config import PretrainConfig
from odis_core.train.loop import Trainer
from odis_core.train.schedules import cosine_schedule

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")
_ = one_thread  # a fixture imported for pytestmark


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return make_store(tmp_path_factory.mktemp("precision_store"))


def _run(args: list[str]):
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    ("flags", "expected"),
    [("fpu sse avx512f avx512_bf16 amx_tile", True), ("fpu amx_bf16 amx_tile", True),
     ("fpu sse avx2 avx512f avx512_vnni", False)],
)
def test_cpu_bf16_units_are_read_from_cpuinfo(tmp_path, flags, expected):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: x\nflags\t\t: {flags}\n\n")
    assert precision.cpu_has_bf16_matmul(cpuinfo) is expected
    assert precision.cpu_has_bf16_matmul(tmp_path / "missing") is False


@pytest.mark.parametrize("has_units", [True, False])
def test_auto_precision_resolves_by_device_and_cpu_units(monkeypatch, has_units):
    monkeypatch.setattr(precision, "cpu_has_bf16_matmul", lambda: has_units)
    assert precision.resolve_precision("auto", "cpu") == ("bf16" if has_units else "fp32")
    assert precision.resolve_precision("auto", "cuda:0") == "bf16"
    for explicit in ("bf16", "fp32"):
        assert precision.resolve_precision(explicit, "cpu") == explicit
    with pytest.raises(ValueError, match="precision"):
        precision.resolve_precision("fp16", "cpu")


def test_bf16_pretrain_on_cpu_is_finite_and_kept_on_resume(store, tmp_path, monkeypatch):
    run = tmp_path / "bf16"
    result = _run(pretrain_args(store, run, tmp_path / "tiny.json", max_steps=2,
                                precision="bf16", no_tensorboard=True))
    assert "(bf16)" in result.output
    assert json.loads((run / "config.json").read_text())["precision"] == "bf16"
    assert all(math.isfinite(r["loss"]) for r in _records(run))
    # The resolved precision belongs to the run: a resume asking for fp32 keeps bf16.
    _run(pretrain_args(store, run, tmp_path / "tiny.json", max_steps=4, precision="fp32",
                       no_tensorboard=True, resume=True))
    assert json.loads((run / "config.json").read_text())["precision"] == "bf16"
    assert len(_records(run)) == 4 and all(math.isfinite(r["loss"]) for r in _records(run))

    # "auto" is resolved before it is written: fp32 on a CPU without bf16 units.
    monkeypatch.setattr(precision, "cpu_has_bf16_matmul", lambda: False)
    auto = tmp_path / "auto"
    _run(pretrain_args(store, auto, tmp_path / "tiny.json", max_steps=1, precision="auto",
                       no_tensorboard=True))
    assert json.loads((auto / "config.json").read_text())["precision"] == "fp32"


def _trainer(**options) -> Trainer:
    config = PretrainConfig(
        arch="vit_tiny", patch_size=8, depth=1, embed_dim=32, num_heads=2, global_size=16,
        local_size=8, n_local_crops=1, out_dim=16, head_hidden_dim=16, head_bottleneck_dim=8,
        epochs=10, warmup_epochs=2, warmup_teacher_temp_epochs=4, freeze_last_layer=1,
        device="cpu", precision="fp32", **options,
    ).resolved()
    return Trainer(config, iters_per_epoch=100, device="cpu")


def test_default_schedules_follow_epochs_as_ibot():
    trainer = _trainer()
    config = trainer.config
    assert trainer.total_steps == 1000
    expected = cosine_schedule(config.lr * 64 / 256, config.min_lr, 10, 100, warmup_epochs=2)
    np.testing.assert_array_equal(trainer.lr_schedule, expected)
    assert [trainer.schedule_epoch(s) for s in (0, 99, 100, 999)] == [0, 0, 1, 9]
    assert trainer.warmup_phases() == {
        "LR warm-up": 200, "teacher-temperature warm-up": 301, "last-layer freeze": 101,
    }
    assert trainer.schedule_warning(1000) is None
    message = trainer.schedule_warning(150)
    assert "LR warm-up" in message and "teacher-temperature" in message
    assert "last-layer freeze" not in message and "--steps 150" in message
    assert trainer.schedule_warning(100) is not None and "freeze" in trainer.schedule_warning(100)
    assert trainer.schedule_warning(400) is None  # past every warm-up, before the end


def test_steps_lay_the_recipe_over_the_steps_that_run():
    trainer = _trainer(steps=50)  # the 10-epoch recipe on 50 steps: 5 steps a recipe epoch
    assert trainer.total_steps == 50 and len(trainer.lr_schedule) == 50
    assert len(trainer.wd_schedule) == len(trainer.momentum_schedule) == 50
    peak = trainer.config.lr * 64 / 256
    # Linear warm-up over 2 recipe epochs = 10 steps, then the cosine down to min_lr.
    np.testing.assert_allclose(trainer.lr_schedule[:10], np.linspace(0, peak, 10))
    assert trainer.lr_schedule[10] == pytest.approx(peak)
    assert trainer.lr_schedule[-1] < 0.01 * peak  # the cosine ends near min_lr
    assert trainer.momentum_schedule[-1] == pytest.approx(1.0, abs=1e-3)
    # Teacher temperature and last-layer freeze follow recipe epochs of 5 steps.
    assert [trainer.schedule_epoch(s) for s in (0, 4, 5, 49)] == [0, 0, 1, 9]
    assert trainer.warmup_phases()["last-layer freeze"] == 6
    assert trainer.schedule_warning(50) is None
    # Uneven: 7 steps of a 10-epoch recipe; the freeze covers step 0 only.
    uneven = _trainer(steps=7)
    assert [uneven.schedule_epoch(s) for s in range(7)] == [0, 1, 2, 4, 5, 7, 8]
    assert uneven.epoch_steps(1) == 1 and len(uneven.lr_schedule) == 7


def test_max_steps_inside_warmup_warns_and_steps_does_not(store, tmp_path):
    run = tmp_path / "trap"  # 4 epochs of 4 steps: LR warm-up 4 steps, freeze 4 steps
    result = _run(pretrain_args(store, run, tmp_path / "tiny.json", max_steps=2,
                                no_tensorboard=True))
    assert "warning:" in result.output and "LR warm-up" in result.output
    records = _records(run)
    assert records[0]["warning"] == "schedule" and "--steps 2" in records[0]["warning_message"]
    assert "warning" not in records[1]

    fitted = tmp_path / "fitted"
    result = _run(pretrain_args(store, fitted, tmp_path / "tiny.json", steps=2, max_steps=2,
                                no_tensorboard=True))
    assert "warning:" not in result.output
    assert "warning" not in (fitted / "metrics.jsonl").read_text()
    assert json.loads((fitted / "config.json").read_text())["steps"] == 2
    # Over 2 steps the 4-epoch recipe's 1-epoch LR warm-up is 1 step (iBOT's warm-up starts
    # at 0), so the second step runs at the peak, 5e-4 x 4 / 256.
    lrs = [r["lr"] for r in _records(fitted)]
    assert lrs == [0.0, pytest.approx(5e-4 * 4 / 256)]


def test_embed_in_bf16_is_close_to_fp32(store):
    from odis_core.embed.inference import embed
    from odis_core.masks.store import read_store
    from odis_core.model.obj_vit import ObjViT

    masks = read_store(store)
    backbone = ObjViT("vit_tiny", img_size=32, patch_size=8, depth=2, drop_path_rate=0.0)
    runs = {
        p: embed(backbone, masks.images_root, masks, image_size=32, batch_size=8, precision=p)
        for p in ("fp32", "bf16")
    }
    fp32, bf16 = (runs[p].features for p in ("fp32", "bf16"))
    assert fp32.dtype == bf16.dtype == np.float32 and fp32.shape == bf16.shape
    assert not np.array_equal(fp32, bf16)  # bf16 really ran
    cosine = (fp32 * bf16).sum(1) / np.linalg.norm(fp32, axis=1) / np.linalg.norm(bf16, axis=1)
    assert cosine.min() > 0.99
