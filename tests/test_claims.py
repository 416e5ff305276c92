"""Task claims (backend/claims.py): per holder, leases with a heartbeat, dead owners, a bounded file."""
from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time

from backend import claims as claims_module
from backend.claims import STORED, ClaimStore, process_start

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rows(path):
    with sqlite3.connect(path) as db:
        return db.execute("SELECT task, model_version, holder FROM claims ORDER BY task").fetchall()


def test_two_holders_in_one_process_do_not_share_claims(tmp_path):
    store = ClaimStore(str(tmp_path / "c.sqlite"))
    a, b = store.holder("predict"), store.holder("predict")
    assert a.claim([1, 2, 3], "v") == {"1", "2", "3"}
    assert b.claim([2, 3, 4], "v") == {"4"}             # same process, another request: not granted
    assert a.claim([1, 2], "v") == {"1", "2"}           # a holder keeps what it has
    assert b.claim([2], "other-version") == {"2"}       # per model version
    assert b.busy([1, 2, 4], "v") == {"1", "2"}
    assert a.busy([1, 2, 4], "v") == {"4"}
    assert store.busy([1, 2, 4], "v") == {"1", "2", "4"}


def test_only_the_holder_releases_its_claims(tmp_path):
    store = ClaimStore(str(tmp_path / "c.sqlite"))
    a, b = store.holder(), store.holder()
    a.claim([1, 2], "v")
    b.release([1, 2], "v")                              # not b's: nothing happens
    b.release_all()
    assert b.claim([1, 2], "v") == set()
    a.release([2], "v")
    assert b.claim([1, 2], "v") == {"2"}
    a.release_all()
    assert b.claim([1], "v") == {"1"}
    assert {h for _, _, h in _rows(store.path)} == {b.token}


def test_transfer_hands_claims_to_another_holder(tmp_path):
    store = ClaimStore(str(tmp_path / "c.sqlite"))
    request, finisher, third = store.holder("predict"), store.holder("background"), store.holder()
    request.claim([1, 2], "v")
    request.transfer([1], "v", finisher)
    request.release_all()                               # the request ends: task 1 stays with the finisher
    assert third.claim([1, 2], "v") == {"2"}
    assert finisher.held() == [("1", "v")]


def test_a_lease_runs_out_unless_the_heartbeat_renews_it(tmp_path):
    store = ClaimStore(str(tmp_path / "c.sqlite"), lease_s=0.4)
    a, b = store.holder(), store.holder()
    a.claim([1], "v")
    with a.heartbeat(interval_s=0.05):
        time.sleep(1.0)                                 # 2.5 leases: only the heartbeat keeps it
        assert b.claim([1], "v") == set()
    time.sleep(0.6)
    assert b.claim([1], "v") == {"1"}                   # no heartbeat: the lease ran out


def test_renew_pushes_back_only_the_holders_own_leases(tmp_path):
    store = ClaimStore(str(tmp_path / "c.sqlite"), lease_s=0.3)
    a, b, c = store.holder(), store.holder(), store.holder()
    a.claim([1], "v")
    b.claim([2], "v")
    time.sleep(0.2)
    a.renew()
    time.sleep(0.2)
    assert c.claim([1, 2], "v") == {"2"}


def _claim_in_child(path: str, task: int) -> None:
    code = (f"from backend.claims import ClaimStore; ClaimStore({path!r}).holder('cmd').claim([{task}], 'v')")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_claims_of_a_dead_process_are_ignored_at_once(tmp_path):
    path = str(tmp_path / "c.sqlite")
    _claim_in_child(path, 7)                            # that process has exited, lease still running
    assert ClaimStore(path).holder().claim([7], "v") == {"7"}


def test_a_reused_pid_with_another_start_time_is_a_dead_owner(tmp_path):
    """A restarted container keeps its host name and often its pid; its start time differs."""
    path = str(tmp_path / "c.sqlite")
    store = ClaimStore(path)
    store.holder().claim([1, 2, 3], "v")
    with sqlite3.connect(path) as db:
        db.execute("UPDATE claims SET start = start + 1 WHERE task='1'")            # same pid, other start
        db.execute("UPDATE claims SET boot = 'another-boot' WHERE task='2'")        # same host, rebooted
    other = ClaimStore(path).holder()
    assert other.claim([1, 2, 3], "v") == {"1", "2"}    # task 3: this very process, alive


def test_claims_from_another_host_count_until_their_lease_ends(tmp_path):
    path = str(tmp_path / "c.sqlite")
    store = ClaimStore(path, lease_s=0.3)
    store.holder().claim([1], "v")
    with sqlite3.connect(path) as db:
        db.execute("UPDATE claims SET host = 'elsewhere', pid = 999999, boot = 'x'")   # cannot be checked here
    other = store.holder()
    assert other.claim([1], "v") == set()
    time.sleep(0.4)
    assert other.claim([1], "v") == {"1"}


def test_process_start_names_a_process_by_its_start_time():
    assert process_start(os.getpid()) == process_start(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)"])
    try:
        assert process_start(child.pid) is not None
    finally:
        child.kill()
        child.wait()
    assert process_start(child.pid) is None


def test_stored_markers_hold_then_expire(tmp_path):
    store = ClaimStore(str(tmp_path / "c.sqlite"), stored_hold_s=0.3)
    a, b = store.holder(), store.holder()
    a.claim([1, 2], "v")
    a.mark_stored([1], "v")
    a.release_all()                                     # the marker is nobody's: it stays
    assert b.claim([1, 2], "v") == {"2"}
    assert [(t, h) for t, _, h in _rows(store.path) if t == "1"] == [("1", STORED)]
    time.sleep(0.4)
    assert b.claim([1], "v") == {"1"}


def test_expired_rows_and_old_markers_are_pruned_so_the_file_stays_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(claims_module, "PRUNE_EVERY_S", 0.0)
    path = str(tmp_path / "c.sqlite")
    store = ClaimStore(path, lease_s=0.05, stored_hold_s=0.05)
    for round_ in range(20):                            # 20 jobs of 50 tasks, each stored and forgotten
        holder = store.holder()
        ids = range(round_ * 50, round_ * 50 + 50)
        holder.claim(ids, "v")
        holder.mark_stored(ids, "v")
        time.sleep(0.06)
    _claim_in_child(path, 99999)                        # a dead process's claim, lease still long
    store.lease_s = 600
    store.holder().claim([5000], "v")                   # taking a claim prunes
    assert [t for t, _, _ in _rows(path)] == ["5000"]
    assert store.prune() == 1
