"""The SQLite conventions shared by the backend's state files in MODEL_DIR (claims, outbox, learned state).

Each store opens a short-lived connection per operation (safe across threads, gunicorn workers and
the commands), in autocommit mode with WAL, and writes in explicit `BEGIN IMMEDIATE` transactions:
the write lock is taken at the start, so two writers queue up instead of failing at commit time.
"""
from __future__ import annotations

import contextlib
import sqlite3
from typing import Iterator


@contextlib.contextmanager
def connect(path: str, *, wal: bool = True, synchronous_full: bool = False) -> Iterator[sqlite3.Connection]:
    db = sqlite3.connect(path, timeout=30.0, isolation_level=None)   # autocommit; explicit BEGIN
    try:
        if wal:
            db.execute("PRAGMA journal_mode=WAL")
        if synchronous_full:
            db.execute("PRAGMA synchronous=FULL")
        yield db
    finally:
        db.close()


@contextlib.contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction (one sync to disk for all its rows); rolled back on any exception."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
