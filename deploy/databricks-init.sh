#!/usr/bin/env bash
# Databricks cluster init script (deploy/databricks.yml: init_scripts), run on every node before
# Spark starts: the RAPIDS Accelerator jar into /databricks/jars (Spark's classpath there) and the
# GPU discovery script into /opt/realsyn. The wheel and its requirement set come as the job's
# libraries (whl + requirements-gpu.txt from the same volume).
set -euo pipefail
RAPIDS_VERSION=26.08.1
RAPIDS_JAR=rapids-4-spark_2.13-${RAPIDS_VERSION}-cuda12.jar
RAPIDS_URL=https://repo1.maven.org/maven2/com/nvidia/rapids-4-spark_2.13/${RAPIDS_VERSION}/${RAPIDS_JAR}
# The volume folder (deploy/databricks.yml: spark_env_vars); volumes are mounted at /Volumes.
ARTIFACTS=${REALSYN_ARTIFACTS:?set by the job cluster}

mkdir -p /opt/realsyn
install -m 0755 "${ARTIFACTS}/getGpusResources.sh" /opt/realsyn/getGpusResources.sh
# Verified against Maven Central's own checksum before it goes on the classpath.
curl -fsSL --retry 3 -o "/tmp/${RAPIDS_JAR}" "${RAPIDS_URL}"
echo "$(curl -fsSL --retry 3 "${RAPIDS_URL}.sha1")  /tmp/${RAPIDS_JAR}" | sha1sum -c -
mv "/tmp/${RAPIDS_JAR}" "/databricks/jars/${RAPIDS_JAR}"
