"""The feature directory (spec §12): round trip, plain-format readability, clear errors."""

import json

import numpy as np
import pytest

from odis_core.embed.features import FeatureDirError, read_features, write_features


def make_rows(n, dtype=np.float32):
    generator = np.random.default_rng(0)
    features = generator.normal(size=(n, 8)).astype(dtype)
    labels = np.array([3, -1, 90, 3, 1][:n], dtype=np.int64)
    meta = [{"image": f"img_{i}.jpg", "image_id": np.int64(i), "object_id": i * 10 + 1,
             "category": "cat" if labels[i] >= 0 else None, "category_id": int(labels[i]),
             "box": np.array([1.0, 2.0, 3.5, 4.0])} for i in range(n)]
    info = {"backbone": "vit_tiny", "checkpoint": "run/", "level": "object", "mode": "masked"}
    return features, labels, meta, info


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_round_trip_keeps_arrays_meta_and_info(tmp_path, dtype):
    features, labels, meta, info = make_rows(5, dtype)
    write_features(tmp_path / "feat", features, labels, meta, info)
    loaded = read_features(tmp_path / "feat")
    assert loaded.features.dtype == dtype and loaded.labels.dtype == np.int64
    np.testing.assert_array_equal(loaded.features, features)
    np.testing.assert_array_equal(loaded.labels, labels)
    assert loaded.meta[2] == {"image": "img_2.jpg", "image_id": 2, "object_id": 21,
                              "category": "cat", "category_id": 90, "box": [1.0, 2.0, 3.5, 4.0]}
    assert loaded.info == {**info, "dim": 8, "n": 5}
    assert len(loaded) == 5


def test_files_read_with_numpy_and_json_lines_alone(tmp_path):
    features, labels, meta, info = make_rows(4)
    write_features(tmp_path, features, labels, meta, info)
    np.testing.assert_array_equal(np.load(tmp_path / "features.npy", allow_pickle=False),
                                  features)
    np.testing.assert_array_equal(np.load(tmp_path / "labels.npy", allow_pickle=False), labels)
    lines = (tmp_path / "meta.jsonl").read_text().splitlines()
    assert [json.loads(line)["image"] for line in lines] == [row["image"] for row in meta]
    assert json.loads((tmp_path / "info.json").read_text())["dim"] == 8
    # Only the four files: no temporary file left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "features.npy", "info.json", "labels.npy", "meta.jsonl"]


def test_mismatched_lengths_are_rejected_on_write_and_read(tmp_path):
    features, labels, meta, info = make_rows(5)
    with pytest.raises(ValueError, match="lengths disagree"):
        write_features(tmp_path / "a", features, labels[:4], meta, info)
    with pytest.raises(ValueError, match="lengths disagree"):
        write_features(tmp_path / "a", features, labels, meta[:3], info)
    write_features(tmp_path / "b", features, labels, meta, info)
    np.save(tmp_path / "b" / "labels.npy", labels[:4])
    with pytest.raises(FeatureDirError, match="4 in labels.npy"):
        read_features(tmp_path / "b")


@pytest.mark.parametrize("name", ["features.npy", "labels.npy", "meta.jsonl"])
def test_missing_file_error_names_the_file(tmp_path, name):
    write_features(tmp_path, *make_rows(3))
    (tmp_path / name).unlink()
    with pytest.raises(FeatureDirError) as error:
        read_features(tmp_path)
    assert str(tmp_path / name) in str(error.value) and "\n" not in str(error.value)


def test_missing_directory_and_bad_meta_line_are_named(tmp_path):
    with pytest.raises(FeatureDirError, match="nowhere"):
        read_features(tmp_path / "nowhere")
    write_features(tmp_path, *make_rows(3))
    (tmp_path / "meta.jsonl").write_text('{"image": "a"}\nnot json\n{"image": "c"}\n')
    with pytest.raises(FeatureDirError, match=r"meta.jsonl: line 2"):
        read_features(tmp_path)


def test_info_json_is_optional_for_hand_made_directories(tmp_path):
    write_features(tmp_path, *make_rows(3))
    (tmp_path / "info.json").unlink()
    assert read_features(tmp_path).info == {}


def test_failed_write_leaves_previous_directory_intact(tmp_path):
    features, labels, meta, info = make_rows(3)
    write_features(tmp_path, features, labels, meta, info)
    bad_meta = [{"image": object()}] * 3  # not JSON: fails before any file is touched
    with pytest.raises(TypeError):
        write_features(tmp_path, features * 2, labels, bad_meta, info)
    np.testing.assert_array_equal(read_features(tmp_path).features, features)
