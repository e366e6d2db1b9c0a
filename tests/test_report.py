"""The HTML run report (etl/report.py): content, escaping, determinism, and how Chromium renders it.

No Spark here: the report is fed pandas frames. The browser checks load the page in headless
Chromium over the DevTools pipe (tests/chromium.py), which `make test` installs; without one they
fail, saying how to get it.
"""
from __future__ import annotations

import io
import shutil
from datetime import datetime, timezone
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import chromium
from etl.report import CHARTS, ReportData, render_report

WHEN = datetime(2025, 3, 1, 12, 0, tzinfo=timezone.utc)
HOSTILE = "<script>alert('x')</script> & \"quoted\" <b>bold</b>"
HOSTILE_WARNING = "RANDOM INIT CLIP: vectors not meaningful <img src=x onerror=alert(1)>"
SCREENSHOT_COPY = Path("/tmp/report-screenshot.png")


def _image(fmt: str, size=(320, 200), mode="RGB") -> bytes:
    w, h = size
    x, y = np.meshgrid(np.linspace(0, 255, w), np.linspace(0, 255, h))
    rgb = np.stack([x, y, 255 - x], axis=-1).astype("uint8")
    img = Image.fromarray(rgb, "RGB")
    if mode == "RGBA":
        img = img.convert("RGBA")
        img.putalpha(Image.fromarray((y > 100).astype("uint8") * 255, "L"))
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def full_data() -> ReportData:
    rng = np.random.default_rng(7)
    funnel = pd.DataFrame([
        ("semantic_dedup", "sentence", "semantic_duplicate", 140), ("semantic_dedup", "sentence", None, 360),
        ("fetch", "image", "fetch_failed", 12), ("fetch", "image", "kept", 188),
        ("image_quality", "image", "too_small", 20), ("image_quality", "image", "aspect_ratio", 5),
        ("image_quality", "image", None, 163), ("image_dedup", "image", "phash_duplicate", 13),
        ("image_dedup", "image", "kept", 150),
        ("sentences", "sentence", "emoji", 30), ("sentences", "sentence", "url", 40),
        ("sentences", "sentence", "too_few_words", 120), ("sentences", "sentence", "too_many_words", 10),
        ("sentences", "sentence", "no_relation_or_action", 90), ("sentences", "sentence", "low_entropy", 150),
        ("sentences", "sentence", "low_perplexity", 20), ("sentences", "sentence", "high_perplexity", 60),
        ("sentences", "sentence", None, 500),
    ], columns=["step", "kind", "reason", "count"])
    random_sizes = np.minimum(rng.pareto(1.2, 150) * 4 + 1, 400).astype(int)
    balanced_sizes = np.minimum(random_sizes, 12)
    cluster_sizes = pd.concat([
        pd.DataFrame({"subset": "random", "cluster_id": range(150), "size": random_sizes}),
        pd.DataFrame({"subset": "balanced", "cluster_id": range(150), "size": balanced_sizes}),
    ])
    sims = pd.concat([pd.DataFrame({"text_type": t, "similarity": rng.normal(m, 0.03, 300)})
                      for t, m in (("text1", 0.31), ("text2", 0.29), ("text3", 0.28), ("syn_text", 0.36))])
    lengths = pd.concat([pd.DataFrame({"text_type": t, "tokens": rng.integers(lo, hi, 300)})
                         for t, lo, hi in (("text1", 3, 40), ("text2", 3, 40), ("text3", 3, 40),
                                           ("syn_text", 15, 70))])
    stage_times = pd.DataFrame([
        ("embed", 41.0, "run-old", pd.Timestamp("2025-03-01 10:00:00"), "ok", 10, 10),
        ("ingest", 12.5, "run-2", pd.Timestamp("2025-03-01 11:00:00"), "ok", 40, 40),
        ("fetch", 3.2, "run-2", pd.Timestamp("2025-03-01 11:00:13"), "ok", 200, 188),
        ("sentences", 95.4, "run-2", pd.Timestamp("2025-03-01 11:00:17"), "ok", 900, 1170),
        ("embed", 61.7, "run-latest", pd.Timestamp("2025-03-01 11:02:00"), "ok", 510, 510),
        ("mystery_stage", 1.0, "run-2", pd.Timestamp("2025-03-01 11:04:00"), "failed", 0, 0),
    ], columns=["stage", "wall_s", "run_id", "started_at", "status", "rows_in", "rows_out"])
    gallery = pd.DataFrame([
        ("img-b", _image("PNG", (300, 420), "RGBA"), "a dog runs on the beach", HOSTILE, None, "A dog on sand."),
        ("img-a", _image("JPEG", (640, 400)), HOSTILE, "two cats sleep", "a red car", HOSTILE),
        ("img-c", _image("WEBP"), "a mountain lake at dawn", "x" * 3000, "", "Mountains over a lake."),
        ("img-d", b"\xff\xd8\xff not really a jpeg", "broken image", "t2", "t3", "syn"),
    ], columns=["image_id", "image_bytes", "text1", "text2", "text3", "syn_text"])
    summary = {
        "documents": 40, "images_kept": 150, "sentences_kept": 360, "pairs": 450,
        "subsets": {"random": 300, "balanced": 300},
        "models": {"clip": "ViT-B-32 (random init)", "perplexity_lm": "HuggingFaceTB/SmolLM2-135M"},
        "warnings": [HOSTILE_WARNING, "no caption weights offline"],
        "input": "sample/<docs>.jsonl",
    }
    return ReportData(funnel=funnel, sentence_funnel={"quality": 0.29, "semantics": 0.3, "redundancy": 0.28},
                      cluster_sizes=cluster_sizes, similarities=sims, similarity_band=(0.30, 0.40),
                      token_lengths=lengths, length_unit="words", stage_times=stage_times,
                      gallery=gallery, summary=summary)


