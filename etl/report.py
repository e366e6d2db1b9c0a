"""The run report: one self-contained HTML page with the pipeline's numbers next to the paper's.

Pure pandas + matplotlib: no SparkSession in here. The Spark side collects small frames (the
funnel counts, cluster sizes, samples of similarities and text lengths, the `runs` table, a
gallery sample) into a `ReportData`; `render_report` turns it into `out_dir/report.html` plus one
PNG per chart in `out_dir/img/`.

The page needs nothing beside itself: every chart and gallery thumbnail is a base64 `data:` URI,
the styles are inline, there is no JavaScript, and a Content-Security-Policy meta tag forbids
scripts and every fetch but `data:` images, so the page opens offline and a text that slipped
through escaping still could not run. Texts come from the web and are escaped everywhere.

Equal input gives equal bytes: inputs are sorted, charts are drawn with matplotlib's Agg canvas
at a fixed dpi with no PNG metadata, thumbnails are re-encoded at a fixed quality, and the
generation time is a parameter.

What each section reads (columns in `ReportData`'s docstring); a missing or empty one renders a
"not available yet: run stage X" note instead:

1. funnel — items per pipeline step and drop reason, and the sentence funnel's removed fractions
   next to RealSyn's (arXiv 2502.12513 §3.1: 2.13B split sentences, −14.6% quality, −36.3%
   semantics, −27.6% redundancy → 0.84B).
2. cluster_sizes — cluster-size histograms of the balanced and random subsets (paper Fig. 8).
3. similarities — image–text cosine similarity per text type.
4. token_lengths — text length per text type.
5. stage_times — wall time of the latest run of each stage (the `runs` table).
6. gallery — sample images with their four texts.
7. summary — headline numbers, subsets, models and warnings (the warnings go first on the page).
"""
from __future__ import annotations

import base64
import html
import io
import math
import os
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from etl.stages import PIPELINE

PAPER = "arXiv:2502.12513"
PAPER_URL = "https://arxiv.org/abs/2502.12513"
# RealSyn §3.1: each filter's share of the sentences that reach it (so 2.13B × 0.854 × 0.637 ×
# 0.724 ≈ 0.84B).
PAPER_SENTENCE_FUNNEL = {"quality": 0.146, "semantics": 0.363, "redundancy": 0.276}
PAPER_SPLIT_SENTENCES = 2.13e9
FUNNEL_FILTERS = ("quality", "semantics", "redundancy")

# Pipeline order (etl.stages imports no Spark); a stage not listed sorts after these, by name.
STAGE_ORDER = PIPELINE
TEXT_TYPES = ("text1", "text2", "text3", "syn_text")
KEPT = "kept"
# Drop reasons in the order their rules run (udfs/image_quality.py, image_dedup, udfs/sentences.py,
# semantic_dedup); a reason not listed sorts after these, the larger count first.
REASON_ORDER = ("fetch_failed", "no_bytes", "undecodable", "format_not_allowed", "decompression_bomb",
                "animated", "too_small", "aspect_ratio", "truncated", "phash_duplicate", "exact_duplicate",
                "emoji", "url", "too_few_words", "too_many_words", "no_relation_or_action", "low_entropy",
                "low_perplexity", "high_perplexity", "semantic_duplicate")

DPI = 100
WIDTH_IN = 10.0
THUMB_PX = 256
THUMB_QUALITY = 85
MAX_THUMB_SOURCE_BYTES = 32 << 20
MAX_THUMB_SOURCE_PIXELS = 89_478_485
MAX_TEXT_CHARS = 600

