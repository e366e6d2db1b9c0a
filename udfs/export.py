"""Write the release: WebDataset shards laid out as img2dataset lays them, parquet shards in the
released RealSyn schema, and a manifest, from pandas frames that Spark hands over one shard at a
time.

Why mirror img2dataset (rom1504/img2dataset, read at commit 95523bc): the released RealSyn is a
URL list that users turn into WebDataset with img2dataset, and open_clip / webdataset loaders
and tools expect its layout. What is matched, and where it comes from:

- `img2dataset/writer.py` `WebDatasetSampleWriter`: one `{shard:05d}.tar` per shard (shard name
  `"{shard_id:0{oom_shard_count}d}"`, `oom_shard_count` = 5), members `<key>.jpg`, `<key>.txt`
  (the caption: text1 here, "" when missing) and `<key>.json` (the row's metadata); beside it a
  `{shard:05d}.parquet` holding every row of the shard, failed ones included, with their status.
  A row without an image is in the parquet but not in the tar, as there.
- `img2dataset/downloader.py` `compute_key`: key = `shard * 10**oom_sample_per_shard + index`,
  zero-padded to `oom_shard_count + oom_sample_per_shard` digits: 9 by default ("000000012" is
  sample 12 of shard 0); the meta columns `key, status, error_message, width, height,
  original_width, original_height`, status "success" / "failed_to_download" / "failed_to_resize".
- `img2dataset/logger.py` `write_stats`: `{shard:05d}_stats.json` with count, successes,
  failed_to_download, failed_to_resize and status_dict (status or error message -> count).
  Its start/end times and duration are left out so that exporting the same rows again yields the
  same bytes.
- `img2dataset/resizer.py` `Resizer` with `resize_mode="keep_ratio"`,
  `resize_only_if_bigger=True`, `skip_reencode=True`, `encode_quality=95`: see `prepare_jpeg`.
- `img2dataset/main.py`: `number_sample_per_shard` = 10,000 (`SAMPLES_PER_SHARD`).

Where this differs, and why: members are written in a fixed order (key, then jpg, txt, json) with
fixed tar headers, not in download-completion order with wall-clock mtimes, so equal rows give
byte-equal shards; every file is written to a hidden temporary name and renamed, and an existing
file with the same SHA-256 is left alone, so a re-run or a retried Spark task never shows a
partial file and rewrites nothing that did not change.

`out_dir` is a local or FUSE-mounted folder (`/Volumes/...`, `/dbfs/...`), where `os.replace` is
what makes a file appear whole, or an object-store URI that pyarrow opens (`s3://bucket/prefix`,
`gs://...`; credentials from the environment, as every AWS / GCP client takes them). An object
store has no rename, but an object appears whole when its upload completes: there the temporary
is a file on the writing task's local disk, uploaded once it is complete and unchanged-checked.
Only the driver may call `remove_orphan_temps`, after the writing tasks have finished.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import shutil
import tarfile
import tempfile
import uuid
import warnings
from pathlib import Path
from functools import lru_cache
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image

RELEASE_COLUMNS = ["raw_image_url", "text1", "text2", "text3", "syn_text"]
TEXT_COLUMNS = ["text1", "text2", "text3", "syn_text"]

SAMPLES_PER_SHARD = 10_000
JPEG_QUALITY = 95
MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb threshold

# Sub-folders of an export root; manifest paths are relative to the root.
WEBDATASET_DIR = "webdataset"
RELEASE_DIR = "data"
EXTRAS_DIR = "extras"
MANIFEST_NAME = "manifest.json"

WRITTEN = "written"
UNCHANGED = "unchanged"

# img2dataset's statuses.
SUCCESS = "success"
FAILED_TO_DOWNLOAD = "failed_to_download"
FAILED_TO_RESIZE = "failed_to_resize"
NO_BYTES = "no image bytes"
AREA_TOO_LARGE = "image area too large"  # img2dataset's message for max_image_area

# What a writing task returns per file (the schema of a mapInPandas over the writers).
ENTRY_SCHEMA = "path string, bytes long, sha256 string, samples long, status string"

_EXTENSIONS = ("jpg", "txt", "json")
# Columns of a shard's rows that are not lineage (input or written by the writer itself).
_NOT_LINEAGE = {"shard", "sample_index", "bytes", "image_id", *RELEASE_COLUMNS, "key", "status",
                "error_message", "width", "height", "original_width", "original_height"}
_OBJECT_REPR = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")
_STRING = pa.string()
_INT32 = pa.int32()


class ImageRejected(ValueError):
    """The image cannot be shipped; the message is what the shard's parquet records."""


