"""The task score's parts (gem_model/uncertainty.py), the selection (gem_model/selection.py) and
`python -m backend.select` against the fake Label Studio."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from backend import select as select_cli
from backend.ls_client import LabelStudioClient
from backend.pipeline import PredictionPipeline
from backend.settings import Settings
from backend_fixtures import FakePredictor, fake_extract_regions
from fake_label_studio import TOKEN
from gem_model.errors import InvalidInputError
from gem_model.regions import RegionConfig
from gem_model.selection import image_embedding, k_center_order, select_diverse
from gem_model.uncertainty import agreement, combine_scores, committee_agreement, margin_score, pixel_margin


# -- the score's parts -------------------------------------------------------------------------------


def test_margin_is_low_where_two_classes_tie_and_high_where_one_wins():
    config = RegionConfig(min_similarity=0.2, softmax_scale=100.0)
    sims = np.full((2, 1, 4), 0.0, np.float32)
    sims[:, 0, 0] = (0.30, 0.30)        # two labels tie, both above the floor
    sims[:, 0, 1] = (0.40, 0.10)        # one label clearly wins
    sims[:, 0, 2] = (0.05, 0.02)        # clearly background (floor 0.2 beats both)
    sims[:, 0, 3] = (0.20, 0.00)        # a label exactly on the floor: label and background tie
    margin = pixel_margin(sims, config)
    assert margin[0, 0] < 0.01 and margin[0, 3] < 0.01
    assert margin[0, 1] > 0.99 and margin[0, 2] > 0.9
    assert margin_score(sims, config) == pytest.approx(float(margin.mean()), abs=1e-6)


def test_margin_independent_mode_takes_the_closest_call_of_the_labels():
    config = RegionConfig(mode="independent", min_similarity=0.2, softmax_scale=100.0)
    sims = np.array([[[0.5, 0.5]], [[0.2, 0.9]]], np.float32)   # label 2 sits on the floor at pixel 0
    margin = pixel_margin(sims, config)
    assert margin[0, 0] < 0.01 and margin[0, 1] > 0.99


def test_agreement_of_the_committee():
    config = RegionConfig(min_similarity=0.2)
    text = np.zeros((2, 4, 4), np.float32)
    text[0, :2] = 0.5                                  # label 0 on the top half
    assert agreement(text, text.copy(), config) == 1.0
    other = np.zeros_like(text)
    other[1, :2] = 0.5                                 # the same pixels, the other label
    assert agreement(text, other, config) == 0.0
    half = np.zeros_like(text)
    half[0, :1] = 0.5                                  # a quarter of the image, inside the first's half
    assert agreement(text, half, config) == pytest.approx(0.5)
    assert agreement(np.zeros_like(text), np.zeros_like(text), config) == 1.0   # nobody claims anything


def test_committee_agreement_of_text_and_prototypes():
    from gem_model.learning import LearnedMaps, build_bank, task_examples

    config = RegionConfig(min_similarity=0.2)
    kind_a, kind_b = np.eye(3)[0], np.eye(3)[1]
    features = np.tile(kind_b, (4, 4, 1)).astype(np.float32)
    features[:, :2] = kind_a                                       # the left half shows kind A
    coverage = np.zeros((4, 4), np.float32)
    coverage[:, :2] = 1.0
    bank = build_bank([task_examples("1", features, {"Thing": coverage})])    # Thing = kind A
    learned = LearnedMaps(bank=bank, calibration=None, prior=0.25)
    right = np.zeros((1, 4, 4), np.float32)
    right[0, :, :2] = 0.5                                          # the text finds kind A too
    wrong = np.zeros((1, 4, 4), np.float32)
    wrong[0, :, 2:] = 0.5                                          # the text points at the other half
    assert committee_agreement(features, right, ["Thing"], learned, config) == 1.0
    assert committee_agreement(features, wrong, ["Thing"], learned, config) == 0.0
    assert committee_agreement(features, right, ["Other"], learned, config) is None      # no examples of it
    assert committee_agreement(features, right, ["Thing"], LearnedMaps(), config) is None


def test_combine_scores():
    parts = {"regions": 0.8, "margin": 0.4, "agreement": None}
    assert combine_scores(parts, ("regions",)) == pytest.approx(0.8)
    assert combine_scores(parts, ("regions", "margin")) == pytest.approx(0.6)
    assert combine_scores(parts, ("regions", "margin", "agreement")) == pytest.approx(0.6)   # unknown part left out
    assert combine_scores({"agreement": None}, ("agreement",)) == 0.0
    with pytest.raises(InvalidInputError):
        combine_scores(parts, ("entropy",))


def test_the_pipeline_scores_tasks_with_the_parts_gem_task_score_names(tmp_path):
    from backend.pipeline import compute_model_version
    from backend_fixtures import data_uri

    config = ('<View><Image name="image" value="$image"/>'
              '<BrushLabels name="tag" toName="image"><Label value="Bright"/><Label value="Dark"/></BrushLabels></View>')
    buffer = io.BytesIO()    # a grey ramp: where Bright (brightness) and Dark (1 - it) tie, the margin is low
    Image.fromarray(np.tile(np.linspace(0, 255, 40).astype(np.uint8), (30, 1))).save(buffer, format="PNG")
    task = {"id": 1, "data": {"image": data_uri(buffer.getvalue())}}
    scores, versions = {}, {}
    for use in (("regions",), ("margin",), ("regions", "margin")):
        settings = Settings(model_dir=str(tmp_path), task_score=use)
        pipeline = PredictionPipeline(settings, FakePredictor(), region_extractor=fake_extract_regions)
        (prediction,), _ = pipeline.predict([task], pipeline.prepare(config))
        scores[use], versions[use] = prediction["score"], compute_model_version(settings)
    assert scores[("regions",)] != pytest.approx(scores[("margin",)], abs=1e-3)
    assert scores[("regions", "margin")] == pytest.approx((scores[("regions",)] + scores[("margin",)]) / 2, abs=2e-4)
    assert len(set(versions.values())) == 3            # stored scores of another formula are not taken for these
    assert versions[("regions",)] == compute_model_version(Settings(model_dir=str(tmp_path)))


# -- the selection -------------------------------------------------------------------------------------


def _clusters(per_cluster=5, clusters=4, dim=8, seed=0):
    """Well-separated clusters: orthogonal directions plus small noise. Returns embeddings, cluster of each."""
    rng = np.random.default_rng(seed)
    rows, labels = [], []
    for c in range(clusters):
        centre = np.zeros(dim)
        centre[c] = 1.0
        for _ in range(per_cluster):
            rows.append(centre + rng.normal(0, 0.05, dim))
            labels.append(c)
    return np.array(rows), np.array(labels)


def test_k_center_visits_every_cluster_before_a_second_point_of_any():
    embeddings, cluster = _clusters()
    order = k_center_order(embeddings, 8, start=3)
    assert order[0] == 3
    assert sorted(cluster[order[:4]]) == [0, 1, 2, 3]
    assert len(set(order)) == 8


def test_select_picks_one_task_per_cluster_before_a_second_from_any():
    embeddings, cluster = _clusters()
    # The lowest scores all lie in cluster 0: "lowest score first" would take four near-duplicates.
    scores = np.linspace(0.5, 0.9, len(cluster))
    scores[cluster == 0] = [0.01, 0.02, 0.03, 0.04, 0.05]
    lowest_first = select_diverse(scores, embeddings, 4, pool_factor=1.0)
    assert set(cluster[lowest_first]) == {0}
    picks = select_diverse(scores, embeddings, 8, pool_factor=10.0)
    assert len(set(picks)) == 8
    assert sorted(cluster[picks[:4]]) == [0, 1, 2, 3]


def test_within_a_cluster_the_lowest_scored_task_is_picked():
    embeddings, cluster = _clusters(seed=1)
    rng = np.random.default_rng(2)
    scores = rng.uniform(0.2, 0.9, len(cluster))
    picks = select_diverse(scores, embeddings, 4, pool_factor=10.0)
    for c in range(4):
        members = np.flatnonzero(cluster == c)
        assert [p for p in picks if cluster[p] == c] == [int(members[np.argmin(scores[members])])]


def test_the_pool_keeps_only_the_lowest_scored():
    embeddings, cluster = _clusters()
    scores = np.arange(len(cluster)) / len(cluster)          # cluster 0 lowest, then 1, ...
    picks = select_diverse(scores, embeddings, 2, pool_factor=5.0)    # a pool of 10: clusters 0 and 1
    assert sorted(cluster[picks]) == [0, 1]
    assert picks[0] == 0                                     # the traversal starts at the lowest score


def test_image_embedding_mean_and_distinct_pooling():
    background, obj, other_background = np.eye(4)[0], np.eye(4)[1], np.eye(4)[2]
    first = np.tile(background, (4, 4, 1))
    first[:2, :2] = obj                                   # a quarter of the patches show the object
    second = np.tile(other_background, (4, 4, 1))
    second[2:, 2:] = obj                                  # the same object on another background
    mean = [image_embedding(f) for f in (first, second)]
    assert np.allclose(np.linalg.norm(mean[0]), 1.0)
    assert np.allclose(mean[0], (0.75 * background + 0.25 * obj) / np.linalg.norm(0.75 * background + 0.25 * obj))
    distinct = [image_embedding(f, "distinct") for f in (first, second)]
    assert np.allclose(distinct[0], obj) and np.allclose(distinct[1], obj)   # the object, not the background
    assert float(mean[0] @ mean[1]) < 0.2
    with pytest.raises(InvalidInputError):
        image_embedding(first, "max")


def test_selection_edge_cases():
    embeddings, _ = _clusters(per_cluster=1)
    assert select_diverse([0.1, 0.2, 0.3, 0.4], embeddings, 0) == []
    assert sorted(select_diverse([0.1, 0.2, 0.3, 0.4], embeddings, 10)) == [0, 1, 2, 3]   # fewer than asked
    duplicate = np.repeat(embeddings[:1], 3, axis=0)         # identical embeddings: still distinct picks
    assert sorted(select_diverse([0.3, 0.2, 0.1], duplicate, 3)) == [0, 1, 2]
    with pytest.raises(InvalidInputError):
        select_diverse([0.1, float("nan"), 0.3, 0.4], embeddings, 2)
    with pytest.raises(InvalidInputError):
        select_diverse([0.1, 0.2], embeddings, 2)
    with pytest.raises(InvalidInputError):
        select_diverse([0.1, 0.2, 0.3, 0.4], embeddings, 2, pool_factor=0.5)


# -- python -m backend.select ----------------------------------------------------------------------------

COLOURS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220), "black": (5, 5, 5)}


def _png(colour, jitter) -> bytes:
    rgb = tuple(int(np.clip(c + jitter, 0, 255)) for c in colour)
    buffer = io.BytesIO()
    Image.new("RGB", (24, 16), rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def _project(fake_ls, annotated=(), bad=()):
    """Four colours (clusters) x 3 tasks, each holding one prediction with a score; returns
    {task id: (colour, score)}. Within each colour the first task scores lowest."""
    layout = {}
    datas = []
    for colour_index, (name, colour) in enumerate(COLOURS.items()):
        for k in range(3):
            tid = len(datas) + 1
            path = fake_ls.add_file(f"{name}{k}.png", _png(colour, 3 * k))
            datas.append({"image": path if tid not in bad else "/data/upload/1/missing.png"})
            layout[tid] = (name, round(0.1 + 0.05 * colour_index + 0.2 * k, 3))
    fake_ls.add_tasks(datas, annotated=set(annotated))
    for tid, (_, score) in layout.items():
        fake_ls._store({"task": tid, "result": [], "score": score, "model_version": "old-version"})
    return layout


def _settings(tmp_path, fake_ls) -> Settings:
    return Settings(model_dir=str(tmp_path), label_studio_url=fake_ls.url, label_studio_api_key=TOKEN,
                    model_version="gem-test-v1")


def _select(tmp_path, fake_ls, count, **kw):
    settings = _settings(tmp_path, fake_ls)
    pipeline = PredictionPipeline(settings, FakePredictor(), region_extractor=fake_extract_regions,
                                  model_version="gem-test-v1")
    return select_cli.run_select(settings, 1, count, client=LabelStudioClient(fake_ls.url, TOKEN),
                                 pipeline=pipeline, page_size=5, **kw)


def test_select_command_picks_one_per_colour_skips_labelled_and_saves_one_tab(tmp_path, fake_ls):
    fake_ls.label_config = ('<View><Image name="image" value="$image"/>'
                            '<BrushLabels name="tag" toName="image"><Label value="Bright"/></BrushLabels></View>')
    # Task 1 (red, the lowest score of all) is labelled: it must not be picked; task 2 is red's next.
    layout = _project(fake_ls, annotated={1})
    summary = _select(tmp_path, fake_ls, 4, pool_factor=3.0)
    assert summary.exit_status == 0 and summary.unlabeled == 11
    assert 1 not in summary.picks
    assert sorted(layout[t][0] for t in summary.picks) == sorted(COLOURS)
    # per colour, the lowest-scored unlabeled task
    assert set(summary.picks) == {2, 4, 7, 10}
    assert summary.sources == {"stale": 11}
    # one tab, showing exactly the picks
    assert len(fake_ls.views) == 1
    view = next(iter(fake_ls.views.values()))
    assert view["data"]["title"] == select_cli.VIEW_TITLE
    filters = view["data"]["filters"]
    assert filters["conjunction"] == "or"
    assert sorted(item["value"] for item in filters["items"]) == sorted(summary.picks)
    assert all(item["filter"] == "filter:tasks:id" and item["operator"] == "equal" for item in filters["items"])
    assert summary.view_url == f"{fake_ls.url}/projects/1/data?tab={view['id']}"
    # a second run updates the same tab (and keeps what the user set in it)
    view["data"]["hiddenColumns"] = {"explore": ["tasks:data.image"]}
    fake_ls.annotate([2])
    again = _select(tmp_path, fake_ls, 4, pool_factor=3.0)
    assert len(fake_ls.views) == 1 and 2 not in again.picks and 3 in again.picks
    assert sorted(i["value"] for i in view["data"]["filters"]["items"]) == sorted(again.picks)
    assert view["data"]["hiddenColumns"] == {"explore": ["tasks:data.image"]}


def test_select_without_view_writes_nothing_and_bad_images_do_not_sink_the_run(tmp_path, fake_ls):
    fake_ls.label_config = ('<View><Image name="image" value="$image"/>'
                            '<BrushLabels name="tag" toName="image"><Label value="Bright"/></BrushLabels></View>')
    layout = _project(fake_ls, bad={1})            # red's lowest-scored task has no image
    posts_before = fake_ls.count("POST", "/api/")
    summary = _select(tmp_path, fake_ls, 4, pool_factor=3.0, write_view=False)
    assert not fake_ls.views and fake_ls.count("POST", "/api/") == posts_before and fake_ls.count("PATCH", "/") == 0
    assert 1 in summary.failed and summary.exit_status == 1
    assert sorted(layout[t][0] for t in summary.picks) == sorted(COLOURS)
    assert 2 in summary.picks                       # red's next task took its place
    assert "selected task ids" in "\n".join(summary.lines())


def test_select_computes_missing_scores(tmp_path, fake_ls):
    fake_ls.label_config = ('<View><Image name="image" value="$image"/>'
                            '<BrushLabels name="tag" toName="image"><Label value="Bright"/></BrushLabels></View>')
    for name, colour in COLOURS.items():
        fake_ls.add_tasks([{"image": fake_ls.add_file(f"{name}.png", _png(colour, 0))}])
    summary = _select(tmp_path, fake_ls, 2, write_view=False)
    assert summary.sources == {"computed": 4} and len(summary.picks) == 2
    assert not fake_ls.predictions                 # --no-view: computed in memory, nothing written


def test_select_stores_what_it_computed_once_and_leaves_a_claimed_task_to_its_holder(tmp_path, fake_ls):
    from backend.claims import ClaimStore

    fake_ls.label_config = ('<View><Image name="image" value="$image"/>'
                            '<BrushLabels name="tag" toName="image"><Label value="Bright"/></BrushLabels></View>')
    ids = [fake_ls.add_tasks([{"image": fake_ls.add_file(f"{name}.png", _png(colour, 0))}])[0]
           for name, colour in COLOURS.items()]
    # the server's background is computing the last task: its claim is held by another holder
    other = ClaimStore(str(tmp_path / "claims.sqlite")).holder("background")
    assert other.claim([ids[-1]], "gem-test-v1", project="1")
    summary = _select(tmp_path, fake_ls, 2)
    assert summary.sources == {"computed": 4} and summary.stored == 3 and summary.exit_status == 0
    stored = [p["task"] for p in fake_ls.predictions if p["model_version"] == "gem-test-v1"]
    assert sorted(stored) == sorted(ids[:-1])      # once each; the claimed task is its holder's to store
    assert all(p["score"] == summary.scores.get(p["task"], p["score"]) for p in fake_ls.predictions)
    assert "3 of the 4 computed predictions stored" in "\n".join(summary.lines())
    # the next run reads those scores back (the tab orders by them) and stores nothing more
    other.release_all()
    again = _select(tmp_path, fake_ls, 2)
    assert again.sources == {"current": 3, "computed": 1} and again.stored == 1
    assert sorted(p["task"] for p in fake_ls.predictions) == sorted(ids)


def test_the_score_of_the_newest_prediction_of_this_version_first():
    task = {"predictions": [
        {"id": 1, "model_version": "v2", "score": 0.4, "created_at": "2026-12-01T10:00:00Z"},
        {"id": 2, "model_version": "v2", "score": 0.6, "created_at": "2026-12-02T10:00:00Z"},
        {"id": 3, "model_version": "v1", "score": 0.9, "created_at": "2026-12-03T10:00:00Z"},
        {"id": 4, "model_version": "v2", "score": None}]}
    assert select_cli.newest_prediction_score(task, "v2") == (0.6, "current")
    assert select_cli.newest_prediction_score(task, "v3") == (0.9, "stale")
    assert select_cli.newest_prediction_score({"predictions": []}, "v2") is None
