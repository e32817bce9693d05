"""progress=True: a tqdm bar when tqdm is importable, else nothing (and no error)."""

from __future__ import annotations

from typing import Any, Optional


class _Bar:
    """Called as bar(done, total) after every step; the tqdm bar is made at the first call."""

    def __init__(self, tqdm: Any, desc: str) -> None:
        self._tqdm = tqdm
        self._desc = desc
        self._bar: Any = None

    def __call__(self, done: int, total: int) -> None:
        if self._bar is None:
            self._bar = self._tqdm(total=total, desc=self._desc, unit="step", leave=False, dynamic_ncols=True)
        self._bar.update(done - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def make_bar(desc: str) -> Optional[_Bar]:
    """A progress bar for one engine call, or None when tqdm is not installed (pip install ddim[progress])."""
    try:
        from tqdm.auto import tqdm
    except Exception:  # ImportError, or a broken tqdm: progress is optional
        return None
    return _Bar(tqdm, desc)
