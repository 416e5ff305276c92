"""`python -m backend.select`'s tab against a real Label Studio: the Data Manager shows exactly the picks.

The tab "GEM: next to label" is an OR of `ID = <id>` filters ordered by prediction score; Label
Studio 1.23.2 stores it through `/api/dm/views/` and its task list under that view (what the Data
Manager's table and "Label All Tasks" in that tab read) is checked here. Saving again updates the
same tab. No model runs; the tasks are never fetched.
"""
from __future__ import annotations

from backend.ls_client import LabelStudioClient
from backend.select import VIEW_TITLE, save_view
from e2e_support import check, labeling_config


def _tasks_in_view(ls, project: int, view: int) -> list[int]:
    reply = check(ls.get("/api/tasks/", params={"project": project, "view": view, "page_size": 1000,
                                                  "fields": "task_only"}), 200)
    return [t["id"] for t in reply.json()["tasks"]]


def test_the_tab_shows_exactly_the_picked_tasks_lowest_score_first(ls, label_studio):
    client = LabelStudioClient(label_studio.url, label_studio.account.legacy_token)
    project = ls.create_project("e2e select tab", labeling_config())
    ls.import_tasks(project, [{"image": f"/data/select-{i}.png"} for i in range(8)])
    ids = [t["id"] for t in ls.tasks(project)]
    for rank, task_id in enumerate(ids):
        check(ls.post("/api/predictions/", json={"task": task_id, "result": [], "score": 0.9 - 0.1 * rank,
                                                 "model_version": "e2e"}), 201)
    # The Data Manager's prediction score is that of the project's model version (the connected
    # backend's, in real use).
    check(ls.request("PATCH", f"/api/projects/{project}/", json={"model_version": "e2e"}), 200)
    other = check(ls.post("/api/dm/views/", json={"project": project, "data": {"title": "my own tab"}}), 201).json()

    picks = [ids[1], ids[6], ids[3]]
    view_id, url = save_view(client, project, picks)
    assert url == f"{label_studio.url}/projects/{project}/data?tab={view_id}"
    # Exactly the picks, lowest prediction score first (task ids[6] scores lowest of the three).
    assert _tasks_in_view(ls, project, view_id) == [ids[6], ids[3], ids[1]]

    again, _ = save_view(client, project, [ids[0], ids[2]])
    assert again == view_id
    assert _tasks_in_view(ls, project, view_id) == [ids[2], ids[0]]
    views = check(ls.get("/api/dm/views/", params={"project": project}), 200).json()
    assert sorted(v["id"] for v in views) == sorted([view_id, other["id"]])     # the user's tab untouched
    (mine,) = [v for v in views if v["id"] == view_id]
    assert mine["data"]["title"] == VIEW_TITLE and mine["data"]["ordering"] == ["tasks:predictions_score"]


def test_a_tab_of_hundreds_of_picks_shows_them_all(ls, label_studio):
    """`--count 200`: one OR filter of 200 ids; Label Studio must still list exactly those, in score order."""
    client = LabelStudioClient(label_studio.url, label_studio.account.legacy_token)
    project = ls.create_project("e2e select big tab", labeling_config())
    n = 300
    ls.import_tasks(project, [{"data": {"image": f"/data/select-big-{i}.png"},
                               "predictions": [{"result": [], "score": round((i * 37 % n) / n, 4),
                                                "model_version": "e2e"}]} for i in range(n)])
    check(ls.request("PATCH", f"/api/projects/{project}/", json={"model_version": "e2e"}), 200)
    tasks = ls.tasks(project)
    assert len(tasks) == n
    score = {t["id"]: (i * 37 % n) / n for i, t in enumerate(tasks)}
    picks = [t["id"] for t in tasks[::6]] + [t["id"] for t in tasks[1::6]] + [t["id"] for t in tasks[2::3]]
    assert len(picks) == 200
    view_id, _ = save_view(client, project, picks)
    shown = _tasks_in_view(ls, project, view_id)
    assert sorted(shown) == sorted(picks)
    assert [score[t] for t in shown] == sorted(score[t] for t in picks)
