"""Config and the stage registry without Spark: paper defaults, profiles, layers and where each
value came from, moved keys, errors that name the key's path, stage_config_hash per stage,
`realsyn stages` / `realsyn config` output."""
import copy
from pathlib import Path

import pytest

from etl.cli import main
from etl.config import CONF_DIR, ConfigError, leaves, load_config, load_layers
from etl.runner import default_registry
from etl.stage import CPU, GPU, MissingInputs, Registry, Stage, UnknownStage


def test_paper_defaults_live_in_config():
    cfg = load_config(CONF_DIR / "databricks-gpu.yaml")
    assert cfg.image_quality.min_side == 100
    assert cfg.image_quality.min_aspect == pytest.approx(1 / 3) and cfg.image_quality.max_aspect == 3
    assert (cfg.sentences.min_words, cfg.sentences.max_words) == (3, 81)
    assert cfg.sentences.min_entropy == 0.3
    lm = cfg.models[cfg.sentences.perplexity_model]
    assert (lm.source, lm.min_perplexity, lm.max_perplexity) == ("gpt2-large", 30, 200)
    assert cfg.cluster.k == 2_000_000
    assert (cfg.retrieve.k, cfg.retrieve.nprobe) == (3, 1)
    clip = cfg.models[cfg.embed.model]
    assert (clip.min_similarity, clip.max_similarity) == (0.51, 0.61)  # the band lives with its CLIP
    assert cfg.balance.cluster_caps == {"15M": 20, "30M": 35, "100M": 180}
    assert cfg.balance.image_clusters == 1_000_000
    assert cfg.models[cfg.embed.model].name == "EVA02-E-14-plus"


@pytest.mark.parametrize("profile", sorted(p.name for p in CONF_DIR.glob("*.yaml")))
def test_every_profile_validates(profile):
    load_config(CONF_DIR / profile)


def test_overrides_are_typed_and_nested():
    cfg = load_config(None, ["retrieve.k=5", "retrieve.min_similarity=0.2", "models.clip.batch_size=8",
                             "spark.conf.spark.sql.shuffle.partitions=3", "ingest.paths=[a.jsonl, b.jsonl]"])
    assert cfg.retrieve.k == 5 and cfg.retrieve.min_similarity == 0.2
    assert cfg.models["clip"].batch_size == 8 and cfg.models["clip"].name == "ViT-B-32"  # the rest kept
    assert cfg.spark.conf["spark.sql.shuffle.partitions"] == 3
    assert cfg.ingest.paths == ["a.jsonl", "b.jsonl"]


def test_layers_and_where_each_value_came_from():
    env = {"REALSYN__CLUSTER__K": "7", "REALSYN__RETRIEVE__K": "4", "UNRELATED": "x"}
    layers = load_layers(None, ["retrieve.k=5"], env)
    cfg = load_config(None, ["retrieve.k=5"], env)
    assert (cfg.cluster.k, cfg.retrieve.k) == (7, 5)  # --set beats the environment
    src = layers.sources
    assert (src["cluster.k"], src["retrieve.k"], src["models.clip.name"], src["fetch.retries"]) == (
        "environment", "--set", "profile local.yaml", "default")
    # A free-form map is replaced whole by the layer that sets it, not merged key by key.
    caps = load_config(None, ["balance.cluster_caps={small: 3}"]).balance.cluster_caps
    assert caps == {"small": 3}


@pytest.mark.parametrize("old, new", [
    ("input.format=mmc4", "ingest.format"),
    ("retrieval.k=4", "retrieve.k"),
    ("embed.pretrained=x", "models.clip.pretrained"),
    ("embed.batch_size=8", "models.clip.batch_size"),
    ("sentences.perplexity_batch_size=8", "models.perplexity_lm.batch_size"),
    ("sentences.max_perplexity=300", "models.perplexity_lm.max_perplexity"),
    ("sentences.pos_models=[x]", "models.pos_parser.candidates"),
    ("image_dedup.semantic_threshold=0.9", "semantic_dedup.images.threshold"),
    ("sentences.semantic_clusters=5", "semantic_dedup.sentences.clusters"),
    ("image_dedup.semantic_on_random_init=true", "semantic_dedup.on_random_init"),
])
def test_old_keys_name_the_new_one(old, new):
    with pytest.raises(ConfigError, match=f"moved to {new.replace('.', '[.]')}"):
        load_config(None, [old])


