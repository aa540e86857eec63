"""`odis export`: the teacher backbone loads through timm's own pretrained path (issue 5)."""

import json

import pytest
import timm
import torch
from pretrain_fixtures import make_store, one_thread, pretrain_args
from safetensors import safe_open
from typer.testing import CliRunner

from odis_cli.app import app
from odis_core.embed.inference import build_backbone, load_teacher_backbone

runner = CliRunner()
_ = one_thread  # fixture


@pytest.mark.usefixtures("one_thread")
def test_export_loads_with_timm_create_model_pretrained_file_overlay(tmp_path):
    store = make_store(tmp_path, n_images=8)
    run = tmp_path / "run"
    result = runner.invoke(app, pretrain_args(store, run, tmp_path / "tiny.json", max_steps=2))
    assert result.exit_code == 0, result.output
    exported = tmp_path / "teacher.safetensors"
    result = runner.invoke(app, ["export", str(run), "--out", str(exported)])
    assert result.exit_code == 0, result.output
    assert "pretrained=True" in result.output and "local-dir:" in result.output

    with safe_open(str(exported), "pt") as handle:
        header = handle.metadata()
    model = timm.create_model(
        header["arch"],
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(exported)),
        **json.loads(header["timm_kwargs"]),
    ).eval()
    teacher, config = load_teacher_backbone(run)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        theirs = model.forward_features(images)
        ours = teacher(images)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    # The file holds the trained teacher, not the initial weights timm would also accept.
    initial = build_backbone(config).vit.state_dict()
    assert any(not torch.equal(initial[k], v) for k, v in model.state_dict().items())
