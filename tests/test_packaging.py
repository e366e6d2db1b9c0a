"""Shipping to a cluster: the wheel and conf archive, the Python set of each environment
(deploy/constraints-*.txt: resolved with pip, one CUDA major each), the Databricks bundle, the EMR
step and bootstrap, the discovery script, `realsyn submit` per profile, and a local spark-submit of
the built wheel writing the same tables as an in-process run."""
from __future__ import annotations

import configparser
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from data_paths import PROJECT
from etl.config import load_config
from etl.runner import default_registry
from etl.session import cluster_settings
from etl.submit import artifact_names, build_artifacts, emr_step, project_version, spark_env, submit_command

DEPLOY = PROJECT / "deploy"
VERSION = project_version(PROJECT)
WHEEL, PY_FILES, CONF_ARCHIVE = artifact_names(VERSION)
RAPIDS = "rapids-4-spark_2.13-26.08.1-cuda12.jar"


def profile(name: str):
    return load_config(str(PROJECT / "conf" / f"{name}.yaml"))


def requirement_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def setup_requirements() -> tuple[list[str], dict[str, list[str]]]:
    cfg = configparser.ConfigParser()
    cfg.read(PROJECT / "setup.cfg")
    extras = {k: requirement_lines(v) for k, v in cfg["options.extras_require"].items()}
    return requirement_lines(cfg["options"]["install_requires"]), extras


def names(requirements: list[str]) -> set[str]:
    return {canonicalize_name(Requirement(r).name) for r in requirements}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    return build_artifacts(PROJECT, tmp_path_factory.mktemp("dist"))


def test_the_wheel_holds_the_packages_data_and_entry_point_without_spark_or_faiss(artifacts):
    assert artifacts.wheel.name == WHEEL and artifacts.wheel.is_file()
    with zipfile.ZipFile(artifacts.wheel) as z:
        files = set(z.namelist())
        meta = z.read(f"realsyn_etl-{VERSION}.dist-info/METADATA").decode()
        entry_points = z.read(f"realsyn_etl-{VERSION}.dist-info/entry_points.txt").decode()
    for module in ("etl/cli.py", "etl/submit.py", "etl/stages/embed.py", "udfs/embed.py", "realsyn_models/clip.py",
                   "realsyn_models/data/tag_vocab.txt"):
        assert module in files
    assert not any(f.startswith(("tests/", "conf/")) for f in files)
    assert "realsyn = etl.cli:main" in entry_points
    base = [line.split(": ", 1)[1] for line in meta.splitlines()
            if line.startswith("Requires-Dist:") and "extra ==" not in line]
    # A cluster's own Spark and Delta must not be shadowed; FAISS comes from an extra.
    assert not names(base) & {"pyspark", "delta-spark", "faiss-cpu", "faiss-gpu-cu12"}
    assert any(line.startswith("Requires-Dist: faiss-gpu-cu12") and 'extra == "gpu"' in line for line in meta.splitlines())


def test_the_py_files_zip_is_the_wheel(artifacts):
    # Spark's Python workers import only .zip/.egg/.jar --py-files.
    assert artifacts.py_files.name == PY_FILES and artifacts.py_files.read_bytes() == artifacts.wheel.read_bytes()


def test_the_conf_archive_unpacks_the_profiles_at_its_root(artifacts):
    assert artifacts.conf_archive.name == CONF_ARCHIVE
    with zipfile.ZipFile(artifacts.conf_archive) as z:
        assert {"local.yaml", "databricks-gpu.yaml", "emr-gpu.yaml", "log4j2.properties"} <= set(z.namelist())
    assert artifacts.entry.read_text() == (PROJECT / "etl" / "submit.py").read_text()


