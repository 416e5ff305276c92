"""The feedback log: one JSON line per annotation event, bounded in size by rotation.

`feedback.jsonl` grows to `max_bytes`, then becomes `feedback.jsonl.1` (the previous `.1` becomes
`.2`, and so on; the oldest beyond `backups` is deleted). An exclusive lock on a side file keeps
the check-and-rotate of several gunicorn workers from interleaving. `max_bytes` 0 turns it off.
"""
from __future__ import annotations

import fcntl
import logging
import os
import threading

logger = logging.getLogger(__name__)


class FeedbackLog:
    def __init__(self, path: str, max_bytes: int, backups: int):
        self.path = path
        self.max_bytes = max(0, int(max_bytes))
        self.backups = max(0, int(backups))
        self._lock = threading.Lock()

    def append(self, line: str) -> None:
        """Append one line (a newline is added); rotate first when it would pass the size limit.
        A failure to write is logged, never raised: the webhook must still be answered."""
        if self.max_bytes == 0:
            return
        data = (line.rstrip("\n") + "\n").encode("utf-8")
        try:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            with self._lock, open(self.path + ".lock", "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                try:
                    size = os.path.getsize(self.path) if os.path.exists(self.path) else 0
                    if size and size + len(data) > self.max_bytes:
                        self._rotate()
                    with open(self.path, "ab") as handle:
                        handle.write(data)
                finally:
                    fcntl.flock(lock, fcntl.LOCK_UN)
        except OSError as exc:
            logger.warning("could not write the feedback log %s: %s", self.path, exc)

    def _rotate(self) -> None:
        if self.backups == 0:
            os.remove(self.path)
            return
        oldest = f"{self.path}.{self.backups}"
        if os.path.exists(oldest):
            os.remove(oldest)
        for index in range(self.backups - 1, 0, -1):
            if os.path.exists(f"{self.path}.{index}"):
                os.replace(f"{self.path}.{index}", f"{self.path}.{index + 1}")
        os.replace(self.path, f"{self.path}.1")
