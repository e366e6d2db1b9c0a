"""Shipping the pipeline to a cluster: the artifacts and the exact command that runs them.

`realsyn submit --profile emr-gpu [--dry-run]` builds (or reuses) the wheel and the `conf/`
archive, then prints or runs the profile's command:

- a cluster profile with `spark.master: null` on YARN (emr-gpu): `spark-submit --master yarn
  --deploy-mode cluster`, every setting the profile fixes as a `--conf` flag (etl/session.py:
  `cluster_settings`: the cluster reads GPU amounts, the discovery script and `spark.plugins` at
  start-up), the wheel with `--py-files`, the conf archive with `--archives ...#conf`;
- databricks-gpu: the bundle's job run (deploy/databricks.yml holds the cluster and its Spark
  config; Databricks has no spark-submit of its own for wheels);
- a local profile: spark-submit on this machine with every setting `build_spark` would set
  (etl/session.py: `session_settings`), since spark-submit starts the JVM before our code runs.

This file is also spark-submit's main script (`build_artifacts` copies it next to the wheel): it
runs `realsyn run` (or the command named first) with the arguments after it.
"""
from __future__ import annotations

import configparser
import json
import os
import shlex
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

# The bundle and the EMR step name the job and the artifacts folder the same way.
DATABRICKS_JOB = "realsyn"
DATABRICKS_TARGET = "gpu"
DEFAULT_ARTIFACTS = {"emr-gpu": "s3://YOUR-BUCKET/realsyn"}
ENTRY = "submit.py"
COMMANDS = ("run", "sql", "status", "stages", "config", "check")


@dataclass(frozen=True)
class Artifacts:
    """What a cluster needs from this checkout: the wheel, the same code as a .zip for
    `--py-files`, the conf archive, the main script."""
    wheel: Path
    py_files: Path
    conf_archive: Path
    entry: Path


def project_version(root: Path) -> str:
    cfg = configparser.ConfigParser()
    cfg.read(root / "setup.cfg")
    return cfg["metadata"]["version"]


def artifact_names(version: str) -> tuple[str, str, str]:
    """(wheel, py-files zip, conf archive) file names for a version: what the bundle, the step
    and the bootstrap scripts name."""
    return (f"realsyn_etl-{version}-py3-none-any.whl", f"realsyn_etl-{version}.zip",
            f"realsyn_conf-{version}.zip")


def build_artifacts(root: Path, dist: Path) -> Artifacts:
    """Build the wheel (no dependencies, no network: the build backend from this environment),
    zip `conf/` and copy the main script into `dist`."""
    dist.mkdir(parents=True, exist_ok=True)
    wheel_name, py_files_name, conf_name = artifact_names(project_version(root))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(dist), str(root)], check=True)
    # Spark puts only .zip/.egg/.jar --py-files on its Python workers' path: the wheel, renamed.
    shutil.copyfile(dist / wheel_name, dist / py_files_name)
    conf_archive = dist / conf_name
    with zipfile.ZipFile(conf_archive, "w", zipfile.ZIP_DEFLATED) as z:
        for f in sorted((root / "conf").iterdir()):
            if f.is_file():
                # At the archive's root: `--archives realsyn_conf-*.zip#conf` unpacks as ./conf/.
                z.write(f, f.name)
    entry = dist / ENTRY
    shutil.copyfile(Path(__file__), entry)
    return Artifacts(dist / wheel_name, dist / py_files_name, conf_archive, entry)


def _conf_flags(settings: dict[str, str]) -> list[str]:
    return [arg for key in sorted(settings) for arg in ("--conf", f"{key}={settings[key]}")]


def pipeline_args(profile_file: str, stages: str | None, overrides: list[str]) -> list[str]:
    args = ["run", "--conf", profile_file]
    if stages:
        args += ["--stages", stages]
    for o in overrides:
        args += ["--set", o]
    return args


def spark_home() -> Path:
    import pyspark

    return Path(pyspark.__file__).parent


def spark_env() -> dict[str, str]:
    """This environment with SPARK_HOME set: pip's spark-submit otherwise looks for pyspark with
    whatever `python3` comes first on PATH."""
    return {"SPARK_HOME": str(spark_home()), **os.environ}


def is_local(cfg) -> bool:
    return bool(cfg.spark.master and cfg.spark.master.startswith("local"))


