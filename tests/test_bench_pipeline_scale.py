"""bench/pipeline_scale.py's split run: finished stages are kept in state.json and only the rest
are run again; the synthetic corpus is what the bench says it is. (The timed run itself is the
bench's, not a test's.)"""
from __future__ import annotations

import argparse
import io
import json
import time
from datetime import datetime, timedelta

import pyarrow.parquet as pq
import pytest
from PIL import Image

from bench.pipeline_scale import State, clock_deadline, growth, report, synthetic_corpus
from etl.stages import PIPELINE


def test_finished_stages_survive_a_restart_and_only_the_rest_are_run_again(tmp_path):
    path = tmp_path / "state.json"
    state = State(path)
    state.record(100.0, "ingest", {"wall_s": 60.0, "peak_rss_gb": 3.0, "rows_in": 41000, "rows_out": 41000})
    state.record(100.0, "fetch", {"wall_s": 9.0, "peak_rss_gb": 3.1, "rows_in": 16000, "rows_out": 16000})
    state.record(1.0, "ingest", {"wall_s": 20.0, "peak_rss_gb": 3.0, "rows_in": 410, "rows_out": 410})

    again = State(path)  # the next session
    assert again.remaining(100.0, list(PIPELINE)) == list(PIPELINE[2:])
    assert again.remaining(1.0, ["ingest", "fetch"]) == ["fetch"]
    assert again.remaining(10.0, ["ingest"]) == ["ingest"]
    assert again.by_scale[100.0]["fetch"]["rows_in"] == 16000
    saved = json.loads(path.read_text())
    assert set(saved["scales"]) == {"100", "1"}
    assert saved["scales"]["100"]["ingest"]["commit"] == state.commit  # which code measured it
    assert not path.with_suffix(".tmp").exists()


def test_without_a_work_dir_nothing_is_written(tmp_path):
    state = State(None)
    state.record(1.0, "ingest", {"wall_s": 1.0})
    assert state.remaining(1.0, ["ingest", "fetch"]) == ["fetch"]
    assert list(tmp_path.iterdir()) == []


def test_growth_is_taken_from_each_scale_to_the_next_that_have_a_figure():
    assert growth([1, 10, 100], [10.0, 100.0, 1000.0]) == [1.0, 1.0]
    assert growth([1, 10, 100], [10.0, 100.0, 10 ** 2.5]) == pytest.approx([1.0, 0.5])
    assert growth([1, 10, 100], [10.0, 100.0, None]) == [1.0, None]  # 100x not reached yet
    assert growth([1, 10, 100], [10.0, None, None]) == [None, None]
    assert growth([1, 10], [0.0, 0.0]) == [None]  # a stage with nothing to do


def test_a_stage_not_reached_yet_reads_as_a_dash_and_null(tmp_path, capsys):
    state = State(None)
    for scale, wall in ((1.0, 10.0), (10.0, 100.0)):
        state.record(scale, "sentences", {"wall_s": wall, "peak_rss_gb": 6.0, "rows_in": 9, "rows_out": 9})
    state.record(100.0, "ingest", {"wall_s": 45.0, "peak_rss_gb": 3.0, "rows_in": 41000, "rows_out": 9})
    out = tmp_path / "scale.json"
    report(state.by_scale, argparse.Namespace(out=str(out), conf="c"), [1.0, 10.0, 100.0], ["ingest", "sentences"])
    sentences = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("sentences"))
    assert sentences.split() == ["sentences", "10.0", "100.0", "-", "9", "9", "-", "6.00", "6.00", "-", "1.00", "-"]
    saved = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
    row = next(r for r in saved["stages"] if r["stage"] == "sentences")
    assert row["wall_s"]["100.0"] is None and row["rows_in"]["100.0"] is None
    assert row["wall_growth_exponent"] == {"1x-10x": 1.0, "10x-100x": None}


def test_the_stop_time_is_the_next_such_clock_time():
    soon = datetime.now() + timedelta(minutes=30)
    at = clock_deadline(f"{soon.hour}:{soon.minute:02d}")
    assert 0 < at - time.time() <= 30 * 60
    passed = datetime.now() - timedelta(minutes=30)
    at = clock_deadline(f"{passed.hour}:{passed.minute:02d}")
    assert 23 * 3600 < at - time.time() <= 24 * 3600


def test_the_synthetic_corpus_is_obelics_shaped_with_decodable_images(tmp_path):
    rows = pq.read_table(synthetic_corpus(40, tmp_path / "c.parquet")).to_pylist()
    assert len(rows) == 40
    for row in rows:
        assert len(row["images"]) == len(row["texts"]) == len(row["image_bytes"])
        assert row["texts"][0] is None and all(t for t in row["texts"][1:])
    photos = [r["image_bytes"][0] for r in rows if r["image_bytes"][0]]
    assert photos and all(Image.open(io.BytesIO(b)).size[0] >= 160 for b in photos)
