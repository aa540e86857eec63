"""`odis pretrain --objects-per-image` (issue 19): refused without read-out tokens, recorded
in the run, kept on resume, and each step's [OBJ] pairs logged."""

import json

import pytest
from pretrain_fixtures import (
    assert_same_training_state,
    load_run_state,
    make_store,
    one_thread,
    pretrain_args,
)
from typer.testing import CliRunner

from odis_cli.app import app

runner = CliRunner()
_ = one_thread  # fixture


def error_lines(output: str) -> list[str]:
    return [line for line in output.strip().splitlines() if line.strip()]


@pytest.mark.usefixtures("one_thread")
def test_several_objects_without_readout_is_a_one_line_error(tmp_path):
    masks = make_store(tmp_path, n_images=4)
    run = tmp_path / "run"
    args = pretrain_args(masks, run, tmp_path / "tiny.json", max_steps=1, objects_per_image=2)
    result = runner.invoke(app, args)
    lines = error_lines(result.output)
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert "--objects-per-image 2 needs --obj-readout" in lines[0]
    assert not run.exists()

    args = pretrain_args(masks, run, tmp_path / "tiny.json", max_steps=1, objects_per_image=2,
                         obj_readout=True, objective="image")
    result = runner.invoke(app, args)
    lines = error_lines(result.output)
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert "needs --objective odis" in lines[0]


@pytest.mark.usefixtures("one_thread")
def test_several_objects_run_logs_pairs_and_resumes_exactly(tmp_path):
    masks = make_store(tmp_path, n_images=8)
    run, config = tmp_path / "run", tmp_path / "tiny.json"
    args = pretrain_args(masks, run, config, max_steps=2, obj_readout=True, objects_per_image=2)
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert " obj pairs " in result.output  # on the progress line
    assert json.loads((run / "config.json").read_text())["objects_per_image"] == 2
    # A method setting: the resume (no flag given) keeps it from the checkpoint.
    result = runner.invoke(app, pretrain_args(masks, run, config, max_steps=3, resume=True))
    assert result.exit_code == 0, result.output
    assert json.loads((run / "config.json").read_text())["objects_per_image"] == 2
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in rows if "loss" in row]
    assert [row["step"] for row in steps] == [1, 2, 3]
    # batch 4, 2 globals and 2 locals: 4 x 2 x 3 target pairs, and the other objects' on top
    assert all(row["object_pairs"] >= 24 for row in steps)
    assert any(row["object_pairs"] > 24 for row in steps)

    # The resume is exact: the same other objects and masks as a run never stopped.
    straight = tmp_path / "straight"
    args = pretrain_args(masks, straight, config, max_steps=3, obj_readout=True,
                         objects_per_image=2)
    assert runner.invoke(app, args).exit_code == 0
    assert_same_training_state(load_run_state(run), load_run_state(straight), exact=True)
