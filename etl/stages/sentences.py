"""sentences: doc_texts paragraphs -> `sentences`, `sentence_occurrences`, `word_unigrams`.

The paper's sentence funnel, cheapest rule first; a sentence keeps the first rule it fails:
1. split + normalise (udfs/sentences.py); the key is the hash of the normalised text, so exact
   duplicates collapse into one row whose `n_occurrences` counts the pages that carry it, and
   `sentence_occurrences` keeps every (doc_id, position, sent_index) for provenance;
2. quality: emoji / URL, 3-81 words, complexity >= C1 + an action (spaCy parse);
3. semantics: information entropy from the corpus unigram table (a two-pass job: count the
   new sentences' words into `word_unigrams`, then score against the updated totals), then
   perplexity under a causal LM in a GPU mapInPandas, for survivors of every cheaper rule only.
Semantic dedup of the kept sentences is the semantic_dedup stage's (it sets
drop_reason='semantic_duplicate' later).

Only paragraphs without occurrences yet are read, every write is a MERGE on content keys, and
the unigram counts are keyed by the ingest batch they came from, so a re-run (or a run after a
crash) adds nothing twice.

Entropy scale: p(w) = count(w) / all word tokens, over the distinct sentences (a boilerplate
line on 10,000 pages counts once). theta(x) = -sum over x's word tokens of p ln p is then large
only for sentences built from frequent words: "the" (p ~ 0.05) alone adds ~0.15, a product or
keyword list of rare words adds ~0.001. theta >= 0.3 therefore keeps running prose with its
function words and drops keyword strings, titles and lists, which is the paper's intent.
Decisions are made with the table as it is when a sentence is first seen and are not revisited.
"""
from __future__ import annotations

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from etl.context import StageContext, StageResult
from etl.gpu import DEVICE, devices_used, map_in_pandas
from etl.session import default_parallelism
from etl.stage import Step, stage
from realsyn_models.sources import resolve as resolve_lm
from realsyn_models.pos import DependencyParser
from udfs import sentences as S
from udfs.perplexity import PERPLEXITY_SCHEMA, make_perplexity_fn

SENTENCES_SCHEMA = (
    "sentence_id string, text string, n_occurrences bigint, word_count int, has_emoji boolean, "
    "has_url boolean, n_relations int, has_action boolean, entropy double, perplexity double, "
    "kept boolean, drop_reason string, semantic_group string, semantic_model string, batch_id string"
)
OCCURRENCES_SCHEMA = "sentence_id string, doc_id string, position int, sent_index int, batch_id string"
UNIGRAMS_SCHEMA = "word string, count bigint, batch_id string"
EMPTY_SCHEMA = "doc_id string, position int, batch_id string"
SENTENCE_COLUMNS = [field.split()[0] for field in SENTENCES_SCHEMA.split(", ")]
EXACT_DUPLICATE = "exact_duplicate"  # an occurrence folded into an existing sentence row


def new_paragraphs(ctx: StageContext) -> DataFrame:
    """doc_texts rows not split yet: no occurrence recorded for their doc_id + position, and not
    recorded in `empty_paragraphs` (split before into no sentence: `&nbsp;`, emoji only, ...).
    Blank text is left out here without being split."""
    done = ctx.read("sentence_occurrences").select("doc_id", "position").distinct()
    empty = ctx.read("empty_paragraphs").select("doc_id", "position")
    return (ctx.read("doc_texts").where(F.col("text").rlike(r"(?U)\S"))
            .select("doc_id", "position", "text", "batch_id")
            .join(done, ["doc_id", "position"], "left_anti")
            .join(empty, ["doc_id", "position"], "left_anti"))


def parser(ctx: StageContext) -> DependencyParser | None:
    sc = ctx.cfg.sentences
    if not sc.require_action:
        return None
    pos = ctx.cfg.models[sc.pos_model]
    return DependencyParser(tuple(pos.candidates), pos.batch_size)


def quality(ctx: StageContext, new: DataFrame) -> DataFrame:
    sc = ctx.cfg.sentences
    parse = parser(ctx)
    fn = S.make_quality_fn(sc.min_words, sc.max_words, sc.require_action, sc.min_relations, parse)
    return new.join(new.select("sentence_id", "text").mapInPandas(fn, S.QUALITY_SCHEMA), "sentence_id")