# ---------------------------------------------------------------------------------------------
# Images


def prepare_jpeg(data: bytes, resize_to: int | None = 224,
                 max_pixels: int = MAX_PIXELS) -> tuple[bytes, int, int]:
    """Image bytes -> (JPEG bytes, width, height) as img2dataset's `keep_ratio` resize with
    `resize_only_if_bigger` and `skip_reencode` leaves them.

    - Resized only when the smaller side is larger than `resize_to` (`downscale = min(w, h) >
      image_size`), to smaller side = `resize_to` with the ratio kept (albumentations'
      `SmallestMaxSize`: the other side rounded); never enlarged. `None` never resizes.
    - Downscaling averages pixel areas (img2dataset's `downscale_interpolation="area"`; Pillow's
      BOX filter). A JPEG is first decoded at a reduced DCT scale no smaller than twice the
      target (what Pillow's `thumbnail` does, and `udfs/embed.decode_image`), which is several
      times faster on large photos and leaves the area filter more pixels than it keeps.
    - A JPEG that needs no resize is returned byte-identical (`skip_reencode`). Anything else is
      encoded as a baseline RGB JPEG at quality 95 (MPO, a camera JPEG with a second frame,
      included). Transparency is composited onto white, as img2dataset's alpha matting does.
      The ICC profile is carried over so colours survive the re-encode.
    - EXIF orientation is not applied, as in img2dataset (cv2 `IMREAD_UNCHANGED`) and in the
      embed stage: the pixels shipped are the pixels whose embedding chose the texts.
    - More than `max_pixels` pixels, read from the header before decoding, raises
      `ImageRejected`, as does anything Pillow cannot decode in full (a truncated JPEG too).
    """
    return _prepare(data, resize_to, max_pixels)[:3]


def _prepare(data: bytes, resize_to: int | None, max_pixels: int) -> tuple[bytes, int, int, int, int]:
    """`prepare_jpeg` plus the original width and height, which the shard parquet records."""
    try:
        with warnings.catch_warnings():
            # Pillow warns (and past twice its limit raises) on huge images; max_pixels decides.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise ImageRejected(AREA_TOO_LARGE)
                target = _target_size(width, height, resize_to)
                if target is None and img.format == "JPEG":
                    img.load()  # decoded in full, as img2dataset does, so a truncated file fails
                    return bytes(data), width, height, width, height
                if target is not None and img.format == "JPEG":
                    img.draft("RGB", (2 * target[0], 2 * target[1]))
                icc = img.info.get("icc_profile")
                rgb = _to_rgb(img)
            if target is not None:
                rgb = rgb.resize(target, Image.Resampling.BOX)
            buf = io.BytesIO()
            rgb.save(buf, "JPEG", quality=JPEG_QUALITY, icc_profile=icc)
    except ImageRejected:
        raise
    except Image.DecompressionBombError as e:
        raise ImageRejected(AREA_TOO_LARGE) from e
    except Exception as e:  # Pillow raises a zoo of types for corrupt or truncated data
        # Pillow's messages may quote the stream's repr, whose address would change the bytes of
        # every re-export; the recorded message must be a function of the image alone.
        raise ImageRejected(_OBJECT_REPR.sub("<bytes>", f"{type(e).__name__}: {e}")) from e
    return buf.getvalue(), rgb.width, rgb.height, width, height


def _target_size(width: int, height: int, resize_to: int | None) -> tuple[int, int] | None:
    if resize_to is None or min(width, height) <= resize_to:
        return None
    scale = resize_to / min(width, height)
    if width <= height:
        return resize_to, max(1, round(height * scale))
    return max(1, round(width * scale)), resize_to


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


# ---------------------------------------------------------------------------------------------
# Shards


