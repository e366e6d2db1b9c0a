"""One module per pipeline stage, named as in ARCHITECTURE.md; `etl.runner.STAGE_ORDER` orders them."""
