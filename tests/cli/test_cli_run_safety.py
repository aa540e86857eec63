"""Issue 15, "no run is ever lost": output directories are never overwritten without
--overwrite, one `--resume` command line serves the first start and every restart, SIGTERM
and SIGINT stop with a checkpoint, and progress reaches a log file without a terminal."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
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
REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_thread")
_ = one_thread  # a fixture imported for pytestmark


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return make_store(tmp_path_factory.mktemp("safety_store"))


def _invoke(args: list[str]):
    return runner.invoke(app, args)


def _error_line(result) -> str:
    assert result.exit_code != 0 and "Traceback" not in result.output, result.output
    lines = [line for line in result.output.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    return lines[0]


def test_a_finished_run_is_refused_without_resume_or_overwrite(store, tmp_path):
    run, config = tmp_path / "run", tmp_path / "tiny.json"
    first = _invoke(pretrain_args(store, run, config, max_steps=4, no_tensorboard=True))
    assert first.exit_code == 0, first.output
    before = (run / "checkpoint.pt").read_bytes()
    metrics_before = (run / "metrics.jsonl").read_text()

    again = _invoke(pretrain_args(store, run, config, max_steps=2, no_tensorboard=True))
    line = _error_line(again)
    assert str(run) in line and "--resume" in line and "--overwrite" in line
    assert "last logged step 4" in line
    assert (run / "checkpoint.pt").read_bytes() == before  # nothing touched
    assert (run / "metrics.jsonl").read_text() == metrics_before

    both = _invoke(pretrain_args(store, run, config, resume=True, overwrite=True))
    assert "choose one" in _error_line(both)

    replaced = _invoke(
        pretrain_args(store, run, config, max_steps=2, no_tensorboard=True, overwrite=True)
    )
    assert replaced.exit_code == 0, replaced.output
    assert f"--overwrite: replaced the run in {run}" in replaced.output
    assert load_run_state(run)["step"] == 2
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2


def test_resume_without_a_checkpoint_starts_at_zero_and_removes_stale_temporaries(
    store, tmp_path
):
    run, config = tmp_path / "run", tmp_path / "tiny.json"
    run.mkdir()
    stale = run / "checkpoint.pt.4242.tmp"  # what a run killed mid-write leaves
    stale.write_bytes(b"half a checkpoint")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')  # logged, never saved
    result = _invoke(
        pretrain_args(store, run, config, max_steps=2, no_tensorboard=True, resume=True)
    )
    assert result.exit_code == 0, result.output
    assert f"no complete checkpoint in {run}; starting from step 0" in result.output
    assert not stale.exists()
    assert load_run_state(run)["step"] == 2
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


def test_resume_names_the_settings_it_ignores_and_refuses_another_store(
    store, tmp_path
):
    run, config = tmp_path / "run", tmp_path / "tiny.json"
    first = _invoke(pretrain_args(store, run, config, max_steps=2, no_tensorboard=True))
    assert first.exit_code == 0, first.output
    result = _invoke(
        pretrain_args(
            store, run, config, max_steps=3, no_tensorboard=True, resume=True, lr=0.1,
            n_local_crops=4,
        )
    )
    assert result.exit_code == 0, result.output
    assert "ignored: " in result.output
    assert "lr 0.1 (the checkpoint's 0.0005 is kept)" in result.output
    assert "n_local_crops 4 (the checkpoint's 2 is kept)" in result.output
    assert "max_steps" not in result.output  # how to run is taken from the command line
    assert load_run_state(run)["config"]["lr"] == 0.0005

    other = make_store(tmp_path / "other", n_images=12)
    refused = _invoke(
        pretrain_args(other, run, config, max_steps=4, no_tensorboard=True, resume=True)
    )
    line = _error_line(refused)
    assert "another mask store" in line and "n_images 16 -> 12" in line
    assert load_run_state(run)["step"] == 3  # untouched


def test_sigterm_stops_with_a_checkpoint_and_resume_equals_an_uninterrupted_run(store, tmp_path):
    config, steps = tmp_path / "tiny.json", 24
    stopped = tmp_path / "stopped"
    # One command line for the first start and the restart, as a requeued job has.
    args = pretrain_args(store, stopped, config, epochs=8, max_steps=steps, no_tensorboard=True,
                         resume=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "odis_cli", *args], env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    metrics = stopped / "metrics.jsonl"
    deadline = time.monotonic() + 180
    # Signal once two steps are logged (metrics.jsonl is flushed every step).
    while process.poll() is None and time.monotonic() < deadline:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.005)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=180)
    assert process.returncode == 143, out + err
    stopped_at = load_run_state(stopped)["step"]
    assert 2 <= stopped_at < steps
    assert (
        f"stopped at step {stopped_at}; checkpoint {stopped / 'checkpoint.pt'}; "
        "continue with --resume" in err
    )
    assert len(metrics.read_text().splitlines()) == stopped_at

    resumed = _invoke(args)
    assert resumed.exit_code == 0, resumed.output
    assert f"resuming at step {stopped_at}" in resumed.output
    reference = tmp_path / "reference"
    assert _invoke(pretrain_args(store, reference, config, epochs=8, max_steps=steps,
                                 no_tensorboard=True)).exit_code == 0
    assert_same_training_state(load_run_state(stopped), load_run_state(reference), exact=True)


def test_stop_signals_first_sets_a_flag_second_exits_at_once():
    from odis_core.train.signals import StopSignals

    code = (
        "import os, signal, time\n"
        "from odis_core.train.signals import StopSignals\n"
        "with StopSignals(on_second=lambda n: print('second', n, flush=True)) as stop:\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(0.01)\n"
        "    print('first', stop.received, stop(), stop.exit_code, flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(5)\n"
        "print('not reached')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 130
    assert done.stdout.split() == ["first", str(int(signal.SIGINT)), "True", "130",
                                   "second", str(int(signal.SIGINT))]
    with StopSignals() as stop:  # handlers are restored on exit
        assert signal.getsignal(signal.SIGTERM) == stop._handle
    assert signal.getsignal(signal.SIGTERM) != stop._handle


def test_without_a_terminal_progress_is_logged_as_plain_lines(store, tmp_path, monkeypatch):
    monkeypatch.setenv("ODIS_LOG_EVERY_S", "0")  # every step, instead of every 30 s
    run = tmp_path / "run"
    result = _invoke(pretrain_args(store, run, tmp_path / "tiny.json", max_steps=3,
                                   no_tensorboard=True))
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["1/3", "2/3", "3/3"]
    assert all("loss" in line and "img/s" in line and "eta" in line for line in lines)


def test_metrics_are_flushed_every_step(tmp_path):
    from odis_core.train.metrics import RunLog

    log = RunLog(tmp_path, 0, tensorboard=False)
    try:
        log.write({"step": 1, "loss": 2.0})
        # Read by another handle (tail -f) before any flush or close of the log.
        assert json.loads((tmp_path / "metrics.jsonl").read_text())["step"] == 1
    finally:
        log.close()


def test_masks_coco_refuses_a_store_of_other_annotations(tmp_path):
    from odis_core.scenes.synthetic import SceneConfig, generate_scenes

    a = generate_scenes(tmp_path / "a", 3, 1, seed=1, config=SceneConfig(image_size=32))["train"]
    b = generate_scenes(tmp_path / "b", 3, 1, seed=2, config=SceneConfig(image_size=32))["train"]
    out = tmp_path / "store"

    def coco(split, *extra):
        return _invoke(["masks", "coco", "--images", str(split.images_dir), "--annotations",
                        str(split.annotations), "--out", str(out), *extra])

    assert coco(a).exit_code == 0
    manifest = (out / "manifest.json").read_text()
    assert coco(a).exit_code == 0  # the same import again: redone, not refused
    line = _error_line(coco(b))
    assert str(out) in line and "annotations_sha1" in line and "--overwrite" in line
    line = _error_line(coco(a, "--min-area", "5"))
    assert "min_area" in line
    assert json.loads((out / "manifest.json").read_text())["settings"] == json.loads(manifest)[
        "settings"]
    replaced = coco(b, "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert f"--overwrite: replacing a mask store built with other annotations_sha1 in {out}" in (
        replaced.output.replace("\n", " ")
    )


def test_embed_refuses_features_of_other_settings(tmp_path):
    import timm
    from safetensors.torch import save_file

    from odis_core.scenes.synthetic import SceneConfig, generate_scenes

    images = generate_scenes(tmp_path / "s", 3, 1, seed=1,
                             config=SceneConfig(image_size=32))["train"].images_dir
    arch = "vit_tiny_patch16_224"
    torch.manual_seed(0)
    vit = timm.create_model(arch, pretrained=False, num_classes=0, img_size=32, patch_size=8,
                            depth=1)
    save_file(vit.state_dict(), tmp_path / "vit.safetensors",
              metadata={"format": "odis-teacher-backbone", "arch": arch,
                        "timm_kwargs": json.dumps({"num_classes": 0, "img_size": 32,
                                                   "patch_size": 8, "depth": 1})})
    out = tmp_path / "features"

    def embed(*extra):
        return _invoke(["embed", "--checkpoint", str(tmp_path / "vit.safetensors"), "--images",
                        str(images), "--out", str(out), "--level", "image", "--device", "cpu",
                        *extra])

    assert embed().exit_code == 0
    before = (out / "features.npy").read_bytes()
    same = embed()
    assert same.exit_code == 0 and "(already" in same.output  # a no-op resume
    line = _error_line(embed("--dtype", "float16"))
    assert str(out) in line and "dtype" in line and "--overwrite" in line
    assert (out / "features.npy").read_bytes() == before
    (out / "notes.txt").write_text("mine")  # not embed's: kept by --overwrite
    replaced = embed("--dtype", "float16", "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert "--overwrite: replaced" in replaced.output
    assert (out / "features.npy").read_bytes() != before
    assert (out / "notes.txt").read_text() == "mine"
