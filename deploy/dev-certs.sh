#!/usr/bin/env bash
# Makes a development certificate authority and, for every agency in the
# directory, a client certificate naming it; plus one server certificate
# for localhost that the agency services and the tracker present.
#
#   deploy/dev-certs.sh [DIRECTORY] [OUT]
#   (defaults: deploy/local/directory.toml, var/tls)
#
# The agency id travels in the client certificate as the URI subject
# alternative name `urn:refbus:agency:<id>` (and as the common name); the
# services accept a client certificate only from the CA in OUT/ca.pem and
# let its holder act only as that agency. For development only: the keys
# are unencrypted and the CA signs whatever this script asks. A real
# deployment issues these from its own CA, with the same name in the SAN.
set -euo pipefail

directory=${1:-deploy/local/directory.toml}
out=${2:-var/tls}
days=825

mkdir -p "$out/agencies"
umask 077

key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

if [[ ! -s "$out/ca.pem" || ! -s "$out/ca.key" ]]; then
  key "$out/ca.key"
  openssl req -x509 -new -key "$out/ca.key" -sha256 -days "$days" \
    -subj "/O=refbus development/CN=refbus development CA" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out "$out/ca.pem"
fi

# issue NAME SUBJECT-CN SAN EXTENDED-KEY-USAGE
issue() {
  local name=$1 cn=$2 san=$3 eku=$4
  key "$out/$name.key"
  openssl req -new -key "$out/$name.key" -subj "/O=refbus development/CN=$cn" \
    -out "$out/$name.csr"
  openssl x509 -req -in "$out/$name.csr" -CA "$out/ca.pem" -CAkey "$out/ca.key" \
    -CAcreateserial -sha256 -days "$days" -out "$out/$name.pem" \
    -extfile <(printf 'subjectAltName=%s\nextendedKeyUsage=%s\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n' "$san" "$eku") \
    2>/dev/null
  rm -f "$out/$name.csr"
}

issue server localhost "DNS:localhost,IP:127.0.0.1,IP:::1" serverAuth

agencies=$(sed -n 's/^id *= *"\([^"]*\)".*/\1/p' "$directory")
if [[ -z "$agencies" ]]; then
  echo "dev-certs: no agencies found in $directory" >&2
  exit 1
fi
count=0
for id in $agencies; do
  issue "agencies/$id" "$id" "URI:urn:refbus:agency:$id" clientAuth
  count=$((count + 1))
done
rm -f "$out/ca.srl"
echo "dev-certs: CA $out/ca.pem, server certificate $out/server.pem, $count agency certificates in $out/agencies/"