# -- the Python set of each environment ------------------------------------------------------------
#
# setup.cfg gives the wheel's dependencies as ranges; each environment's exact set is a constraints
# file in deploy/. How each set is checked here:
# - local (the suite's own .venv): offline. pip resolves the wheel's [test,local] extras with the
#   file against the installed packages (--no-index), and the installed set is exactly the file's.
# - databricks, emr, vllm: online against the package index, skipped (saying so) when it cannot be
#   reached. `pip install --dry-run --report` of the built wheel with the file, for the platform's
#   Python and manylinux tags (--python-version, --platform, --only-binary=:all:): it resolves, to
#   exactly the file's pins, with one CUDA major (nvidia-*-cuNN, cuda-toolkit / cuda-bindings,
#   faiss-gpu-cuNN: the file's `# cuda:`), and on Databricks torch and the rest of the runtime's
#   stack at the runtime's versions (so pip keeps them). pip reads the metadata only (PEP 658 where
#   the index serves it, else HTTP range requests: --use-feature=fast-deps), through a local index
#   that shows pip only each pinned version (pages of torch or grpcio list thousands of files, which
#   cost pip more CPU than the rest); the three run at once, and a passing answer is kept in
#   .cache/resolution/ under a hash of everything it depends on, so a re-run costs nothing.
SETS = ("local", "databricks", "emr", "vllm")
# set -> (Python, newest manylinux glibc minor of the platform, the wheel's extras). Databricks
# 17.3: Python 3.12 on Ubuntu 24.04 (glibc 2.39); EMR emr-spark-8.0.0: Python 3.11 on Amazon Linux
# 2023 (glibc 2.34); the vLLM set serves both (3.11 resolves to the same set; its header says so).
GPU_SETS = {"databricks": ("3.12", 39, "gpu"), "emr": ("3.11", 34, "gpu"), "vllm": ("3.12", 34, "gpu,vllm")}
SET_EXTRAS = {"local": "test,local", **{k: v[2] for k, v in GPU_SETS.items()}}
# Databricks: what pip must keep as the runtime installed it (with every nvidia-*-cu12 library).
RUNTIME_STACK = ("torch", "torchvision", "triton", "numpy", "pandas", "pyarrow")
# Resolved but deliberately unpinned (the file's header says why).
UNPINNED = {"databricks": {"psutil"}}
INDEX = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
SIMPLE_JSON = "application/vnd.pypi.simple.v1+json"


def read_constraints(name: str) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    """(pins {name: version}, inline comments {name: text}, header fields {cuda, min-driver})."""
    pins, notes, header = {}, {}, {}
    for line in (DEPLOY / f"constraints-{name}.txt").read_text().splitlines():
        m = re.match(r"^# (cuda|min-driver): (\S+)", line)
        if m:
            header[m.group(1)] = m.group(2)
        body, _, note = line.partition("#")
        if "==" in body:
            pkg, version = body.strip().split("==")
            pins[canonicalize_name(pkg)] = version
            notes[canonicalize_name(pkg)] = note.strip()
    return pins, notes, header


def wheel_requirements(extras: str) -> list[Requirement]:
    base, extra_reqs = setup_requirements()
    reqs = base + [r for e in extras.split(",") for r in extra_reqs[e]]
    return [Requirement(r) for r in reqs]


def cuda_majors(packages: dict[str, str]) -> dict[int, list[str]]:
    """CUDA major -> the packages built for it: a -cuNN / -cudaNNx name, or a CUDA toolkit
    package's own major (cuda-toolkit, cuda-bindings, the unsuffixed nvidia-cuda-runtime of CUDA 13)."""
    majors: dict[int, list[str]] = {}
    for name, version in packages.items():
        m = re.search(r"-cu(?:da)?(\d+)x?(?:-|$)", name)
        if m:
            major = int(m.group(1))
        elif name in ("cuda-toolkit", "cuda-bindings", "cuda-python", "nvidia-cuda-runtime"):
            major = int(version.split(".")[0])
        else:
            continue
        majors.setdefault(major, []).append(name)
    return majors


