#!/usr/bin/env bash
# A SuperNode's authentication key pair (ECDSA P-384, the type Flower's node auth expects).
#
#   scripts/deploy/make_node_key.sh NAME OUT_DIR
#
# Writes OUT_DIR/NAME (private: stays on the SuperNode, passed as
# --auth-supernode-private-key) and OUT_DIR/NAME.pub (public: registered with the SuperLink by
# scripts/deploy/register_node.sh). Refuses to overwrite an existing key.
set -euo pipefail

if [ $# -ne 2 ] || [ -z "$1" ]; then
    echo "usage: $0 NAME OUT_DIR   (e.g. $0 site-a keys)" >&2
    exit 2
fi
command -v ssh-keygen >/dev/null || {
    echo "ssh-keygen not found: apt-get install openssh-client" >&2
    exit 1
}
name=$1
out=$2
mkdir -p "$out"
if [ -e "$out/$name" ] || [ -e "$out/$name.pub" ]; then
    echo "$out/$name exists; choose another name or remove the old key" >&2
    exit 1
fi
ssh-keygen -q -t ecdsa -b 384 -N "" -C "$name" -f "$out/$name"
echo "private key: $out/$name   public key: $out/$name.pub"
