"""Model output is staged in parquet shards, not persisted (etl/gpu.py: infer_into): a task that
dies costs its own rows only, and the next run computes only what no shard holds (the model's
calls are counted in a file each task appends to)."""
from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from etl.context import StageResult
from etl.gpu import infer_into, staging_folder

pytestmark = pytest.mark.spark

SCHEMA = "sentence_id string, model_id string, vector array<float>, error string"
IDS = [f"s{i:02d}" for i in range(20)]


def counting_model(calls: Path, poison: Path):
    """A model that appends each id it computes to `calls`; while `poison` exists, the task that
    holds s17 dies (after the others have finished: it waits first)."""
    def fn(batches):
        for b in batches:
            ids = list(b["sentence_id"])
            with open(calls, "a") as f:
                f.write("".join(f"{i}\n" for i in ids))
            if poison.exists() and "s17" in ids:
                time.sleep(3)
                raise RuntimeError("the executor was lost")
            yield pd.DataFrame({"sentence_id": ids, "model_id": "m1",
                                "vector": [[float(int(i[1:])), 1.0] for i in ids],
                                "error": ["too_long" if i == "s03" else None for i in ids]})
    return fn


def test_a_failed_model_job_resumes_from_its_shards_without_computing_them_again(stage_ctx, tmp_path):
    ctx = stage_ctx(model_output={"rows_per_task": 5})
    source = ctx.spark.createDataFrame([(i, f"text {i}") for i in IDS], "sentence_id string, text string")
    calls, poison = tmp_path / "calls", tmp_path / "poison"
    poison.touch()
    fn = counting_model(calls, poison)
    folder = Path(staging_folder(ctx, "vectors", "m1"))

    with pytest.raises(Exception, match="executor was lost"):
        infer_into(ctx, StageResult(), source, "vectors", "sentence_id", fn, SCHEMA, "m1", "text", step="model")
    shards = sorted(folder.glob("part-*.parquet"))
    staged = {i for s in shards for i in pq.read_table(s).column("sentence_id").to_pylist()}
    assert shards and len(staged) < 20 and "s17" not in staged  # what finished is kept, whole
    first_calls = calls.read_text().split()

    poison.unlink()
    calls.write_text("")
    result = StageResult()
    infer_into(ctx, result, source, "vectors", "sentence_id", fn, SCHEMA, "m1", "text", step="model")
    # Only the rows no shard held were computed again; every row landed once; the shards are gone.
    assert sorted(calls.read_text().split()) == sorted(set(IDS) - staged)
    rows = ctx.read("vectors").collect()
    assert sorted(r["sentence_id"] for r in rows) == IDS and result.rows_out == 20
    assert {r["sentence_id"]: list(r["vector"]) for r in rows}["s17"] == [17.0, 1.0]
    assert result.drops == ({"text_too_long": 1} if "s03" not in staged else {})
    assert "text_resumed" in result.notes and not folder.exists()
    assert len(first_calls) >= len(staged)

    # Nothing new: no model call, nothing written.
    before = calls.read_text()
    again = StageResult()
    infer_into(ctx, again, source, "vectors", "sentence_id", fn, SCHEMA, "m1", "text", step="model")
    assert calls.read_text() == before and again.rows_in == 0 and again.rows_out == 0


def test_each_task_holds_at_most_rows_per_task(stage_ctx, tmp_path):
    ctx = stage_ctx(model_output={"rows_per_task": 7})
    source = ctx.spark.createDataFrame([(i, "t") for i in IDS], "sentence_id string, text string")
    seen = tmp_path / "tasks"
    seen.mkdir()

    def fn(batches):
        import uuid

        rows = pd.concat(list(batches))
        (seen / uuid.uuid4().hex).write_text(str(len(rows)))
        yield pd.DataFrame({"sentence_id": rows["sentence_id"], "model_id": "m1",
                            "vector": [[0.0]] * len(rows), "error": None})

    result = StageResult()
    infer_into(ctx, result, source, "vectors", "sentence_id", fn, SCHEMA, "m1", "text", step="model")
    sizes = sorted(int(p.read_text()) for p in seen.iterdir() if int(p.read_text()))
    assert sum(sizes) == 20 and max(sizes) <= 7 and len(sizes) == 3  # ceil(20 / 7) tasks
    assert result.metrics["text_tasks"] == 3 and result.rows_out == 20
