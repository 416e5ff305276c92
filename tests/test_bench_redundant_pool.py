"""The redundant pool of bench/bench_learning.py --curve --duplicates K: near-duplicates of few scenes.

The learning-curve figures in docs/LEARNING.md ("A redundant pool") rest on this generator: each
scene drawn K times must come out alike (same labels, nearly the same masks and pixels) yet not
identical, and distinct scenes must stay distinct; the default, independent project is unchanged.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_learning import (  # noqa: E402
    make_project, make_redundant_project, make_scene, make_task, render_scene,
)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def _pixels(task) -> np.ndarray:
    return np.asarray(task.image, dtype=np.float32)


def test_a_scene_drawn_without_jitter_is_the_default_task():
    scene = make_scene(np.random.default_rng(3))
    task = make_task(np.random.default_rng(3))
    drawn = render_scene(scene)
    assert np.array_equal(_pixels(drawn), _pixels(task))
    assert drawn.masks.keys() == task.masks.keys()


def test_jittered_copies_are_near_duplicates_not_copies():
    rng = np.random.default_rng(11)
    scene, other = make_scene(rng), make_scene(rng)
    jitter = np.random.default_rng(5)
    a, b = render_scene(scene, jitter=jitter), render_scene(scene, jitter=jitter)
    assert a.masks.keys() == b.masks.keys() == {label for label, _, _ in scene.shapes}
    for label in a.masks:
        assert _iou(a.masks[label], b.masks[label]) > 0.6
    masks = list(a.masks.values()) + list(b.masks.values())
    for copy in (a, b):                                         # labelled shapes still kept apart
        kept = list(copy.masks.values())
        assert all(not (kept[i] & kept[j]).any() for i in range(len(kept)) for j in range(i + 1, len(kept)))
    assert all(m.any() for m in masks)
    same = np.abs(_pixels(a) - _pixels(b)).mean()
    assert same > 0                                             # not a copy
    assert same < np.abs(_pixels(a) - _pixels(render_scene(other))).mean() / 2


def test_redundant_project_has_groups_of_duplicates():
    pool = make_redundant_project(12, 4, seed=7)
    assert len(pool) == 12
    for task in pool:
        twins = [o for o in pool if o is not task and o.masks.keys() == task.masks.keys()
                 and all(_iou(o.masks[k], task.masks[k]) > 0.6 for k in task.masks)]
        assert len(twins) >= 3
    assert len(make_redundant_project(10, 4, seed=7)) == 10        # the last scene drawn fewer times
    assert len(make_project(5, seed=7)) == 5
