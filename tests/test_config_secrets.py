"""Config scrubbing on its own: real-looking Coolify, Compose and Nginx files, keys and certificates, odd bytes;
secrets found by their value (token formats, randomness) in a corpus with look-alikes; the gate before a commit."""

from __future__ import annotations

import base64
import datetime
import random
import re
import string

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from luxima_backup.config_secrets import (
    DEFAULT_SECRET_FILES,
    Finding,
    Rules,
    check,
    fingerprint,
    whole_file_placeholder,
    is_secret_name,
    scrub,
)
from luxima_backup.errors import ConfigError
from luxima_backup.secret_values import is_random
from tests import secret_corpus as corpus

KEY = b"operator-held fingerprint key, 32"
OTHER_KEY = b"another operator key of 32 bytes"
RULES = Rules.default()
FP_RE = re.compile(rb"luxima-redacted:hmac-sha256:[0-9a-f]{16}")


def fp(value: bytes | str, key: bytes = KEY) -> bytes:
    return fingerprint(value.encode() if isinstance(value, str) else value, key).encode()


def lines(data: bytes) -> list[bytes]:
    return data.splitlines(keepends=True)


def assert_only_lines_changed(before: bytes, after: bytes, changed: set[int]) -> None:
    """Lines (1-based) outside ``changed`` are byte-identical; those in it differ."""
    old, new = lines(before), lines(after)
    assert len(old) == len(new)
    for n, (a, b) in enumerate(zip(old, new), start=1):
        assert (a != b) == (n in changed), (n, a, b)


def assert_hidden(secrets: list[bytes], out: bytes, findings: list[Finding]) -> None:
    """No secret in the git copy, nor in what is reported about it."""
    for secret in secrets:
        assert secret not in out
        assert not any(secret.decode() in f"{f}" for f in findings)


# --- samples ---------------------------------------------------------------------------

COOLIFY_ENV = b"""\
APP_ID=5f3d1e2c9a8b7d6e
APP_NAME=Coolify
APP_ENV=production
APP_KEY=base64:q5Xm2Tz8kq3Qe0b7H1vR9yN4sL6pW2cA8dF0gJ3hK5M=
APP_URL=https://coolify.example.com
DB_USERNAME=coolify
DB_PASSWORD=Zr8!kq2#Lm9vXw
REDIS_PASSWORD=c0olify-redis-9f8e7d
PUSHER_APP_ID=8a7b6c5d
PUSHER_APP_KEY=f0e1d2c3b4a59687
PUSHER_APP_SECRET=9c8b7a6f5e4d3c2b1a
ROOT_USERNAME=admin
ROOT_USER_EMAIL=admin@example.com
ROOT_USER_PASSWORD="Adm1n pass with spaces" # set by the installer
# DB_PASSWORD=old-db-pass-2023
REGISTRY_URL=ghcr.io
AUTOUPDATE=false
SSH_MUX_ENABLED=true
MAIL_PASSWORD=
"""
COOLIFY_SECRETS = [b"q5Xm2Tz8kq3Qe0b7H1vR9yN4sL6pW2cA8dF0gJ3hK5M=", b"Zr8!kq2#Lm9vXw", b"c0olify-redis-9f8e7d",
                   b"f0e1d2c3b4a59687", b"9c8b7a6f5e4d3c2b1a", b"Adm1n pass with spaces", b"old-db-pass-2023"]

COMPOSE = b"""\
services:
  coolify:
    image: "ghcr.io/coollabsio/coolify:4.0.0"
    environment:
      - APP_ENV=production
      - DB_PASSWORD=Zr8!kq2#Lm9vXw
      - "API_TOKEN=tok-list-quoted-77"
      - DATABASE_URL=postgres://coolify:pg-url-secret-42@postgres:5432/coolify
      - SESSION_LIFETIME=120
      - REDIS_PASSWORD=${REDIS_PASSWORD}
    volumes:
      - /data/coolify/source/.env:/var/www/html/.env
  postgres:
    image: postgres:15-alpine
    environment:
      POSTGRES_USER: coolify
      POSTGRES_PASSWORD: "Zr8!kq2#Lm9vXw"
      POSTGRES_DB: coolify
      PGDATA: /var/lib/postgresql/data/pgdata
  redis:
    image: redis:7-alpine
    command: redis-server --save 20 1 --requirepass redis-cmd-secret-5
    environment:
      REDIS_HOST_PASSWORD: redis-map-secret-6   # used by the healthcheck
      SECRET_KEY_BASE: ${SECRET_KEY_BASE:-fallback-secret-7}
  soketi:
    labels:
      - "traefik.http.middlewares.dash.basicauth.users=admin:$$apr1$$H6uskkkW$$IgXLP6ewTrSuBkTrqE8wj/"
"""
COMPOSE_SECRETS = [b"Zr8!kq2#Lm9vXw", b"tok-list-quoted-77", b"pg-url-secret-42", b"redis-cmd-secret-5",
                   b"redis-map-secret-6", b"fallback-secret-7", b"H6uskkkW", b"IgXLP6ewTrSuBkTrqE8wj"]