COLORS = {"text1": "#1f77b4", "text2": "#6baed6", "text3": "#9ecae1", "syn_text": "#d62728"}
_EXTRA_COLORS = ("#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
KEPT_COLOR = "#4c9a5b"
DROP_COLOR = "#d9822b"
BAR_COLOR = "#4a6fa5"

_RC = {
    "font.family": "DejaVu Sans", "font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10,
    "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.3,
    "legend.frameon": False, "svg.hashsalt": "realsyn-report", "path.simplify": True,
}

# Chart files, in page order; files of charts not drawn this time are removed from img/.
CHARTS = ("funnel", "cluster_sizes", "similarities", "token_lengths", "stage_times")


@dataclass
class ReportData:
    """Everything the report shows; every field is optional.

    funnel:           step, kind ("image" | "sentence"), reason, count — `count` items of `kind`
                      that `step` removed for `reason`; reason null / "" / "kept" = the items that
                      survived `step`.
    sentence_funnel:  {"quality": f, "semantics": f, "redundancy": f} — each filter's removed
                      share of the sentences that reach it (bench/sentence_funnel.py's
                      `removed_fraction`).
    cluster_sizes:    subset, cluster_id, size — items per cluster in each sampled subset
                      ("balanced", "random", ...).
    similarities:     text_type ("text1" | "text2" | "text3" | "syn_text"), similarity — image–
                      text cosine similarity per pair.
    similarity_band:  (low, high) of the CLIP model's syn_text band, drawn on the chart.
    token_lengths:    text_type, tokens — length of each text, in `length_unit`.
    length_unit:      the unit of `tokens` ("tokens", "words", ...), the chart's axis label.
    stage_times:      stage, wall_s, run_id, started_at (+ optional status, rows_in, rows_out) —
                      rows of the `runs` table; the latest run of each stage is shown.
    gallery:          image_id, image_bytes (JPEG / PNG / WEBP ...), text1, text2, text3, syn_text.
    summary:          documents, images_kept, sentences_kept, pairs (ints), subsets
                      ({name: size}), models ({key: model id} or a list), warnings (list of str);
                      other keys are shown as given.
    """

    funnel: pd.DataFrame | None = None
    sentence_funnel: Mapping[str, float] | None = None
    cluster_sizes: pd.DataFrame | None = None
    similarities: pd.DataFrame | None = None
    similarity_band: tuple[float, float] | None = None
    token_lengths: pd.DataFrame | None = None
    length_unit: str = "tokens"
    stage_times: pd.DataFrame | None = None
    gallery: pd.DataFrame | None = None
    summary: Mapping[str, Any] | None = field(default=None)


REQUIRED_COLUMNS = {
    "funnel": ("step", "kind", "reason", "count"),
    "cluster_sizes": ("subset", "cluster_id", "size"),
    "similarities": ("text_type", "similarity"),
    "token_lengths": ("text_type", "tokens"),
    "stage_times": ("stage", "wall_s", "run_id", "started_at"),
    "gallery": ("image_id", "image_bytes", *TEXT_TYPES),
}

# What to run when a section has nothing to show.
PRODUCED_BY = {
    "summary": "ingest (and the later stages for the other counts)",
    "funnel": "ingest, image_quality, image_dedup, sentences, semantic_dedup",
    "sentence_funnel": "sentences, semantic_dedup",
    "cluster_sizes": "balance",
    "similarities": "retrieve (text1–3), similarity_band (syn_text)",
    "token_lengths": "retrieve, generate",
    "stage_times": "ingest (every stage run adds a row to the runs table)",
    "gallery": "retrieve, generate",
}


# ---------------------------------------------------------------------------------------------
# entry point


def render_report(data: ReportData, out_dir: Path, *, generated_at: datetime | str | None = None,
                  title: str = "RealSyn ETL report", max_gallery: int = 24) -> Path:
    """Write `out_dir/report.html` and the charts as `out_dir/img/<chart>.png`; return the HTML path.

    `generated_at` is printed as given (a string) or in ISO form (a datetime); None = now, UTC.
    At most `max_gallery` gallery rows are shown, the first by image_id.
    """
    out_dir = Path(out_dir)
    img_dir = out_dir / "img"
    img_dir.mkdir(parents=True, exist_ok=True)
    for name, cols in REQUIRED_COLUMNS.items():
        _check_columns(name, getattr(data, name), cols)
    if generated_at is None:
        generated_at = datetime.now(timezone.utc)
    when = generated_at if isinstance(generated_at, str) else generated_at.isoformat(timespec="seconds")

    charts: dict[str, bytes] = {}
    sections = [
        ("funnel", "1. Funnel: what each step removed", _funnel_section(data, charts)),
        ("cluster_sizes", "2. Cluster sizes: balanced vs random sampling", _cluster_section(data, charts)),
        ("similarities", "3. Image–text similarity per text type", _similarity_section(data, charts)),
        ("token_lengths", "4. Text length per text type", _length_section(data, charts)),
        ("stage_times", "5. Stage wall time (latest run of each stage)", _stage_section(data, charts)),
        ("gallery", "6. Gallery: sample images and their texts", _gallery_section(data, max_gallery)),
        ("summary", "7. Summary", _summary_section(data.summary)),
    ]
    for name in CHARTS:
        path = img_dir / f"{name}.png"
        if name in charts:
            _write_bytes(path, charts[name])
        elif path.exists():
            path.unlink()

    nav = " · ".join(f'<a href="#{sid}">{_esc(h.split(". ", 1)[1].split(":")[0])}</a>'
                     for sid, h, _ in sections)
    body = "\n".join(f'<section id="{sid}">\n<h2>{_esc(h)}</h2>\n{content}\n</section>'
                     for sid, h, content in sections)
    page = _PAGE.format(
        title=_esc(title), when=_esc(when), paper=_esc(PAPER), paper_url=_esc(PAPER_URL),
        style=_STYLE, top=_top(data.summary), nav=nav, body=body)
    out = out_dir / "report.html"
    _write_bytes(out, page.encode("utf-8"))
    return out


# ---------------------------------------------------------------------------------------------
# sections


def _funnel_section(data: ReportData, charts: dict[str, bytes]) -> str:
    parts = []
    df = _frame(data.funnel)
    if df is None:
        parts.append(_missing("funnel"))
    else:
        df = df[list(REQUIRED_COLUMNS["funnel"])].copy()
        df["reason"] = [KEPT if _blank(r) or str(r) == KEPT else str(r) for r in df["reason"]]
        df["step"] = df["step"].astype(str)
        df["kind"] = df["kind"].astype(str)
        df["count"] = pd.to_numeric(df["count"], errors="coerce").fillna(0).astype("int64")
        df = df.groupby(["kind", "step", "reason"], as_index=False)["count"].sum()
        df["_k"] = df["kind"].map(lambda k: (0 if k == "image" else 1 if k == "sentence" else 2, k))
        df["_s"] = df["step"].map(_stage_key)
        # Drops first, in rule order, survivors last.
        df["_r"] = [(r == KEPT, REASON_ORDER.index(r) if r in REASON_ORDER else len(REASON_ORDER), -c, r)
                    for r, c in zip(df["reason"], df["count"])]
        df = df.sort_values(["_k", "_s", "_r"]).drop(columns=["_k", "_s", "_r"]).reset_index(drop=True)
        df["share"] = _funnel_shares(df)
        charts["funnel"] = _funnel_chart(df)
        parts.append(
            "<p class=caption>Items of each kind removed by each step, one bar per drop reason "
            "(<span class=c-drop>orange</span>), and the items that survived a step "
            "(<span class=c-kept>green</span>, reason “kept”). The share is of all items of that kind "
            "(everything removed plus the survivors of the last step). Read it against the paper: "
            "the sentence drops should fall in the same order of size as the table below.</p>")
        parts.append(_img("funnel", charts["funnel"], "Funnel: items removed per step and reason"))
        recs = df.to_dict("records")
        rows = [[_esc(r["kind"]), _esc(r["step"]), _esc(r["reason"]), _int(r["count"]), _pct(r["share"])]
                for r in recs]
        parts.append(_table(["kind", "step", "reason", "count", "share of kind"], rows, numeric={3, 4},
                            row_classes=["kept" if r["reason"] == KEPT else "" for r in recs]))
    parts.append("<h3>Sentence funnel vs the paper</h3>")
    parts.append(_sentence_funnel_table(data.sentence_funnel))
    return "\n".join(parts)


def _funnel_shares(df: pd.DataFrame) -> list[float]:
    totals = {}
    for kind, g in df.groupby("kind", sort=False):
        removed = int(g.loc[g["reason"] != KEPT, "count"].sum())
        kept = g[g["reason"] == KEPT]
        last_kept = int(kept["count"].iloc[-1]) if len(kept) else 0  # df is in step order
        totals[kind] = removed + last_kept
    return [c / totals[k] if totals[k] else math.nan for k, c in zip(df["kind"], df["count"])]


def _sentence_funnel_table(fractions: Mapping[str, float] | None) -> str:
    paper_left = PAPER_SPLIT_SENTENCES
    have = fractions is not None and any(not _blank(fractions.get(k)) for k in FUNNEL_FILTERS)
    rows, ours_left = [], 1.0
    for step in FUNNEL_FILTERS:
        paper = PAPER_SENTENCE_FUNNEL[step]
        paper_left *= 1 - paper
        ours = None if not have or _blank(fractions.get(step)) else float(fractions[step])
        if ours is not None:
            ours_left *= 1 - ours
        rows.append([step, _pct(ours) if ours is not None else "—", _pct(paper),
                     _pp(ours - paper) if ours is not None else "—", f"{paper_left / 1e9:.2f}B"])
    paper_total = paper_left / PAPER_SPLIT_SENTENCES
    complete = have and all(not _blank(fractions.get(k)) for k in FUNNEL_FILTERS)
    rows.append(["kept of split (all three)", _pct(ours_left) if complete else "—", _pct(paper_total),
                 _pp(ours_left - paper_total) if complete else "—", f"{paper_left / 1e9:.2f}B"])
    caption = ("<p class=caption>Each filter's removed share of the sentences that reach it, ours "
               f"vs RealSyn ({_esc(PAPER)} §3.1: {PAPER_SPLIT_SENTENCES / 1e9:.2f}B split sentences "
               "→ 0.84B). The difference is in percentage points; a large gap on a model-decided "
               "rule (perplexity, semantic dedup) may be the model, not the data.</p>")
    note = "" if have else _missing("sentence_funnel")
    return caption + note + _table(["filter", "ours removed", "paper removed", "difference",
                                    "paper sentences left"], rows, numeric={1, 2, 3, 4})


def _cluster_section(data: ReportData, charts: dict[str, bytes]) -> str:
    df = _frame(data.cluster_sizes)
    if df is None:
        return _missing("cluster_sizes")
    df = df[["subset", "cluster_id", "size"]].copy()
    df["subset"] = df["subset"].astype(str)
    df["size"] = pd.to_numeric(df["size"], errors="coerce")
    df = df.dropna(subset=["size"])
    if df.empty:
        return _missing("cluster_sizes")
    subsets = sorted(df["subset"].unique(), key=lambda s: (s != "balanced", s != "random", s))
    charts["cluster_sizes"] = _cluster_chart(df, subsets)
    rows = []
    for s in subsets:
        sizes = np.sort(df.loc[df["subset"] == s, "size"].to_numpy(dtype=float))[::-1]
        top = max(1, math.ceil(len(sizes) * 0.1))
        rows.append([s, _int(len(sizes)), _int(sizes.sum()), _num(np.median(sizes)), _int(sizes.max()),
                     _pct(sizes[:top].sum() / sizes.sum() if sizes.sum() else math.nan)])
    return ("<p class=caption>How many clusters (y) hold how many items (x), both on log scales, one "
            "panel per subset on the same bins. Random sampling inherits the web's long tail: a few huge "
            "clusters and many tiny ones. Balanced sampling (the paper's Fig. 8) caps the big "
            "clusters, so its histogram ends further left and is flatter; the table's last column "
            "(share of items in the largest 10% of clusters) should be lower for it.</p>"
            + _img("cluster_sizes", charts["cluster_sizes"], "Cluster-size histograms per subset")
            + _table(["subset", "clusters", "items", "median size", "max size", "items in top 10% clusters"],
                     rows, numeric={1, 2, 3, 4, 5}))


def _similarity_section(data: ReportData, charts: dict[str, bytes]) -> str:
    df = _values(data.similarities, "similarity")
    if df is None:
        return _missing("similarities")
    band = data.similarity_band
    charts["similarities"] = _overlay_chart(df, "similarity", "image–text cosine similarity",
                                            integer=False, band=band)
    band_txt = (f" The dashed lines are the CLIP model's syn_text band ({band[0]:.2f}–{band[1]:.2f}); "
                "synthetic texts outside it are dropped by similarity_band." if band else "")
    return ("<p class=caption>Distribution of the cosine similarity between each image and its texts, "
            "per text type (histograms drawn as outlines on shared bins). text1 is the best retrieved "
            "realistic sentence, so its curve should sit right of text2 and text3; syn_text, written "
            "from the image's caption, tags and text1, usually sits further right still. The paper's "
            "band (0.51–0.61) is for EVA02-CLIP-E/14+; other CLIP models have their own scale."
            + _esc(band_txt) + "</p>"
            + _img("similarities", charts["similarities"], "Similarity distributions per text type")
            + _stats_table(df, "similarity", digits=3))


def _length_section(data: ReportData, charts: dict[str, bytes]) -> str:
    df = _values(data.token_lengths, "tokens")
    if df is None:
        return _missing("token_lengths")
    unit = str(data.length_unit or "tokens")
    charts["token_lengths"] = _overlay_chart(df, "tokens", f"length ({unit})", integer=True)
    return (f"<p class=caption>Length of each text in {_esc(unit)}, per text type. Realistic "
            "sentences are bounded by the sentence rule (3–81 words); the paper's synthetic texts "
            "are longer and more descriptive than the retrieved ones, so syn_text should sit right "
            "of text1–3. CLIP's text encoder reads at most 77 tokens.</p>"
            + _img("token_lengths", charts["token_lengths"], "Text-length distributions per text type")
            + _stats_table(df, "tokens", digits=1))


def _stage_section(data: ReportData, charts: dict[str, bytes]) -> str:
    df = _frame(data.stage_times)
    if df is None:
        return _missing("stage_times")
    df = df.copy()
    df["stage"] = df["stage"].astype(str)
    df["wall_s"] = pd.to_numeric(df["wall_s"], errors="coerce")
    df["_t"] = pd.to_datetime(df["started_at"], utc=True, errors="coerce")
    df["_r"] = df["run_id"].astype(str)
    df = df.sort_values(["stage", "_t", "_r"], na_position="first")
    latest = df.groupby("stage", sort=False).tail(1)
    latest = latest.iloc[sorted(range(len(latest)), key=lambda i: _stage_key(latest["stage"].iloc[i]))]
    runs = df.groupby("stage")["run_id"].count()
    charts["stage_times"] = _stage_chart(latest)
    cols = ["stage", "run_id", "started_at"] + [c for c in ("status",) if c in latest] + ["wall_s"]
    cols += [c for c in ("rows_in", "rows_out") if c in latest]
    numeric = {i for i, c in enumerate(cols + ["runs"]) if c in ("wall_s", "rows_in", "rows_out", "runs")}
    rows = []
    for _, r in latest.iterrows():
        row = []
        for c in cols:
            v = r[c]
            row.append(_num(v, 1) if c == "wall_s" else _int(v) if c in ("rows_in", "rows_out")
                       else _when(v) if c == "started_at" else _text(v))
        rows.append(row + [_int(runs[r["stage"]])])
    total = latest["wall_s"].sum()
    return (f"<p class=caption>Wall time of the latest run of each stage, in pipeline order "
            f"(total {_num(total, 1)} s). rows_in / rows_out count what each stage read and "
            "wrote (docs/architecture.md); “runs” is how many runs of the stage the runs table "
            "holds.</p>"
            + _img("stage_times", charts["stage_times"], "Wall time per stage")
            + _table(cols + ["runs"], rows, numeric=numeric))


def _gallery_section(data: ReportData, max_gallery: int) -> str:
    df = _frame(data.gallery)
    if df is None:
        return _missing("gallery")
    df = df.assign(_id=df["image_id"].astype(str)).sort_values("_id", kind="stable").head(max_gallery)
    cards = []
    for _, r in df.iterrows():
        uri = _thumbnail_uri(r["image_bytes"])
        pic = (f'<div class=thumbbox><img class=thumb src="{uri}" alt="image {_esc(r["_id"])}"></div>' if uri
               else '<div class="thumbbox nothumb">image not decodable</div>')
        texts = "".join(f"<dt>{t}</dt><dd>{_text(r[t], MAX_TEXT_CHARS) if not _blank(r[t]) else '<i>none</i>'}</dd>"
                        for t in TEXT_TYPES)
        cards.append(f'<figure class=card>{pic}<figcaption><div class=imgid>{_esc(r["_id"])}</div>'
                     f"<dl>{texts}</dl></figcaption></figure>")
    total = len(data.gallery)
    shown = f"{len(df)} of {total}" if total > len(df) else f"{len(df)}"
    return (f"<p class=caption>{shown} sample images (first by image_id), each with its three "
            "retrieved realistic sentences (text1 the most similar) and its synthetic text. "
            "Texts are shown as found on the web, escaped.</p>"
            f'<div class=gallery>{"".join(cards)}</div>')


HEADLINE = (("documents", "documents"), ("images_kept", "images kept"),
            ("sentences_kept", "sentences kept"), ("pairs", "image–text pairs"))


def _summary_section(summary: Mapping[str, Any] | None) -> str:
    if not summary:
        return _missing("summary")
    parts = []
    cards = [f'<div class=stat><div class=v>{_int(summary[k]) if _is_number(summary[k]) else _text(summary[k])}'
             f'</div><div class=k>{_esc(label)}</div></div>'
             for k, label in HEADLINE if k in summary]
    if cards:
        parts.append(f'<div class=stats>{"".join(cards)}</div>')
    subsets = summary.get("subsets")
    if subsets:
        rows = [[_text(k), _int(v) if _is_number(v) else _text(v)]
                for k, v in sorted(subsets.items(), key=lambda kv: str(kv[0]))]
        parts.append("<h3>Subsets</h3>" + _table(["subset", "pairs"], rows, numeric={1}))
    models = summary.get("models")
    if models:
        items = sorted(models.items(), key=lambda kv: str(kv[0])) if isinstance(models, Mapping) \
            else [("", m) for m in models]
        rows = [[_text(k), f"<code>{_text(v)}</code>"] for k, v in items]
        parts.append("<h3>Models</h3>" + _table(["key", "model"], rows))
    warns = _warnings(summary)
    parts.append("<h3>Warnings</h3>" + (
        "<ul class=warnlist>" + "".join(f"<li>{_text(w)}</li>" for w in warns) + "</ul>" if warns
        else "<p>None.</p>"))
    known = {k for k, _ in HEADLINE} | {"subsets", "models", "warnings"}
    other = [[_text(k), _text(v)] for k, v in sorted(summary.items(), key=lambda kv: str(kv[0])) if k not in known]
    if other:
        parts.append("<h3>Other</h3>" + _table(["name", "value"], other))
    return "\n".join(parts)


def _top(summary: Mapping[str, Any] | None) -> str:
    """The warnings box under the title: the first thing a reader sees."""
    warns = _warnings(summary or {})
    if not warns:
        return ""
    items = "".join(f"<li>{_text(w)}</li>" for w in warns)
    return (f'<div class=warnings role=alert><strong>{len(warns)} warning{"s" * (len(warns) != 1)}'
            f" — read before trusting the numbers below</strong><ul>{items}</ul></div>")


def _warnings(summary: Mapping[str, Any]) -> list[str]:
    w = summary.get("warnings") if summary else None
    if w is None or (isinstance(w, float) and math.isnan(w)):
        return []
    return [str(w)] if isinstance(w, str) else [str(x) for x in w]


# ---------------------------------------------------------------------------------------------
# charts


def _figure(height_in: float, **kw):
    from matplotlib.figure import Figure

    # Figure without pyplot: no global figure registry, no backend switch in the caller's
    # process; the Agg canvas is attached by savefig.
    return Figure(figsize=(WIDTH_IN, height_in), dpi=DPI, layout="constrained", **kw)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    fig.clear()
    return buf.getvalue()


def _rc():
    import matplotlib

    return matplotlib.rc_context(_RC)


def _funnel_chart(df: pd.DataFrame) -> bytes:
    kinds = list(dict.fromkeys(df["kind"]))
    sizes = [int((df["kind"] == k).sum()) for k in kinds]
    counts = df["count"].to_numpy(dtype=float)
    positive = counts[counts > 0]
    log = len(positive) == len(counts) and len(positive) > 1 and positive.max() / positive.min() > 50
    with _rc():
        fig = _figure(1.0 + 0.28 * sum(sizes) + 0.5 * len(kinds))
        axes = fig.subplots(len(kinds), 1, squeeze=False, gridspec_kw={"height_ratios": sizes})[:, 0]
        for ax, kind in zip(axes, kinds):
            g = df[df["kind"] == kind]
            y = np.arange(len(g))[::-1]
            colors = [KEPT_COLOR if r == KEPT else DROP_COLOR for r in g["reason"]]
            ax.barh(y, g["count"], color=colors, height=0.7)
            ax.set_yticks(y, [f"{s} · {r}" for s, r in zip(g["step"], g["reason"])])
            ax.set_title(f"{kind}s", loc="left", fontweight="bold")
            ax.grid(axis="y", visible=False)
            if log:
                ax.set_xscale("log")
            top = g["count"].max()
            if log:
                ax.set_xlim(positive.min() / 2, top * 2.5)
            else:
                ax.set_xlim(0, top * 1.15 if top > 0 else 1)
            for yy, c in zip(y, g["count"]):
                ax.annotate(f"{c:,}", (c, yy), xytext=(3, 0), textcoords="offset points",
                            va="center", fontsize=8)
        axes[-1].set_xlabel("items" + (" (log scale)" if log else ""))
        return _png(fig)


def _cluster_chart(df: pd.DataFrame, subsets: list[str]) -> bytes:
    from matplotlib.ticker import FuncFormatter

    # Log-spaced integer bins, the same for every panel: a long tail stays readable next to a
    # capped subset (bins of width 1 at small sizes, wider further out).
    top = max(1.0, float(df["size"].max()))
    edges = np.unique(np.round(np.geomspace(1, top + 1, 31)))
    bins = np.append(edges, edges[-1] + 1) - 0.5 if edges[-1] <= top else edges - 0.5
    with _rc():
        fig = _figure(3.4)
        axes = fig.subplots(1, len(subsets), squeeze=False, sharex=True, sharey=True)[0]
        highest = 1
        for i, (ax, s) in enumerate(zip(axes, subsets)):
            sizes = df.loc[df["subset"] == s, "size"].to_numpy(dtype=float)
            ax.hist(sizes, bins=bins, color=_palette(s, i, cluster=True), edgecolor="white", linewidth=0.5)
            ax.set_yscale("log")
            ax.set_xscale("log")
            ax.set_title(f"{s} ({len(sizes):,} clusters, largest {int(sizes.max()):,})", loc="left")
            ax.set_xlabel("cluster size (items, log scale)")
            highest = max(highest, np.histogram(sizes, bins=bins)[0].max())
        axes[0].set_ylabel("clusters (log scale)")
        axes[0].set_ylim(0.7, max(2.0, highest * 1.6))
        for axis in (axes[0].xaxis, axes[0].yaxis):  # 1, 10, 100 rather than 10^0, 10^1, 10^2
            axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 1 else f"{v:g}"))
        return _png(fig)


