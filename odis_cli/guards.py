"""Output directories that hold another job's output: refused unless the user says
`--resume` (pretrain) or `--overwrite`; an overwrite says what it replaces.

Each guard returns the line to print (or None) and raises ValueError (one line via
`cli_errors`) when the directory must not be touched.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

# What `odis pretrain` writes into a run directory (all of it is replaced by --overwrite).
RUN_FILES = ("checkpoint.pt", "config.json", "metrics.jsonl", "report.json", "tensorboard")


def _last_logged_step(run: Path) -> int | None:
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        return None
    last = None
    with open(metrics, encoding="utf-8") as handle:
        for line in handle:
            try:
                last = int(json.loads(line)["step"])
            except (ValueError, KeyError, TypeError):
                continue
    return last


def _describe_run(run: Path) -> str:
    present = [name for name in RUN_FILES if (run / name).exists()]
    step = _last_logged_step(run)
    return ", ".join(present) + (f"; last logged step {step}" if step is not None else "")


def guard_run_dir(run: Path, resume: bool, overwrite: bool, main_rank: bool = True) -> str | None:
    """Check `odis pretrain --out RUN` before anything is written."""
    if resume and overwrite:
        raise ValueError("--resume and --overwrite: choose one (continue the run, or replace it)")
    if run.exists() and not run.is_dir():
        raise ValueError(f"--out {run}: exists and is not a directory")
    if resume or not run.is_dir() or not any((run / name).exists() for name in RUN_FILES):
        return None
    what = _describe_run(run)
    if not overwrite:
        raise ValueError(
            f"--out {run}: holds another run ({what}); continue it with --resume, "
            "or replace it with --overwrite"
        )
    if main_rank:
        for name in RUN_FILES:
            target = run / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    return f"--overwrite: replaced the run in {run} ({what})"


def guard_feature_dir(
    out: Path, settings: dict[str, Any], overwrite: bool, main_rank: bool = True
) -> str | None:
    """Check `odis embed --out DIR`: a finished feature directory of other settings (or
    other weights) is refused without --overwrite. The same settings stay a no-op resume."""
    from odis_core.embed.features import FEATURES_FILE, INFO_FILE, LABELS_FILE, META_FILE
    from odis_core.embed.shards import SETTINGS_FILE, SHARDS_DIR, _with_defaults

    previous = None
    info_path = out / INFO_FILE
    shards_settings = out / SHARDS_DIR / SETTINGS_FILE
    for path in (info_path, shards_settings):
        if path.is_file():
            try:
                loaded = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                loaded = {}
            previous = loaded.get("settings", loaded) if path == info_path else loaded
            break
    if previous is None or not isinstance(previous, dict):
        return None
    previous = _with_defaults(previous)
    changed = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
    if not changed:
        return None
    kind = "features" if info_path.is_file() else "unfinished shards"
    what = f"{kind} of other settings ({', '.join(changed)} differ)"
    if not overwrite:
        raise ValueError(f"--out {out}: holds {what}; use another --out, or replace it with "
                         "--overwrite")
    if main_rank:
        # Only what `odis embed` writes: an --out that also holds other files keeps them.
        for name in (INFO_FILE, FEATURES_FILE, LABELS_FILE, META_FILE, SHARDS_DIR, "viz"):
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
    return f"--overwrite: replaced {out} ({what})"


def guard_coco_store(out: Path, settings: dict[str, Any], overwrite: bool) -> str | None:
    """Check `odis masks coco --out STORE`: a store built from other annotations (or other
    import settings, or by SAM) is refused without --overwrite; the same import is redone."""
    manifest_path = out / "manifest.json"
    if not manifest_path.is_file():
        if out.is_dir() and any(out.iterdir()) and not (out / "shards").is_dir():
            if not overwrite:
                raise ValueError(f"--out {out}: a directory that is not a mask store and not "
                                 "empty; use another --out, or replace it with --overwrite")
            return f"--overwrite: writing the store into {out} (its other files are kept)"
        return None
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        manifest = {}
    previous = manifest.get("settings") or {}
    source = manifest.get("source", "?")
    # A key the old store lacks (written before it was recorded) is not a difference.
    differing = [k for k, v in settings.items() if k in previous and previous[k] != v]
    if source == "coco" and not differing:
        return None
    what = (f"a {source} mask store" if source != "coco"
            else f"a mask store built with other {', '.join(differing)}")
    if not overwrite:
        raise ValueError(f"--out {out}: holds {what}; use another --out, or replace it with "
                         "--overwrite")
    return f"--overwrite: replacing {what} in {out}"
