#!/usr/bin/env bash
# Mints an HS256 token for sse-gateway with nothing but bash and openssl, for trying tokens out
# (docs/authorization.md). Production tokens come from your identity provider or backend.
#
#   export SSEGW_JWT_SECRET=$(openssl rand -hex 32)    # the gateway reads the same variable
#   deploy/mint-token.sh --subscribe 'orders.*' --publish orders.eu --ttl 10m
#
# Options (patterns are comma-separated, docs/authorization.md, "Topic patterns"):
#   --subscribe PATTERNS   topics the token may subscribe to
#   --publish PATTERNS     topics the token may publish to over HTTP
#   --ttl DURATION         lifetime: seconds, or with s, m, h or d (default 1h)
#   --sub SUBJECT          the `sub` claim (default: $USER)
#   --aud AUDIENCE         the `aud` claim (for gateways started with --jwt-audience)
#   --iss ISSUER           the `iss` claim (for gateways started with --jwt-issuer)
set -euo pipefail

secret="${SSEGW_JWT_SECRET:?set SSEGW_JWT_SECRET to the secret the gateway verifies with}"
subscribe="" publish="" ttl="1h" sub="${USER:-dev}" aud="" iss=""
while [ $# -gt 0 ]; do
  case "$1" in
    --subscribe) subscribe="$2" ;;
    --publish) publish="$2" ;;
    --ttl) ttl="$2" ;;
    --sub) sub="$2" ;;
    --aud) aud="$2" ;;
    --iss) iss="$2" ;;
    *) echo "mint-token: unknown option $1 (see the comment at the top of $0)" >&2; exit 2 ;;
  esac
  shift 2
done

seconds() {
  case "$1" in
    *[!0-9smhd]* | "" ) echo "mint-token: bad --ttl $1" >&2; exit 2 ;;
    *d) echo $(( ${1%d} * 86400 )) ;;
    *h) echo $(( ${1%h} * 3600 )) ;;
    *m) echo $(( ${1%m} * 60 )) ;;
    *s) echo "${1%s}" ;;
    *) echo "$1" ;;
  esac
}

# A JSON array of strings from a comma-separated list. Patterns use a charset that needs no
# escaping; anything else is refused rather than quoted.
json_list() {
  local out="" item
  IFS=',' read -ra items <<< "$1"
  for item in "${items[@]}"; do
    [ -z "$item" ] && continue
    [[ "$item" =~ ^[A-Za-z0-9._:/@*-]+$ ]] || { echo "mint-token: bad pattern $item" >&2; exit 2; }
    out="${out:+$out,}\"$item\""
  done
  echo "[$out]"
}

b64url() { openssl base64 -A | tr '+/' '-_' | tr -d '='; }

now=$(date +%s)
claims="\"sub\":\"$sub\",\"iat\":$now,\"exp\":$(( now + $(seconds "$ttl") ))"
[ -n "$aud" ] && claims="$claims,\"aud\":\"$aud\""
[ -n "$iss" ] && claims="$claims,\"iss\":\"$iss\""
claims="$claims,\"ssegw\":{\"subscribe\":$(json_list "$subscribe"),\"publish\":$(json_list "$publish")}"

# The secret is on openssl's command line for the moment it runs, where other local users can
# see it: fine for trying things out on your machine, not for a shared host.
header=$(printf '%s' '{"alg":"HS256","typ":"JWT"}' | b64url)
payload=$(printf '{%s}' "$claims" | b64url)
signature=$(printf '%s.%s' "$header" "$payload" \
  | openssl dgst -sha256 -mac HMAC -macopt "key:$secret" -binary | b64url)
echo "$header.$payload.$signature"
