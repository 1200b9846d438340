#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment in .venv with the project and its pinned
# dependencies. torch 2.13.0 goes first, the CPU build unless `--cuda`: a looser requirement with
# no torch installed pulls the newest CUDA build (several GB). `--cuda` installs PyPI's CUDA
# build of torch 2.13.0 (for a machine with an NVIDIA GPU and driver) and checks that torch
# sees the GPU. `--test` adds the test tools and the Fashion-MNIST Debian package that the
# loader tests read.
set -euo pipefail
cd "$(dirname "$0")/.."

with_tests=false
with_cuda=false
for flag in "$@"; do
    case "$flag" in
        --test) with_tests=true ;;
        --cuda) with_cuda=true ;;
        *) echo "usage: $0 [--test] [--cuda]" >&2; exit 2 ;;
    esac
done

python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
if $with_cuda; then
    # PyPI's Linux wheel of torch is the CUDA build; local CPU wheels must not stand in for it.
    PIP_FIND_LINKS= .venv/bin/python -m pip install --quiet --index-url https://pypi.org/simple \
        torch==2.13.0
    .venv/bin/python -c "import torch, sys; ok = torch.cuda.is_available(); \
print(f'torch {torch.__version__}: CUDA available: {ok}'); sys.exit(0 if ok else 1)" \
        || echo "warning: torch does not see a GPU (driver?); runs will use the CPU" >&2
else
    .venv/bin/python -m pip install --quiet torch==2.13.0
fi
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
