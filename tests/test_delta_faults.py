"""One line per failure a user can meet (issue 32, item 3): Delta-level faults and a table older than
`runs` says.

End to end on real Spark + Delta, through `etl.cli.main` on a copy of a small warehouse (two
ingest runs, tests/warehouse_fixtures.py), as a user meets them in turn:
- the last commit of `documents` truncated mid-record: `realsyn sql`, `status` and `run` each stop
  with one line naming the table and the file, what to do, exit 7, no traceback;
- that commit then deleted by hand (its hidden checksum left behind): `realsyn run` refuses before
  any stage reads, naming the table, the run whose rows it lost, and the run to roll back to; that
  rollback, then the run, repair the warehouse (the lost page is ingested again);
- a table written by a newer Delta protocol, and a table whose folder is gone: one line each.
The messages of other Delta faults (Delta 4.0.1's own texts), and the `runs` note of a failed
write, are checked without Spark.
"""
from __future__ import annotations

import re

import pytest

import warehouse_fixtures as wf
from etl.runner import stored_error
from etl.warehouse import delta_fault

FAULTS = """
import json, re, shutil
from pathlib import Path
from pyspark.sql import SparkSession
wh, inputs = Path(sys.argv[1]), Path(sys.argv[2])
db = wh / "tables" / "realsyn.db"
log = db / "documents" / "_delta_log"
last = max(p.name[:20] for p in log.glob("[0-9]*.json"))
commit = log / f"{last}.json"
commit.write_bytes(commit.read_bytes()[: commit.stat().st_size // 2])
steps = {"sql": wf.cli(wh, inputs, "sql", "SELECT count(*) FROM realsyn.documents"),
         "status": wf.cli(wh, inputs, "status"),
         "run": wf.cli(wh, inputs, "run", "--stages", "ingest")}
for p in log.glob(f"{last}.*"):  # by hand: the hidden .<version>.json.crc stays
    p.unlink()
steps["behind"] = wf.cli(wh, inputs, "run", "--stages", "ingest")
target = re.search(r"realsyn rollback --to-run (\\w+)", steps["behind"][1][-1]).group(1)
steps["rollback"] = wf.cli(wh, inputs, "rollback", "--to-run", target)
rolled_back = SparkSession.getActiveSession().table("realsyn.documents").count()
steps["rerun"] = wf.cli(wh, inputs, "run", "--stages", "ingest")
documents = SparkSession.getActiveSession().table("realsyn.documents").count()
images = db / "doc_images" / "_delta_log"
newer = int(max(p.name[:20] for p in images.glob("[0-9]*.json"))) + 1
(images / f"{newer:020d}.json").write_text(json.dumps({"protocol": {
    "minReaderVersion": 3, "minWriterVersion": 7, "readerFeatures": ["futureFeature"],
    "writerFeatures": ["futureFeature"]}}) + "\\n")
steps["newer"] = wf.cli(wh, inputs, "sql", "SELECT count(*) FROM realsyn.doc_images")
shutil.rmtree(db / "quarantine")
steps["missing"] = wf.cli(wh, inputs, "sql", "SELECT count(*) FROM realsyn.quarantine")
wf.result(steps=steps, target=target, rolled_back=rolled_back, documents=documents, last=last)
"""


