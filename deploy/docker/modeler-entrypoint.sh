#!/bin/sh
# Entry point of the modeler image, which plays three roles:
#   python -m modeler ...        the Spark driver (default command)
#   spark-class <Master|Worker>  standalone master / worker (docker-compose)
#   executor                     a Spark executor pod started by the driver on Kubernetes
set -eu

# OpenShift runs containers under an arbitrary UID that has no passwd entry. The JVM's
# Hadoop login resolves the current user by name and fails without one, so add an entry
# (the image leaves /etc/passwd group-writable for GID 0, which such UIDs always have).
if ! whoami >/dev/null 2>&1 && [ -w /etc/passwd ]; then
    echo "streamrec:x:$(id -u):0:streamrec:${HOME:-/app}:/sbin/nologin" >> /etc/passwd
fi

if [ "${1:-}" = "executor" ]; then
    # The Kubernetes scheduler backend describes the executor in SPARK_* variables; the JVM
    # options arrive as SPARK_JAVA_OPT_0..N and must keep their numeric order.
    shift
    java_opts=$(env | grep '^SPARK_JAVA_OPT_' | sort -t_ -k4 -n | sed 's/^[^=]*=//' || true)
    # One option per line, so spaces inside an option survive.
    old_ifs=$IFS
    IFS='
'
    # shellcheck disable=SC2086
    set -- $java_opts
    IFS=$old_ifs
    exec "${JAVA_HOME}/bin/java" "$@" \
        -Xms"${SPARK_EXECUTOR_MEMORY}" -Xmx"${SPARK_EXECUTOR_MEMORY}" \
        -cp "${SPARK_CONF_DIR:-/opt/spark/conf}:${SPARK_HOME}/jars/*" \
        org.apache.spark.scheduler.cluster.k8s.KubernetesExecutorBackend \
        --driver-url "${SPARK_DRIVER_URL}" \
        --executor-id "${SPARK_EXECUTOR_ID}" \
        --cores "${SPARK_EXECUTOR_CORES}" \
        --app-id "${SPARK_APPLICATION_ID}" \
        --hostname "${SPARK_EXECUTOR_POD_IP}" \
        --resourceProfileId "${SPARK_RESOURCE_PROFILE_ID:-0}" \
        --podName "${SPARK_EXECUTOR_POD_NAME}"
fi

exec "$@"
