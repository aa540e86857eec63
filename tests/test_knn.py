"""Weighted k-NN (spec §7, DINO protocol): official reference values and a brute-force twin."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from odis_core.evaluate.knn import DEFAULT_KS, knn_search, l2_normalize, weighted_knn

_HERE = Path(__file__).resolve()
_REFERENCE_DIRS = [_HERE.parent / "reference", _HERE.parents[2] / "shared" / "reference"]
REFERENCE = next((folder / "knn.npz" for folder in _REFERENCE_DIRS
                  if (folder / "knn.npz").is_file()), None)


def brute_force_knn(train, train_labels, test, test_labels, k, temperature):
    """The official algorithm written out in torch: full similarity matrix, topk, one-hot
    weighted vote, classes sorted by summed weight (stable: ties by class index)."""
    keep_train, keep_test = train_labels >= 0, test_labels >= 0
    train = F.normalize(torch.from_numpy(train[keep_train]).float(), dim=1)
    test = F.normalize(torch.from_numpy(test[keep_test]).float(), dim=1)
    classes, bank_classes = torch.unique(torch.from_numpy(train_labels[keep_train]),
                                         return_inverse=True)
    match = torch.from_numpy(test_labels[keep_test])[:, None] == classes[None]
    true_classes = torch.where(match.any(1), match.float().argmax(1), -1)
    k = min(k, len(train))
    similarities, indices = (test @ train.T).topk(k, dim=1)
    one_hot = F.one_hot(bank_classes[indices], len(classes)).float()
    votes = (one_hot * (similarities / temperature).exp()[..., None]).sum(1)
    ranked = votes.sort(dim=1, descending=True, stable=True).indices
    correct = ranked == true_classes[:, None]
    n = len(test)
    return {"top1": correct[:, :1].any(1).sum().item() * 100.0 / n,
            "top5": correct[:, :min(5, k)].any(1).sum().item() * 100.0 / n}


def random_problem(seed, n_train, n_test, dim, label_values):
    generator = np.random.default_rng(seed)
    label_values = np.asarray(label_values)
    # Class-dependent means so the vote is informative and ranks vary.
    means = generator.normal(size=(len(label_values), dim))
    train_idx = generator.integers(len(label_values), size=n_train)
    test_idx = generator.integers(len(label_values), size=n_test)
    train = (means[train_idx] + 1.5 * generator.normal(size=(n_train, dim))).astype(np.float32)
    test = (means[test_idx] + 1.5 * generator.normal(size=(n_test, dim))).astype(np.float32)
    return train, label_values[train_idx], test, label_values[test_idx]


@pytest.mark.skipif(REFERENCE is None, reason="knn.npz not found in tests/reference/ nor "
                    "../shared/reference/ next to the checkout")
def test_reproduces_official_knn_classifier():
    ref = np.load(REFERENCE)
    result = weighted_knn(ref["train_features"], ref["train_labels"], ref["test_features"],
                          ref["test_labels"], ks=(10, 20, 100, 200), temperature=float(ref["T"]))
    for k in (10, 20, 100, 200):
        assert result.results[k]["top1"] == pytest.approx(float(ref[f"top1_k{k}"]), abs=1e-6)
        assert result.results[k]["top5"] == pytest.approx(float(ref[f"top5_k{k}"]), abs=1e-6)
    assert (result.n_train, result.n_test, result.n_classes) == (500, 200, 10)


@pytest.mark.parametrize(
    ("seed", "n_train", "n_test", "label_values", "ks"),
    [
        (0, 80, 1, range(6), (1, 10, 20)),  # a single query
        (1, 80, 7, range(6), DEFAULT_KS),  # fewer than 100 queries, k > n_train
        (2, 300, 150, range(12), (1, 2, 3, 10)),  # many queries with < 5 voted classes
        (3, 120, 40, [1, 3, 17, 44, 90], (5, 30)),  # COCO-like non-contiguous ids
    ],
)
def test_matches_brute_force_torch(seed, n_train, n_test, label_values, ks):
    train, train_labels, test, test_labels = random_problem(seed, n_train, n_test, 16,
                                                            label_values)
    result = weighted_knn(train, train_labels, test, test_labels, ks=ks, temperature=0.07)
    for k in ks:
        expected = brute_force_knn(train, train_labels, test, test_labels, k, 0.07)
        assert result.results[k] == pytest.approx(expected, abs=1e-9), k
        assert result.effective_k[k] == min(k, n_train)
    assert (result.n_train, result.n_test) == (n_train, n_test)


def test_label_values_do_not_matter_only_their_order():
    train, train_labels, test, test_labels = random_problem(4, 100, 60, 8, range(9))
    contiguous = weighted_knn(train, train_labels, test, test_labels, ks=(3, 20))
    sparse = weighted_knn(train, 7 * train_labels + 3, test, 7 * test_labels + 3, ks=(3, 20))
    assert sparse.results == contiguous.results
    assert sparse.n_classes == contiguous.n_classes == 9


def test_unknown_labels_are_left_out_and_counted():
    train, train_labels, test, test_labels = random_problem(5, 100, 50, 8, range(5))
    train_labels, test_labels = train_labels.copy(), test_labels.copy()
    train_labels[::4], test_labels[::5] = -1, -1
    result = weighted_knn(train, train_labels, test, test_labels, ks=(5, 20))
    kept_train, kept_test = train_labels >= 0, test_labels >= 0
    without = weighted_knn(train[kept_train], train_labels[kept_train], test[kept_test],
                           test_labels[kept_test], ks=(5, 20))
    assert result.results == without.results
    assert (result.n_train_unknown, result.n_test_unknown) == (25, 10)
    assert (result.n_train, result.n_test) == (75, 40)


def test_query_class_missing_from_bank_is_always_wrong():
    train = np.eye(4, dtype=np.float32)
    result = weighted_knn(train, np.array([0, 0, 1, 1]), train[:1], np.array([2]), ks=(4,))
    assert result.results[4] == {"top1": 0.0, "top5": 0.0}
    assert result.n_test_unseen == 1


def test_chunking_does_not_change_anything():
    train, train_labels, test, test_labels = random_problem(6, 150, 37, 8, range(7))
    whole = weighted_knn(train, train_labels, test, test_labels, ks=(1, 5, 50))
    for chunk_size in (1, 5, 36):
        chunked = weighted_knn(train, train_labels, test, test_labels, ks=(1, 5, 50),
                               chunk_size=chunk_size)
        assert chunked.results == whole.results
        similarities, indices = knn_search(train, test, 50, chunk_size=chunk_size)
        whole_similarities, whole_indices = knn_search(train, test, 50)
        np.testing.assert_array_equal(indices, whole_indices)
        np.testing.assert_array_equal(similarities, whole_similarities)


def test_knn_search_agrees_with_torch_topk():
    generator = np.random.default_rng(7)
    train = generator.normal(size=(200, 24)).astype(np.float32) * 5
    queries = generator.normal(size=(13, 24)).astype(np.float32)
    similarities, indices = knn_search(train, queries, 17, chunk_size=4)
    expected = F.normalize(torch.from_numpy(queries), dim=1) @ F.normalize(
        torch.from_numpy(train), dim=1).T
    expected_similarities, expected_indices = expected.topk(17, dim=1)
    assert indices.dtype == np.int64 and similarities.dtype == np.float32
    np.testing.assert_array_equal(indices, expected_indices.numpy())
    np.testing.assert_allclose(similarities, expected_similarities.numpy(), atol=1e-5)


def test_l2_normalize_gives_unit_rows_and_keeps_zero_rows():
    x = np.array([[3.0, 4.0], [0.0, 0.0]], dtype=np.float16)
    normed = l2_normalize(x)
    assert normed.dtype == np.float32
    np.testing.assert_allclose(normed, [[0.6, 0.8], [0.0, 0.0]], atol=1e-6)


def test_report_json_uses_string_keys_of_spec():
    train, train_labels, test, test_labels = random_problem(8, 30, 5, 4, range(3))
    report = weighted_knn(train, train_labels, test, test_labels, ks=(20, 100)).to_json()
    assert set(report["results"]) == {"20", "100"}
    assert set(report["results"]["20"]) == {"top1", "top5"}
    assert report["effective_k"] == {"20": 20, "100": 30}
    assert (report["n_train"], report["n_test"], report["backend"]) == (30, 5, "faiss-cpu")


@pytest.mark.parametrize(
    ("train_shape", "test_shape", "message"),
    [((0, 4), (3, 4), "train set is empty"), ((5, 4), (0, 4), "test set is empty"),
     ((5, 4), (3, 6), "dimensions differ")],
)
def test_bad_inputs_raise_clear_errors(train_shape, test_shape, message):
    train, test = np.ones(train_shape, np.float32), np.ones(test_shape, np.float32)
    with pytest.raises(ValueError, match=message):
        weighted_knn(train, np.zeros(len(train), np.int64), test, np.zeros(len(test), np.int64))


def test_all_unknown_test_labels_and_nan_features_raise():
    features = np.eye(3, dtype=np.float32)
    with pytest.raises(ValueError, match="nothing to score"):
        weighted_knn(features, np.array([0, 1, 2]), features, np.array([-1, -1, -1]))
    features[1, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        weighted_knn(features, np.array([0, 1, 2]), features, np.array([0, 1, 2]))
