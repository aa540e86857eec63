"""What a restart needs beyond the checkpoint itself (issue 15): one command line serves the
first start and every restart (a scheduler relaunches the same `--resume` line), stale
temporary files of a killed writer are removed, a checkpoint is never continued on another
mask store, and every setting given now that the checkpoint overrides is named.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from odis_core.masks.store import MaskStore
from odis_core.train.checkpoint import CHECKPOINT_NAME, CheckpointError
from odis_core.train.config import PretrainConfig


def remove_stale_temporaries(out_dir: Path) -> list[Path]:
    """Delete `checkpoint.pt.<pid>.tmp` files a killed run left (a run directory has one
    writer, so any such file is stale when a run starts)."""
    removed = []
    for path in out_dir.glob(f"{CHECKPOINT_NAME}.*.tmp"):
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def store_fingerprint(store: MaskStore) -> dict[str, Any]:
    """What identifies a mask store's content: its size and what it was built from."""
    settings = store.settings or {}
    return {
        "n_images": int(store.n_images),
        "n_objects": int(store.n_objects),
        "source": str(store.source),
        "built_from": str(settings.get("annotations_sha1") or settings.get("annotations") or ""),
    }


def check_same_store(state: dict[str, Any], store: MaskStore) -> None:
    """Refuse to continue a checkpoint on a store other than the one it was trained on
    (checkpoints written before the fingerprint was recorded are not checked)."""
    saved = state.get("store")
    if not isinstance(saved, dict):
        return
    now = store_fingerprint(store)
    differing = [key for key in now if key in saved and saved[key] != now[key]]
    if differing:
        detail = ", ".join(f"{key} {saved[key]} -> {now[key]}" for key in differing)
        raise CheckpointError(
            f"{state.get('path', 'checkpoint')}: trained on another mask store than "
            f"{store.path} ({detail}); resume with the run's own --masks, or start a new run"
        )


def ignored_settings(
    saved: PretrainConfig, given: PretrainConfig, names: Iterable[str], run_control: Iterable[str]
) -> list[str]:
    """'name given -> kept' for each setting named in `names` (given on the command line or
    in --config) whose value differs from the checkpoint's: a resumed run keeps the
    checkpoint's method settings, so these are ignored."""
    skip = set(run_control)
    result = []
    for name in names:
        if name in skip or not hasattr(saved, name):
            continue
        ours, theirs = getattr(given, name), getattr(saved, name)
        if ours != theirs:
            result.append(f"{name} {ours} (the checkpoint's {theirs} is kept)")
    return result
