#!/usr/bin/env bash
# Spark GPU discovery script: prints the executor's GPUs as Spark's ResourceInformation JSON,
# {"name": "gpu", "addresses": ["0", "1", ...]}. Set as
# spark.executor.resource.gpu.discoveryScript (and spark.worker.resource.gpu.discoveryScript on
# a standalone worker); the bootstrap / init scripts install it as /opt/realsyn/getGpusResources.sh.
# Addresses are nvidia-smi indices, which is what realsyn_models/device.py maps to a torch device.
set -euo pipefail
addresses=$(nvidia-smi --query-gpu=index --format=csv,noheader | sed -e 's/^ *//' -e 's/.*/"&"/' | paste -sd, -)
echo "{\"name\": \"gpu\", \"addresses\": [${addresses}]}"
