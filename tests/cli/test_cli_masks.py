"""`odis masks coco|sam` on bad input, end to end: one line naming the file, exit 1."""

import json

import pytest
from bad_inputs import bad_annotation_cases
from typer.testing import CliRunner

from odis_cli.app import app

CASES = {name: (content, words) for name, content, words in bad_annotation_cases()}


@pytest.mark.parametrize("case", ["malformed_json", "parent_path", "negative_box"])
def test_a_bad_annotation_file_stops_masks_coco_with_one_line(tmp_path, bad_image_corpus, case):
    content, words = CASES[case]
    path = tmp_path / "bad.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    result = CliRunner().invoke(
        app,
        [
            "masks",
            "coco",
            "--images",
            str(bad_image_corpus.root),
            "--annotations",
            str(path),
            "--out",
            str(tmp_path / "store"),
        ],
    )
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and words in lines[0] and "bad.json" in lines[0], result.output
    assert not (tmp_path / "store").exists()
