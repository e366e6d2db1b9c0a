"""Input containment: local paths stay inside the input folder (and are checked for NUL, controls and
lone surrogates before any OS call), every read is capped, no credential is stored in any cell of
any table (OBELICS image metadata, titles and alt texts included), one run at a time on a
warehouse. Real files, a real local Spark + Delta, a real HTTP server on 127.0.0.1."""
from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

import hostile_corpus as H
from lock_helpers import hold_in_child
from image_fixtures import server  # noqa: F401  (fixture)
from etl.lock import Holder, WarehouseBusy, current_holder, warehouse_lock
from etl.runner import run_stages
from data_paths import PROJECT
from udfs import ingest as I


# --- LocalFiles without Spark -------------------------------------------------------------------

@pytest.fixture
def corpus(tmp_path):
    return H.build(tmp_path, lambda path: f"http://127.0.0.1:9{path}")


def test_every_hostile_path_gets_its_reason(corpus):
    files = I.LocalFiles(max_bytes=H.FILE_CAP)
    for rel, expected in corpus.expected_paths.items():
        try:
            path, data = files.read(rel, str(corpus.root))
        except I.BadRecord as e:
            assert e.reason == expected, (rel, e.detail)
            assert H.OUTSIDE_MARKER.decode() not in e.detail
            continue
        assert expected == "ok", rel
        assert Path(path).is_relative_to(corpus.root.resolve()) and data[:4] == b"\x89PNG"


def test_local_root_and_allowed_absolute_roots(corpus, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "img.png").write_bytes(H.png())
    strict = I.LocalFiles()
    with pytest.raises(I.BadRecord) as e:
        strict.read(str(elsewhere / "img.png"), str(corpus.root))
    assert e.value.reason == I.PATH_OUTSIDE_INPUT
    opened = I.LocalFiles(allow_roots=(str(elsewhere),))
    assert opened.read(str(elsewhere / "img.png"), str(corpus.root))[1][:4] == b"\x89PNG"
    # The allow-list widens absolute paths only to its own folders; a device stays refused.
    with pytest.raises(I.BadRecord) as e:
        I.LocalFiles(allow_roots=("/dev",)).read("/dev/zero", str(corpus.root))
    assert e.value.reason == I.NOT_A_REGULAR_FILE
    # ingest.local_root: relative paths resolve against it, not the input file's folder.
    rooted = I.LocalFiles(root=str(elsewhere))
    assert rooted.read("img.png", str(corpus.root))[1][:4] == b"\x89PNG"
    with pytest.raises(I.BadRecord) as e:
        rooted.read("../input/ok.png", str(corpus.root))
    assert e.value.reason == I.PATH_OUTSIDE_INPUT


def test_capped_reads_never_hold_more_than_the_cap():
    class Endless(io.RawIOBase):  # like /dev/zero: it never ends
        def readable(self):
            return True

        def readinto(self, b):
            b[:] = b"\0" * len(b)
            return len(b)

    assert I.read_capped(io.BufferedReader(Endless()), 1 << 20) is None
    assert I.read_capped(io.BytesIO(b"abc"), 3) == b"abc"
    assert I.read_capped(io.BytesIO(b"abcd"), 3) is None


def test_capped_line_reader_cuts_long_lines_and_keeps_numbering():
    data = b'{"a": 1}\n' + b"x" * 100_000 + b"\n" + b'{"b": 2}\r\n' + b"tail"
    lines = list(I.read_lines_capped(io.BufferedReader(io.BytesIO(data)), 1000, 16))
    assert lines == [('{"a": 1}', None), ("x" * 16, 100_001), ('{"b": 2}', None), ("tail", None)]


def test_a_growing_file_is_cut_while_reading(tmp_path):
    # st_size said small when checked; the file then grows past the cap: the read stops at the cap.
    path = tmp_path / "grows.png"
    path.write_bytes(H.png())
    stop = threading.Event()

    def grow():
        with open(path, "ab") as f:
            while not stop.is_set():
                f.write(b"\0" * 65536)
                f.flush()

    files = I.LocalFiles(max_bytes=2 << 20)
    t = threading.Thread(target=grow)
    t.start()
    try:
        time.sleep(0.2)
        outcomes = set()
        for _ in range(5):
            try:
                files.read("grows.png", str(tmp_path))
                outcomes.add("read")
            except I.BadRecord as e:
                outcomes.add(e.reason)
    finally:
        stop.set()
        t.join()
    assert outcomes == {I.FILE_TOO_LARGE}


# --- the whole stage: nothing from outside, no credential, in any table ----------------------------

