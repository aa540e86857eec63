"""The step-memory estimate that refuses a batch before the kernel's OOM killer does
(issue 15, case 5)."""

import json

import pytest
from pretrain_fixtures import TINY_CONFIG, make_store, pretrain_args
from typer.testing import CliRunner

from odis_cli.app import app
from odis_core.train import memory
from odis_core.train.config import PretrainConfig

runner = CliRunner()


def test_the_estimate_matches_the_measured_default_run():
    # Measured on the CPU (issue 15): the default ViT-S/16 run, float32.
    estimate = memory.estimate_step_memory(PretrainConfig().resolved(), "cpu")
    assert estimate.at(8) == pytest.approx(4.3e9, rel=0.1)
    assert estimate.at(16) == pytest.approx(7.0e9, rel=0.1)
    # Gradient checkpointing and bf16 on a GPU need less per image, a wider model more.
    checkpointed = memory.estimate_step_memory(
        PretrainConfig(grad_checkpointing=True).resolved(), "cpu")
    assert checkpointed.per_image < estimate.per_image / 2
    assert memory.estimate_step_memory(PretrainConfig().resolved(), "cuda").per_image < (
        estimate.per_image)
    assert memory.estimate_step_memory(PretrainConfig(arch="vit_base").resolved(), "cpu").at(
        8) > estimate.at(8)


def test_a_batch_that_does_not_fit_is_refused_naming_one_that_does(monkeypatch):
    config = PretrainConfig().resolved()
    estimate = memory.estimate_step_memory(config, "cpu")
    available = (estimate.fixed + 20.5 * estimate.per_image) / memory.HEADROOM
    monkeypatch.setattr(memory, "available_bytes", lambda device: available)
    with pytest.raises(memory.MemoryEstimateError) as refused:
        memory.check_step_fits(config, "cpu")  # batch 64
    message = str(refused.value)
    assert message.startswith("--batch-size 64: one step needs about")
    assert "--batch-size 20 fits" in message
    memory.check_step_fits(PretrainConfig(batch_size=20).resolved(), "cpu")  # it does
    monkeypatch.setattr(memory, "available_bytes", lambda device: estimate.fixed / 2)
    with pytest.raises(memory.MemoryEstimateError, match="not even batch 1 fits"):
        memory.check_step_fits(config, "cpu")


def test_pretrain_refuses_before_the_first_step_with_one_line(tmp_path, monkeypatch):
    store = make_store(tmp_path / "data", n_images=8)
    config = PretrainConfig(**TINY_CONFIG, arch="vit_tiny", patch_size=8, global_size=32,
                            local_size=16, n_local_crops=2, out_dim=64, batch_size=4)
    estimate = memory.estimate_step_memory(config.resolved(), "cpu")
    available = (estimate.fixed + 2.5 * estimate.per_image) / memory.HEADROOM
    monkeypatch.setattr(memory, "available_bytes", lambda device: available)
    run = tmp_path / "run"
    args = pretrain_args(store, run, tmp_path / "tiny.json", max_steps=1, no_tensorboard=True)
    assert json.loads((tmp_path / "tiny.json").read_text()) == TINY_CONFIG
    result = runner.invoke(app, args)
    assert result.exit_code == 1 and "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "--batch-size 2 fits" in lines[0], result.output
    assert not run.exists()  # refused before anything was written
    forced = runner.invoke(app, [*args, "--no-memory-check"])
    assert forced.exit_code == 0, forced.output