def assign_shards(positions: pd.Series, samples_per_shard: int = SAMPLES_PER_SHARD) -> pd.DataFrame:
    """Global 0-based positions -> `shard`, `sample_index` (img2dataset's fixed-size shards).

    Positions should come from a stable order (e.g. `row_number()` over `image_id`), so that a
    re-export puts every row in the same shard at the same key and rewrites nothing."""
    if samples_per_shard < 1:
        raise ValueError("samples_per_shard must be >= 1")
    pos = positions.astype("int64")
    if (pos < 0).any():
        raise ValueError("positions must be >= 0")
    return pd.DataFrame({"shard": pos // samples_per_shard, "sample_index": pos % samples_per_shard},
                        index=positions.index)


def sample_key(shard: int, sample_index: int, key_digits: int = 9, shard_digits: int = 5) -> str:
    """img2dataset's `compute_key`: shard and index side by side in one zero-padded number."""
    index_digits = key_digits - shard_digits
    if index_digits < 1:
        raise ValueError("key_digits must exceed shard_digits")
    if not 0 <= shard < 10 ** shard_digits:
        raise ValueError(f"shard {shard} does not fit in {shard_digits} digits")
    if not 0 <= sample_index < 10 ** index_digits:
        raise ValueError(f"sample_index {sample_index} does not fit in {index_digits} digits")
    return f"{shard * 10 ** index_digits + sample_index:0{key_digits}d}"


def write_webdataset_shard(rows: pd.DataFrame, out_dir: str, shard: int, resize_to: int | None = 224,
                           key_digits: int = 9, shard_digits: int = 5,
                           max_pixels: int = MAX_PIXELS) -> list[dict]:
    """One shard's rows -> `webdataset/{shard}.tar`, `.parquet` and `_stats.json` under `out_dir`.

    `rows` carry `sample_index`, `image_id`, `bytes` and the `RELEASE_COLUMNS` (a `shard` column
    is ignored); any other column is lineage and goes into each sample's `.json` and the shard parquet. Returns one manifest
    entry per file (`ENTRY_SCHEMA`), `status` telling whether it was written or unchanged."""
    _require(rows, ["sample_index", "image_id", "bytes", *RELEASE_COLUMNS])
    if rows["sample_index"].duplicated().any():
        raise ValueError(f"shard {shard}: duplicate sample_index")
    extras = [c for c in rows.columns if c not in _NOT_LINEAGE]
    rows = rows.sort_values("sample_index", kind="stable")

    samples: list[tuple[str, bytes, dict]] = []
    metas: list[dict] = []
    status_dict: dict[str, int] = {}
    for r in rows.to_dict("records"):
        meta = {
            "key": sample_key(shard, int(r["sample_index"]), key_digits, shard_digits),
            "image_id": r["image_id"],
            **{c: _text(r[c]) for c in RELEASE_COLUMNS},
            "status": SUCCESS, "error_message": None,
            "width": None, "height": None, "original_width": None, "original_height": None,
            **{c: _jsonable(r[c]) for c in extras},
        }
        data = r["bytes"]
        if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) == 0:
            meta.update(status=FAILED_TO_DOWNLOAD, error_message=NO_BYTES)
        else:
            try:
                jpeg, w, h, ow, oh = _prepare(data, resize_to, max_pixels)
                meta.update(width=w, height=h, original_width=ow, original_height=oh)
                samples.append((meta["key"], jpeg, meta))
            except ImageRejected as e:
                meta.update(status=FAILED_TO_RESIZE, error_message=str(e))
        outcome = meta["error_message"] or SUCCESS
        status_dict[outcome] = status_dict.get(outcome, 0) + 1
        metas.append(meta)

    name = f"{WEBDATASET_DIR}/{shard:0{shard_digits}d}"
    n = len(metas)
    ok = len(samples)
    stats = {
        "count": n,
        "successes": ok,
        "failed_to_download": sum(m["status"] == FAILED_TO_DOWNLOAD for m in metas),
        "failed_to_resize": sum(m["status"] == FAILED_TO_RESIZE for m in metas),
        "status_dict": dict(sorted(status_dict.items())),
    }
    table = _shard_table(metas, extras)
    return [
        publish(out_dir, f"{name}.tar", ok, lambda p: _write_tar(p, samples)),
        publish(out_dir, f"{name}.parquet", n, lambda p: _write_parquet(p, table)),
        publish(out_dir, f"{name}_stats.json", n, _bytes_writer(_json_bytes(stats))),
    ]


def _write_tar(path: str, samples: Sequence[tuple[str, bytes, dict]]) -> None:
    with open(path, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, jpeg, meta in sorted(samples, key=lambda s: s[0]):
            members = {
                "jpg": jpeg,
                "txt": (meta["text1"] or "").encode("utf-8"),
                "json": json.dumps(meta, ensure_ascii=False, indent=4).encode("utf-8"),
            }
            for ext in _EXTENSIONS:
                payload = members[ext]
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                info.mtime = 0
                info.mode = 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(payload))