def test_hostile_corpus_leaves_nothing_in_any_table(stage_ctx, tmp_path, server):  # noqa: F811
    corpus = H.build(tmp_path, server.url)
    caps = {"max_record_bytes": H.RECORD_CAP, "max_text_chars": H.TEXT_CAP}
    fetch = {"max_bytes": H.FILE_CAP, "allow_hosts": ["127.0.0.1"], "retries": 0, "connect_timeout_s": 1.0}
    ctx = stage_ctx(ingest={"format": "interleaved_jsonl", "paths": [str(corpus.jsonl)], **caps}, fetch=fetch)
    jsonl = run_stages(ctx.spark, ctx.cfg, ["ingest"])["ingest"]

    def with_input(fmt, path):
        ingest = ctx.cfg.ingest.model_copy(update={"format": fmt, "paths": [str(path)]})
        return ctx.cfg.model_copy(update={"ingest": ingest})

    run_stages(ctx.spark, with_input("mmc4", corpus.mmc4), ["ingest", "fetch"])
    obelics = run_stages(ctx.spark, with_input("obelics", corpus.obelics), ["ingest"])["ingest"]
    assert obelics.rows_out == 1 and ctx.read("doc_images").where("metadata LIKE '%REDACTED%'").count() == 1

    # Each hostile path has its own reason; the good ones (a symlink that stays inside too) are read.
    reasons = {r["detail"].split(": ", 1)[0]: r["reason"] for r in ctx.read("quarantine").collect()}
    positions = {f"blocks[{i + 1}]": rel for i, rel in enumerate(corpus.expected_paths)}
    for block, rel in positions.items():
        assert reasons.get(block, "ok") == corpus.expected_paths[rel], rel
    assert set(jsonl.drops) >= {I.PATH_OUTSIDE_INPUT, I.NOT_A_REGULAR_FILE, I.FILE_TOO_LARGE, I.MISSING_FILE,
                                I.TEXT_TOO_LONG, I.RECORD_TOO_LARGE}
    assert ctx.read("doc_images").where("bytes IS NOT NULL").count() == 3
    # Nothing lost: every record is a document or a quarantine row.
    assert jsonl.rows_in == 3 and jsonl.rows_out == 2

    # Stored URLs: no userinfo, no signature; the 6to4 loopback form was refused by fetch.
    # (The OBELICS page was ingested after fetch: its image is not in `images`.)
    images = {r["url"]: r for r in ctx.read("images").where("url IS NOT NULL").collect()}
    statuses = sorted(r["fetch_status"] for r in images.values())
    assert statuses == ["blocked_address", "http_error", "ok"]  # the signed URL was fetched unsigned
    for url in list(images) + [r["url"] for r in ctx.read("documents").collect()]:
        assert "@" not in url.split("/")[2], url

    # Every cell of every table, OBELICS per-image metadata, titles, alt texts and quarantine included.
    leaks = [(table, s) for table, cell in H.all_cells(ctx) for s in corpus.secrets if s in cell]
    assert leaks == []


def test_a_failed_run_records_its_error_redacted(stage_ctx):
    path = f"/nonexistent/docs.jsonl?token={H.TOKEN}&password={H.PASSWORD}"
    ctx = stage_ctx(ingest={"format": "mmc4", "paths": [path]})
    with pytest.raises(Exception) as e:
        run_stages(ctx.spark, ctx.cfg, ["ingest"])
    assert H.PASSWORD not in str(e.value)
    error = ctx.read("runs").collect()[0]["notes"]["error"]
    assert "input path does not exist" in error and H.PASSWORD not in error and H.TOKEN not in error


# --- one run at a time ------------------------------------------------------------------------------

def test_lock_refuses_a_second_holder_names_the_first_and_releases(tmp_path):
    with warehouse_lock(tmp_path, "b1", "run") as held:
        held.set_stage("embed")
        with pytest.raises(WarehouseBusy) as e:
            with warehouse_lock(tmp_path, "b2", "run"):
                pass
        assert e.value.holder.run_id == "b1" and e.value.holder.stage == "embed"
        assert "run b1" in str(e.value) and "--wait" in str(e.value)
        assert current_holder(tmp_path).pid == os.getpid()
    assert current_holder(tmp_path) is None
    with warehouse_lock(tmp_path, "b3", "run") as held:
        assert held.abandoned is None  # released cleanly: nothing abandoned


def test_wait_takes_over_when_the_holder_finishes(tmp_path):
    child = hold_in_child(tmp_path, 1.5, die=False)
    told = []
    t0 = time.monotonic()
    with warehouse_lock(tmp_path, "b2", "run", wait=True, poll_s=0.1, on_wait=told.append) as held:
        assert held.abandoned is None
    assert time.monotonic() - t0 >= 0.5 and [h.run_id for h in told] == ["child"]
    child.wait(5)


def test_a_dead_holder_is_taken_over_and_reported_abandoned(tmp_path):
    child = hold_in_child(tmp_path, 0.1, die=True)
    child.wait(5)
    with warehouse_lock(tmp_path, "b2", "run") as held:
        assert isinstance(held.abandoned, Holder)
        assert (held.abandoned.run_id, held.abandoned.stage) == ("child", "fetch")


def test_second_realsyn_run_is_refused_at_once_with_one_line(tmp_path):
    warehouse = tmp_path / "wh"
    child = hold_in_child(warehouse, 30, die=False)
    try:
        t0 = time.monotonic()
        out = subprocess.run([sys.executable, "-m", "etl.cli", "run", "--stages", "ingest",
                              "--set", f"spark.warehouse_dir={warehouse}"],
                             cwd=PROJECT, capture_output=True, text=True, timeout=60)
        elapsed = time.monotonic() - t0
    finally:
        child.kill()
        child.wait()
    assert out.returncode == 4
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "run child" in lines[0] and "in stage fetch" in lines[0], out.stderr
    assert elapsed < 30  # refused before any Spark start-up