def _overlay_chart(df: pd.DataFrame, col: str, xlabel: str, *, integer: bool,
                   band: tuple[float, float] | None = None) -> bytes:
    types = _order_types(df["text_type"].unique())
    lo, hi = float(df[col].min()), float(df[col].max())
    if integer:
        step = max(1, math.ceil((hi - lo + 1) / 60))
        bins = np.arange(math.floor(lo) - 0.5, math.ceil(hi) + step + 0.5, step)
    else:
        if band:
            lo, hi = min(lo, band[0]), max(hi, band[1])
        pad = (hi - lo) * 0.02 or 0.01
        bins = np.linspace(lo - pad, hi + pad, 41)
    with _rc():
        fig = _figure(3.6)
        ax = fig.subplots()
        for i, t in enumerate(types):
            v = df.loc[df["text_type"] == t, col].to_numpy(dtype=float)
            color = _palette(t, i)
            ax.hist(v, bins=bins, histtype="stepfilled", alpha=0.12, color=color)
            ax.hist(v, bins=bins, histtype="step", linewidth=1.8, color=color,
                    label=f"{t} (n={len(v):,}, median {np.median(v):.{0 if integer else 3}f})")
        if band:
            for x in band:
                ax.axvline(x, color="#444", linestyle="--", linewidth=1)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("texts")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9)
        return _png(fig)


