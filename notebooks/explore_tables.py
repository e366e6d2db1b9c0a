# %% [markdown]
# # Exploring the RealSyn tables with SQL
#
# A percent-format notebook (opens as a notebook in Jupyter with jupytext, VS Code, or Databricks'
# "Import .py"). It only reads: run it after `make demo`, or point `REALSYN_CONF` at another
# profile. The test suite executes it against the end-to-end test's tables.

# %%
import os

from pyspark.sql import SparkSession

from etl.config import load_config

cfg = load_config(os.environ.get("REALSYN_CONF"), os.environ.get("REALSYN_SET", "").split() or None)
spark = SparkSession.getActiveSession()
if spark is None:
    from etl.session import build_spark

    spark = build_spark(cfg, progress=False)
db = cfg.catalog.database
spark.sql(f"USE {db}")
present = {t.name for t in spark.catalog.listTables(db)}


def show(query: str, n: int = 20) -> None:
    print(query.strip())
    spark.sql(query).show(n, truncate=70)


# %% [markdown]
# ## What ran: the `runs` table (last run of each stage)

# %%
show("""
SELECT stage, status, round(wall_s, 1) AS wall_s, rows_in, rows_out, drops, models, warnings
FROM (SELECT *, row_number() OVER (PARTITION BY stage ORDER BY started_at DESC) AS rn FROM runs)
WHERE rn = 1 ORDER BY started_at""")

# %% [markdown]
# ## Bad input: quarantine reasons

# %%
show("SELECT reason, count(*) AS n, first(detail) AS example FROM quarantine GROUP BY reason ORDER BY n DESC")

# %% [markdown]
# ## Image funnel: why images were dropped

# %%
if "images" in present:
    show("SELECT coalesce(drop_reason, 'kept') AS verdict, count(*) AS n FROM images GROUP BY 1 ORDER BY n DESC")
    show("SELECT width, height, format FROM images WHERE kept ORDER BY width * height DESC LIMIT 5")

# %% [markdown]
# ## Sentence funnel

# %%
if "sentences" in present:
    show("SELECT coalesce(drop_reason, 'kept') AS verdict, count(*) AS n FROM sentences GROUP BY 1 ORDER BY n DESC")
    show("SELECT text, n_occurrences FROM sentences WHERE kept ORDER BY n_occurrences DESC, sentence_id LIMIT 5")

# %% [markdown]
# ## Clusters and retrievals: each image's top-k sentences from the whole corpus

# %%
if "sentence_clusters" in present:
    show("""SELECT cluster_id, count(*) AS sentences FROM sentence_clusters
            GROUP BY cluster_id ORDER BY sentences DESC LIMIT 10""")
if "retrievals" in present:
    show("""
    SELECT r.image_id, r.rank, round(r.score, 3) AS score, s.text
    FROM retrievals r JOIN sentences s USING (sentence_id)
    ORDER BY r.image_id, r.rank LIMIT 12""")
