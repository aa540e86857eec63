"""Option checks every command shares: each failure is one line naming the option (issue 15),
raised before any work starts (and before any progress bar is drawn)."""

from __future__ import annotations

from pathlib import Path


def check_device(value: str | None, option: str = "--device") -> None:
    """auto, cpu, cuda or cuda:N; cuda only when torch sees a GPU."""
    if value is None or value in ("auto", "cpu"):
        return
    if value != "cuda" and not (value.startswith("cuda:") and value[5:].isdigit()):
        raise ValueError(f"{option} {value}: use auto, cpu or cuda (cuda:N)")
    import torch

    if not torch.cuda.is_available():
        raise ValueError(f"{option} {value}: torch sees no GPU on this machine (use cpu)")


def check_at_least(option: str, value: float | None, minimum: float) -> None:
    if value is not None and value < minimum:
        raise ValueError(f"{option} {value}: must be >= {minimum:g}")


def check_folder(option: str, path: Path) -> None:
    if not path.is_dir():
        raise ValueError(f"{option} {path}: " + ("not a directory" if path.exists()
                                                 else "no such directory"))
