"""spark-submit entry: `spark-submit etl/submit.py --conf conf/emr-gpu.yaml [--stages ...]`.

Does the same as `realsyn run`; the package itself ships to the cluster as a wheel
(`--py-files dist/realsyn_etl-*.whl`) or is pip-installed on the cluster's nodes.
"""
import sys

from etl.cli import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    sys.exit(main(argv if argv and argv[0] in ("run", "sql", "status", "stages", "config") else ["run", *argv]))
