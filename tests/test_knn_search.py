"""Search backends of the k-NN (torch matmul + top-k, FAISS exact, FAISS IVF) and the
per-class / confusion / recall parts of the report."""

import numpy as np
import pytest

from odis_core.evaluate.knn import weighted_knn
from odis_core.evaluate.search import (
    FaissCpuSearch,
    IvfSettings,
    TorchSearch,
    build_search,
    l2_normalize,
    recall_at_k,
)
from tests.test_knn import random_problem


def normalised_problem(seed, n_train, n_test, dim=32):
    generator = np.random.default_rng(seed)
    bank = l2_normalize(generator.normal(size=(n_train, dim)))
    queries = l2_normalize(generator.normal(size=(n_test, dim)))
    return bank, queries


@pytest.mark.parametrize("block_elements", [1 << 26, 7 * 50, 1])
def test_torch_search_equals_faiss(block_elements):
    # block_elements 350 with 50 queries -> blocks of 7 bank rows (a running top-k merge
    # over ~43 blocks); 1 -> blocks of k rows.
    bank, queries = normalised_problem(0, 300, 50)
    faiss_sim, faiss_idx = FaissCpuSearch(bank).search(queries, 20)
    torch_sim, torch_idx = TorchSearch(bank, "cpu", block_elements).search(queries, 20)
    assert torch_idx.dtype == np.int64 and torch_sim.dtype == np.float32
    np.testing.assert_array_equal(torch_idx, faiss_idx)
    np.testing.assert_allclose(torch_sim, faiss_sim, atol=1e-5)


def test_knn_reports_equal_for_torch_and_faiss_backends():
    train, train_labels, test, test_labels = random_problem(3, 400, 90, 16, range(8))
    by_faiss = weighted_knn(train, train_labels, test, test_labels, backend="faiss")
    by_torch = weighted_knn(train, train_labels, test, test_labels, backend="torch", device="cpu")
    assert by_faiss.backend == "faiss-cpu" and by_torch.backend == "torch-cpu"
    assert by_torch.results == by_faiss.results
    assert by_torch.per_class == by_faiss.per_class
    np.testing.assert_array_equal(by_torch.confusion, by_faiss.confusion)


def test_auto_backend_on_this_machine_is_exact():
    bank, _ = normalised_problem(1, 20, 1)
    assert build_search(bank, 5).name in ("faiss-cpu", "faiss-gpu", "torch-cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        build_search(bank, 5, backend="annoy")
    with pytest.raises(ValueError, match="IVF index is a FAISS index"):
        build_search(bank, 5, backend="torch", ivf=IvfSettings(4))


def test_per_class_and_confusion_agree_with_top1():
    train, train_labels, test, test_labels = random_problem(4, 300, 120, 16, [2, 5, 9, 11])
    result = weighted_knn(train, train_labels, test, test_labels, ks=(10, 20))
    assert result.confusion_k == 20
    confusion = result.confusion
    assert confusion.shape == (4, 4) and confusion.sum() == 120
    # Rows are true classes: their sums are the per-class query counts.
    assert [result.per_class[20][label]["n"] for label in (2, 5, 9, 11)] == list(
        confusion.sum(axis=1)
    )
    assert np.trace(confusion) * 100.0 / 120 == pytest.approx(result.results[20]["top1"])
    for k in (10, 20):
        table = result.per_class[k]
        hits = sum(entry["top1"] * entry["n"] / 100.0 for entry in table.values())
        assert hits * 100.0 / 120 == pytest.approx(result.results[k]["top1"])
    per_class_json = result.to_json()["per_class"]["20"]
    assert set(per_class_json) == {"2", "5", "9", "11"}


def test_confusion_matrix_off_diagonal_counts_a_known_mistake():
    # The one query sits on class-1 training items while labelled 0.
    train = np.array([[1, 0], [0.9, 0.1], [0, 1]], dtype=np.float32)
    result = weighted_knn(
        train, np.array([1, 1, 0]), np.array([[1.0, 0.0]]), np.array([0]), ks=(2,)
    )
    np.testing.assert_array_equal(result.confusion, [[0, 1], [0, 0]])
    assert result.per_class[2] == {0: {"top1": 0.0, "n": 1}}


def test_single_query_and_k_beyond_bank_are_clamped():
    train, train_labels, test, test_labels = random_problem(5, 6, 1, 8, range(3))
    result = weighted_knn(train, train_labels, test, test_labels, backend="torch")
    assert result.effective_k == {10: 6, 20: 6, 100: 6, 200: 6} and result.n_test == 1


def test_confusion_k_must_be_requested():
    train, train_labels, test, test_labels = random_problem(5, 20, 4, 8, range(3))
    with pytest.raises(ValueError, match="confusion_k=7"):
        weighted_knn(train, train_labels, test, test_labels, ks=(5,), confusion_k=7)


def test_recall_at_k_counts_shared_neighbours():
    exact = np.array([[0, 1, 2], [3, 4, 5]])
    assert recall_at_k(exact, exact) == 1.0
    assert recall_at_k(np.array([[0, 9, -1], [5, 4, 3]]), exact) == pytest.approx(4 / 6)


def test_ivf_with_every_cell_probed_is_exact_and_says_so():
    train, train_labels, test, test_labels = random_problem(6, 600, 80, 16, range(5))
    exact = weighted_knn(train, train_labels, test, test_labels, ks=(10, 20))
    full = weighted_knn(
        train, train_labels, test, test_labels, ks=(10, 20), ivf=IvfSettings(nlist=8, nprobe=8)
    )
    assert full.backend.startswith("faiss-ivf")
    assert full.ivf["recall_at_k"] == {"10": 1.0, "20": 1.0}
    assert full.ivf["recall_queries"] == 80
    assert full.results == exact.results
    # One cell of 16 probed: a real approximation, and the report shows it.
    narrow = weighted_knn(
        train, train_labels, test, test_labels, ks=(10, 20), ivf=IvfSettings(nlist=16, nprobe=1)
    )
    assert 0.0 < narrow.ivf["recall_at_k"]["20"] < 1.0
    assert narrow.to_json()["ivf"]["nprobe"] == 1