class _Imgs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs: list[str] = []
        self.tags: set[str] = set()

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        if tag == "img":
            self.srcs.append(dict(attrs).get("src") or "")


def _parse(text: str) -> _Imgs:
    p = _Imgs()
    p.feed(text)
    return p


@pytest.fixture(scope="module")
def full_report(tmp_path_factory) -> Path:
    return render_report(full_data(), tmp_path_factory.mktemp("report"), generated_at=WHEN)


@pytest.fixture(scope="module")
def empty_report(tmp_path_factory) -> Path:
    return render_report(ReportData(), tmp_path_factory.mktemp("empty"), generated_at=WHEN)


# 5 charts + 3 decodable gallery thumbnails (the fourth image is corrupt).
EXPECTED_IMAGES = len(CHARTS) + 3


def test_full_report_content(full_report):
    text = full_report.read_text(encoding="utf-8")
    parsed = _parse(text)
    assert len(parsed.srcs) == EXPECTED_IMAGES
    assert all(s.startswith("data:image/") for s in parsed.srcs)
    assert sum(s.startswith("data:image/png;base64,") for s in parsed.srcs) == len(CHARTS)
    assert sum(s.startswith("data:image/jpeg;base64,") for s in parsed.srcs) == 3
    assert sorted(p.name for p in (full_report.parent / "img").iterdir()) == sorted(f"{c}.png" for c in CHARTS)
    assert "Not available yet" not in text
    assert "image not decodable" in text
    # Self-contained: nothing fetched, no script of any kind.
    assert not {"script", "link", "iframe", "object", "embed"} & parsed.tags
    assert "http://" not in text and "src=\"http" not in text and "url(" not in text
    # Sections in order, the warnings box before the first one.
    order = [text.index(f'<section id="{s}">') for s in
             ("funnel", "cluster_sizes", "similarities", "token_lengths", "stage_times", "gallery", "summary")]
    assert order == sorted(order)
    assert text.index("class=warnings") < order[0]
    assert "2025-03-01T12:00:00+00:00" in text
    # The paper's funnel and ours.
    for s in ("14.6%", "36.3%", "27.6%", "0.84B", "29.0%", "+14.4 pp"):
        assert s in text
    # Latest run per stage; a stage outside the pipeline order still shown.
    assert "run-latest" in text and "run-old" not in text and "mystery_stage" in text
    assert "words" in text