def _stage_chart(latest: pd.DataFrame) -> bytes:
    with _rc():
        fig = _figure(1.0 + 0.32 * len(latest))
        ax = fig.subplots()
        y = np.arange(len(latest))[::-1]
        wall = latest["wall_s"].fillna(0).to_numpy(dtype=float)
        ax.barh(y, wall, color=BAR_COLOR, height=0.7)
        ax.set_yticks(y, list(latest["stage"]))
        ax.grid(axis="y", visible=False)
        ax.set_xlim(right=(wall.max() or 1) * 1.15)
        for yy, w in zip(y, wall):
            ax.annotate(f"{w:,.1f} s", (w, yy), xytext=(3, 0), textcoords="offset points",
                        va="center", fontsize=8)
        ax.set_xlabel("wall time (s)")
        return _png(fig)


def _palette(name: str, i: int, cluster: bool = False) -> str:
    if cluster:
        return {"balanced": "#2a9d8f", "random": "#8d99ae"}.get(name, _EXTRA_COLORS[i % len(_EXTRA_COLORS)])
    return COLORS.get(name, _EXTRA_COLORS[i % len(_EXTRA_COLORS)])


# ---------------------------------------------------------------------------------------------
# thumbnails


def _thumbnail_uri(data: Any) -> str | None:
    """Hostile bytes -> a `data:image/jpeg` URI of at most THUMB_PX a side, or None."""
    if data is None or isinstance(data, float) or not len(data):
        return None
    data = bytes(data)
    if len(data) > MAX_THUMB_SOURCE_BYTES:
        return None
    from PIL import Image, ImageOps

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                w, h = img.size
                if w * h > MAX_THUMB_SOURCE_PIXELS:
                    return None
                if img.format == "JPEG":
                    img.draft("RGB", (THUMB_PX, THUMB_PX))
                img.seek(0)
                img = ImageOps.exif_transpose(img)
                if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                    rgba = img.convert("RGBA")
                    rgb = Image.new("RGB", rgba.size, (255, 255, 255))
                    rgb.paste(rgba, mask=rgba.getchannel("A"))
                else:
                    rgb = img.convert("RGB")
                rgb.thumbnail((THUMB_PX, THUMB_PX), Image.Resampling.LANCZOS)
                buf = io.BytesIO()
                rgb.save(buf, "JPEG", quality=THUMB_QUALITY, optimize=False)
    except Exception:  # Pillow raises a zoo of types for corrupt or hostile data
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# ---------------------------------------------------------------------------------------------
# HTML helpers


