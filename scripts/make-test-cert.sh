#!/usr/bin/env bash
# Makes a throw-away certificate authority and a coordinator certificate for TLS tests and
# trials: DIR/ca.pem (give it to workers with --tls-ca), DIR/server.pem and
# DIR/server-key.pem (give them to the coordinator with --tls-cert and --tls-key).
# The server certificate is valid for the names in HOSTS (default: localhost and 127.0.0.1)
# for 30 days. Needs the openssl command.
set -euo pipefail

if [ $# -lt 1 ]; then
  echo "usage: $0 DIR [HOSTS]   (HOSTS like DNS:coordinator.example,IP:10.0.0.5)" >&2
  exit 2
fi
dir=$1
hosts=${2:-DNS:localhost,IP:127.0.0.1}
mkdir -p "$dir"
cd "$dir"

openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=fedcompress test CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign" \
  -keyout ca-key.pem -out ca.pem 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj "/CN=fedcompress coordinator" \
  -keyout server-key.pem -out server.csr 2>/dev/null
printf 'basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=%s\n' \
  "$hosts" > server.ext
openssl x509 -req -in server.csr -CA ca.pem -CAkey ca-key.pem -CAcreateserial -days 30 \
  -extfile server.ext -out server.pem 2>/dev/null
rm -f server.csr server.ext ca.srl
echo "wrote $dir/ca.pem, $dir/server.pem and $dir/server-key.pem"