NGINX = b"""\
server {
    listen 443 ssl http2;
    server_name app.example.com;
    ssl_certificate /etc/letsencrypt/live/app.example.com/fullchain.pem;
    ssl_certificate_key /etc/letsencrypt/live/app.example.com/privkey.pem;

    location / {
        auth_basic "Restricted";
        auth_basic_user_file /etc/nginx/conf.d/.htpasswd;
        proxy_set_header Authorization "Basic YWRtaW46bmdpbngtc2VjcmV0";
        proxy_set_header X-Api-Key "nginx-api-key-8c1f";
        proxy_set_header Host $host;
        proxy_cache_key $scheme$request_method$host$request_uri;
        proxy_pass http://127.0.0.1:8080;
    }
    location /legacy {
        proxy_set_header Authorization "Bearer nginx-bearer-3e9d";
        proxy_pass http://backend:backend-pass-2b@10.0.0.5:9000;
    }
}
"""
NGINX_SECRETS = [b"YWRtaW46bmdpbngtc2VjcmV0", b"nginx-api-key-8c1f", b"nginx-bearer-3e9d", b"backend-pass-2b"]


def private_key_pem() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())


def openssh_key() -> bytes:
    return ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())


def certificate_pem() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "app.example.com")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=90)).sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)


def pem_body(pem: bytes) -> list[bytes]:
    """The base64 lines of a PEM block: what must not reach git."""
    return [ln for ln in pem.splitlines() if ln and not ln.startswith(b"-----")]


# --- the samples -----------------------------------------------------------------------


def test_coolify_env() -> None:
    out, findings = scrub("coolify/source/.env", COOLIFY_ENV, KEY, RULES)
    assert_hidden(COOLIFY_SECRETS, out, findings)
    assert_only_lines_changed(COOLIFY_ENV, out, {4, 7, 8, 10, 11, 14, 15})
    got = lines(out)
    assert got[3] == b"APP_KEY=" + fp("base64:q5Xm2Tz8kq3Qe0b7H1vR9yN4sL6pW2cA8dF0gJ3hK5M=") + b"\n"
    assert got[6] == b"DB_PASSWORD=" + fp("Zr8!kq2#Lm9vXw") + b"\n"  # a # without a blank before is no comment
    assert got[13] == b'ROOT_USER_PASSWORD="' + fp("Adm1n pass with spaces") + b'" # set by the installer\n'
    assert got[14] == b"# DB_PASSWORD=" + fp("old-db-pass-2023") + b"\n"  # commented out is still a secret
    assert [(f.line, f.kind, f.name) for f in findings] == [
        (4, "env", "APP_KEY"), (7, "env", "DB_PASSWORD"), (8, "env", "REDIS_PASSWORD"), (10, "env", "PUSHER_APP_KEY"),
        (11, "env", "PUSHER_APP_SECRET"), (14, "env", "ROOT_USER_PASSWORD"), (15, "env", "DB_PASSWORD")]
    assert all(f.path == "coolify/source/.env" for f in findings)


def test_docker_compose_list_and_map_forms_and_url() -> None:
    out, findings = scrub("coolify/docker-compose.yml", COMPOSE, KEY, RULES)
    assert_hidden(COMPOSE_SECRETS, out, findings)
    assert_only_lines_changed(COMPOSE, out, {6, 7, 8, 17, 22, 24, 25, 28})
    got = lines(out)
    assert got[5] == b"      - DB_PASSWORD=" + fp("Zr8!kq2#Lm9vXw") + b"\n"
    assert got[6] == b'      - "API_TOKEN=' + fp("tok-list-quoted-77") + b'"\n'
    assert got[7] == b"      - DATABASE_URL=postgres://coolify:" + fp("pg-url-secret-42") + b"@postgres:5432/coolify\n"
    assert got[16] == b'      POSTGRES_PASSWORD: "' + fp("Zr8!kq2#Lm9vXw") + b'"\n'
    assert got[21] == b"    command: redis-server --save 20 1 --requirepass " + fp("redis-cmd-secret-5") + b"\n"
    assert got[23] == b"      REDIS_HOST_PASSWORD: " + fp("redis-map-secret-6") + b"   # used by the healthcheck\n"
    assert got[24] == b"      SECRET_KEY_BASE: " + fp("${SECRET_KEY_BASE:-fallback-secret-7}") + b"\n"  # a default may be a secret
    assert b"REDIS_PASSWORD=${REDIS_PASSWORD}" in out  # a reference is no secret
    assert [(f.line, f.kind, f.name) for f in findings] == [
        (6, "env", "DB_PASSWORD"), (7, "env", "API_TOKEN"), (8, "url-credentials", "postgres://coolify"),
        (17, "yaml", "POSTGRES_PASSWORD"), (22, "flag", "requirepass"), (24, "yaml", "REDIS_HOST_PASSWORD"),
        (25, "yaml", "SECRET_KEY_BASE"), (28, "env", "traefik.http.middlewares.dash.basicauth.users")]


