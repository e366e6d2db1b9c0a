#!/usr/bin/env bash
# EMR bootstrap action (every node, before applications start):
#   --bootstrap-actions Path=s3://YOUR-BUCKET/realsyn/emr-bootstrap.sh,Args=[s3://YOUR-BUCKET/realsyn]
# Installs, under /opt/realsyn: a Python 3.11 venv with the GPU requirement set and the wheel
# (conf/emr-gpu.yaml points spark.pyspark.python there), the GPU discovery script, and the
# RAPIDS Accelerator jar (conf/emr-gpu.yaml puts it on the driver and executor classpath).
set -euo pipefail
ARTIFACTS=${1:?usage: emr-bootstrap.sh s3://bucket/realsyn}
VERSION=${2:-0.1.0}
RAPIDS_VERSION=26.08.1
RAPIDS_JAR=rapids-4-spark_2.13-${RAPIDS_VERSION}-cuda12.jar
RAPIDS_URL=https://repo1.maven.org/maven2/com/nvidia/rapids-4-spark_2.13/${RAPIDS_VERSION}/${RAPIDS_JAR}
WHEEL=realsyn_etl-${VERSION}-py3-none-any.whl

sudo mkdir -p /opt/realsyn/jars && sudo chown -R "$(id -u):$(id -g)" /opt/realsyn
cd /opt/realsyn
aws s3 cp "${ARTIFACTS}/getGpusResources.sh" getGpusResources.sh && chmod 0755 getGpusResources.sh
aws s3 cp "${ARTIFACTS}/requirements-gpu.txt" requirements-gpu.txt
aws s3 cp "${ARTIFACTS}/${WHEEL}" "${WHEEL}"

curl -fsSL --retry 3 -o "jars/${RAPIDS_JAR}" "${RAPIDS_URL}"
echo "$(curl -fsSL --retry 3 "${RAPIDS_URL}.sha1")  jars/${RAPIDS_JAR}" | sha1sum -c -

python3.11 -m venv venv
venv/bin/pip install --quiet --upgrade pip
venv/bin/pip install --quiet -r requirements-gpu.txt
# The wheel's own dependencies are all in the set above; none of Spark, Delta or faiss-cpu.
venv/bin/pip install --quiet --no-deps "${WHEEL}"
