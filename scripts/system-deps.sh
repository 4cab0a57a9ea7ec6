#!/usr/bin/env bash
# Installs the Debian packages Flywheel's demo and tests need, when missing and when we can.
set -euo pipefail
need=()
[ -d /usr/share/datasets/fashion-mnist ] || need+=(dataset-fashion-mnist)
command -v sshd >/dev/null 2>&1 || [ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v dockerd >/dev/null 2>&1 || need+=(docker.io)
[ -x /usr/lib/postgresql/15/bin/postgres ] || need+=(postgresql-15)
command -v java >/dev/null 2>&1 || need+=(openjdk-17-jre-headless)
command -v curl >/dev/null 2>&1 || need+=(curl)  # the quick start and runbooks call it (tests execute them)
# Triton's Python-backend stub (nvidia-pytriton's wheel) links the system's libpython3.11.
[ -e /usr/lib/x86_64-linux-gnu/libpython3.11.so.1.0 ] || need+=(libpython3.11)
# The serving pool's load balancer and the pod spec run of the Kubernetes manifests (podman kube play).
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || need+=(haproxy)
command -v podman >/dev/null 2>&1 || need+=(podman)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ] && ! command -v sudo >/dev/null 2>&1; then
  echo "flywheel: missing system packages: ${need[*]}" >&2
  echo "  install them as root: apt-get install ${need[*]}" >&2
  exit 1
fi
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
echo "flywheel: installing system packages: ${need[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
