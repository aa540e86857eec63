"""Read-out [OBJ] end to end (issue 19): `odis pretrain --obj-readout` records it, a resume
keeps it, `odis export` carries it, and `odis embed` embeds one pass per image from it."""

import json

import numpy as np
import pytest
from pretrain_fixtures import make_store, one_thread, pretrain_args
from safetensors import safe_open
from typer.testing import CliRunner

from odis_cli.app import app
from odis_core.embed.backbones import load_backbone
from odis_core.embed.features import read_features

runner = CliRunner()
_ = one_thread  # fixture


def _embed(checkpoint, store, out, *extra):
    args = ["embed", "--checkpoint", str(checkpoint), "--images", str(store["images"]),
            "--masks", str(store["masks"]), "--out", str(out), "--device", "cpu", *extra]
    return runner.invoke(app, args)


@pytest.mark.usefixtures("one_thread")
def test_readout_run_resumes_exports_and_embeds_in_one_pass(tmp_path):
    masks = make_store(tmp_path, n_images=8)
    store = {"masks": masks, "images": tmp_path / "scenes" / "train" / "images"}
    run, config = tmp_path / "run", tmp_path / "tiny.json"
    result = runner.invoke(app, pretrain_args(masks, run, config, max_steps=2, obj_readout=True))
    assert result.exit_code == 0, result.output
    assert json.loads((run / "config.json").read_text())["obj_readout"] is True
    # A method setting: the resume (no flag given) keeps it from the checkpoint.
    result = runner.invoke(app, pretrain_args(masks, run, config, max_steps=3, resume=True))
    assert result.exit_code == 0, result.output
    assert json.loads((run / "config.json").read_text())["obj_readout"] is True
    assert load_backbone(run).backbone.obj_readout

    exported = tmp_path / "teacher.safetensors"
    assert runner.invoke(app, ["export", str(run), "--out", str(exported)]).exit_code == 0
    with safe_open(str(exported), "pt") as handle:
        assert handle.metadata()["obj_readout"] == "true"
    assert load_backbone(exported).backbone.obj_readout

    # fp32: one pass equals per-object passes to fp32 tolerance (bf16 rounds per path)
    result = _embed(exported, store, tmp_path / "one", "--precision", "fp32")
    assert result.exit_code == 0, result.output
    result = _embed(exported, store, tmp_path / "per", "--no-one-pass", "--precision", "fp32")
    assert result.exit_code == 0, result.output
    one, per = read_features(tmp_path / "one"), read_features(tmp_path / "per")
    assert one.info["one_pass"] is True and per.info["one_pass"] is False
    assert len(one.features) > len(list(store["images"].iterdir()))  # several per image
    np.testing.assert_allclose(one.features, per.features, rtol=1e-5, atol=1e-5)


@pytest.mark.usefixtures("one_thread")
def test_one_pass_on_the_papers_model_is_a_one_line_error(tmp_path):
    masks = make_store(tmp_path, n_images=4)
    store = {"masks": masks, "images": tmp_path / "scenes" / "train" / "images"}
    run = tmp_path / "run"
    args = pretrain_args(masks, run, tmp_path / "tiny.json", max_steps=1, batch_size=2)
    assert runner.invoke(app, args).exit_code == 0
    result = _embed(run, store, tmp_path / "f", "--one-pass")
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert "--one-pass needs a read-out model" in lines[0]
    assert not (tmp_path / "f").exists()