def _shard_table(metas: list[dict], extras: list[str]) -> pa.Table:
    fields = [("key", _STRING), ("image_id", _STRING), *((c, _STRING) for c in RELEASE_COLUMNS),
              ("status", _STRING), ("error_message", _STRING),
              *((c, _INT32) for c in ("width", "height", "original_width", "original_height"))]
    table = pa.table({name: pa.array([m[name] for m in metas], type=t) for name, t in fields})
    for c in extras:
        table = table.append_column(c, pa.array([m[c] for m in metas]))
    return table


# ---------------------------------------------------------------------------------------------
# Parquet release


def write_parquet_shard(rows: pd.DataFrame, out_dir: str, shard: int,
                        extra_columns: Sequence[str] = ()) -> list[dict]:
    """One shard's rows -> `data/part-{shard:05d}.parquet` (exactly `RELEASE_COLUMNS`, the
    released RealSyn schema) and `extras/part-{shard:05d}.parquet` (`image_id` + `extra_columns`,
    our lineage), rows in `image_id` order in both, so row i of one is row i of the other.

    The files carry no pandas metadata, so equal rows give equal bytes under one pyarrow version
    (the writer's version is in the footer: an upgrade rewrites each file once)."""
    _require(rows, ["image_id", *RELEASE_COLUMNS, *extra_columns])
    rows = rows.sort_values("image_id", kind="stable")
    release = pa.table({c: pa.array([_text(v) for v in rows[c]], type=_STRING) for c in RELEASE_COLUMNS})
    extras = pa.table({"image_id": pa.array(rows["image_id"].tolist(), type=_STRING),
                       **{c: pa.array([_jsonable(v) for v in rows[c]]) for c in extra_columns}})
    name = f"part-{shard:05d}.parquet"
    out = []
    for sub, table in ((RELEASE_DIR, release), (EXTRAS_DIR, extras)):
        out.append(publish(out_dir, f"{sub}/{name}", table.num_rows, lambda p, t=table: _write_parquet(p, t)))
    return out


def _write_parquet(path: str, table: pa.Table) -> None:
    pq.write_table(table.replace_schema_metadata(None), path, compression="zstd")


# ---------------------------------------------------------------------------------------------
# Manifest


def write_manifest(out_dir: str, entries: Iterable[Mapping[str, Any]], counts: Mapping[str, Any]) -> str:
    """Every file's size, SHA-256 and sample count (sorted by path) with the run's counts, as
    `manifest.json` under `out_dir`; unchanged content is not rewritten. The entries' `status`
    is left out: it describes a run, not the release."""
    files = sorted(({k: e[k] for k in ("path", "bytes", "sha256", "samples")} for e in entries),
                   key=lambda e: e["path"])
    paths = [f["path"] for f in files]
    if len(set(paths)) != len(paths):
        raise ValueError("duplicate paths in manifest entries")
    manifest = {
        "counts": {k: _jsonable(v) for k, v in sorted(counts.items())},
        "files": files,
        "totals": {"files": len(files), "bytes": sum(int(f["bytes"]) for f in files)},
    }
    publish(out_dir, MANIFEST_NAME, len(files), _bytes_writer(_json_bytes(manifest)))
    return f"{out_dir.rstrip('/')}/{MANIFEST_NAME}"


def remove_orphan_temps(out_dir: str) -> int:
    """Delete temporaries left by killed tasks; returns how many. Driver only, after the writing
    tasks have finished: a running task's temporary looks the same. An object store holds none: a
    killed upload never completes, and the bucket's lifecycle rule for incomplete multipart
    uploads reclaims its parts."""
    removed = 0
    if object_store(out_dir):
        return removed
    for sub in ("", WEBDATASET_DIR, RELEASE_DIR, EXTRAS_DIR):
        folder = Path(out_dir) / sub
        for p in folder.glob(".*.tmp-*") if folder.is_dir() else ():
            p.unlink(missing_ok=True)
            removed += 1
    return removed


# ---------------------------------------------------------------------------------------------
# Helpers


def object_store(out_dir: str) -> pafs.FileSystem | None:
    """The pyarrow filesystem of an `scheme://` out_dir other than file://; None for a local folder."""
    scheme = re.match(r"^([a-z][a-z0-9+.-]*)://", out_dir)
    return _opened(out_dir)[0] if scheme and scheme.group(1) != "file" else None


