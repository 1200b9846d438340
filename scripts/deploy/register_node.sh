#!/usr/bin/env bash
# Register SuperNode public keys with the SuperLink (needs --enable-supernode-auth there).
# Only registered keys may connect; a SuperNode with any other key is refused.
#
#   scripts/deploy/register_node.sh CONNECTION KEY.pub [KEY.pub ...]
#
# CONNECTION is a SuperLink connection in $FLWR_HOME/config.toml (see add_connection.sh). Each
# node is named after its key file (site-a.pub -> site-a). `flwr supernode list CONNECTION`
# shows the registered nodes and their state.
set -euo pipefail

if [ $# -lt 2 ]; then
    echo "usage: $0 CONNECTION KEY.pub [KEY.pub ...]" >&2
    exit 2
fi
connection=$1
shift
for key in "$@"; do
    [ -f "$key" ] || { echo "no such public key: $key" >&2; exit 1; }
    name=$(basename "$key" .pub)
    flwr supernode register "$key" "$connection" --name "$name"
done