def submit_command(cfg, profile_path: Path, artifacts: str, stages: str | None = None,
                   overrides: list[str] = ()) -> list[str]:
    """The command that runs the pipeline under `cfg` (read from `profile_path`) from the
    artifacts in `artifacts` (a folder or URI holding the wheel, the conf archive, submit.py).
    Locally it is this environment's spark-submit, on a cluster the one on its PATH."""
    from etl.session import cluster_settings, session_settings

    _, py_files, conf_archive = artifact_names(cfg_version())
    base = artifacts.rstrip("/")
    if cfg.profile.startswith("databricks"):
        if overrides:
            raise ValueError("the Databricks job reads its profile from the volume: edit "
                             f"conf/{profile_path.name} there instead of --set")
        run = ["databricks", "bundle", "run", "--target", DATABRICKS_TARGET]
        return run + ([f"{DATABRICKS_JOB}_stages", "--params", f"stages={stages}"] if stages else [DATABRICKS_JOB])
    if is_local(cfg):
        settings = session_settings(cfg, progress=False)
        # The driver and its workers run this interpreter (it has the wheel's dependencies).
        settings["spark.pyspark.python"] = settings["spark.pyspark.driver.python"] = sys.executable
        head = [str(spark_home() / "bin" / "spark-submit"), "--master", cfg.spark.master, "--name", cfg.spark.app_name,
                *_conf_flags(settings), "--py-files", f"{base}/{py_files}"]
        profile_file = str(profile_path.resolve())
    else:
        head = ["spark-submit", "--master", "yarn", "--deploy-mode", "cluster", "--name", cfg.spark.app_name,
                *_conf_flags(cluster_settings(cfg)), "--py-files", f"{base}/{py_files}",
                "--archives", f"{base}/{conf_archive}#conf"]
        # Unpacked as ./conf/ in the YARN container's working directory.
        profile_file = f"conf/{profile_path.name}"
    return [*head, f"{base}/{ENTRY}", *pipeline_args(profile_file, stages, overrides)]


def connect_server_command(cfg, port: int) -> list[str]:
    """A Spark Connect server on this machine with the session `realsyn run` would build for a
    local profile (Delta jars, warehouse, metastore); clients then run with
    `--set spark.remote=sc://127.0.0.1:<port> --set spark.delta=cluster`."""
    from etl.session import session_settings

    settings = session_settings(cfg, progress=False)
    settings["spark.connect.grpc.binding.port"] = str(port)
    settings["spark.connect.grpc.binding.address"] = "127.0.0.1"
    settings["spark.pyspark.python"] = sys.executable
    return [str(spark_home() / "bin" / "spark-submit"), "--master", cfg.spark.master, "--name", "realsyn connect server",
            "--class", "org.apache.spark.sql.connect.service.SparkConnectServer", *_conf_flags(settings),
            "spark-internal"]


def emr_step(command: list[str], name: str = "realsyn") -> list[dict]:
    """The `aws emr add-steps --steps file://...` JSON for a spark-submit command."""
    return [{"Type": "CUSTOM_JAR", "Name": name, "ActionOnFailure": "CONTINUE",
             "Jar": "command-runner.jar", "Args": command}]


def cfg_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    root = Path(__file__).resolve().parent.parent
    if (root / "setup.cfg").is_file():
        return project_version(root)
    try:
        return version("realsyn-etl")
    except PackageNotFoundError:  # pragma: no cover - neither a checkout nor installed
        raise SystemExit("realsyn submit runs from a checkout or an installed realsyn-etl")


def cmd_submit(args) -> int:
    """`realsyn submit`: build the artifacts, print the command, run it unless --dry-run."""
    from etl.config import CONF_DIR, PROJECT_ROOT, load_config
    from etl.runner import default_registry

    profile_path = Path(args.conf) if args.conf else CONF_DIR / f"{args.profile}.yaml"
    try:
        cfg = load_config(str(profile_path), args.overrides)
        if args.stages:
            default_registry().resolve(args.stages.split(","))
        artifacts = args.artifacts or DEFAULT_ARTIFACTS.get(cfg.profile) or str(PROJECT_ROOT / "dist")
        cmd = submit_command(cfg, profile_path, artifacts, args.stages, args.overrides)
    except ValueError as e:  # ConfigError, UnknownStage, --set on Databricks
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.build:
        built = build_artifacts(PROJECT_ROOT, PROJECT_ROOT / "dist")
        print(f"built {built.wheel}, {built.py_files}, {built.conf_archive}, {built.entry}", file=sys.stderr)
    if args.emr_step:
        print(json.dumps(emr_step(cmd), indent=2))
        return 0
    print(shlex.join(cmd))
    if args.dry_run:
        return 0
    if "://" in artifacts and not artifacts.startswith("file://"):
        print(f"copy {PROJECT_ROOT / 'dist'}/* to {artifacts} first (docs/deploy.md)", file=sys.stderr)
    return subprocess.run(cmd, env=spark_env()).returncode


if __name__ == "__main__":
    from etl.cli import main

    argv = sys.argv[1:]
    sys.exit(main(argv if argv and argv[0] in COMMANDS else ["run", *argv]))
