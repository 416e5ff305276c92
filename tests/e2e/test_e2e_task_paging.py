"""Task paging against a real Label Studio: annotators label tasks while a run lists them.

`python -m backend.prelabel --only-unlabeled` (and its Ray listing stage) reads the task list in
pages while annotators work. Label Studio 1.23.2's task list is checked here for real: paging by
page number skips tasks when tasks of an earlier page get labelled (shown, so the test proves the
fault exists), and paging by task id (`filter:tasks:id`, ls_client.tasks_after) lists each task once.
The project's ids are sparse (another project's tasks were imported in between), as in real use.
No model runs; the tasks are never fetched.
"""
from __future__ import annotations

from backend.ls_client import LabelStudioClient
from backend.prelabel_ray import TaskRanges, id_ranges
from e2e_support import check, labeling_config

CONFIG = labeling_config()


def _sparse_project(ls, title: str) -> tuple[int, list[int]]:
    """(project, its 12 task ids): ids interleaved with another project's tasks."""
    project = ls.create_project(title, CONFIG)
    other = ls.create_project(f"{title} (other)", CONFIG)
    for part in range(3):
        ls.import_tasks(project, [{"image": f"/data/{title}-{part}-{i}.png"} for i in range(4)])
        ls.import_tasks(other, [{"image": f"/data/other-{part}-{i}.png"} for i in range(3)])
    ids = [t["id"] for t in ls.tasks(project)]
    assert len(ids) == 12 and ids[-1] - ids[0] > 12
    return project, ids


def _annotate(ls, task_id: int) -> None:
    check(ls.post(f"/api/tasks/{task_id}/annotations/", json={"result": [], "lead_time": 1.0}), 201)


def _walk_while_labelling(ls, project: int, ids: list[int], pages) -> list[int]:
    """List the project's unlabeled tasks 3 at a time; after the first page, an annotator labels
    two tasks of that page and one further on."""
    listed: list[int] = []
    for task in pages:
        listed.append(task["id"])
        if len(listed) == 3:
            for task_id in (ids[0], ids[1], ids[7]):
                _annotate(ls, task_id)
    return listed


def test_paging_by_task_id_lists_each_task_once_while_tasks_are_labelled(ls, label_studio):
    client = LabelStudioClient(label_studio.url, label_studio.account.legacy_token)

    project, ids = _sparse_project(ls, "e2e paging by page")
    _annotate(ls, ids[5])
    by_page = _walk_while_labelling(ls, project, ids, client.iter_tasks(project, page_size=3, only_unlabeled=True))
    # Page 2 began after the next 3 unlabeled tasks of the *new* list: two tasks were never listed.
    assert set(ids) - {ids[5], ids[7]} - set(by_page), "paging by page number skipped nothing here"

    project, ids = _sparse_project(ls, "e2e paging by id")
    _annotate(ls, ids[5])
    assert client.task_id_range(project, only_unlabeled=True) == (ids[0], ids[-1])
    by_id = _walk_while_labelling(ls, project, ids,
                                  client.iter_tasks_by_id(project, page_size=3, only_unlabeled=True))
    assert by_id == [i for i in ids if i not in (ids[5], ids[7])]


def test_ray_listing_ranges_cover_a_sparse_project_once(ls, label_studio):
    """The Ray listing stage's id ranges, read in any order, give the project's tasks once each."""
    client = LabelStudioClient(label_studio.url, label_studio.account.legacy_token)
    project, ids = _sparse_project(ls, "e2e paging ranges")
    first, last = client.task_id_range(project)
    ranges = TaskRanges(url=label_studio.url, token=label_studio.account.legacy_token, project=project,
                        ranges=tuple(id_ranges(first, last, len(ids), page_size=4)), page_size=2)
    assert len(ranges.ranges) >= 3
    listed = [t["id"] for i in reversed(range(len(ranges.ranges))) for t in ranges.read(i)]
    assert sorted(listed) == ids and len(listed) == len(set(listed))