def test_nginx_site() -> None:
    out, findings = scrub("nginx/sites-enabled/app.conf", NGINX, KEY, RULES)
    assert_hidden(NGINX_SECRETS, out, findings)
    assert_only_lines_changed(NGINX, out, {10, 11, 17, 18})
    got = lines(out)
    assert got[9] == b'        proxy_set_header Authorization "Basic ' + fp("YWRtaW46bmdpbngtc2VjcmV0") + b'";\n'
    assert got[16] == b'        proxy_set_header Authorization "Bearer ' + fp("nginx-bearer-3e9d") + b'";\n'
    # A key's path, the htpasswd file's path, nginx variables and proxy_pass are no secrets.
    assert b"ssl_certificate_key /etc/letsencrypt/live/app.example.com/privkey.pem;" in out
    assert [(f.line, f.kind, f.name) for f in findings] == [
        (10, "header", "Authorization"), (11, "nginx", "X-Api-Key"), (17, "header", "Authorization"),
        (18, "url-credentials", "http://backend")]


def test_a_pem_file_with_a_private_key_is_secret_as_a_whole() -> None:
    pem = certificate_pem() + private_key_pem()
    out, findings = scrub("proxy/certs/app.pem", pem, KEY, RULES)
    assert out == (b"# luxima-backup: secret file kept only in the encrypted archive\n"
                   b"# fingerprint: " + fp(pem) + b"\n# size: %d bytes\n" % len(pem))
    assert findings == [Finding("proxy/certs/app.pem", 0, "whole-file", "*.pem")]


def test_a_certificate_only_pem_is_unchanged() -> None:
    pem = certificate_pem() + certificate_pem()
    assert scrub("proxy/certs/fullchain.pem", pem, KEY, RULES) == (pem, [])


def test_a_private_key_inside_another_file_becomes_one_line() -> None:
    cert, key = certificate_pem(), private_key_pem()
    indented = lambda pem: b"".join(b"      " + ln for ln in lines(pem))  # noqa: E731
    data = b"tls:\n  - name: app\n    certificate: |\n" + indented(cert) + b"    key: |\n" + indented(key) + b"  - name: other\n"
    out, findings = scrub("traefik/dynamic/certs.yml", data, KEY, RULES)
    block = indented(key).strip()
    assert out == (b"tls:\n  - name: app\n    certificate: |\n" + indented(cert) + b"    key: |\n"
                   b"      " + fp(block) + b" -----EC PRIVATE KEY kept only in the encrypted archive-----\n  - name: other\n")
    assert not any(ln in out for ln in pem_body(key))
    assert findings == [Finding("traefik/dynamic/certs.yml", 4 + len(lines(cert)) + 1, "private-key", "EC PRIVATE KEY")]


