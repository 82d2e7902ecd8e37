"""Numbered stages for long commands: a line when each starts and one when it ends, so that no
silent gap (a model conversion, a capture, a compile) leaves the user guessing."""

from __future__ import annotations

import contextlib
import time

__all__ = ["Stages"]


class Stages:
    """``with stages("capturing (2, 5)"):`` prints ``[3/9] capturing (2, 5) ...`` then
    ``[3/9] capturing (2, 5): done in 4.1 s``."""

    def __init__(self, total: int):
        self.total, self.started = total, 0

    @contextlib.contextmanager
    def __call__(self, what: str):
        self.started += 1
        tag = f"[{self.started}/{max(self.total, self.started)}]"
        print(f"{tag} {what} ...", flush=True)
        start = time.perf_counter()
        yield
        print(f"{tag} {what}: done in {time.perf_counter() - start:.1f} s", flush=True)
