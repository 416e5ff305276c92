"""Concurrency on the production server, small: no errors, and answers equal to isolated ones.

bench/load_test.py does the work (gunicorn with the tiny model, loopback only, bounded); the
full-size run and its figures are in docs/RELIABILITY.md.
"""
from bench.load_test import run


def test_concurrent_predictions_equal_isolated_ones_without_errors(tmp_path):
    report = run(threads=8, requests_per_thread=4, max_seconds=90, n_images=8, feature_cache_mb=0.03,
                 workdir=tmp_path, log=lambda *a: None)
    assert report.errors == [] and report.mismatches == []
    assert report.completed == 32 and not report.stopped_early
    # The comparison means something: every distinct request has its own answer, with regions.
    assert report.distinct_answers == report.distinct_requests and report.regions_per_answer > 0
    assert report.rss_peak_mib <= report.rss_bound_mib, report


def test_first_setup_is_fast_while_the_model_loads(tmp_path):
    """Label Studio gives /setup 3 s. The first one after a start used to import the config
    parser (1-5 s); it is now done at app creation. Loose bound: the figure (tens of ms) is in
    docs/BACKEND.md, from bench/first_setup.py."""
    from bench.first_setup import one_start

    run = one_start("gunicorn", tmp_path, 0, {"GEM_MODEL": "ViT-B-16"})
    assert run["first_status"] == 200 and run["second_status"] == 200
    assert not run["ready_at_health"]        # /setup really was sent while the model was loading
    assert run["first_setup_s"] < 1.0, run