def test_old_keys_in_a_profile_and_old_meanings(tmp_path: Path):
    old = tmp_path / "old.yaml"
    old.write_text("input:\n  format: mmc4\nembed:\n  pretrained: x\n")
    with pytest.raises(ConfigError, match=r"profile old\.yaml: keys that moved(.|\n)*input\.format: moved to ingest"):
        load_config(old)
    # embed.model kept its name but now names a models: entry; the old meaning is explained.
    with pytest.raises(ConfigError, match="embed.model names a `models:` entry"):
        load_config(None, ["embed.model=ViT-B-32"])
    with pytest.raises(ConfigError, match="is a open_clip model, not causal_lm"):
        load_config(None, ["sentences.perplexity_model=clip"])


@pytest.mark.parametrize("override, message", [
    ("retrieve.kk=5", "retrieve.kk"),                         # unknown key, named by path
    ("retrieve.k=0", "retrieve.k"),                           # out of range
    ("retrieve.k=three", "retrieve.k"),                       # wrong type
    ("ingest.format=warc", "ingest.format"),                  # not one of the readers
    ("models.clip.bogus=1", "models.clip.bogus"),
    ("nosuchsection.x=1", "nosuchsection"),
    ("sentences.min_words=100", "min_words must be <= max_words"),
    ("models.perplexity_lm.min_perplexity=5000", "min_perplexity must be <= max_perplexity"),
    ("balance.min_similarity=0.9", "moved to models.clip.min_similarity"),
    ("spark.gpu.enabled=true", "spark.gpu.enabled needs a cluster master"),  # GPUs with local[*]
    ("spark.delta=cluster", "--set model_output.staging_dir="),  # workers do not share the driver's disk
])
def test_bad_values_fail_fast_with_the_key_path(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(None, [override])


def test_bad_files(tmp_path: Path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("spark: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("spark:\n  master: local\n  masterr: x\n")
    with pytest.raises(ConfigError, match=r"spark\.masterr"):
        load_config(bad)


# --- the registry ------------------------------------------------------------------------------

def _depends(stage: Stage, cfg: dict, path: str) -> bool:
    """Whether `path` lies under a config key the stage declares, or in a model it names."""
    keys = list(stage.config) + list(stage.models) + [f"models.{m}" for m in stage.model_keys(cfg)]
    return any(path == k or path.startswith(k + ".") for k in keys)


@pytest.mark.parametrize("name", default_registry().names)
def test_stage_config_hash_changes_exactly_with_its_keys(name):
    stage = default_registry()[name]
    cfg = load_config(None).model_dump(mode="json")
    base = stage.config_hash(cfg)
    for path, _ in leaves(cfg):
        changed = copy.deepcopy(cfg)
        node = changed
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = "__changed__"
        dotted = ".".join(path)
        assert (stage.config_hash(changed) != base) == _depends(stage, cfg, dotted), (name, dotted)


def test_declared_config_keys_and_models_exist():
    cfg = load_config(None).model_dump(mode="json")
    for stage in default_registry().stages:
        stage.config_hash(cfg)  # raises KeyError on a key the config does not have
        assert len(stage.model_keys(cfg)) == len(stage.models), stage.name


def _fake(name, reads=(), writes=(), **kw) -> Stage:
    return Stage(name=name, run=lambda ctx: None, reads=reads, writes=writes, config=(), **kw)


def test_inputs_are_checked_against_earlier_stages_and_existing_tables():
    reg = Registry([_fake("a", writes=("t1",)), _fake("b", reads=("t1",), writes=("t2",)),
                    _fake("c", reads=("t2", "t0"), optional_reads=("t9",))])
    nothing = lambda table: False  # noqa: E731
    reg.check_inputs(reg.resolve(["a", "b"]), nothing)
    with pytest.raises(MissingInputs, match=r"c reads t0, which does not exist yet"):
        reg.check_inputs(reg.resolve(None), nothing)
    with pytest.raises(MissingInputs, match=r"b reads t1, which does not exist yet \(run a first\)"):
        reg.check_inputs(reg.resolve(["b"]), nothing)
    reg.check_inputs(reg.resolve(["c", "b"]), lambda t: t in ("t0", "t1"))  # order is the registry's
    assert [s.name for s in reg.resolve(["c", "a"])] == ["a", "c"]
    with pytest.raises(UnknownStage, match="stages are: a, b, c"):
        reg.resolve(["nope"])


def test_every_pipeline_read_is_written_earlier():
    reg = default_registry()
    reg.check_inputs(reg.stages, lambda table: False)  # the whole pipeline on an empty warehouse


def test_gpu_steps_are_declared_per_step_not_per_stage():
    reg = default_registry()
    # The model forward passes and GPU FAISS/torch kernels; routing, CPU search, means, range search,
    # joins and writes are no step of their own: they run as CPU tasks.
    assert {s.name: [st.name for st in s.gpu_steps] for s in reg.stages if s.gpu_steps} == {
        "sentences": ["perplexity"], "embed": ["clip_image", "clip_text"],
        "semantic_dedup": ["sentence_encoder", "kmeans_train"], "cluster": ["kmeans_train"],
        "retrieve": ["topk"], "caption": ["captioner"], "tag": ["clip_text"], "generate": ["llm"],
        "similarity_band": ["clip_text"], "balance": ["kmeans_train"]}
    assert reg["fetch"].steps == () and GPU.gpu and not CPU.gpu
    with pytest.raises(KeyError, match="declares no step 'clip'.*clip_image, clip_text"):
        reg["embed"].step("clip")


# --- the CLI's Spark-free commands -----------------------------------------------------------------

def test_realsyn_stages_prints_the_pipeline(capsys):
    assert main(["stages"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["stage", "reads", "->"]
    table = out[1:out.index("")]
    rows = {line.split()[0]: line for line in table}
    assert list(rows) == default_registry().names
    assert "doc_images -> images, image_bytes" in rows["fetch"] and "fetch, redaction" in rows["fetch"]
    assert "GPU: clip_image, clip_text" in rows["embed"] and " clip " in rows["embed"]
    assert " CPU " in rows["fetch"] and "pos_parser, perplexity_lm" in rows["sentences"]
    # Then each GPU step and what it runs, and what its tasks hold under this profile.
    steps = [line.strip() for line in out if line.startswith("  ")]
    assert "embed.clip_image: CLIP image tower over decoded images" in steps
    assert any(x.startswith("retrieve.topk: ") for x in steps) and len(steps) == 12
    assert "CPU tasks under this profile: spark.gpu.enabled is false" in "\n".join(out)


def test_realsyn_config_prints_values_and_their_source(capsys, monkeypatch):
    monkeypatch.setenv("REALSYN__CLUSTER__NITER", "3")
    assert main(["config", "--set", "retrieve.k=9"]) == 0
    out = capsys.readouterr().out
    assert "retrieve:\n  k: 9" in out
    sources = {line.split()[0]: line.split(None, 1)[1] for line in out.split("# where each value came from")[1]
               .splitlines()[1:] if line.strip()}
    assert sources["retrieve.k"] == "--set" and sources["cluster.niter"] == "environment"
    assert sources["models.clip.name"] == "profile local.yaml" and sources["fetch.retries"] == "default"


def test_a_missing_or_unreadable_input_fails_before_the_jvm_starts(tmp_path):
    """`realsyn run` with an input path that is not there: one line naming it and the way to give
    one, exit 2, and no JVM started (no Spark log line in the process's output)."""
    import os
    import subprocess
    import sys

    from data_paths import PROJECT

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0)
    env = {**os.environ, "PYTHONPATH": str(PROJECT)}
    for path, why in ((tmp_path / "absent.parquet", "does not exist"), (locked, "is not readable")):
        if why == "is not readable" and os.geteuid() == 0:
            continue  # root reads everything: only the missing path can be tried
        done = subprocess.run([sys.executable, "-m", "etl.cli", "run", "--set", f"spark.warehouse_dir={tmp_path / 'w'}",
                               "--set", f"ingest.paths=[{path}]"], capture_output=True, text=True, timeout=120,
                              env=env, cwd=tmp_path)
        assert done.returncode == 2 and done.stderr.splitlines() == [
            f"config error: ingest.paths: {path} {why}" + (" by this user" if "readable" in why else "")
            + " (give the input with --set 'ingest.paths=[/path/to/file-or-folder]')"], done.stderr
        assert not (tmp_path / "w").exists()  # nothing was created: no session, no warehouse
