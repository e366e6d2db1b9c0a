"""A small real warehouse made by `realsyn run`, and the CLI run command after command in one child
process, for tests/test_warehouse_copy.py and tests/test_delta_faults.py.

`base_warehouse` is built once per test session (two `realsyn run --stages ingest`, the second
over one more page: two runs to roll back between) and copied by each test, so a test never
changes another's warehouse. Copies are themselves what item 0 of issue 32 is about: a copied
warehouse works on its own folder (etl/warehouse.py: `relocate`).

A child process runs a script that calls `etl.cli.main` (what the `realsyn` command runs) once per
command, on one JVM: a JVM start per command would cost more than the commands. Between commands
the script drops Delta's in-memory log cache, as a new process would start without it. Each command
is reported on stderr as `@@ <args>` ... `@@ rc=<code> in <seconds>`, its own `realsyn:` lines in between.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import time
from contextlib import redirect_stderr
from pathlib import Path

from data_paths import PROJECT

TESTS = Path(__file__).resolve().parent
PAGES = {"a.jsonl": ("https://h.org/1", "The first page has one sentence."),
         "b.jsonl": ("https://h.org/2", "The second page has another sentence.")}
_BASE: dict[str, object] = {}


def page(folder: Path, name: str) -> None:
    url, text = PAGES[name]
    (folder / name).write_text(json.dumps({"url": url, "blocks": [{"type": "text", "text": text}]}) + "\n")


def settings(warehouse: Path, inputs: Path) -> list[str]:
    """--set flags: the warehouse, the input folder, a small local session."""
    flat = {"spark.warehouse_dir": str(warehouse), "spark.master": "local[2]", "spark.shuffle_partitions": "2",
            "spark.conf.spark.databricks.delta.snapshotPartitions": "1",
            "spark.conf.spark.sql.sources.parallelPartitionDiscovery.parallelism": "2",
            "spark.conf.spark.driver.memory": "1g",
            "ingest.format": "interleaved_jsonl", "ingest.paths": f"[{inputs}]"}
    return [a for k, v in flat.items() for a in ("--set", f"{k}={v}")]


# --- in the child process -------------------------------------------------------------------------------

class _Tee(io.StringIO):
    def __init__(self, out):
        super().__init__()
        self.out = out

    def write(self, s: str) -> int:
        self.out.write(s)
        return super().write(s)


def cli(warehouse: Path, inputs: Path, *args: str) -> tuple[int, list[str]]:
    """`realsyn <args>` on the warehouse: its exit code and its own `realsyn:` lines."""
    from pyspark.sql import SparkSession

    from etl.cli import main

    spark = SparkSession.getActiveSession()
    if spark is not None:  # what a new process would not have
        spark._jvm.org.apache.spark.sql.delta.DeltaLog.clearCache()
        spark.catalog.clearCache()
    print(f"@@ {' '.join(args)}", file=sys.stderr, flush=True)
    tee, started = _Tee(sys.stderr), time.monotonic()
    with redirect_stderr(tee):
        code = main([*args, *settings(warehouse, inputs)])
    print(f"@@ rc={code} in {time.monotonic() - started:.1f}s", file=sys.stderr, flush=True)
    return code, [line for line in tee.getvalue().splitlines() if line.startswith(("realsyn", "setup error"))]


def result(**values) -> None:
    print("RESULT " + json.dumps(values, default=str), flush=True)


# --- in the test process ---------------------------------------------------------------------------------

def run_script(code: str, *args: object, timeout: int = 900) -> tuple[dict, str]:
    """Run `code` (which imports this module as `wf`) in a child process with sys.argv[1:] = args;
    returns its RESULT and its stderr."""
    prelude = f"import sys; sys.path.insert(0, {str(TESTS)!r}); import warehouse_fixtures as wf\n"
    env = {**os.environ, "PYTHONPATH": str(PROJECT)}
    done = subprocess.run([sys.executable, "-c", prelude + code, *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=PROJECT, timeout=timeout)
    found = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and found, (done.stdout[-3000:], done.stderr[-5000:])
    return json.loads(found[-1][len("RESULT "):]), done.stderr


BUILD = """
from pathlib import Path
from pyspark.sql import SparkSession
warehouse, inputs = map(Path, sys.argv[1:3])
wf.page(inputs, "a.jsonl")
first = wf.cli(warehouse, inputs, "run", "--stages", "ingest")[0]
wf.page(inputs, "b.jsonl")
second = wf.cli(warehouse, inputs, "run", "--stages", "ingest")[0]
spark = SparkSession.getActiveSession()
runs = [r["run_id"] for r in spark.table("realsyn.runs").orderBy("started_at").collect()]
wf.result(codes=[first, second], runs=runs)
"""


def base_warehouse(tmp_path_factory) -> dict:
    """{warehouse, inputs, runs (the two ingest run ids, oldest first)}: built once per session;
    copy it (`copy_of`), never change it."""
    if not _BASE:
        folder = tmp_path_factory.mktemp("base-warehouse")
        inputs = folder / "in"
        inputs.mkdir()
        out, err = run_script(BUILD, folder / "warehouse", inputs)
        assert out["codes"] == [0, 0] and len(out["runs"]) == 2, err[-5000:]
        _BASE.update(warehouse=folder / "warehouse", inputs=inputs, runs=out["runs"])
    return dict(_BASE)


def copy_of(base: dict, dest: Path) -> dict:
    """A copy of the base warehouse (`cp -r`, as a user backs one up); the input folder is the
    base's (never written after the build)."""
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(["cp", "-r", str(base["warehouse"]), str(dest / "warehouse")], check=True)
    return {**base, "warehouse": dest / "warehouse"}


def folder_hash(folder: Path) -> dict[str, str]:
    """relative path -> SHA-256 of every file under `folder` (the metastore, the lock and the Delta
    logs and data files included)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}
