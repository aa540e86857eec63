"""The online k-NN monitor of `odis pretrain` (issue 14 item 2), end to end on a tiny run:
its rows in metrics.jsonl, the curve in report.json and curve.png, the step-0 value against
`odis embed --random-init` + `odis knn` on the same split, a continuous curve after resume,
and training that stays bitwise what it is without the monitor."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
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
pytestmark = pytest.mark.usefixtures("one_thread")
_ = one_thread  # a fixture imported for pytestmark
STEPS, EVERY = 3, 2  # evaluations at steps 0, 2 and 3 (the last)


def _run(args: list[str]) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, Path]:
    from odis_core.masks.coco import import_coco
    from odis_core.scenes.synthetic import SceneConfig, generate_scenes

    root = tmp_path_factory.mktemp("monitor")
    splits = generate_scenes(root / "eval_scenes", 1, 12, seed=4,
                             config=SceneConfig(image_size=32))
    import_coco(splits["test"].annotations, root / "eval_masks",
                images_root=splits["test"].images_dir)
    return {"train": make_store(root), "eval": root / "eval_masks", "root": root}


def _monitored(stores, run: Path, steps: int = STEPS, **options) -> list[str]:
    return pretrain_args(stores["train"], run, stores["root"] / "tiny.json", max_steps=steps,
                         eval_masks=stores["eval"], eval_every=EVERY, no_tensorboard=True,
                         **options)


@pytest.fixture(scope="module")
def monitored_run(stores) -> Path:
    # Module-scoped fixtures run before the function-scoped one_thread: set it here too (the
    # runs compared with this one use one thread, and the thread count changes the floats).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    run = stores["root"] / "monitored"
    try:
        _run(_monitored(stores, run))
    finally:
        torch.set_num_threads(previous)
    return run


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _curve_rows(run: Path) -> list[dict]:
    return [row for row in _rows(run) if "knn_top1" in row]


def test_rows_report_and_png(monitored_run):
    rows = _curve_rows(monitored_run)
    assert [row["step"] for row in rows] == [0, 2, 3]
    for row in rows:
        assert set(row) == {"step", "knn_top1", "knn_top5", "effective_rank", "eval_seconds"}
        assert 0 <= row["knn_top1"] <= row["knn_top5"] <= 100 and row["effective_rank"] > 1
    report = json.loads((monitored_run / "report.json").read_text())
    assert report["curve"] == [
        [row["step"], row["knn_top1"], row["knn_top5"], row["effective_rank"]] for row in rows
    ]
    assert report["eval"]["n_bank"] > 0 and report["eval"]["n_query"] > 0
    png = monitored_run / "curve.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as image:
        image.verify()


def test_step0_equals_embed_random_init_plus_knn(monitored_run, stores, tmp_path):
    """The monitor's first value is the untrained teacher's object k-NN: `odis embed
    --random-init` of the evaluation store, cut by eval_split.json, scored by `odis knn`."""
    from odis_core.embed.features import read_features, write_features
    from odis_core.masks.store import read_store

    split = json.loads((monitored_run / "eval_split.json").read_text())
    assert not set(split["bank_images"]) & set(split["query_images"])  # split by image
    features = tmp_path / "untrained"
    images = read_store(stores["eval"]).images_root
    _run(["embed", "--checkpoint", str(monitored_run), "--random-init", "--masks",
          str(stores["eval"]), "--images", images, "--out", str(features), "--image-size", "32",
          "--device", "cpu"])
    embedded = read_features(features)
    info = json.loads((features / "info.json").read_text())
    for side in ("bank", "query"):
        names = set(split[f"{side}_images"])
        rows = [i for i, row in enumerate(embedded.meta) if row["image"] in names]
        write_features(tmp_path / side, np.asarray(embedded.features)[rows],
                       np.asarray(embedded.labels)[rows], [embedded.meta[i] for i in rows], info)
    _run(["knn", "--train", str(tmp_path / "bank"), "--test", str(tmp_path / "query"),
          "--k", "20", "--json", str(tmp_path / "knn.json")])
    reference = json.loads((tmp_path / "knn.json").read_text())["results"]["20"]
    step0 = _curve_rows(monitored_run)[0]
    assert step0["step"] == 0
    assert (step0["knn_top1"], step0["knn_top5"]) == (reference["top1"], reference["top5"])


def test_monitor_leaves_training_unchanged(monitored_run, stores, tmp_path):
    plain = tmp_path / "plain"
    _run(pretrain_args(stores["train"], plain, stores["root"] / "tiny.json", max_steps=STEPS,
                       no_tensorboard=True))
    assert_same_training_state(load_run_state(plain), load_run_state(monitored_run))
    terms = ("step", "loss", "loss_obj", "loss_mim", "grad_norm", "teacher_entropy")
    def losses(rows):
        return [[row[term] for term in terms] for row in rows if "loss" in row]
    assert losses(_rows(plain)) == losses(_rows(monitored_run))


def test_resume_continues_the_curve_without_repeats(monitored_run, stores, tmp_path):
    run = tmp_path / "resumed"
    _run(_monitored(stores, run, steps=EVERY))  # evaluations at 0 and 2
    _run(_monitored(stores, run, resume=True))  # ... and at 3; step 2 not again
    resumed = _curve_rows(run)
    assert [row["step"] for row in resumed] == [0, 2, 3]
    drop_time = [{k: v for k, v in row.items() if k != "eval_seconds"} for row in resumed]
    assert drop_time == [{k: v for k, v in row.items() if k != "eval_seconds"}
                         for row in _curve_rows(monitored_run)]
    report = json.loads((run / "report.json").read_text())
    assert [point[0] for point in report["curve"]] == [0, 2, 3]


def test_eval_every_without_store_is_one_line_error(stores, tmp_path):
    args = pretrain_args(stores["train"], tmp_path / "run", stores["root"] / "tiny.json",
                         max_steps=1, eval_every=2)
    result = runner.invoke(app, args)
    assert result.exit_code != 0
    assert "eval_every needs eval_masks" in result.output and "Traceback" not in result.output


def test_missing_eval_store_is_one_line_error_before_training(stores, tmp_path):
    run = tmp_path / "run"
    args = pretrain_args(stores["train"], run, stores["root"] / "tiny.json", max_steps=1,
                         eval_masks=tmp_path / "nowhere")
    result = runner.invoke(app, args)
    assert result.exit_code != 0 and "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "nowhere" in errors[0], result.output
    assert not (run / "checkpoint.pt").exists()
