#!/usr/bin/env bash
# Add a TLS connection to a SuperLink to the flwr CLI's configuration ($FLWR_HOME/config.toml;
# FLWR_HOME defaults to ~/.flwr), so `flwr run . CONNECTION`, `flwr ls` and
# `flwr supernode register` can reach it.
#
#   scripts/deploy/add_connection.sh CONNECTION HOST:PORT CA_CERT
#
# HOST:PORT is the SuperLink's control API (flower-superlink --host/--port, default port 8000),
# not the Fleet API port (9092) the SuperNodes use. CA_CERT is the ca.crt from make_certs.sh.
set -euo pipefail

if [ $# -ne 3 ]; then
    echo "usage: $0 CONNECTION HOST:PORT CA_CERT   (e.g. $0 metagater 10.0.0.5:8000 certs/ca.crt)" >&2
    exit 2
fi
connection=$1
address=$2
[ -f "$3" ] || { echo "no such CA certificate: $3" >&2; exit 1; }
ca=$(cd "$(dirname "$3")" && pwd)/$(basename "$3")  # Flower wants an absolute path
config="${FLWR_HOME:-$HOME/.flwr}/config.toml"
[ -f "$config" ] || flwr config list >/dev/null  # Flower writes its default configuration
if grep -q "^\[superlink\.$connection\]" "$config"; then
    echo "connection '$connection' already exists in $config; edit it there" >&2
    exit 1
fi
printf '\n[superlink.%s]\naddress = "%s"\nroot-certificates = "%s"\n' \
    "$connection" "$address" "$ca" >>"$config"
echo "added connection '$connection' ($address, TLS with $ca) to $config"