def count_unigrams(ctx: StageContext, scored: DataFrame) -> int:
    """Pass 1: the new sentences' word counts, added to the corpus table per ingest batch."""
    counts = (scored.select("batch_id", F.explode("words").alias("word"))
              .groupBy("word", "batch_id").agg(F.count("*").alias("count")))
    return ctx.merge_new(counts.select("word", "count", "batch_id"), "word_unigrams", ["word", "batch_id"])


def entropy(ctx: StageContext, scored: DataFrame) -> DataFrame:
    """Pass 2: theta(x) = -sum_i p(x_i) ln p(x_i), p from the whole (updated) unigram table."""
    vocab = ctx.read("word_unigrams").groupBy("word").agg(F.sum("count").alias("n"))
    total = vocab.agg(F.sum("n")).first()[0] or 1
    p = F.col("n") / F.lit(total)
    terms = (scored.select("sentence_id", F.explode("words").alias("word"))
             .join(vocab, "word").select("sentence_id", (-p * F.log(p)).alias("term")))
    # Summed in sorted order: a float sum in arrival order differs in its low bits with the
    # partitioning, and a re-run after a crash must give the same numbers.
    theta = terms.groupBy("sentence_id").agg(F.aggregate(
        F.array_sort(F.collect_list("term")), F.lit(0.0), lambda acc, x: acc + x).alias("entropy"))
    return (scored.join(theta, "sentence_id", "left")
            .withColumn("entropy", F.coalesce("entropy", F.lit(0.0))))


def perplexity(ctx: StageContext, scored: DataFrame) -> tuple[DataFrame, int]:
    """Perplexity for the sentences that passed every cheaper rule (the LM is the costly step)."""
    sc = ctx.cfg.sentences
    todo = scored.where(F.col("drop_reason").isNull() & (F.col("entropy") >= sc.min_entropy))
    n = todo.count()
    if n == 0:
        return ctx.spark.createDataFrame([], PERPLEXITY_SCHEMA), 0
    lm = ctx.cfg.models[sc.perplexity_model]
    fn = make_perplexity_fn(lm.source, lm.batch_size, lm.max_tokens, lm.precision)
    parts = min(n, default_parallelism(ctx.spark))
    scores = map_in_pandas(ctx, todo.select("sentence_id", "text").repartition(parts), fn, PERPLEXITY_SCHEMA,
                           step="perplexity", with_device=True)
    return scores, n


def decide(ctx: StageContext, scored: DataFrame, scores: DataFrame) -> DataFrame:
    """kept / drop_reason: the first failing rule, in funnel order."""
    sc = ctx.cfg.sentences
    lm = ctx.cfg.models[sc.perplexity_model]
    ppl = F.col("perplexity")
    reason = F.coalesce(
        F.col("drop_reason"),
        F.when(F.col("entropy") < sc.min_entropy, F.lit(S.LOW_ENTROPY)),
        F.when(ppl.isNull() | F.isnan(ppl) | (ppl > lm.max_perplexity), F.lit(S.HIGH_PERPLEXITY)),
        F.when(ppl < lm.min_perplexity, F.lit(S.LOW_PERPLEXITY)),
    )
    return (scored.join(scores, "sentence_id", "left")
            .withColumn("drop_reason", reason)
            .withColumn("kept", F.col("drop_reason").isNull()))


def refresh_occurrence_counts(ctx: StageContext, ids: DataFrame) -> None:
    """sentences.n_occurrences := rows in sentence_occurrences, for the sentences this run saw.

    Recounted from the table (not incremented), so a run repeated after a crash counts nothing
    twice; only that column is touched, the later stages' flags on the row stay as they are.
    """
    counts = (ctx.read("sentence_occurrences").join(ids, "sentence_id", "left_semi")
              .groupBy("sentence_id").agg(F.count("*").alias("n_occurrences")))
    ctx.update_columns(counts, "sentences", ["sentence_id"], ["n_occurrences"])

def split(ctx: StageContext, paragraphs: DataFrame) -> DataFrame:
    """Occurrences (sentence_id, doc_id, position, sent_index, text, batch_id) of the new
    paragraphs. Checkpointed (lineage cut) because the inputs are anti-joins against the tables
    this run writes: recomputed after the writes they would come out empty."""
    sc = ctx.cfg.sentences
    return paragraphs.mapInPandas(S.make_split_fn(sc.emoji_url, sc.max_chunk_chars), S.SPLIT_SCHEMA).localCheckpoint()


