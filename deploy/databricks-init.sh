#!/usr/bin/env bash
# Databricks cluster init script (deploy/databricks.yml: init_scripts), run on every node before
# Spark starts. From the volume folder REALSYN_ARTIFACTS, it installs the wheel into the runtime's
# Python with the job cluster's Python set (REALSYN_PYTHON_SET):
#   databricks  deploy/constraints-databricks.txt, extras [gpu]: the runtime's torch 2.7.0 / CUDA 12.6
#               kept, never reinstalled; plus the RAPIDS Accelerator jar into /databricks/jars
#   vllm        deploy/constraints-vllm.txt, extras [gpu,vllm]: the `generate` cluster; vllm 0.19.1
#               with torch 2.10.0 / CUDA 12.8; no RAPIDS (the GPU's memory goes to vLLM)
# and the GPU discovery script into /opt/realsyn. A GPU node whose NVIDIA driver is older than the
# set's minimum (its `# min-driver:` line) stops here, so the cluster fails at start, not mid-job.
set -euo pipefail
RAPIDS_VERSION=26.08.1
RAPIDS_JAR=rapids-4-spark_2.13-${RAPIDS_VERSION}-cuda12.jar
RAPIDS_URL=https://repo1.maven.org/maven2/com/nvidia/rapids-4-spark_2.13/${RAPIDS_VERSION}/${RAPIDS_JAR}
# Set by the job cluster (deploy/databricks.yml: spark_env_vars); volumes are mounted at /Volumes.
ARTIFACTS=${REALSYN_ARTIFACTS:?set by the job cluster}
WHEEL=${REALSYN_WHEEL:?set by the job cluster}
PYTHON_SET=${REALSYN_PYTHON_SET:-databricks}
case "${PYTHON_SET}" in
  databricks) EXTRAS=gpu ;;
  vllm) EXTRAS=gpu,vllm ;;
  *) echo "REALSYN_PYTHON_SET=${PYTHON_SET}: expected databricks or vllm" >&2; exit 1 ;;
esac
CONSTRAINTS="${ARTIFACTS}/constraints-${PYTHON_SET}.txt"

MIN_DRIVER=$(sed -n 's/^# min-driver: \([0-9.]*\).*/\1/p' "${CONSTRAINTS}")
if command -v nvidia-smi >/dev/null; then
  driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -n 1 | tr -d ' ')
  if [ "$(printf '%s\n%s\n' "${MIN_DRIVER}" "${driver}" | sort -V | head -n 1)" != "${MIN_DRIVER}" ]; then
    echo "NVIDIA driver ${driver} is older than ${MIN_DRIVER}, the minimum of ${CONSTRAINTS##*/}" >&2
    exit 1
  fi
fi

mkdir -p /opt/realsyn
install -m 0755 "${ARTIFACTS}/getGpusResources.sh" /opt/realsyn/getGpusResources.sh
/databricks/python/bin/pip install --quiet -c "${CONSTRAINTS}" "${ARTIFACTS}/${WHEEL}[${EXTRAS}]"

if [ "${PYTHON_SET}" = databricks ]; then
  # Verified against Maven Central's own checksum before it goes on the classpath.
  curl -fsSL --retry 3 -o "/tmp/${RAPIDS_JAR}" "${RAPIDS_URL}"
  echo "$(curl -fsSL --retry 3 "${RAPIDS_URL}.sha1")  /tmp/${RAPIDS_JAR}" | sha1sum -c -
  mv "/tmp/${RAPIDS_JAR}" "/databricks/jars/${RAPIDS_JAR}"
fi
