#!/usr/bin/env bash
# EMR bootstrap action (every node, before applications start):
#   --bootstrap-actions Path=s3://YOUR-BUCKET/realsyn/emr-bootstrap.sh,Args=[s3://YOUR-BUCKET/realsyn]
# Installs, under /opt/realsyn: two Python 3.11 venvs with the wheel, each under its constraints
# file (deploy/constraints-*.txt; every set CUDA 12, see their headers),
#   venv       constraints-emr.txt, extras [gpu]: every stage but `generate` (conf/emr-gpu.yaml
#              points spark.pyspark.python here)
#   venv-vllm  constraints-vllm.txt, extras [gpu,vllm]: the `generate` step of deploy/emr-step.json,
#              which points spark.pyspark.python here and sets models.llm.backend=vllm
# the GPU discovery script, and the RAPIDS Accelerator jar (conf/emr-gpu.yaml puts it on the driver
# and executor classpath). A GPU node whose NVIDIA driver is older than the sets' minimum (their
# `# min-driver:` line) fails the bootstrap, so the cluster never starts on it.
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
aws s3 cp "${ARTIFACTS}/constraints-emr.txt" constraints-emr.txt
aws s3 cp "${ARTIFACTS}/constraints-vllm.txt" constraints-vllm.txt
aws s3 cp "${ARTIFACTS}/${WHEEL}" "${WHEEL}"

# The primary node (no GPU, no nvidia-smi) is not checked.
if command -v nvidia-smi >/dev/null; then
  driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -n 1 | tr -d ' ')
  for constraints in constraints-emr.txt constraints-vllm.txt; do
    min=$(sed -n 's/^# min-driver: \([0-9.]*\).*/\1/p' "${constraints}")
    if [ "$(printf '%s\n%s\n' "${min}" "${driver}" | sort -V | head -n 1)" != "${min}" ]; then
      echo "NVIDIA driver ${driver} is older than ${min}, the minimum of ${constraints}" >&2
      exit 1
    fi
  done
fi

curl -fsSL --retry 3 -o "jars/${RAPIDS_JAR}" "${RAPIDS_URL}"
echo "$(curl -fsSL --retry 3 "${RAPIDS_URL}.sha1")  jars/${RAPIDS_JAR}" | sha1sum -c -

# Spark, Delta and faiss-cpu are none of the wheel's dependencies: the cluster's own Spark and
# Delta stay the only ones.
python3.11 -m venv venv
venv/bin/pip install --quiet --upgrade pip
venv/bin/pip install --quiet -c constraints-emr.txt "${WHEEL}[gpu]"
python3.11 -m venv venv-vllm
venv-vllm/bin/pip install --quiet --upgrade pip
venv-vllm/bin/pip install --quiet -c constraints-vllm.txt "${WHEEL}[gpu,vllm]"