def test_a_private_key_without_its_end_line_is_replaced_to_the_end() -> None:
    key = openssh_key()
    cut = key[: len(key) // 2]
    out, findings = scrub("notes.txt", b"before\n" + cut, KEY, RULES)
    assert out == b"before\n" + fp(cut) + b" -----OPENSSH PRIVATE KEY kept only in the encrypted archive-----"
    assert [f.kind for f in findings] == ["private-key"]


def test_coolify_ssh_key_without_extension_loses_its_key_material() -> None:
    key = openssh_key()
    out, findings = scrub("coolify/ssh/keys/id.root@host.docker.internal", key, KEY, RULES)
    assert not any(ln in out for ln in pem_body(key))
    assert out == fp(key.rstrip(b"\n")) + b" -----OPENSSH PRIVATE KEY kept only in the encrypted archive-----\n"
    assert findings[0].line == 1


def test_ssh_private_key_file() -> None:
    key = openssh_key()
    out, findings = scrub("root/.ssh/id_ed25519", key, KEY, RULES)
    assert out == (b"# luxima-backup: secret file kept only in the encrypted archive\n"
                   b"# fingerprint: " + fp(key) + b"\n# size: %d bytes\n" % len(key))
    assert findings == [Finding("root/.ssh/id_ed25519", 0, "whole-file", "id_ed25519")]
    public = b"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGx0ZXN0a2V5IGZvciBsdXhpbWEgYmFja3Vw root@coolify\n"
    assert scrub("root/.ssh/id_ed25519.pub", public, KEY, RULES) == (public, [])


@pytest.mark.parametrize("path, glob", [
    ("etc/ssl/private/app.key", "*.key"), ("etc/ssl/private/APP.KEY", "*.key"), ("root/.ssh/id_rsa", "id_rsa"),
    ("root/.ssh/id_ecdsa", "id_ecdsa"), ("certs/client.p12", "*.p12"), ("certs/client.pfx", "*.pfx"),
    ("java/trust.jks", "*.jks"), ("java/app.keystore", "*.keystore"), ("nginx/conf.d/.htpasswd", "*.htpasswd"),
    ("etc/nginx/htpasswd", "htpasswd"), ("coolify/proxy/acme.json", "acme.json"), ("root/.pgpass", ".pgpass"),
    ("home/deploy/keys/prod.ppk", "*.ppk"),
])
def test_default_whole_secret_files(path: str, glob: str) -> None:
    assert glob in DEFAULT_SECRET_FILES
    data = b"\x30\x82\x0a\x00 binary keystore \xff" if glob in ("*.p12", "*.pfx", "*.jks", "*.keystore") else (
        b"admin:$apr1$H6uskkkW$IgXLP6ewTrSuBkTrqE8wj/\n" if "htpasswd" in glob else b'{"acme": {"Account": "x"}}\n')
    out, findings = scrub(path, data, KEY, RULES)
    assert out.startswith(b"# luxima-backup: secret file kept only in the encrypted archive\n")
    assert data not in out and fp(data) in out
    assert findings == [Finding(path, 0, "whole-file", glob)]
    assert scrub(path, b"", KEY, RULES) == (b"", [])  # nothing to hide in an empty file


def test_binary_data_is_kept_out_whole() -> None:
    data = b"SQLite format 3\x00\x10\x00\x01\x01" + b"DB_PASSWORD=inside-a-database\n" + bytes(range(256))
    out, findings = scrub("coolify/database.sqlite", data, KEY, RULES)
    assert b"inside-a-database" not in out and out == whole_file_placeholder(data, KEY)
    assert findings == [Finding("coolify/database.sqlite", 0, "binary", "binary data")]
    assert scrub("coolify/database.sqlite", out, KEY, RULES) == (out, [])  # idempotent
    utf16 = "DB_PASSWORD=utf16-secret\n".encode("utf-16")
    assert b"u\x00t\x00f\x001\x006" not in scrub("app/.env", utf16, KEY, RULES)[0]


def test_text_that_is_not_utf8() -> None:
    data = b"# Caf\xe9 du coin\nAPP_NAME=Caf\xe9 Luxima\nDB_PASSWORD=m\xf6t-de-passe-\xe9\xff\nAPP_URL=https://caf\xe9.example\n"
    out, findings = scrub("cafe/.env", data, KEY, RULES)
    assert out == data.replace(b"m\xf6t-de-passe-\xe9\xff", fp(b"m\xf6t-de-passe-\xe9\xff"))
    assert findings == [Finding("cafe/.env", 3, "env", "DB_PASSWORD")]


@pytest.mark.parametrize("data, expected", [
    (b'export API_TOKEN="shell-token-1"\n', b'export API_TOKEN="{}"\n'),
    (b"      - 'DB_PASS=single-list-2'\n", b"      - 'DB_PASS={}'\n"),
    (b"[client]\npassword = ini-secret-3\n", b"[client]\npassword = {}\n"),
    (b'{"auth": "ZG9ja2VyOmh1Yi00", "pin": 1234}\n', b'{"auth": "{}", "pin": 1234}\n'),
    (b'{"tokens": ["tok-5a", "tok-5b"], "n": 1}\n', b'{"tokens": "{}", "n": 1}\n'),
    (b"requirepass redis-conf-6\n", b"requirepass {}\n"),
    (b"curl -H 'Authorization: Bearer curl-token-7' https://api\n", b"curl -H 'Authorization: Bearer {}' https://api\n"),
    (b'OPTS="--api-key=opt-key-8 --verbose"\n', b'OPTS="--api-key={} --verbose"\n'),
    (b"GET /hook?user=a&access_token=query-9&x=1\n", b"GET /hook?user=a&access_token={}&x=1\n"),
    (b"SENTRY_DSN=https://abc10@o1.ingest.sentry.io/2\n", b"SENTRY_DSN={}\n"),
    (b"DB_PASSWORD=crlf-11\r\nAPP_NAME=x\r\n", b"DB_PASSWORD={}\r\nAPP_NAME=x\r\n"),
    (b"clientSecret: camel-12\n", b"clientSecret: {}\n"),
    (b"password: 'it''s-13'\n", b"password: '{}'\n"),
    (b"token: !!str tagged-14\n", b"token: !!str {}\n"),
    (b"redis://:only-password-15@redis:6379/0\n", b"redis://:{}@redis:6379/0\n"),
])
def test_more_forms(data: bytes, expected: bytes) -> None:
    out, findings = scrub("conf", data, KEY, RULES)
    assert len(findings) == 1
    assert FP_RE.sub(b"{}", out) == expected
    assert len(FP_RE.findall(out)) == 1


def test_yaml_block_and_multi_line_values() -> None:
    data = b"smtp:\n  password: |\n    block-line-1\n    block-line-2\n  host: mail\nPASS=\"multi\nline-16\"\nNEXT=1\n"
    out, findings = scrub("conf.yml", data, KEY, RULES)
    assert out == (b"smtp:\n  password: |\n    " + fp(b"block-line-1\n    block-line-2") + b"\n  host: mail\n"
                   b'PASS="' + fp(b"multi\nline-16") + b'"\nNEXT=1\n')
    assert [(f.line, f.name) for f in findings] == [(3, "password"), (6, "PASS")]


@pytest.mark.parametrize("line", [
    b"API_KEY=\n", b"password:\n", b"DB_PASSWORD=${DB_PASSWORD}\n", b"DB_PASSWORD=$DB_PASSWORD\n",
    b"DB_PASSWORD=${DB_PASSWORD:?set it}\n", b"DB_PASSWORD_FILE=/run/secrets/db_password\n",
    b"ssl_certificate_key: /etc/ssl/private/app.key\n", b"tls_key: certs/app.key\n", b"SMTP_AUTH=false\n",
    b"password: null\n", b"token: env:API_TOKEN\n", b"api_key: *shared_key\n", b"secret: '{{ vault_secret }}'\n",
    b"proxy_cache_key $scheme$host$request_uri;\n", b"HostKey /etc/ssh/ssh_host_ed25519_key\n",
    b"PasswordAuthentication no\n", b"AWS_ACCESS_KEY_ID=${AWS_ACCESS_KEY_ID}\n", b"JWT_TTL=3600\n",
    b"AUTH_ENABLED=true\n", b"VAPID_PUBLIC_KEY=BPub1icKey\n", b"proxy_pass http://app:8080;\n",
    b"TOKEN_URL=https://auth.example.com/token\n", b"DATABASE_URL: postgres://app:${POSTGRES_PASSWORD}@db:5432/app\n",
    b'proxy_set_header Authorization "Bearer $jwt";\n', b"JSON_OPTS='{\"password\": \"${DB_PASSWORD}\"}'\n",
    b"  GITHUB_TOKEN: ${{ secrets.GITHUB_TOKEN }}\n",
])
def test_values_that_stay(line: bytes) -> None:
    assert scrub("conf", line, KEY, RULES) == (line, [])


@pytest.mark.parametrize("name", [
    "PASSWORD", "db_password", "MYSQL_ROOT_PASSWD", "DB_PASS", "PGPASSWORD", "SECRET", "APP_SECRET", "GITHUB_TOKEN",
    "accessToken", "API_KEY", "apiKey", "APIKEY", "AWS_SECRET_ACCESS_KEY", "PRIVATE_KEY", "CLIENT_SECRET",
    "clientSecret", "GOOGLE_CREDENTIALS", "AUTH_TOKEN", "BASIC_AUTH", "auth", "SENTRY_DSN", "DATABASE_URL",
    "JWT_SIGNING", "ENCRYPTION_KEY", "APP_KEY", "HASH_SALT", "STRIPE_KEY", "ssl_certificate_key", "Authorization",
    "X-Api-Key", "requirepass", "masterauth", "SSH_PASSPHRASE", "DB_PWD",
])
def test_secret_names(name: str) -> None:
    assert is_secret_name(name)


@pytest.mark.parametrize("name", [
    "APP_NAME", "APP_URL", "APP_ID", "DB_USERNAME", "key", "KEY_FILE", "passwordFile", "DB_PASSWORD_FILE",
    "SECRETS_DIR", "AWS_ACCESS_KEY_ID", "TOKEN_TTL", "JWT_ALGORITHM", "AUTH_ENABLED", "OAuth", "PUBLIC_KEY",
    "proxy_pass", "fastcgi_pass", "proxy_pass_header", "BYPASS", "COMPASS_HEADING", "PORT", "REDIS_URL",
])
def test_names_that_are_not_secret(name: str) -> None:
    assert not is_secret_name(name)


# --- fingerprints, determinism, idempotence ----------------------------------------------


def test_fingerprints_are_keyed_and_equal_for_equal_values() -> None:
    assert re.fullmatch(r"luxima-redacted:hmac-sha256:[0-9a-f]{16}", fingerprint(b"x", KEY))
    assert fingerprint(b"Zr8!kq2#Lm9vXw", KEY) != fingerprint(b"Zr8!kq2#Lm9vXw", OTHER_KEY)
    assert fingerprint(b"Zr8!kq2#Lm9vXw", KEY) != fingerprint(b"Zr8!kq2#Lm9vXx", KEY)
    env, _ = scrub(".env", COOLIFY_ENV, KEY, RULES)
    compose, _ = scrub("docker-compose.yml", COMPOSE, KEY, RULES)
    same = fp("Zr8!kq2#Lm9vXw")
    assert env.count(same) == 1 and compose.count(same) == 2  # the .env, the list and the map form agree
    other, _ = scrub(".env", COOLIFY_ENV, OTHER_KEY, RULES)
    assert other != env and same not in other and fp("Zr8!kq2#Lm9vXw", OTHER_KEY) in other


def test_a_short_key_is_refused() -> None:
    with pytest.raises(ConfigError, match="at least 16 bytes"):
        scrub(".env", COOLIFY_ENV, b"short", RULES)


SAMPLES = [(".env", COOLIFY_ENV), ("docker-compose.yml", COMPOSE), ("app.conf", NGINX),
           ("certs.pem", private_key_pem()), ("id_ed25519", openssh_key()), ("notes.txt", b"x\n" + private_key_pem()),
           ("conf.yml", b"smtp:\n  password: |\n    a\n    b\n{\"pin\": 12}\n"), ("latin.env", b"PASS=\xe9\xff\n")]


@pytest.mark.parametrize("path, data", SAMPLES, ids=[p for p, _ in SAMPLES])
def test_deterministic_and_idempotent(path: str, data: bytes) -> None:
    out, findings = scrub(path, data, KEY, RULES)
    assert findings and out != data
    assert scrub(path, data, KEY, RULES) == (out, findings)
    assert scrub(path, out, KEY, RULES) == (out, [])


def test_scrubbing_goes_on_until_nothing_is_left() -> None:
    # The ${ of this value closes inside a key: once the key is replaced, the value is a word of
    # its own, found by a second pass (whose line is counted in the original data).
    data = (b"a: 1\n-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----\n"
            b"OPTS token=requirepass${ -----BEGIN RSA PRIVATE KEY----- }\n")
    out, findings = scrub("conf", data, KEY, RULES)
    assert b"requirepass" not in out
    assert [(f.line, f.kind) for f in findings] == [(2, "private-key"), (5, "private-key"), (5, "assignment")]
    assert scrub("conf", out, KEY, RULES) == (out, [])


# --- the operator's rules ---------------------------------------------------------------


def test_custom_rules() -> None:
    rules = Rules.default(extra_value_names=[r"^LUXIMA_LICEN[CS]E$"],
                          extra_patterns=[r"sk_live_[0-9A-Za-z]{8,}", r"hooks\.example\.com/services/([A-Za-z0-9/]+)"],
                          extra_secret_files=["*.vault", "*/private/*"])
    data = (b"LUXIMA_LICENSE=lic-abc-123\nnotes: stripe sk_live_abcdEFGH1234 in use\n"
            b"webhook: https://hooks.example.com/services/T000/B000/XXXXsecret\n")
    assert scrub("app/.env", data, KEY, RULES) == (data, [])  # none of it is found without the operator's rules
    out, findings = scrub("app/.env", data, KEY, rules)
    assert out == (b"LUXIMA_LICENSE=" + fp("lic-abc-123") + b"\nnotes: stripe " + fp("sk_live_abcdEFGH1234")
                   + b" in use\nwebhook: https://hooks.example.com/services/" + fp("T000/B000/XXXXsecret") + b"\n")
    assert [(f.line, f.kind, f.name) for f in findings] == [
        (1, "env", "LUXIMA_LICENSE"), (2, "custom", r"sk_live_[0-9A-Za-z]{8,}"),
        (3, "custom", r"hooks\.example\.com/services/([A-Za-z0-9/]+)")]
    assert scrub("app/.env", out, KEY, rules) == (out, [])
    for path, glob in [("ansible/prod.vault", "*.vault"), ("app/private/token.txt", "*/private/*")]:
        out, findings = scrub(path, b"plain text\n", KEY, rules)
        assert findings == [Finding(path, 0, "whole-file", glob)]
    assert scrub("ansible/prod.vault", b"plain text\n", KEY, RULES) == (b"plain text\n", [])


@pytest.mark.parametrize("kwargs, bad", [
    ({"extra_value_names": ["PASSWORD", "(unclosed"]}, "(unclosed"),
    ({"extra_patterns": ["[a-"]}, "[a-"),
])
def test_an_invalid_regex_is_a_config_error_naming_it(kwargs: dict[str, list[str]], bad: str) -> None:
    with pytest.raises(ConfigError) as info:
        Rules.default(**kwargs)
    assert repr(bad) in str(info.value)


def test_allow_patterns_are_checked_like_the_others() -> None:
    from luxima_backup.settings import ConfigSecretRules

    assert ConfigSecretRules(allow=[r"sha384-[A-Za-z0-9+/]{64}"]).allow == [r"sha384-[A-Za-z0-9+/]{64}"]
    with pytest.raises(ValueError, match=r"configs.secrets.allow: '\(x' is not a valid regular expression"):
        ConfigSecretRules(allow=["(x"])


# --- secrets found by their value: the corpus ------------------------------------------------


@pytest.mark.parametrize("sample", corpus.CORPUS, ids=[s.path for s in corpus.CORPUS])
def test_corpus_secrets_are_replaced_and_look_alikes_kept(sample: corpus.Sample) -> None:
    out, findings = scrub(sample.path, sample.data, KEY, RULES)
    for secret in sample.secrets:  # each replaced by its own fingerprint, where it was
        assert secret.encode() not in out and fp(secret) in out, secret
    for secret in sample.absent:
        assert secret.encode() not in out
    assert_hidden([s.encode() for s in [*sample.secrets, *sample.absent]], out, findings)
    for look_alike in sample.kept:  # byte for byte, every line holding one
        held = [ln for ln in lines(sample.data) if look_alike.encode() in ln]
        assert held and all(ln in lines(out) for ln in held), look_alike
    assert [f.kind for f in findings] == sample.kinds
    assert scrub(sample.path, out, KEY, RULES) == (out, [])  # a fixed point
    assert check(sample.path, out, KEY, RULES) == []  # and the gate has nothing to say about it


def test_the_issue_examples_are_replaced_whatever_their_name_and_wherever_they_are() -> None:
    service_role = corpus.SERVICE_JWT
    stripe, pat = corpus.STRIPE_LIVE, corpus.GH_PAT
    env = (f"SLACK_WEBHOOK_URL=https://hooks.slack.com/services/T000/B000/XXXX\nGH_PAT={pat}\n"
           f"STRIPE={stripe}\nSERVICE_ROLE={service_role}\n").encode()
    out, findings = scrub("app/.env", env, KEY, RULES)
    assert out == (b"SLACK_WEBHOOK_URL=https://hooks.slack.com/services/" + fp("T000/B000/XXXX") + b"\nGH_PAT=" + fp(pat)
                   + b"\nSTRIPE=" + fp(stripe) + b"\nSERVICE_ROLE=" + fp(service_role) + b"\n")
    assert [(f.line, f.kind) for f in findings] == [(1, "slack-webhook"), (2, "github-token"), (3, "stripe-key"), (4, "jwt")]
    # in prose, a shell history, a query string: formats need no syntax
    notes = f"curl -d @msg.json https://hooks.slack.com/services/T000/B000/XXXX # pat {pat}, key {stripe}\n".encode()
    out, findings = scrub("root/notes.txt", notes, KEY, RULES)
    assert [f.kind for f in findings] == ["slack-webhook", "github-token", "stripe-key"]
    assert pat.encode() not in out and stripe.encode() not in out and b"XXXX" not in out


@pytest.mark.parametrize("data, kept", [
    # a key id's letters inside a certificate's base64 are not a key id
    (b"MIIBszCCAVmgAwIBAgIUAKIAIOSFODNN7EXAMPLEQzJ0aW5nMAoGCCqGSM49BAMCMCAxHjAcBgNVBAMMFWlkcC5sdXhpbWEu\n", True),
    (b"stripe:\n  publishable: " + corpus.PK_LIVE.encode() + b"\n", True),           # pk_ keys are public
    (b"id: eyJub3QiOiJhIGp3dCJ9\n", True),                                           # one part: no JWT
    (b"claims: eyJhbGciOiJub25lIn0.bm90IGpzb24.c2ln\n", True),                        # payload not JSON
])
def test_token_look_alikes(data: bytes, kept: bool) -> None:
    assert (scrub("conf.yml", data, KEY, RULES) == (data, [])) == kept


def test_a_token_is_replaced_to_its_end() -> None:
    # detect-secrets' patterns stop at a fixed length (Stripe 24, GitHub 36) and a JWT's before its signature
    for token in (corpus.STRIPE_LIVE, corpus.GH_PAT + "extra", corpus.SERVICE_JWT):
        out, findings = scrub("notes.txt", b"x " + token.encode() + b" y\n", KEY, RULES)
        assert out == b"x " + fp(token) + b" y\n", token


def rand(n: int, alphabet: str, rng: random.Random) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


@pytest.mark.parametrize("alphabet", [string.ascii_letters + string.digits, string.ascii_lowercase + string.digits,
                                      string.ascii_uppercase + string.digits, string.ascii_letters + string.digits + "+/"])
def test_random_strings_are_found_at_20_characters_and_more(alphabet: str) -> None:
    rng = random.Random(alphabet)
    for n, at_least in ((20, 0.97), (32, 0.99)):
        found = sum(is_random(rand(n, alphabet, rng).encode()) for _ in range(500))
        assert found >= at_least * 500, (n, found)


@pytest.mark.parametrize("value", [
    "APP_ENV_PRODUCTION_SETTING", "europe-west3-docker-pkg", "ghcr-io-coollabsio-coolify", "SomeLongClassNameForThing",
    "production-eu-west-1-cluster", "postgresql-primary-replica", "laravel_session_cookie_name", "short1Aa",
    corpus.INSTANCE_UUID, corpus.IMAGE_DIGEST, corpus.PK_LIVE, corpus.SB_PUBLISHABLE, corpus.CERT_DER_B64,
    corpus.CERT_PEM_B64, "AAAAC3NzaC1lZDI1NTE5AAAAIGx0ZXN0a2V5IGZvciBsdXhpbWEgYmFja3Vw", "a" * 40,
    "https://db.luxima.id/x", "admin@luxima.id", "v2.4.1-rc.1",
])
def test_values_that_do_not_look_random(value: str) -> None:
    assert not is_random(value.encode())


@pytest.mark.parametrize("value", [
    corpus.SIGNING_SEED, corpus.MEILI_MASTER, corpus.SESSION_SEED, corpus.NPM_PUBLISH, corpus.AWS_SECRET,
    "base64:" + base64.b64encode(bytes(range(7, 39))).decode(), "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
])
def test_values_that_look_random(value: str) -> None:
    assert is_random(value.encode())


def test_randomness_is_judged_in_environments_only_and_names_can_say_otherwise() -> None:
    seed, digest = corpus.SIGNING_SEED, corpus.COMMIT
    env = (f"SEED={seed}\nGIT_COMMIT={digest}\nBUILD_SHA={digest}\nRELEASE={digest}\nAPP_ID={seed}\nVAPID_PUBLIC={seed}\n"
           "PGDATA=/var/lib/postgresql/data/pgdata\nCACHE_DIR=./storage/framework/cache\n")
    out, findings = scrub("srv/app/.env.production", env.encode(), KEY, RULES)
    assert [(f.line, f.kind, f.name) for f in findings] == [(1, "high-entropy", "SEED"), (4, "high-entropy", "RELEASE")]
    # the same settings elsewhere stay (a hash or an id a reader needs); the gate asks about them instead
    conf = f"seed = {seed}\n".encode()
    assert scrub("etc/app/app.ini", conf, KEY, RULES) == (conf, [])
    assert [(f.line, f.kind, f.name) for f in check("etc/app/app.ini", conf, KEY, RULES)] == [(1, "high-entropy", "seed")]
    compose = (f"services:\n  app:\n    labels:\n      - com.example.seed={seed}\n    environment:\n"
               f"      - SEED={seed}\n      OTHER: x\n    command: --seed {seed}\n"
               f"x-common-env: &env\n  SEED: {seed}\n").encode()
    out, findings = scrub("srv/app/compose.yaml", compose, KEY, RULES)
    assert [(f.line, f.kind) for f in findings] == [(6, "high-entropy"), (10, "high-entropy")]
    assert b"com.example.seed=" + seed.encode() in out and b"--seed " + seed.encode() in out
    k8s = f"spec:\n  containers:\n    - name: app\n      env:\n        - name: SEED\n          value: {seed}\n".encode()
    assert [f.line for f in scrub("k8s/app.yaml", k8s, KEY, RULES)[1]] == [6]


# --- the gate ------------------------------------------------------------------------------


def test_the_gate_finds_what_the_scrubber_cannot_know() -> None:
    sample = corpus.GATE_ONLY
    out, findings = scrub(sample.path, sample.data, KEY, RULES)
    assert (out, findings) == (sample.data, [])
    assert [(f.path, f.line, f.kind, f.name) for f in check(sample.path, out, KEY, RULES)] == [
        (sample.path, 3, "high-entropy", "signing")]
    allowed = Rules.default(allow=[re.escape(corpus.GATE_ONLY_SECRET)])  # the operator says it is safe
    assert check(sample.path, out, KEY, allowed) == []


def test_the_gate_fails_an_unscrubbed_tree() -> None:
    for sample in corpus.CORPUS:  # what scrubbing replaces, the gate finds (if scrubbing were skipped)
        scrubbed = {(f.line, f.kind) for f in scrub(sample.path, sample.data, KEY, RULES)[1]}
        assert scrubbed and scrubbed <= {(f.line, f.kind) for f in check(sample.path, sample.data, KEY, RULES)}
    binary = b"SQLite format 3\x00" + b"\x01" * 20
    assert [f.kind for f in check("app/db.sqlite", binary, KEY, RULES)] == ["binary"]
    assert check("app/db.sqlite", whole_file_placeholder(binary, KEY), KEY, RULES) == []


def test_the_gate_knows_private_key_markers_no_pem_rule_replaces() -> None:
    putty = b"PuTTY-User-Key-File-2: ssh-rsa\nEncryption: none\nComment: deploy\nPublic-Lines: 1\nAAAAB3Nza\n"
    out, findings = scrub("home/deploy/notes/prod-key.txt", putty, KEY, RULES)
    assert [(f.line, f.kind) for f in check("home/deploy/notes/prod-key.txt", out, KEY, RULES)] == [(1, "private-key")]
    ssh2 = b"---- BEGIN SSH2 ENCRYPTED PRIVATE KEY ----\nP2/56wAAAi4AAAA3aWYtbW9kbntzaWdu\n---- END SSH2 ENCRYPTED PRIVATE KEY ----\n"
    assert [f.kind for f in check("etc/legacy/key.txt", ssh2, KEY, RULES)] == ["private-key"]


def test_allowed_values_stay_readable_in_scrub_and_gate() -> None:
    rules = Rules.default(allow=[r"AIza[0-9A-Za-z_\-]{35}", r"sha384-[A-Za-z0-9+/]{64}"])
    data = f"MAPS_BROWSER={corpus.GOOGLE_KEY}\nSEED={corpus.SIGNING_SEED}\nAPI_KEY={corpus.GOOGLE_KEY}\n".encode()
    out, findings = scrub("web/.env", data, KEY, rules)
    assert [(f.line, f.kind) for f in findings] == [(2, "high-entropy"), (3, "env")]  # a secret name still counts
    assert out.startswith(f"MAPS_BROWSER={corpus.GOOGLE_KEY}\n".encode())
    assert check("web/.env", out, KEY, rules) == []