@pytest.mark.spark
def test_delta_faults_give_one_line_naming_the_table_and_the_repair(tmp_path_factory, tmp_path):
    base = wf.base_warehouse(tmp_path_factory)
    copy = wf.copy_of(base, tmp_path)["warehouse"]
    out, err = wf.run_script(FAULTS, copy, base["inputs"])
    steps = {name: (code, lines) for name, (code, lines) in out["steps"].items()}
    codes = {name: code for name, (code, _) in steps.items()}
    assert codes == {"sql": 7, "status": 7, "run": 7, "behind": 7, "rollback": 0, "rerun": 0, "newer": 7,
                     "missing": 7}, err[-6000:]
    assert all(len(steps[s][1]) == 1 for s in ("sql", "status", "run", "behind", "newer", "missing")), steps
    # No traceback, Python's or the JVM's: the cause is in the line (--verbose shows them).
    assert "Traceback" not in err and "\tat org.apache" not in err, err[-6000:]

    log_dir = copy.resolve() / "tables" / "realsyn.db" / "documents" / "_delta_log"
    for step in ("sql", "status", "run"):
        line = steps[step][1][0]
        assert line.startswith(f"realsyn: table realsyn.documents is damaged: its Delta log file "
                               f"_delta_log/{out['last']}.json cannot be read (checksum error). Restore the "
                               "warehouse from a backup"), line
        assert f"move {log_dir}/{out['last']}.* and {log_dir}/.{out['last']}.* out of the folder" in line

    first, second = base["runs"]
    behind = steps["behind"][1][0]
    assert behind.startswith(f"realsyn: table realsyn.documents is at Delta version {int(out['last']) - 1}, older "
                             f"than the version {int(out['last'])} that run {second} (ingest) recorded"), behind
    assert f"Nothing ran: roll every table back to a run they all still hold, `realsyn rollback --to-run {first}`" \
        in behind and out["target"] == first
    assert out["rolled_back"] == 1 and out["documents"] == 2  # the lost page is ingested again

    assert re.match(r"realsyn: table realsyn\.doc_images was written by a newer Delta Lake: it needs reader "
                    r"feature\(s\) futureFeature, which Delta Lake \S+ here does not support", steps["newer"][1][0])
    assert steps["missing"][1][0].startswith(
        f"realsyn: table realsyn.quarantine is registered in the metastore but {copy.resolve()}/tables/realsyn.db/"
        "quarantine is missing or holds no _delta_log: restore it from a backup of the warehouse")


# --- Delta's own messages (Delta 4.0.1), no Spark ------------------------------------------------------------

def test_other_delta_faults_name_the_table_and_what_to_do():
    lost = RuntimeError("org.apache.spark.sql.delta.DeltaFileNotFoundException: [DELTA_TRUNCATED_TRANSACTION_LOG] "
                        "file:/w/tables/realsyn.db/runs/_delta_log/00000000000000000000.json: Unable to reconstruct "
                        "state at version 1 as the transaction log has been truncated due to manual deletion")
    assert delta_fault(lost, "/w") == (
        "table realsyn.runs has lost commits from its Delta log (files of _delta_log deleted or truncated): restore "
        "its folder (/w/tables/realsyn.db/runs) from a backup of the warehouse (README: 'Backing up and moving a "
        "warehouse')")
    write = RuntimeError('org.apache.spark.sql.delta.DeltaUnsupportedTableFeatureException: '
                         '[DELTA_UNSUPPORTED_FEATURES_FOR_WRITE] Unsupported Delta write feature: table '
                         '"realsyn.quarantine" requires writer table feature(s) that are unsupported by Delta Lake '
                         '"4.0.1": futureWriteFeature.')
    assert delta_fault(write).startswith("table realsyn.quarantine was written by a newer Delta Lake: it needs "
                                         "writer feature(s) futureWriteFeature, which Delta Lake 4.0.1 here")
    missing = RuntimeError("[DELTA_TABLE_NOT_FOUND] Delta table `realsyn`.`doc_texts` doesn't exist.")
    assert "table realsyn.doc_texts is registered in the metastore but its folder is missing" in delta_fault(missing)
    # a damaged commit that is not the table's last one can not be dropped: only a backup helps
    damaged = RuntimeError("org.apache.spark.SparkException: [FAILED_READ_FILE.NO_HINT] Encountered error while "
                           "reading file file:///w/tables/t_1.db/docs/_delta_log/00000000000000000003.json.  SQLSTATE: "
                           "KD001\norg.apache.hadoop.fs.ChecksumException: Checksum error: file:/w/tables/t_1.db/docs"
                           "/_delta_log/00000000000000000003.json at 1024 exp: 1 got: 2")
    assert delta_fault(damaged, "/nonexistent").endswith("(checksum error). Restore the warehouse from a backup "
                                                         "(README: 'Backing up and moving a warehouse')")
    assert delta_fault(RuntimeError("[TABLE_OR_VIEW_NOT_FOUND] The table or view `realsyn`.`nope` cannot be found.")) \
        is None


def test_a_failed_writes_runs_note_names_the_table():
    cause = ValueError("something in the merge source")
    cause.realsyn_table = "realsyn.documents"  # set by etl/tables.py: merge_into
    try:
        raise RuntimeError("outer") from cause
    except RuntimeError as e:
        note = stored_error(e, [])
    assert note == "RuntimeError: outer (writing realsyn.documents)"
    long = ValueError("x" * 1000)
    long.realsyn_table = "realsyn.doc_texts"
    note = stored_error(long, [])
    assert len(note) == 300 and note.endswith("... (writing realsyn.doc_texts)")