def _esc(s: Any) -> str:
    return html.escape(str(s), quote=True)


def _text(v: Any, limit: int | None = None) -> str:
    if _blank(v):
        return "—"
    s = str(v)
    if limit and len(s) > limit:
        s = s[:limit] + "…"
    return _esc(s)


def _img(name: str, png: bytes, alt: str) -> str:
    uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    return f'<img class=chart src="{uri}" alt="{_esc(alt)}" data-file="img/{name}.png">'


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], numeric: set[int] = frozenset(),
           row_classes: Sequence[str] | None = None) -> str:
    """Cells are already-escaped HTML; headers are plain text."""
    def cls(i):
        return " class=num" if i in numeric else ""
    head = "".join(f"<th{cls(i)}>{_esc(h)}</th>" for i, h in enumerate(headers))
    body = []
    for j, row in enumerate(rows):
        rc = f' class="{row_classes[j]}"' if row_classes and row_classes[j] else ""
        body.append(f"<tr{rc}>" + "".join(f"<td{cls(i)}>{c}</td>" for i, c in enumerate(row)) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _stats_table(df: pd.DataFrame, col: str, digits: int) -> str:
    rows = []
    for t in _order_types(df["text_type"].unique()):
        v = df.loc[df["text_type"] == t, col].to_numpy(dtype=float)
        rows.append([_esc(t), _int(len(v)), _num(v.mean(), digits), _num(np.percentile(v, 5), digits),
                     _num(np.median(v), digits), _num(np.percentile(v, 95), digits)])
    return _table(["text type", "n", "mean", "p5", "median", "p95"], rows, numeric={1, 2, 3, 4, 5})


def _missing(section: str) -> str:
    return f"<p class=missing>Not available yet: run stage {_esc(PRODUCED_BY[section])}.</p>"


# ---------------------------------------------------------------------------------------------
# small helpers


def _check_columns(name: str, df: Any, cols: Sequence[str]) -> None:
    if df is None:
        return
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"ReportData.{name} must be a pandas DataFrame, not {type(df).__name__}")
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise ValueError(f"ReportData.{name} lacks column(s) {missing}; it needs {list(cols)}")


