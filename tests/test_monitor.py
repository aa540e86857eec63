"""The k-NN monitor's parts (train/monitor.py): the effective rank on hand-made covariances,
and the seeded, capped split by image."""

import numpy as np
import pytest
import torch

from odis_core.train.monitor import QUERY_FRACTION, KnnMonitor, participation_ratio


def _plus_minus(axes: np.ndarray) -> np.ndarray:
    """Rows +a_i e_i and -a_i e_i: zero mean, covariance diag(a_i^2) / d exactly."""
    d = len(axes)
    rows = np.diag(axes.astype(np.float64))
    return np.concatenate([rows, -rows])[:, :d]


@pytest.mark.parametrize("d", [1, 3, 16])
def test_isotropic_features_have_full_effective_rank(d):
    assert participation_ratio(_plus_minus(np.ones(d))) == pytest.approx(d, rel=1e-12)


def test_effective_rank_of_an_anisotropic_covariance():
    axes = np.array([3.0, 2.0, 1.0, 0.5])
    eigen = axes**2
    expected = eigen.sum() ** 2 / np.square(eigen).sum()
    assert participation_ratio(_plus_minus(axes)) == pytest.approx(expected, rel=1e-12)
    # Padding with unused dimensions (more dimensions than rows: the Gram-matrix path).
    padded = np.pad(_plus_minus(axes), ((0, 0), (0, 60)))
    assert participation_ratio(padded) == pytest.approx(expected, rel=1e-12)


def test_collapsed_features_have_rank_one_and_constant_ones_zero():
    rng = np.random.default_rng(0)
    line = rng.normal(size=(50, 1)) * rng.normal(size=(1, 8)) + 5.0
    assert participation_ratio(line) == pytest.approx(1.0, rel=1e-9)
    assert participation_ratio(np.ones((10, 4))) == 0.0
    # Gaussian features of 4 dimensions, many samples: close to 4.
    assert participation_ratio(rng.normal(size=(20000, 4))) == pytest.approx(4.0, rel=0.02)


@pytest.fixture(scope="module")
def eval_store(tmp_path_factory):
    from odis_core.masks.coco import import_coco
    from odis_core.masks.store import read_store
    from odis_core.scenes.synthetic import SceneConfig, generate_scenes

    root = tmp_path_factory.mktemp("monitor_split")
    splits = generate_scenes(root / "scenes", 1, 16, seed=2, config=SceneConfig(image_size=32))
    import_coco(splits["test"].annotations, root / "masks", images_root=splits["test"].images_dir)
    return read_store(root / "masks")


def _monitor(store, seed=0, max_objects=1000):
    return KnnMonitor(store, store.images_root, 32, 8, seed=seed, max_objects=max_objects)


def test_split_is_by_image_seeded_and_capped(eval_store):
    split = _monitor(eval_store).split()
    bank, queries = split["bank_images"], split["query_images"]
    assert not set(bank) & set(queries)
    assert len(bank) + len(queries) == len(eval_store.images)  # every image has objects
    assert len(queries) == round(QUERY_FRACTION * len(eval_store.images))
    assert _monitor(eval_store).split() == split
    assert _monitor(eval_store, seed=1).split()["query_images"] != queries
    capped = _monitor(eval_store, max_objects=12).split()
    assert capped["n_bank"] + capped["n_query"] <= 12
    assert len(capped["bank_images"]) + len(capped["query_images"]) < len(eval_store.images)
    # The cap takes a prefix of the same shuffled order.
    assert capped["query_images"] == (queries + bank)[: len(capped["query_images"])]


def test_evaluate_restores_the_mode_and_counts_every_object(eval_store):
    from odis_core.model.obj_vit import ObjViT

    torch.manual_seed(0)
    # Drop-path in train mode would make features random: the monitor evaluates in eval mode.
    backbone = ObjViT("vit_tiny", img_size=32, patch_size=8, depth=2, drop_path_rate=0.5)
    monitor = _monitor(eval_store)
    bank, queries = monitor.features(backbone.train())
    assert backbone.training
    eval_bank, _ = monitor.features(backbone.eval())
    np.testing.assert_array_equal(bank, eval_bank)
    backbone.train()
    assert len(bank) == monitor.split()["n_bank"] and len(queries) == monitor.split()["n_query"]
    n_objects = int(eval_store.object_counts().sum())
    assert len(bank) + len(queries) == n_objects
    values = monitor.evaluate(backbone)
    assert set(values) == {"knn_top1", "knn_top5", "effective_rank", "eval_seconds"}
    assert values["effective_rank"] == pytest.approx(
        participation_ratio(bank / np.linalg.norm(bank, axis=1, keepdims=True)), rel=1e-5)