@lru_cache(maxsize=4)
def _opened(out_dir: str) -> tuple[pafs.FileSystem, str]:
    return pafs.FileSystem.from_uri(out_dir)


def _remote_path(out_dir: str, rel: str) -> str:
    return f"{_opened(out_dir)[1].rstrip('/')}/{rel}"


def publish(root: str, rel: str, samples: int, write: Callable[[str], None]) -> dict:
    """`write(temporary path)`, then make the file `root/rel` appear whole, or drop the temporary
    when the final file already holds the same bytes (a local file's mtime stays). Returns its
    manifest entry, `status` written or unchanged.

    Locally the temporary is a hidden file beside the final one (pyarrow, Spark and glob patterns
    such as `part-*` skip dot files, so an orphan from a killed task breaks no reader), renamed
    into place; on an object store it is a local temporary, uploaded in one stream."""
    fs = object_store(root)
    final = Path(root) / rel
    if fs is None:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex}")
    else:
        handle, name = tempfile.mkstemp(prefix=".export-", suffix=f"-{final.name}")
        os.close(handle)
        tmp = Path(name)
    try:
        write(str(tmp))
        digest, size = _sha256(tmp, sync=fs is None)
        if fs is None:
            unchanged = final.is_file() and final.stat().st_size == size and _sha256(final)[0] == digest
            if not unchanged:
                os.replace(tmp, final)
        else:
            target = _remote_path(root, rel)
            existing = fs.get_file_info(target)
            unchanged = existing.type == pafs.FileType.File and existing.size == size and (
                _remote_sha256(fs, target) == digest)
            if not unchanged:
                with open(tmp, "rb") as src, fs.open_output_stream(target, metadata={}) as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
    finally:
        tmp.unlink(missing_ok=True)
    return {"path": rel, "bytes": size, "sha256": digest, "samples": samples,
            "status": UNCHANGED if unchanged else WRITTEN}


def _bytes_writer(data: bytes) -> Callable[[str], None]:
    return lambda path: Path(path).write_bytes(data)


def _remote_sha256(fs: pafs.FileSystem, path: str) -> str:
    with fs.open_input_stream(path) as f:
        return _digest(f)[0]


def _sha256(path: Path, sync: bool = False) -> tuple[str, int]:
    with open(path, "rb") as f:
        out = _digest(f)
        if sync:
            os.fsync(f.fileno())
    return out


def _digest(f) -> tuple[str, int]:
    """(SHA-256, size) of a binary stream, read in 1 MiB chunks."""
    h = hashlib.sha256()
    size = 0
    while chunk := f.read(1 << 20):
        h.update(chunk)
        size += len(chunk)
    return h.hexdigest(), size


def _require(rows: pd.DataFrame, columns: Iterable[str]) -> None:
    missing = [c for c in columns if c not in rows.columns]
    if missing:
        raise ValueError(f"rows lack columns: {missing}")


def _text(v) -> str | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)


def _jsonable(v):
    """pandas / numpy values -> plain JSON values (NaN and NaT -> null)."""
    if isinstance(v, np.ndarray):
        return [_jsonable(x) for x in v.tolist()]
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, np.generic):
        v = v.item()
    if v is None or v is pd.NaT or (isinstance(v, float) and math.isnan(v)):
        return None
    if isinstance(v, pd.Timestamp):
        return v.isoformat()
    if isinstance(v, bytes):
        return v.hex()
    return v


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, ensure_ascii=False, indent=4) + "\n").encode("utf-8")


def make_shard_writer(out_dir: str, resize_to: int | None, extra_columns: Sequence[str],
                      max_pixels: int = MAX_PIXELS) -> Callable[[pd.DataFrame], pd.DataFrame]:
    """applyInPandas fn over one shard's rows (`shard`, `sample_index`, `image_id`, `bytes`, the
    release columns, `extra_columns`) -> ENTRY_SCHEMA rows: its WebDataset tar, parquet and stats,
    and its release and extras parquet parts."""

    def write_shard(rows: pd.DataFrame) -> pd.DataFrame:
        shard = int(rows["shard"].iloc[0])
        entries = write_webdataset_shard(rows, out_dir, shard, resize_to=resize_to, max_pixels=max_pixels)
        entries += write_parquet_shard(rows.drop(columns=["bytes"]), out_dir, shard, extra_columns=extra_columns)
        return pd.DataFrame(entries, columns=[c.split()[0] for c in ENTRY_SCHEMA.split(", ")])

    return write_shard