def test_the_wheel_takes_ranges_and_every_environment_pins_inside_them():
    base, extras = setup_requirements()
    assert not [r for r in base + [r for e in extras.values() for r in e] if "==" in r], "setup.cfg: ranges, not pins"
    assert not (DEPLOY / "requirements-gpu.txt").exists()
    majors = {}
    for name in SETS:
        pins, notes, header = read_constraints(name)
        for req in wheel_requirements(SET_EXTRAS[name]):
            key = canonicalize_name(req.name)
            assert key in pins, f"constraints-{name}.txt does not pin {key}"
            assert req.specifier.contains(pins[key], prereleases=True), f"{name}: {key}=={pins[key]} outside {req}"
        majors[name] = cuda_majors(pins)
        assert set(header) == {"cuda", "min-driver"}, f"constraints-{name}.txt: `# cuda:` and `# min-driver:` lines"
        if name == "local":
            assert {"pyspark", "delta-spark", "faiss-cpu"} <= set(pins) and "faiss-gpu-cu12" not in pins
            continue
        # A GPU set: FAISS on the GPU only, the cluster's own Spark and Delta, CUDA 12 everywhere
        # (the RAPIDS jar is the cuda12 build), a driver floor the init / bootstrap scripts enforce.
        assert "faiss-gpu-cu12" in pins and not {"faiss-cpu", "pyspark", "delta-spark"} & set(pins)
        assert header["cuda"].startswith("12.") and set(majors[name]) == {12}, (name, majors[name])
        assert header["min-driver"] == "525.60.13"
    # The local set runs on the CPU; torch's PyPI wheel still brings one CUDA major's libraries.
    assert len(majors["local"]) <= 1
    # Databricks keeps the runtime's torch and the stack around it.
    pins, notes, _ = read_constraints("databricks")
    kept = [k for k in pins if k in RUNTIME_STACK or re.match(r"nvidia-.*-cu12$", k)]
    assert len(kept) > len(RUNTIME_STACK) and all(notes[k] == "runtime" for k in kept), \
        {k: notes[k] for k in kept if notes[k] != "runtime"}
    assert pins["torch"] == "2.7.0" and pins["nvidia-cuda-runtime-cu12"].startswith("12.6.")
    # The scripts install the wheel with these files and read the driver floor from them.
    init = (DEPLOY / "databricks-init.sh").read_text()
    bootstrap = (DEPLOY / "emr-bootstrap.sh").read_text()
    assert 'constraints-${PYTHON_SET}.txt' in init and "# min-driver:" in init
    assert "-c constraints-emr.txt" in bootstrap and "-c constraints-vllm.txt" in bootstrap
    assert "# min-driver:" in bootstrap
    makefile = (PROJECT / "Makefile").read_text()
    assert "-c deploy/constraints-local.txt -e '.[test,local]'" in makefile


def installed_closure(root: str, extras: set[str]) -> dict[str, str]:
    """The installed distributions `root[extras]` needs, transitively: {name: version}."""
    seen: dict[str, set[str]] = {}
    todo = [(root, set(extras))]
    while todo:
        name, wanted = todo.pop()
        key = canonicalize_name(name)
        if key in seen and wanted <= seen[key]:
            continue
        seen[key] = seen.get(key, set()) | wanted
        for line in metadata.distribution(name).requires or []:
            req = Requirement(line)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in seen[key] or {""}):
                todo.append((req.name, set(req.extras)))
    return {k: metadata.version(k) for k in seen}