def _frame(df: pd.DataFrame | None) -> pd.DataFrame | None:
    return None if df is None or df.empty else df


def _values(df: pd.DataFrame | None, col: str) -> pd.DataFrame | None:
    """text_type + a numeric column, NaNs dropped; None when nothing is left."""
    if _frame(df) is None:
        return None
    out = pd.DataFrame({"text_type": df["text_type"].astype(str),
                        col: pd.to_numeric(df[col], errors="coerce")}).dropna()
    return None if out.empty else out


def _order_types(types) -> list[str]:
    return sorted(types, key=lambda t: (TEXT_TYPES.index(t) if t in TEXT_TYPES else len(TEXT_TYPES), t))


def _stage_key(stage: str) -> tuple[int, str]:
    return (STAGE_ORDER.index(stage) if stage in STAGE_ORDER else len(STAGE_ORDER), stage)


def _blank(v: Any) -> bool:
    if v is None:
        return True
    if isinstance(v, float) and math.isnan(v):
        return True
    if isinstance(v, str) and not v.strip():
        return True
    try:
        return bool(pd.isna(v)) if np.ndim(v) == 0 else False
    except (TypeError, ValueError):
        return False


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _int(v: Any) -> str:
    if _blank(v):
        return "—"
    try:
        return f"{int(round(float(v))):,}"
    except (TypeError, ValueError):
        return _esc(v)


