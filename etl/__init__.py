"""Spark + Delta stages of the RealSyn ETL; `etl.runner` orders them, `etl.cli` is the entry."""
