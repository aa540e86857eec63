"""`odis pretrain` reliability end to end (issue 5 item 4, issue 8): crash and exact resume,
NaN guard, collapse warning, foreign checkpoints, disk errors, metrics files.

Determinism used by the resume tests: CPU, `--workers 0` (any worker count gives the same
crops: every sample has its own (seed, epoch, index) generator), torch's default CPU
kernels (repeatable at a fixed thread count); no `torch.use_deterministic_algorithms`.
"""

import errno
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
    return make_store(tmp_path_factory.mktemp("pretrain_store"))


def _run(args: list[str], expect_ok: bool = True):
    result = runner.invoke(app, args)
    if expect_ok:
        assert result.exit_code == 0, result.output
    return result


def _one_line_error(result) -> str:
    assert result.exit_code != 0 and "Traceback" not in result.output
    lines = [line for line in result.output.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    return lines[0]


def test_sigkill_mid_run_then_resume_equals_uninterrupted_run(store, tmp_path):
    config = tmp_path / "tiny.json"
    steps = 16  # 4 epochs of 4 steps
    killed = tmp_path / "killed"
    args = pretrain_args(store, killed, config, max_steps=steps, save_every=2, no_tensorboard=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "odis_cli", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    checkpoint = killed / "checkpoint.pt"
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()
    killed_at = load_run_state(killed)["step"]
    assert 2 <= killed_at < steps, "the run must be killed mid-run, after a checkpoint"

    result = _run(
        pretrain_args(
            store, killed, config, max_steps=steps, save_every=2, no_tensorboard=True, resume=True
        )
    )
    assert f"resuming at step {killed_at}" in result.output
    reference = tmp_path / "reference"
    _run(
        pretrain_args(store, reference, config, max_steps=steps, save_every=2, no_tensorboard=True)
    )
    assert_same_training_state(load_run_state(killed), load_run_state(reference), exact=True)
    # Steps the killed run logged after its checkpoint are replayed, not duplicated.
    logged = [
        json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()
    ]
    assert logged == list(range(1, steps + 1))


def test_checkpoint_is_written_to_a_temporary_name_then_renamed(store, tmp_path, monkeypatch):
    renames = []
    real_replace = os.replace

    def recording_replace(source, target):
        renames.append((Path(source), Path(target), Path(source).exists()))
        return real_replace(source, target)

    monkeypatch.setattr(os, "replace", recording_replace)
    run = tmp_path / "run"
    _run(pretrain_args(store, run, tmp_path / "tiny.json", max_steps=4, save_every=2))
    saves = [(s, ok) for s, t, ok in renames if t == run / "checkpoint.pt"]
    assert len(saves) == 2  # steps 2 and 4
    for source, existed in saves:
        assert existed and source.parent == run and source.name.endswith(".tmp")
    assert not list(run.glob("*.tmp"))
    state = torch.load(run / "checkpoint.pt", weights_only=True)  # plain data only
    assert isinstance(state["config"], dict) and state["step"] == 4
    assert {"student", "teacher", "optimizer", "loss", "rng", "rng_per_rank"} <= set(state)


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(
    store, tmp_path, monkeypatch
):
    from odis_core.loss.ibot import IBOTLoss

    real_forward, calls = IBOTLoss.forward, {"n": 0}

    def forward_with_nan_at_step_5(self, *args, **kwargs):
        terms = real_forward(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 5:
            terms.total = terms.total * float("nan")
        return terms

    monkeypatch.setattr(IBOTLoss, "forward", forward_with_nan_at_step_5)
    config = tmp_path / "tiny.json"
    run = tmp_path / "run"
    result = _run(pretrain_args(store, run, config, max_steps=8, save_every=2), expect_ok=False)
    line = _one_line_error(result)
    assert "loss is nan at step 5" in line and "checkpoint of step 4" in line
    monkeypatch.setattr(IBOTLoss, "forward", real_forward)
    good = tmp_path / "good"
    _run(pretrain_args(store, good, config, max_steps=4, save_every=2, epochs=4))
    # The run's schedules span 4 epochs either way, so its step-4 state is the good run's.
    assert_same_training_state(load_run_state(run), load_run_state(good), exact=True)


def test_collapse_warning_is_shown_and_recorded(store, tmp_path):
    config = tmp_path / "hot_teacher.json"
    # A very hot teacher makes its output uniform: the collapse signature.
    config.write_text(
        json.dumps(
            {
                "depth": 2,
                "head_hidden_dim": 32,
                "head_bottleneck_dim": 16,
                "min_patches_per_block": 2,
                "warmup_teacher_temp": 1000.0,
                "teacher_temp": 1000.0,
                "collapse_patience": 2,
            }
        )
    )
    run = tmp_path / "run"
    # --steps 4: schedules over the 4 steps that run, so no warm-up warning joins in.
    result = _run(pretrain_args(store, run, config, max_steps=4, steps=4))
    assert "warning:" in result.output and "collapse" in result.output
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("warning") for r in records] == [None, "collapse", None, "collapse"]

    normal = tmp_path / "normal"
    result = _run(pretrain_args(store, normal, tmp_path / "tiny.json", max_steps=4, steps=4))
    assert "warning:" not in result.output
    assert "warning" not in (normal / "metrics.jsonl").read_text()


def test_metrics_jsonl_and_tensorboard_hold_every_term(store, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    _run(pretrain_args(store, run, tmp_path / "tiny.json", max_steps=3))
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    for key in (
        "loss",
        "loss_obj",
        "loss_mim",
        "lr",
        "wd",
        "momentum",
        "teacher_temp",
        "teacher_entropy",
        "grad_norm",
        "images_per_second",
        "data_wait_share",
    ):
        assert isinstance(record[key], float), key
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss/total", "teacher/entropy", "schedule/lr", "speed/images_per_second"} <= tags
    assert [event.step for event in events.Scalars("loss/total")] == [1, 2, 3]
    report = json.loads((run / "report.json").read_text())
    assert 0.0 <= report["data_wait_share"] <= 1.0 and report["processes"] == 1


def _first_checkpoint(store: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    _run(pretrain_args(store, run, tmp_path / "tiny.json", max_steps=2))
    return run


def test_resume_refuses_a_foreign_checkpoint_listing_keys(store, tmp_path):
    run = _first_checkpoint(store, tmp_path)
    state = load_run_state(run)
    state["student"] = {f"module.{key}": value for key, value in state["student"].items()}
    torch.save(state, run / "checkpoint.pt")
    args = pretrain_args(store, run, tmp_path / "tiny.json", max_steps=4, resume=True)
    line = _one_line_error(_run(args, expect_ok=False))
    assert "checkpoint.pt" in line and "missing [" in line and "unexpected [module." in line

    torch.save({"model": {"w": torch.zeros(1)}}, run / "checkpoint.pt")  # e.g. a DINO file
    line = _one_line_error(_run(args, expect_ok=False))
    assert "not an odis checkpoint" in line

    import argparse

    torch.save(
        {"format": "odis-checkpoint", "args": argparse.Namespace(a=1)}, run / "checkpoint.pt"
    )  # pickled objects are never unpickled
    line = _one_line_error(_run(args, expect_ok=False))
    assert "cannot load checkpoint" in line


def test_disk_full_gives_one_line_and_keeps_the_previous_checkpoint(store, tmp_path, monkeypatch):
    import odis_core.train.checkpoint as checkpoint_module

    run = _first_checkpoint(store, tmp_path)
    before = (run / "checkpoint.pt").read_bytes()

    def save_until_the_disk_is_full(obj, handle):
        handle.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint_module.torch, "save", save_until_the_disk_is_full)
    args = pretrain_args(store, run, tmp_path / "tiny.json", max_steps=4, save_every=1, resume=True)
    line = _one_line_error(_run(args, expect_ok=False))
    assert "No space left on device" in line and "previous checkpoint is intact" in line
    assert (run / "checkpoint.pt").read_bytes() == before
    assert not list(run.glob("*.tmp"))


def test_permission_denied_gives_one_line_and_keeps_the_previous_checkpoint(
    store, tmp_path, monkeypatch
):
    # The same failure as a read-only run directory, raised where the temporary file is
    # opened, so it is also proven where the tests run as root (CI), which ignores modes.
    import builtins

    import odis_core.atomic as atomic_module

    run = _first_checkpoint(store, tmp_path)
    before = (run / "checkpoint.pt").read_bytes()
    real_open = builtins.open

    def open_denied_in_the_run_directory(file, *args, **kwargs):
        if Path(file).parent == run:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(atomic_module, "open", open_denied_in_the_run_directory, raising=False)
    args = pretrain_args(store, run, tmp_path / "tiny.json", max_steps=4, save_every=1, resume=True)
    line = _one_line_error(_run(args, expect_ok=False))
    assert "Permission denied" in line and str(run) in line
    assert (run / "checkpoint.pt").read_bytes() == before


@pytest.mark.skipif(
    os.name != "posix" or os.geteuid() == 0, reason="root ignores directory permissions"
)
def test_read_only_run_directory_gives_one_line_and_keeps_the_checkpoint(store, tmp_path):
    run = _first_checkpoint(store, tmp_path)
    before = (run / "checkpoint.pt").read_bytes()
    run.chmod(0o555)
    try:
        args = pretrain_args(store, run, tmp_path / "tiny.json", max_steps=4, resume=True)
        line = _one_line_error(_run(args, expect_ok=False))
        assert "Permission denied" in line and str(run) in line
    finally:
        run.chmod(0o755)
    assert (run / "checkpoint.pt").read_bytes() == before


def test_unreadable_images_are_skipped_and_counted_never_fatal(tmp_path):
    store = make_store(tmp_path, n_images=8)
    images = sorted((tmp_path / "scenes").rglob("*.png")) + sorted(
        (tmp_path / "scenes").rglob("*.jpg")
    )
    train_images = [path for path in images if "train" in str(path)]
    assert len(train_images) == 8
    for path in train_images:
        path.write_bytes(b"not an image")
    run = tmp_path / "run"
    _run(pretrain_args(store, run, tmp_path / "tiny.json", max_steps=2, epochs=1))
    report = json.loads((run / "report.json").read_text())
    assert report["steps"] == 2 and report["images"] == 0 and report["images_skipped"] == 8