def test_hostile_text_is_escaped(full_report):
    text = full_report.read_text(encoding="utf-8")
    assert "<script" not in text.lower()
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; &quot;quoted&quot; &lt;b&gt;bold&lt;/b&gt;" in text
    assert "<b>bold" not in text
    assert "onerror=alert(1)&gt;" in text and "<img src=x" not in text
    assert "sample/&lt;docs&gt;.jsonl" in text
    # The 3000-character text is cut.
    assert "x" * 600 + "…" in text and "x" * 601 not in text


def test_empty_report_notes_every_section(empty_report):
    text = empty_report.read_text(encoding="utf-8")
    assert text.count("Not available yet: run stage") == 8  # 7 sections + the paper comparison
    assert "<img" not in text
    assert not list((empty_report.parent / "img").iterdir())
    assert "14.6%" in text  # the paper's side of the comparison is still shown
    assert "class=warnings" not in text


def test_deterministic_and_stale_charts_removed(tmp_path, full_report):
    again = render_report(full_data(), tmp_path / "again", generated_at=WHEN)
    assert again.read_bytes() == full_report.read_bytes()
    for c in CHARTS:
        assert (again.parent / "img" / f"{c}.png").read_bytes() == \
            (full_report.parent / "img" / f"{c}.png").read_bytes()
    # Re-rendered without charts: the old PNGs go, so img/ matches the page.
    render_report(ReportData(summary={"documents": 1}), tmp_path / "again", generated_at="now")
    assert not list((tmp_path / "again" / "img").iterdir())


def test_bad_frames_refused(tmp_path):
    with pytest.raises(ValueError, match="funnel lacks column"):
        render_report(ReportData(funnel=pd.DataFrame({"step": ["a"], "count": [1]})), tmp_path)
    with pytest.raises(TypeError, match="must be a pandas DataFrame"):
        render_report(ReportData(gallery=[{"image_id": "x"}]), tmp_path)


@pytest.fixture(scope="module")
def browser():
    path = chromium.find_chromium()
    if not path:
        # `make test` installs Chromium: a missing browser is a broken set-up, never a skip.
        pytest.fail("no headless Chromium on PATH: apt-get install -y chromium (or python tests/chromium.py "
                    "--install), or set CHROMIUM=/path/to/chrome")
    return path


@pytest.mark.parametrize("which", ["full", "empty"])
def test_renders_in_chromium(which, browser, full_report, empty_report, tmp_path):
    report = full_report if which == "full" else empty_report
    res = chromium.load_page(report, binary=browser)
    shot = tmp_path / f"report-{which}.png"
    shot.write_bytes(res.screenshot)
    if which == "full":
        shutil.copyfile(shot, SCREENSHOT_COPY)
    assert res.errors == [], res.errors
    assert res.title == "RealSyn ETL report"
    # Only the page itself and its data: URIs were loaded.
    assert all(u.startswith(("file:", "data:")) for u in res.requests), res.requests
    assert res.failed == []
    expected = EXPECTED_IMAGES if which == "full" else 0
    assert len(res.images) == expected
    assert all(i["src"].startswith("data:image/") and i["complete"] and i["width"] > 0 and i["height"] > 0
               for i in res.images), res.images
    thumbs = [i for i in res.images if i["src"].startswith("data:image/jpeg")]
    assert all(max(i["width"], i["height"]) <= 256 for i in thumbs)
    with Image.open(shot) as img:
        assert img.width >= 1000 and img.height > (3000 if which == "full" else 400)
        colors = img.convert("RGB").resize((200, 200)).getcolors(maxcolors=200 * 200)
        assert colors is not None and len(colors) > (200 if which == "full" else 5)  # not blank
