#!/usr/bin/env bash
# A development certificate authority and a SuperLink server certificate, for TLS between
# SuperNodes, the flwr CLI and the SuperLink. For production, use certificates from your own CA.
#
#   scripts/deploy/make_certs.sh HOST[,HOST...] OUT_DIR
#
# HOST is the name or IP address SuperNodes and the flwr CLI use to reach the SuperLink
# (e.g. 10.0.0.5 or superlink.example.org). The certificate always covers 127.0.0.1 and
# localhost as well: the SuperLink's own runtime (flower-superexec, which starts the ServerApp)
# connects to it there. Writes ca.key, ca.crt (give ca.crt to every SuperNode and CLI user),
# server.key, server.csr, server.pem (the SuperLink's). Refuses to overwrite existing files.
set -euo pipefail

if [ $# -ne 2 ] || [ -z "$1" ]; then
    echo "usage: $0 HOST[,HOST...] OUT_DIR   (e.g. $0 10.0.0.5 certs)" >&2
    exit 2
fi
command -v openssl >/dev/null || { echo "openssl not found: apt-get install openssl" >&2; exit 1; }
hosts=$1
out=$2
mkdir -p "$out"
for f in ca.key ca.crt server.key server.csr server.pem; do
    if [ -e "$out/$f" ]; then
        echo "$out/$f exists; remove the old certificates first or choose another folder" >&2
        exit 1
    fi
done

san=""
first=""
for h in ${hosts//,/ } 127.0.0.1 localhost; do
    if [[ $h =~ ^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$ || $h == *:* ]]; then entry="IP:$h"; else entry="DNS:$h"; fi
    [[ ",$san," == *",$entry,"* ]] && continue
    san="${san:+$san,}$entry"
    first=${first:-$h}
done

umask 077  # private keys readable by their owner only
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-384 -nodes -sha384 -days 365 \
    -keyout "$out/ca.key" -out "$out/ca.crt" -subj "/CN=MetaGater development CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    2>/dev/null
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-384 -nodes -sha384 \
    -keyout "$out/server.key" -out "$out/server.csr" -subj "/CN=$first" 2>/dev/null
openssl x509 -req -in "$out/server.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" -CAcreateserial \
    -sha384 -days 365 -out "$out/server.pem" -extfile <(printf '%s\n' \
        "subjectAltName=$san" "basicConstraints=CA:FALSE" \
        "keyUsage=critical,digitalSignature,keyEncipherment" "extendedKeyUsage=serverAuth") \
    2>/dev/null
chmod 644 "$out/ca.crt" "$out/server.pem"
echo "CA certificate:     $out/ca.crt   (copy to every SuperNode and flwr CLI machine)"
echo "server certificate: $out/server.pem, key $out/server.key   ($san)"