def _num(v: Any, digits: int = 1) -> str:
    if _blank(v):
        return "—"
    return f"{float(v):,.{digits}f}"


def _pct(v: float | None) -> str:
    return "—" if v is None or _blank(v) else f"{100 * v:.1f}%"


def _pp(v: float) -> str:
    return f"{100 * v:+.1f} pp"


def _when(v: Any) -> str:
    if _blank(v):
        return "—"
    if isinstance(v, (datetime, pd.Timestamp)):
        return _esc(v.isoformat(sep=" ", timespec="seconds"))
    return _esc(v)


def _write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


_STYLE = """
:root { color-scheme: light; }
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
  color: #1d2329; background: #fff; margin: 0; line-height: 1.45; }
main { max-width: 1080px; margin: 0 auto; padding: 24px 28px 64px; }
h1 { font-size: 1.7rem; margin: 0 0 4px; }
h2 { font-size: 1.25rem; margin: 40px 0 8px; padding-bottom: 4px; border-bottom: 1px solid #d8dde3; }
h3 { font-size: 1.02rem; margin: 22px 0 6px; }
.meta { color: #5b6670; font-size: .9rem; margin: 0 0 12px; }
nav { font-size: .9rem; margin: 8px 0 4px; }
a { color: #2859a8; }
.caption { color: #3c4650; font-size: .92rem; max-width: 860px; }
.missing { color: #6b5a00; background: #fff8dc; border: 1px solid #eedc82; border-radius: 4px;
  padding: 8px 12px; display: inline-block; }
.warnings { background: #fdecea; border: 2px solid #c62828; border-radius: 6px; padding: 12px 16px;
  margin: 16px 0; color: #7f1d1d; }
.warnings ul, .warnlist { margin: 6px 0 0; padding-left: 22px; }
.warnlist li { color: #7f1d1d; }
img.chart { display: block; max-width: 100%; height: auto; margin: 8px 0 12px; }
table { border-collapse: collapse; font-size: .88rem; margin: 6px 0 14px; }
th, td { border: 1px solid #dde2e7; padding: 4px 10px; text-align: left; vertical-align: top; }
th { background: #f3f5f7; font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.kept td { background: #f1f8f2; }
.c-kept { color: #2e7d32; font-weight: 600; } .c-drop { color: #b85c00; font-weight: 600; }
.stats { display: flex; flex-wrap: wrap; gap: 12px; margin: 8px 0 12px; }
.stat { border: 1px solid #dde2e7; border-radius: 6px; padding: 10px 16px; min-width: 150px; }
.stat .v { font-size: 1.4rem; font-weight: 600; font-variant-numeric: tabular-nums; }
.stat .k { color: #5b6670; font-size: .85rem; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(300px, 1fr)); gap: 16px;
  align-items: start; }
.card { margin: 0; border: 1px solid #dde2e7; border-radius: 6px; padding: 10px; overflow-wrap: anywhere; }
.thumbbox { height: 256px; display: flex; align-items: center; justify-content: center;
  margin-bottom: 8px; background: #f7f8f9; }
.thumb { display: block; max-width: 100%; max-height: 256px; }
.nothumb { color: #6b7680; font-size: .85rem; }
.imgid { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: .75rem;
  color: #6b7680; margin-bottom: 4px; }
.card dl { margin: 0; font-size: .86rem; }
.card dt { font-weight: 600; color: #3c4650; margin-top: 4px; }
.card dd { margin: 0 0 0 0; }
code { font-size: .85rem; }
"""

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>{title}</title>
<style>{style}</style>
</head>
<body>
<main>
<h1>{title}</h1>
<p class=meta>Generated {when} · compared with RealSyn (<a href="{paper_url}" rel="noreferrer">{paper}</a>)</p>
{top}
<nav>{nav}</nav>
{body}
</main>
</body>
</html>
"""
