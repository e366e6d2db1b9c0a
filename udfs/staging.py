"""Model output staged as parquet shards (etl/gpu.py: infer_into): each task writes what it
computed as one shard, named by the ids it holds, and hands back only counts. Nothing waits in
executor memory; a retried task writes the same shard again; the shards already written survive a
killed run, which then computes only the rest.

Shards appear whole (udfs/export.py: publish: a hidden temporary renamed into place locally, one
upload on an object store), so a reader never sees half a shard.
"""
from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from udfs.export import _remote_path, object_store, publish

# What a staging task hands back: rows per (error, device), and the shard it wrote.
SUMMARY_SCHEMA = "error string, task_device string, rows long, shard string"


def make_staging_fn(fn: Callable, folder: str, schema: pa.Schema, key: str, device_col: str) -> Callable:
    """fn's output for one task (fn labelled with `device_col`) -> one parquet shard in `folder`
    with `schema` -> SUMMARY_SCHEMA rows."""
    def run(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        parts = [p for p in fn(batches) if len(p)]
        if not parts:
            return
        out = pd.concat(parts, ignore_index=True)
        # Named by content: a retried task (same rows) replaces its shard rather than adding one.
        shard = hashlib.sha256("\n".join(sorted(out[key].astype(str))).encode()).hexdigest()[:32]
        table = pa.Table.from_pandas(out.drop(columns=[device_col]), schema=schema, preserve_index=False)
        publish(folder, f"part-{shard}.parquet", len(out), lambda path: pq.write_table(table, path))
        counts = out.groupby(["error", device_col], dropna=False).size().reset_index(name="rows")
        counts["error"] = counts["error"].astype(object).where(counts["error"].notna(), None)
        yield counts.rename(columns={device_col: "task_device"}).assign(shard=shard)[
            ["error", "task_device", "rows", "shard"]]
    return run


def has_shards(folder: str) -> bool:
    fs = object_store(folder)
    if fs is None:
        return any(Path(folder).glob("part-*.parquet"))
    info = fs.get_file_info(pafs.FileSelector(_remote_path(folder, ""), allow_not_found=True))
    return any(Path(i.path).name.startswith("part-") for i in info)


def remove_shards(folder: str) -> None:
    fs = object_store(folder)
    if fs is None:
        shutil.rmtree(folder, ignore_errors=True)
    else:
        fs.delete_dir_contents(_remote_path(folder, ""), missing_dir_ok=True)
