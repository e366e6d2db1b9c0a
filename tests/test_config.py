"""Config: paper defaults, profile loading, overrides, and errors that name the key's path."""
from pathlib import Path

import pytest

from etl.config import CONF_DIR, ConfigError, load_config


def test_paper_defaults_live_in_config():
    cfg = load_config(CONF_DIR / "databricks-gpu.yaml")
    assert cfg.image_quality.min_side == 100
    assert cfg.image_quality.min_aspect == pytest.approx(1 / 3) and cfg.image_quality.max_aspect == 3
    assert (cfg.sentences.min_words, cfg.sentences.max_words) == (3, 81)
    assert cfg.sentences.min_entropy == 0.3
    assert (cfg.sentences.min_perplexity, cfg.sentences.max_perplexity) == (30, 200)
    assert cfg.cluster.k == 2_000_000
    assert (cfg.retrieval.k, cfg.retrieval.nprobe) == (3, 1)
    assert (cfg.balance.min_similarity, cfg.balance.max_similarity) == (0.51, 0.61)
    assert cfg.balance.cluster_caps == {"15M": 20, "30M": 35, "100M": 180}
    assert cfg.embed.model == "EVA02-E-14-plus"


@pytest.mark.parametrize("profile", sorted(p.name for p in CONF_DIR.glob("*.yaml")))
def test_every_profile_validates(profile):
    load_config(CONF_DIR / profile)


def test_overrides_are_typed_and_nested():
    cfg = load_config(None, ["retrieval.k=5", "retrieval.min_similarity=0.2",
                             "spark.conf.spark.sql.shuffle.partitions=3", "input.paths=[a.jsonl, b.jsonl]"])
    assert cfg.retrieval.k == 5 and cfg.retrieval.min_similarity == 0.2
    assert cfg.spark.conf["spark.sql.shuffle.partitions"] == 3
    assert cfg.input.paths == ["a.jsonl", "b.jsonl"]


@pytest.mark.parametrize("override, message", [
    ("retrieval.kk=5", "retrieval.kk"),                       # unknown key, named by path
    ("retrieval.k=0", "retrieval.k"),                         # out of range
    ("retrieval.k=three", "retrieval.k"),                     # wrong type
    ("input.format=warc", "input.format"),                    # not one of the readers
    ("nosuchsection.x=1", "nosuchsection"),
    ("sentences.min_words=100", "min_words must be <= sentences.max_words"),
    ("balance.min_similarity=0.9", "min_similarity must be <= max_similarity"),
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


def test_hash_changes_with_config():
    a, b = load_config(None), load_config(None, ["retrieval.k=4"])
    assert a.hash() != b.hash() and a.hash("input") == b.hash("input")