def test_the_local_venv_is_exactly_the_local_set(artifacts):
    """Offline: what `make setup` installed is constraints-local.txt, and pip resolves the wheel with
    it against the installed packages alone."""
    # `make test` installs the project first: its absence is a broken set-up, not a reason to skip.
    metadata.version("realsyn-etl")
    pins, _, _ = read_constraints("local")
    needed = installed_closure("realsyn-etl", {"test", "local"})
    del needed["realsyn-etl"]
    assert needed == pins, {k: (needed.get(k), pins.get(k)) for k in set(needed) | set(pins)
                            if needed.get(k) != pins.get(k)}
    report = Path(tempfile.mkdtemp()) / "report.json"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--quiet",
                           "--report", str(report), "-c", str(DEPLOY / "constraints-local.txt"),
                           f"{artifacts.wheel}[test,local]"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PIP_FIND_LINKS": ""})
    assert done.returncode == 0, done.stderr[-3000:]
    # Nothing to install but the wheel itself: every dependency is already there, at its pin.
    assert [i["metadata"]["name"] for i in json.loads(report.read_text())["install"]] == ["realsyn-etl"]


class PinnedIndex(ThreadingHTTPServer):
    """A local simple index (JSON, PEP 691) in front of the real one: /<set>/<project>/ is the
    project's page showing only the version that constraints-<set>.txt pins (all of it when the
    project is not pinned). File URLs, hashes and metadata links are the index's own. The pinned
    pages are fetched concurrently at start."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), PinnedIndexHandler)
        self.pins = {name: read_constraints(name)[0] for name in GPU_SETS}
        self.pages: dict[str, dict] = {}
        self.lock = threading.Lock()
        projects = sorted({p for pins in self.pins.values() for p in pins})
        with ThreadPoolExecutor(32) as pool:
            for project, page in zip(projects, pool.map(self.fetch, projects)):
                self.pages[project] = page

    @staticmethod
    def fetch(project: str) -> dict | None:
        req = urllib.request.Request(f"{INDEX}/{project}/", headers={"Accept": SIMPLE_JSON})
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return json.load(resp)
        except OSError:
            return None

    def page(self, set_name: str, project: str) -> dict | None:
        with self.lock:
            page = self.pages.get(project)
        if page is None:
            page = self.fetch(project)
            with self.lock:
                self.pages[project] = page
        pin = self.pins[set_name].get(project)
        if page is None or pin is None:
            return page
        files = [f for f in page["files"] if _file_version(f["filename"]) == pin]
        return {**page, "files": files, "versions": [pin]}


def _file_version(filename: str) -> str | None:
    stem = re.sub(r"\.(whl|tar\.gz|zip)$", "", filename)
    parts = stem.split("-")
    return parts[1] if len(parts) > 1 else None


class PinnedIndexHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        set_name, _, project = self.path.strip("/").partition("/")
        page = self.server.page(set_name, canonicalize_name(project.strip("/"))) if set_name in GPU_SETS else None
        if page is None:
            self.send_response(404)
            self.end_headers()
            return
        body = json.dumps(page).encode()
        self.send_response(200)
        self.send_header("Content-Type", SIMPLE_JSON)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def resolution_command(name: str, wheel: Path, index: str, report: Path) -> list[str]:
    python, glibc, extras = GPU_SETS[name]
    platforms = [f"manylinux_2_{minor}_x86_64" for minor in range(glibc, 4, -1)]
    platforms += ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
    return [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed",
            "--use-feature=fast-deps", "--index-url", index, "--report", str(report),
            "--only-binary=:all:", "--python-version", python, "--target", tempfile.mkdtemp(),
            *[arg for p in platforms for arg in ("--platform", p)],
            "-c", str(DEPLOY / f"constraints-{name}.txt"), f"{wheel}[{extras}]"]


def index_reachable() -> str | None:
    try:
        urllib.request.urlopen(urllib.request.Request(f"{INDEX}/pip/", headers={"Accept": SIMPLE_JSON}),
                               timeout=10).close()
    except OSError as e:
        return f"the package index {INDEX} is not reachable ({e}): the GPU sets' resolution needs it"
    return None


@pytest.fixture(scope="module")
def resolutions(artifacts):
    """set -> (pip's exit code, its report or its error output), the three resolved at once."""
    with zipfile.ZipFile(artifacts.wheel) as z:
        meta = z.read(f"realsyn_etl-{VERSION}.dist-info/METADATA").decode()
    # What the resolution depends on: the wheel's requirements (not its README), the set, pip.
    wheel_meta = "\n".join(line for line in meta.splitlines() if line.startswith(("Requires-", "Version:"))).encode()
    pip_version = metadata.version("pip")
    cache = PROJECT / ".cache" / "resolution"
    results, todo = {}, []
    for name in GPU_SETS:
        key = hashlib.sha256(b"\0".join([wheel_meta, (DEPLOY / f"constraints-{name}.txt").read_bytes(),
                                         repr((GPU_SETS[name], pip_version, INDEX)).encode()])).hexdigest()[:24]
        cached = cache / f"{name}-{key}.json"
        if cached.is_file():
            results[name] = (0, json.loads(cached.read_text()))
        else:
            todo.append((name, cached))
    if todo:
        unreachable = index_reachable()
        if unreachable:
            pytest.skip(unreachable)
        index = PinnedIndex()
        threading.Thread(target=index.serve_forever, daemon=True).start()
        try:
            runs = {}
            for name, cached in todo:
                report = Path(tempfile.mkdtemp()) / "report.json"
                url = f"http://127.0.0.1:{index.server_port}/{name}/"
                runs[name] = (subprocess.Popen(resolution_command(name, artifacts.wheel, url, report),
                                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                               env={**os.environ, "PIP_FIND_LINKS": ""}), report, cached)
            for name, (proc, report, cached) in runs.items():
                output = proc.communicate(timeout=600)[0]
                if proc.returncode == 0:
                    cached.parent.mkdir(parents=True, exist_ok=True)
                    cached.write_text(report.read_text())
                    results[name] = (0, json.loads(report.read_text()))
                else:
                    results[name] = (proc.returncode, output)
        finally:
            index.shutdown()
            index.server_close()
    return results


@pytest.mark.parametrize("name", list(GPU_SETS))
def test_each_gpu_set_resolves_to_its_pins_on_one_cuda_major(resolutions, name):
    rc, report = resolutions[name]
    assert rc == 0, f"constraints-{name}.txt does not resolve with the wheel:\n{report[-3000:]}"
    resolved = {canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"] for i in report["install"]}
    assert resolved.pop("realsyn-etl") == VERSION
    pins, notes, header = read_constraints(name)
    # The file is the whole set: every resolved package pinned, at its pin, every pin used.
    loose = set(resolved) - set(pins) - UNPINNED.get(name, set())
    assert not loose, f"resolved but not pinned in constraints-{name}.txt: {sorted(loose)}"
    assert {k: v for k, v in resolved.items() if k in pins} == pins
    majors = cuda_majors(resolved)
    assert set(majors) == {int(header["cuda"].split(".")[0])}, majors
    if name == "databricks":
        # torch is not reinstalled: it and the stack around it resolve to the runtime's versions.
        kept = {k: v for k, v in resolved.items() if k in RUNTIME_STACK or re.match(r"nvidia-.*-cu12$", k)}
        assert kept["torch"] == "2.7.0" and all(notes[k] == "runtime" for k in kept), kept


VLLM_SET = ["models.llm.backend=vllm", "models.llm.batch_size=1024"]
RAPIDS_KEYS = ("spark.plugins", "spark.rapids.")


def test_the_bundle_runs_every_stage_once_in_order_and_generate_on_the_vllm_cluster():
    bundle = yaml.safe_load((DEPLOY / "databricks.yml").read_text())
    job = bundle["resources"]["jobs"]["realsyn"]
    clusters = {c["job_cluster_key"]: c["new_cluster"] for c in job["job_clusters"]}
    assert set(clusters) == {"gpu", "vllm", "gpu_release"} and clusters["gpu_release"] == clusters["gpu"]
    settings = cluster_settings(profile("databricks-gpu"))
    for key, cluster in clusters.items():
        assert cluster["spark_version"] == "17.3.x-gpu-ml-scala2.13"
        assert cluster["init_scripts"][0]["volumes"]["destination"].endswith("/databricks-init.sh")
        env = cluster["spark_env_vars"]
        assert env["REALSYN_WHEEL"] == "${var.wheel}" and env["REALSYN_ARTIFACTS"] == "${var.artifacts}"
        # Each cluster installs one Python set (deploy/constraints-<set>.txt).
        assert env["REALSYN_PYTHON_SET"] == ("vllm" if key == "vllm" else "databricks")
        assert (DEPLOY / f"constraints-{env['REALSYN_PYTHON_SET']}.txt").is_file()
    assert clusters["gpu"]["spark_conf"] == settings
    # The vLLM cluster: the same settings without the RAPIDS Accelerator (no JVM pool on the card).
    assert clusters["vllm"]["spark_conf"] == {k: v for k, v in settings.items() if not k.startswith(RAPIDS_KEYS)}
    assert bundle["variables"]["wheel"]["default"] == WHEEL
    stages = []
    for task in job["tasks"]:
        assert {"whl": "${var.artifacts}/${var.wheel}"} in task["libraries"]
        wheel_task = task["python_wheel_task"]
        assert (wheel_task["package_name"], wheel_task["entry_point"]) == ("realsyn_etl", "realsyn")
        params = wheel_task["parameters"]
        assert params[:3] == ["run", "--conf", "${var.artifacts}/conf/databricks-gpu.yaml"]
        task_stages = params[params.index("--stages") + 1].split(",")
        overrides = [params[i + 1] for i, arg in enumerate(params) if arg == "--set"]
        if "generate" in task_stages:
            # generate alone, on the vLLM cluster, with the vLLM backend; every other task keeps the
            # profile's models and the Databricks set.
            assert task_stages == ["generate"] and task["job_cluster_key"] == "vllm" and overrides == VLLM_SET
        else:
            assert task["job_cluster_key"] in ("gpu", "gpu_release") and not overrides
        stages += task_stages
    assert stages == default_registry().names
    # The `gpu` cluster ends with the last task before generate; gpu_release takes the ones after.
    keys = [t["job_cluster_key"] for t in job["tasks"]]
    assert keys == sorted(keys, key=["gpu", "vllm", "gpu_release"].index)
    cfg = load_config(str(PROJECT / "conf" / "databricks-gpu.yaml"), VLLM_SET)
    assert cfg.models["llm"].backend == "vllm" and cfg.models["llm"].batch_size >= cfg.spark.arrow_batch_rows
    init = (DEPLOY / "databricks-init.sh").read_text()
    assert RAPIDS in init.replace("${RAPIDS_VERSION}", "26.08.1") and "getGpusResources.sh" in init


EMR_VLLM_SET = [*VLLM_SET, "spark.conf.spark.pyspark.python=/opt/realsyn/venv-vllm/bin/python",
                "spark.conf.spark.pyspark.driver.python=/opt/realsyn/venv-vllm/bin/python",
                "spark.conf.spark.plugins=''", "spark.conf.spark.rapids.sql.enabled=false"]


def test_the_emr_steps_are_submit_commands_generate_in_the_vllm_venv_and_the_bootstrap_installs_both():
    names = default_registry().names
    cut = names.index("generate")
    path, base = PROJECT / "conf" / "emr-gpu.yaml", "s3://YOUR-BUCKET/realsyn"
    expected = []
    for title, stages, overrides, on_failure in (
            ("realsyn: ingest to tag", names[:cut], [], "CANCEL_AND_WAIT"),
            ("realsyn: generate (vLLM)", ["generate"], EMR_VLLM_SET, "CANCEL_AND_WAIT"),
            ("realsyn: similarity_band to export", names[cut + 1:], [], "CONTINUE")):
        # What `realsyn submit --profile emr-gpu --stages ... [--set ...] --emr-step` prints.
        command = submit_command(load_config(str(path), overrides), path, base, stages=",".join(stages),
                                 overrides=overrides)
        expected.append({**emr_step(command, title)[0], "ActionOnFailure": on_failure})
    assert json.loads((DEPLOY / "emr-step.json").read_text()) == expected
    generate = dict(arg.split("=", 1) for arg in expected[1]["Args"] if arg.startswith("spark."))
    assert generate["spark.pyspark.python"] == "/opt/realsyn/venv-vllm/bin/python" and generate["spark.plugins"] == ""
    assert load_config(str(path), EMR_VLLM_SET).models["llm"].backend == "vllm"
    cfg = profile("emr-gpu")
    settings = cluster_settings(cfg)
    bootstrap = (DEPLOY / "emr-bootstrap.sh").read_text().replace("${RAPIDS_VERSION}", "26.08.1")
    assert settings["spark.executor.resource.gpu.discoveryScript"] == "/opt/realsyn/getGpusResources.sh"
    assert "getGpusResources.sh" in bootstrap and "cd /opt/realsyn" in bootstrap
    assert settings["spark.executor.extraClassPath"] == f"/opt/realsyn/jars/{RAPIDS}" and RAPIDS in bootstrap
    assert "realsyn_etl-${VERSION}-py3-none-any.whl" in bootstrap
    # Two venvs, each the wheel under its constraints file: the profile's, and generate's.
    assert settings["spark.pyspark.python"] == "/opt/realsyn/venv/bin/python" and "-m venv venv\n" in bootstrap
    assert '-c constraints-emr.txt "${WHEEL}[gpu]"' in bootstrap
    assert "-m venv venv-vllm" in bootstrap and '-c constraints-vllm.txt "${WHEEL}[gpu,vllm]"' in bootstrap
    configurations = json.loads((DEPLOY / "emr-configurations.json").read_text())
    assert {"delta-defaults", "yarn-site", "container-executor"} <= {c["Classification"] for c in configurations}


def test_submit_builds_each_profiles_command():
    emr = submit_command(profile("emr-gpu"), PROJECT / "conf" / "emr-gpu.yaml", "s3://b/realsyn", stages="embed")
    assert emr[:5] == ["spark-submit", "--master", "yarn", "--deploy-mode", "cluster"]
    flags = {emr[i + 1] for i, arg in enumerate(emr) if arg == "--conf" and i + 1 < emr.index("s3://b/realsyn/submit.py")}
    for needed in ("spark.executor.resource.gpu.amount=1", "spark.task.resource.gpu.amount=0.125",
                   "spark.plugins=com.nvidia.spark.SQLPlugin", "spark.dynamicAllocation.enabled=false"):
        assert needed in flags
    assert emr[emr.index("--py-files") + 1] == f"s3://b/realsyn/{PY_FILES}"
    assert emr[emr.index("--archives") + 1] == f"s3://b/realsyn/{CONF_ARCHIVE}#conf"
    assert emr[-6:] == ["s3://b/realsyn/submit.py", "run", "--conf", "conf/emr-gpu.yaml", "--stages", "embed"]

    dbx = profile("databricks-gpu")
    assert submit_command(dbx, Path("databricks-gpu.yaml"), "x") == [
        "databricks", "bundle", "run", "--target", "gpu", "realsyn"]
    assert submit_command(dbx, Path("databricks-gpu.yaml"), "x", stages="embed")[-3:] == [
        "realsyn_stages", "--params", "stages=embed"]

    local = submit_command(profile("local"), PROJECT / "conf" / "local.yaml", "/d", overrides=["retrieve.k=5"])
    assert local[0].endswith("/pyspark/bin/spark-submit") and local[1:3] == ["--master", "local[*]"]
    assert "--archives" not in local
    conf = dict(local[i + 1].split("=", 1) for i, arg in enumerate(local[:local.index("/d/submit.py")])
                if arg == "--conf")
    assert "delta-spark" in conf["spark.jars"] and conf["spark.pyspark.python"] == sys.executable
    assert local[-6:] == ["/d/submit.py", "run", "--conf", str(PROJECT / "conf" / "local.yaml"), "--set", "retrieve.k=5"]


def test_realsyn_submit_dry_run_prints_the_command_and_refuses_unknown_stages(capsys):
    from etl.cli import main

    assert main(["submit", "--profile", "emr-gpu", "--dry-run", "--stages", "embed"]) == 0
    assert capsys.readouterr().out.startswith("spark-submit --master yarn --deploy-mode cluster")
    assert main(["submit", "--profile", "emr-gpu", "--dry-run", "--stages", "embedd"]) == 2
    assert main(["submit", "--profile", "emr-gpu", "--emr-step"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["Jar"] == "command-runner.jar"


def test_the_discovery_script_lists_every_gpu_as_spark_expects(tmp_path):
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\nprintf '0\\n1\\n'\n")
    fake.chmod(0o755)
    out = subprocess.run([str(DEPLOY / "getGpusResources.sh")], capture_output=True, text=True, check=True,
                         env={**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}).stdout
    assert json.loads(out) == {"name": "gpu", "addresses": ["0", "1"]}


LOCAL_STAGES = "ingest,fetch,image_quality,image_dedup"


def _rows(df):
    """A table's rows as comparable tuples, without what differs between two runs by design."""
    volatile = {f.name for f in df.schema.fields if f.name == "batch_id" or f.dataType.typeName() == "timestamp"}
    kept = sorted(c for c in df.columns if c not in volatile)
    return sorted(tuple(str(v) for v in r) for r in df.select(*kept).collect())


@pytest.mark.spark
def test_a_local_spark_submit_of_the_wheel_writes_the_same_tables_as_realsyn_run(
        artifacts, spark, stage_ctx, tmp_path):
    from etl.runner import run_stages

    import pyarrow.parquet as pq

    # The first documents of the bundled sample: every stage has work, the test stays short.
    sample = tmp_path / "sample.parquet"
    pq.write_table(pq.read_table(PROJECT / "sample" / "recipes.obelics.parquet").slice(0, 12), sample)
    ctx = stage_ctx({"ingest": {"paths": [str(sample)]}})
    results = run_stages(spark, ctx.cfg, LOCAL_STAGES.split(","))
    # The sample's images come inline: nothing fetched, every kept image measured and grouped.
    n = ctx.read("images").count()
    assert n == ctx.read("doc_images").select("image_id").distinct().count() > 0
    assert results["fetch"].drops == {}
    assert 0 < ctx.read("images").where("kept").count() <= n
    assert ctx.read("images").where("kept AND (phash IS NULL OR phash_group IS NULL OR width < 100)").count() == 0

    warehouse = tmp_path / "warehouse"
    dumped = ctx.cfg.model_dump(mode="json")
    dumped["spark"]["warehouse_dir"] = str(warehouse)
    dumped["spark"]["conf"]["spark.driver.memory"] = "2g"
    dumped["catalog"]["database"] = "realsyn"
    profile_file = tmp_path / "submitted.yaml"
    profile_file.write_text(yaml.safe_dump(dumped))
    command = submit_command(load_config(str(profile_file)), profile_file, str(artifacts.wheel.parent),
                             stages=LOCAL_STAGES)
    # Outside the checkout and without PYTHONPATH: the code comes from the wheel on --py-files.
    env = {k: v for k, v in spark_env().items() if k not in ("PYTHONPATH", "PYSPARK_PYTHON", "PYSPARK_DRIVER_PYTHON")}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]

    stage_names = LOCAL_STAGES.split(",")
    written = sorted({t for s in default_registry().stages if s.name in stage_names for t in s.writes})
    for table in written:
        mine = spark.table(ctx.table(table))
        theirs = spark.read.format("delta").load(str(warehouse / "tables" / "realsyn.db" / table))
        assert _rows(theirs) == _rows(mine), table
