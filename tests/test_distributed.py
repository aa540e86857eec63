"""DDP across 2 CPU processes with real torchrun and gloo (issue 5 goal 3).

Both ranks must hold identical weights after training, and the run must equal a single
process with the same global batch: each rank takes a disjoint half of every global
batch, gradients are averaged across ranks, and the loss centres are all-reduced.
Drop-path is off: its per-rank random draws differ from one process's draws by design.
"""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from pretrain_fixtures import (
    TINY_CONFIG,
    assert_same_training_state,
    load_run_state,
    make_store,
    one_thread,
    pretrain_args,
)
from typer.testing import CliRunner

from odis_cli.app import app
from odis_core.train.loop import EpochSampler

REPO = Path(__file__).resolve().parents[1]
_ = one_thread  # fixture


def test_rank_shards_are_disjoint_and_together_the_single_process_batches():
    single = EpochSampler(22, seed=4, batch_size=4)
    ranks = [EpochSampler(22, seed=4, batch_size=2, rank=r, world=2) for r in (0, 1)]
    for sampler in (single, *ranks):
        sampler.set_position(epoch=1, start_index=4)  # resume after one global batch
    order, shards = list(single), [list(s) for s in ranks]
    assert len(order) == 16 and all(len(shard) == 8 for shard in shards)  # 5 batches, 1 done
    assert not set(shards[0]) & set(shards[1])
    for batch in range(4):
        global_batch = order[4 * batch : 4 * batch + 4]
        assert (
            shards[0][2 * batch : 2 * batch + 2] + shards[1][2 * batch : 2 * batch + 2]
            == global_batch
        )


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not installed")
def test_torchrun_two_processes_equal_one_process_with_the_same_global_batch(tmp_path, one_thread):
    store = make_store(tmp_path, n_images=16)
    config = tmp_path / "no_drop_path.json"
    # fp32: bf16 autocast (the CPU default where bf16 units exist) rounds the two ranks'
    # half-batches differently from one process's whole batch.
    config.write_text(json.dumps({**TINY_CONFIG, "drop_path": 0.0, "precision": "fp32"}))
    steps = 4
    ddp_run, single_run = tmp_path / "ddp", tmp_path / "single"
    args = pretrain_args(store, ddp_run, config, batch_size=2, max_steps=steps, no_tensorboard=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            "torchrun",
            "--standalone",
            "--nnodes",
            "1",
            "--nproc-per-node",
            "2",
            "-m",
            "odis_cli",
            *args,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 processes (DDP)" in result.stdout
    report = json.loads((ddp_run / "report.json").read_text())
    assert report["processes"] == 2 and report["steps"] == steps

    ddp = load_run_state(ddp_run)
    student, teacher = zip(*ddp["rank_fingerprints"], strict=True)
    assert len(student) == 2 and student[0] == student[1] and teacher[0] == teacher[1]

    outcome = CliRunner().invoke(
        app,
        pretrain_args(
            store, single_run, config, batch_size=4, max_steps=steps, no_tensorboard=True
        ),
    )
    assert outcome.exit_code == 0, outcome.output
    single = load_run_state(single_run)
    assert_same_training_state(ddp, single, exact=False, rtol=1e-4, atol=1e-5)
    assert ddp["config"]["batch_size"] == 2 and single["config"]["batch_size"] == 4
