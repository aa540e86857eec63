"""`odis pretrain --pos-embed sincos` and `--background-removal P` (issue 17): recorded in
the run, fixed positions never trained, bad values a one-line error."""

import json

import pytest
import torch
from pretrain_fixtures import load_run_state, make_store, one_thread, pretrain_args
from typer.testing import CliRunner

from odis_cli.app import app
from odis_core.model.obj_vit import ObjViT

runner = CliRunner()
_ = one_thread  # fixture


@pytest.mark.usefixtures("one_thread")
def test_sincos_run_with_background_removal_keeps_its_positions(tmp_path):
    masks = make_store(tmp_path, n_images=8)
    run = tmp_path / "run"
    args = pretrain_args(masks, run, tmp_path / "tiny.json", max_steps=2, pos_embed="sincos",
                         background_removal=0.5)
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    saved = json.loads((run / "config.json").read_text())
    assert saved["pos_embed"] == "sincos" and saved["background_removal"] == 0.5
    assert saved["augment_on"] == "loader"
    # Two optimiser steps later, student and teacher still hold the fixed table.
    table = ObjViT("vit_tiny", img_size=32, patch_size=8, depth=2,
                   pos_embed="sincos").vit.pos_embed
    state = load_run_state(run)
    for part in ("student", "teacher"):
        assert torch.equal(state[part]["backbone.vit.pos_embed"], table), part


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"pos_embed": "rope"}, "pos_embed (--pos-embed): learned or sincos, not 'rope'"),
        ({"background_removal": 1.5}, "background_removal (--background-removal) 1.5: must be"),
        ({"background_removal": 0.5, "augment_on": "device"}, "needs --augment-on loader"),
        ({"background_removal": 0.5, "obj_readout": True, "objects_per_image": 2},
         "needs --objects-per-image 1"),
    ],
)
def test_bad_view_options_are_one_line_errors(tmp_path, options, message):
    masks = make_store(tmp_path, n_images=4)
    run = tmp_path / "run"
    result = runner.invoke(app, pretrain_args(masks, run, tmp_path / "tiny.json", max_steps=1,
                                              **options))
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert message in lines[0]
    assert not run.exists()
