"""The sentence funnel as the paper counts it (RealSyn Table/§3.1: 2.13B split sentences -> -14.6%
quality -> -36.3% semantics -> -27.6% redundancy -> 0.84B), over sentence occurrences. Shared by
bench/sentence_funnel.py and the report.
"""
from __future__ import annotations

from udfs.sentences import QUALITY_REASONS, SEMANTIC_REASONS

PAPER = {"quality": 0.146, "semantics": 0.363, "redundancy": 0.276}
SEMANTIC_DUPLICATE = "semantic_duplicate"
EXACT_DUPLICATE = "exact_duplicate"


def sentence_funnel(spark, database: str) -> dict:
    """Occurrence-level funnel plus per-reason counts of distinct sentences."""
    rows = spark.sql(f"""
        SELECT s.drop_reason AS reason, count(*) AS occurrences, count(DISTINCT s.sentence_id) AS sentences
        FROM {database}.sentence_occurrences o JOIN {database}.sentences s USING (sentence_id)
        GROUP BY s.drop_reason""").collect()
    occ = {r["reason"]: r["occurrences"] for r in rows}
    repeats = sum(r["occurrences"] - r["sentences"] for r in rows if r["reason"] is None)
    uniq = {r["reason"]: r["sentences"] for r in rows}
    split = sum(occ.values())
    quality = sum(occ.get(r, 0) for r in QUALITY_REASONS)
    semantics = sum(occ.get(r, 0) for r in SEMANTIC_REASONS)
    after_semantics = split - quality - semantics
    # Survivors of both filters: every occurrence beyond the first of a sentence is redundant,
    # and so is every occurrence of a semantic duplicate.
    final = uniq.get(None, 0)
    steps = {
        "split": split,
        "after_quality": split - quality,
        "after_semantics": after_semantics,
        "after_redundancy": final,
    }
    return {
        "steps": steps,
        "removed_fraction": {
            "quality": quality / split if split else 0.0,
            "semantics": semantics / (split - quality) if split - quality else 0.0,
            "redundancy": (after_semantics - final) / after_semantics if after_semantics else 0.0,
        },
        "occurrences_by_reason": {**{str(k): v for k, v in occ.items()}, EXACT_DUPLICATE: repeats},
        "sentences_by_reason": {**{str(k): v for k, v in uniq.items()}, EXACT_DUPLICATE: 0},
    }
