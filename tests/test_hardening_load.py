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
