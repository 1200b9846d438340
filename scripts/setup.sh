#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment in .venv with the project and its pinned
# dependencies. torch 2.13.0 (CPU) goes first: a looser requirement with no torch installed pulls
# the newest CUDA build (several GB). `--test` adds the test tools and the Fashion-MNIST Debian
# package that the loader tests read.
set -euo pipefail
cd "$(dirname "$0")/.."

with_tests=false
[ "${1:-}" = "--test" ] && with_tests=true

python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet torch==2.13.0
if $with_tests; then
    .venv/bin/python -m pip install --quiet -e ".[test]"
    # Debian packages the tests read or call: the Fashion-MNIST files, and openssl/ssh-keygen
    # for the deployment tests' certificates and node keys.
    missing=()
    [ -d /usr/share/datasets/fashion-mnist ] || missing+=(dataset-fashion-mnist)
    command -v openssl >/dev/null || missing+=(openssl)
    command -v ssh-keygen >/dev/null || missing+=(openssh-client)
    if [ ${#missing[@]} -gt 0 ]; then
        sudo_cmd=""
        [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
        $sudo_cmd apt-get update -qq
        $sudo_cmd apt-get install -y -qq "${missing[@]}"
    fi
else
    .venv/bin/python -m pip install --quiet -e .
fi
echo "set-up done: .venv ready"
