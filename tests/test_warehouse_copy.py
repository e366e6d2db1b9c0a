"""A warehouse is what its folder holds (issue 32, item 0).

The local Derby metastore records absolute locations, so a copied warehouse (`cp -r`) used to
read and write the original's tables: a rollback on a backup rolled back the original. Now
`build_spark` rewrites the copy's metastore to its own folder before anything reads it
(etl/warehouse.py: `relocate`). End to end, on real Spark + Delta through `etl.cli.main`: a copy is
rolled back, run and reported on, and not one byte of the original changes (every file of its
folder hashed: metastore, lock, Delta logs and data files, so its table contents too), while the
copy ends as expected. The placement rules themselves are checked without Spark.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

import warehouse_fixtures as wf
from etl.warehouse import WarehouseError, moved, plan_relocation

COPY = """
import re
from pathlib import Path
from pyspark.sql import SparkSession
copy, inputs, first = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
codes = {"rollback": wf.cli(copy, inputs, "rollback", "--to-run", first)[0]}
spark = SparkSession.getActiveSession()
rolled_back = spark.table("realsyn.documents").count()
codes["run"] = wf.cli(copy, inputs, "run", "--stages", "ingest")[0]
codes["report"] = wf.cli(copy, inputs, "report")[0]
names = sorted(t.name for t in spark.catalog.listTables("realsyn"))
wf.result(codes=codes, rolled_back=rolled_back, documents=spark.table("realsyn.documents").count(),
          stages=[r["stage"] for r in spark.table("realsyn.runs").orderBy("started_at").collect()],
          locations={t: spark.sql(f"DESCRIBE DETAIL realsyn.{t}").first()["location"] for t in names},
          database=spark.sql("DESCRIBE DATABASE realsyn").where("info_name = 'Location'").first()["info_value"])
"""


@pytest.mark.spark
def test_rollback_run_and_report_on_a_copy_never_touch_the_original(tmp_path_factory, tmp_path):
    base = wf.base_warehouse(tmp_path_factory)
    original = base["warehouse"]
    before = wf.folder_hash(original)
    copy = wf.copy_of(base, tmp_path)["warehouse"]

    out, err = wf.run_script(COPY, copy, base["inputs"], base["runs"][0])

    assert out["codes"] == {"rollback": 0, "run": 0, "report": 0}, err[-5000:]
    assert wf.folder_hash(original) == before  # not one byte of the original changed
    assert not (original / "report").exists()
    assert f"warehouse {copy.resolve()} is a copy or a move of {original.resolve()}" in err
    # `cp -r` dated every file by the copy; Delta's history (and so the rollback) goes by those dates
    assert re.search(rf"warehouse {copy.resolve()}: the dates of \d+ Delta commits, lost by a copy, restored", err)
    # The copy: rolled back to the first run (one page), run again (the second page is new to it
    # again), reported on; every table and the database registered in its own folder.
    assert out["rolled_back"] == 1 and out["documents"] == 2
    assert out["stages"] == ["ingest", "ingest", "rollback", "ingest"]
    assert (copy / "report" / "report.html").is_file()
    tables = str(copy.resolve() / "tables")
    assert out["database"].removeprefix("file:") == f"{tables}/realsyn.db"
    assert out["locations"] and all(loc.removeprefix("file:").startswith(f"{tables}/realsyn.db/")
                                    for loc in out["locations"].values()), out["locations"]


# --- the placement rules (no Spark) -----------------------------------------------------------------------

DBS = [("1", "default", "file:/old/wh/tables"), ("2", "realsyn", "file:/old/wh/tables/realsyn.db")]


def test_a_copy_moves_every_entry_that_follows_the_warehouse_layout(tmp_path):
    (tmp_path / "tables" / "realsyn.db" / "by_hand").mkdir(parents=True)
    tables = [("realsyn", "documents", "MANAGED_TABLE", "file:/old/wh/tables/realsyn.db/documents", "3"),
              ("realsyn", "a_view", "VIRTUAL_VIEW", None, None),
              # an external table whose folder was copied in by hand; Spark keeps the real place in `path`
              ("realsyn", "by_hand", "EXTERNAL_TABLE", "file:/old/wh/tables/realsyn.db/by_hand-__PLACEHOLDER__", "5"),
              ("realsyn", "home", "EXTERNAL_TABLE", f"file:{tmp_path}/tables/realsyn.db/home", "6")]
    paths = {"3": "file:/old/wh/tables/realsyn.db/documents", "5": "file:/data/by_hand"}
    moves, n_dbs = plan_relocation(tmp_path, DBS, tables, paths)
    here = f"{tmp_path}/tables"
    assert n_dbs == 2 and moves == {"/old/wh/tables": here, "/old/wh/tables/realsyn.db": f"{here}/realsyn.db",
                                    "/old/wh/tables/realsyn.db/documents": f"{here}/realsyn.db/documents",
                                    "/data/by_hand": f"{here}/realsyn.db/by_hand"}
    assert moved("file:///old/wh/tables/realsyn.db/documents", moves) == f"file:{here}/realsyn.db/documents"
    assert moved("file:/old/wh/tables/realsyn.db/by_hand-__PLACEHOLDER__", moves) == \
        f"file:{here}/realsyn.db/by_hand-__PLACEHOLDER__"
    assert moved("file:/old/whx/tables", moves) is None and moved(f"file:{here}/realsyn.db/home", moves) is None
    # the original warehouse itself: nothing to move
    assert plan_relocation(Path("/old/wh"), DBS, tables[:1], paths) == ({}, 0)


def test_a_table_registered_outside_the_warehouse_is_refused_naming_it(tmp_path):
    tables = [("realsyn", "elsewhere", "EXTERNAL_TABLE", "file:/old/wh/tables/realsyn.db/elsewhere-__PLACEHOLDER__",
               "7"), ("realsyn", "on_s3", "EXTERNAL_TABLE", "s3a://bucket/on_s3", "8")]
    with pytest.raises(WarehouseError) as refused:
        plan_relocation(tmp_path, DBS, tables, {"7": "file:/data/elsewhere"})
    message = str(refused.value)
    assert "\n" not in message
    assert (f"table realsyn.elsewhere is registered at file:/data/elsewhere, outside warehouse {tmp_path}: copy its "
            f"folder to {tmp_path}/tables/realsyn.db/elsewhere (and 1 more), then run again") in message