def fold_exact_duplicates(ctx: StageContext, occ: DataFrame) -> DataFrame:
    """One row per sentence not in the table yet: exact duplicates fold into their key."""
    grouped = occ.groupBy("sentence_id").agg(F.first("text").alias("text"), F.min("batch_id").alias("batch_id"),
                                             F.count("*").alias("n_occurrences"))
    return grouped.join(ctx.read("sentences").select("sentence_id"), "sentence_id", "left_anti")


def judge(ctx: StageContext, new: DataFrame) -> tuple[DataFrame, int]:
    """quality -> entropy (two passes over the unigram table, the first of which writes it) ->
    perplexity -> verdicts. Returns the checkpointed verdict rows and how many the LM scored."""
    checked = quality(ctx, new).localCheckpoint()  # the spaCy parse runs once
    count_unigrams(ctx, checked)
    with_entropy = entropy(ctx, checked).localCheckpoint()
    scores, n_scored = perplexity(ctx, with_entropy)
    return decide(ctx, with_entropy, scores).localCheckpoint(), n_scored  # the LM runs once


@stage(reads=("doc_texts",), writes=("sentences", "sentence_occurrences", "word_unigrams", "empty_paragraphs"),
       config=("sentences",), models=("sentences.pos_model", "sentences.perplexity_model"),
       steps=(Step("perplexity", "causal LM perplexity of each new sentence"),))
def sentences(ctx: StageContext) -> StageResult:
    sc = ctx.cfg.sentences
    for name, schema in (("sentences", SENTENCES_SCHEMA), ("sentence_occurrences", OCCURRENCES_SCHEMA),
                         ("word_unigrams", UNIGRAMS_SCHEMA), ("empty_paragraphs", EMPTY_SCHEMA)):
        ctx.create_if_missing(name, schema)
    # Resolved on the driver first: a missing model fails the run before any work, and is named.
    pos_model = parser(ctx).model_id() if sc.require_action else "off"
    resolve_lm(ctx.cfg.models[sc.perplexity_model].source)
    result = StageResult(models={sc.pos_model: pos_model,
                                 sc.perplexity_model: ctx.cfg.models[sc.perplexity_model].source})

    # read
    paragraphs = new_paragraphs(ctx)
    result.rows_in = paragraphs.count()

    # transform
    occ = split(ctx, paragraphs)
    n_occ = occ.count()
    # Paragraphs that split into nothing are recorded as done, last (a crash before re-splits them).
    empty = (paragraphs.select("doc_id", "position", "batch_id")
             .join(occ.select("doc_id", "position"), ["doc_id", "position"], "left_anti").localCheckpoint())
    if n_occ == 0:
        ctx.merge_new(empty, "empty_paragraphs", ["doc_id", "position"])
        return result
    new = fold_exact_duplicates(ctx, occ)
    final, n_scored = judge(ctx, new)

    # record (before the writes: nothing below re-reads what they change)
    n_new = final.count()
    result.add_drops({r["drop_reason"]: r["count"] for r in final.groupBy("drop_reason").count().collect()})
    result.add_drops({EXACT_DUPLICATE: n_occ - n_new})
    result.metrics = {"occurrences": float(n_occ), "new_sentences": float(n_new),
                      "perplexity_scored": float(n_scored), "kept": float(final.where("kept").count())}
    if n_scored:
        result.notes["perplexity_devices"] = devices_used(
            (r[DEVICE], r["count"]) for r in final.where(F.col(DEVICE).isNotNull()).groupBy(DEVICE).count().collect())

    # write. semantic_group and semantic_model are the semantic_dedup stage's to fill.
    final = (final.withColumn("semantic_group", F.lit(None).cast("string"))
             .withColumn("semantic_model", F.lit(None).cast("string")))
    result.rows_out = ctx.merge_new(final.select(*SENTENCE_COLUMNS), "sentences", ["sentence_id"])
    ctx.merge_new(occ.select("sentence_id", "doc_id", "position", "sent_index", "batch_id"),
                  "sentence_occurrences", ["sentence_id", "doc_id", "position", "sent_index"])
    refresh_occurrence_counts(ctx, occ.select("sentence_id").distinct())
    ctx.merge_new(empty, "empty_paragraphs", ["doc_id", "position"])
    return result
