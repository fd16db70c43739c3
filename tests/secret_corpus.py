"""Realistic config files with planted secrets of every kind the scrubber knows, and look-alikes that are not secrets.

Shared by the scrubber's unit tests (tests/test_config_secrets.py) and the end-to-end backup (tests/test_configs.py).
Secrets are generated from a fixed seed in the shape real ones have (random where real ones are random, the
length real ones have), so they are realistic and the same every run.
"""

from __future__ import annotations

import base64
import datetime
import json
import random
import string
import uuid
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

_rng = random.Random(20261129)
ALNUM = string.ascii_letters + string.digits
UPPER_DIGITS = string.ascii_uppercase + string.digits


def _rand(n: int, alphabet: str = ALNUM) -> str:
    return "".join(_rng.choice(alphabet) for _ in range(n))


def _hex(n: int) -> str:
    return "".join(_rng.choice("0123456789abcdef") for _ in range(n))


def _bytes(n: int) -> bytes:
    return bytes(_rng.getrandbits(8) for _ in range(n))


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def jwt(payload: dict[str, object]) -> str:
    """An HS256 JWT as Supabase issues them (its signature random here: only its shape matters)."""
    parts = [{"alg": "HS256", "typ": "JWT"}, payload]
    return ".".join(_b64url(json.dumps(p, separators=(",", ":")).encode()) for p in parts) + "." + _b64url(_bytes(32))


def certificate_der() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "idp.luxima.id")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=365)).sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.DER)


# --- secrets, one or more of each kind -------------------------------------------------------

SLACK_WEBHOOK = f"T0{_rand(9, UPPER_DIGITS)}/B0{_rand(9, UPPER_DIGITS)}/{_rand(24)}"  # what follows /services/
SLACK_WEBHOOK_URL = "https://hooks.slack.com/services/" + SLACK_WEBHOOK
SLACK_BOT = f"xoxb-{_rand(12, string.digits)}-{_rand(13, string.digits)}-{_rand(24)}"
SLACK_USER = f"xoxp-{_rand(12, string.digits)}-{_rand(12, string.digits)}-{_rand(13, string.digits)}-{_hex(32)}"
GH_PAT = "ghp_" + _rand(36)
GH_APP = "ghs_" + _rand(36)
GH_FINE = "github_pat_11" + _rand(20, UPPER_DIGITS) + "_" + _rand(59)
AWS_KEY_ID = "AKIA" + _rand(16, UPPER_DIGITS)
AWS_SECRET = _rand(40, ALNUM + "+/")
STRIPE_LIVE = "sk_live_51" + _rand(97)  # today's keys are longer than the 24 characters detect-secrets' pattern has
STRIPE_RESTRICTED = "rk_live_51" + _rand(97)
GOOGLE_KEY = "AIzaSy" + _rand(33, ALNUM + "-_")
SUPABASE_REF = _rand(20, string.ascii_lowercase)
ANON_JWT = jwt({"iss": "supabase", "ref": SUPABASE_REF, "role": "anon", "iat": 1735689600, "exp": 2051222400})
SERVICE_JWT = jwt({"iss": "supabase", "ref": SUPABASE_REF, "role": "service_role", "iat": 1735689600, "exp": 2051222400})
SUPABASE_SECRET = "sb_secret_" + _rand(31, ALNUM + "_-")
BASIC_AUTH = base64.b64encode(b"deploy:" + _rand(20).encode()).decode()
BEARER = _rand(40)
DB_URL_PASSWORD = _rand(24)
APP_KEY = "base64:" + base64.b64encode(_bytes(32)).decode()
DB_PASSWORD = _rand(18) + "!#"
JWT_SECRET = _rand(40)
DASHBOARD_PASSWORD = _rand(16)
PG_PASSWORD = _rand(32)
SIGNING_SEED = _rand(32)                      # random values under names that say nothing: found as random
MEILI_MASTER = _b64url(_bytes(32))
NPM_PUBLISH = "npm_" + _rand(36)
SESSION_SEED = _hex(64)
DEPLOY_SSH_KEY = ed25519.Ed25519PrivateKey.from_private_bytes(_bytes(32)).private_bytes(
    serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()).decode()
DEPLOY_SSH_BODY = [ln for ln in DEPLOY_SSH_KEY.splitlines() if ln and not ln.startswith("-----")]

# --- look-alikes that must stay readable ----------------------------------------------------

INSTANCE_UUID = str(uuid.UUID(int=_rng.getrandbits(128), version=4))
WORKER_UUID = str(uuid.UUID(int=_rng.getrandbits(128), version=4))
IMAGE_DIGEST = "sha256:" + _hex(64)
COMMIT = _hex(40)
ACTION_COMMIT = _hex(40)
CACHE_VERSION = _hex(32)
PK_LIVE = "pk_live_51" + _rand(97)
SB_PUBLISHABLE = "sb_publishable_" + _rand(31, ALNUM + "_-")
CERT_DER_B64 = base64.b64encode(certificate_der()).decode()   # a SAML IdP certificate, one line of base64
CERT_PEM_B64 = base64.b64encode(x509.load_der_x509_certificate(base64.b64decode(CERT_DER_B64)).public_bytes(
    serialization.Encoding.PEM)).decode()
SRI = "sha384-" + base64.b64encode(_bytes(48)).decode()
APP_ID = _hex(16)


@dataclass
class Sample:
    """One config file: where it lives on a host, its bytes, and what scrubbing must do to it."""

    path: str
    text: str
    secrets: list[str]             # each replaced by its own fingerprint, exactly where it was
    kept: list[str]                # look-alikes: every line holding one stays byte for byte
    kinds: list[str]               # the kinds of the findings, in order
    absent: list[str] = field(default_factory=list)  # must be gone too (key material replaced as a block)

    @property
    def data(self) -> bytes:
        return self.text.encode()


NGINX_SITE = Sample("/etc/nginx/sites-available/api.conf", f"""\
# api.luxima.id: the public API and the alerts relay
server {{
    listen 443 ssl http2;
    server_name api.luxima.id;
    ssl_certificate /etc/letsencrypt/live/api.luxima.id/fullchain.pem;
    ssl_certificate_key /etc/letsencrypt/live/api.luxima.id/privkey.pem;
    add_header X-Build-Commit {COMMIT} always;
    add_header X-Instance {INSTANCE_UUID};

    location /alerts/ {{
        proxy_set_header Authorization "Bearer {BEARER}";
        proxy_pass {SLACK_WEBHOOK_URL};
    }}
    location /internal/ {{
        proxy_set_header Authorization "Basic {BASIC_AUTH}";
        proxy_set_header X-Request-Id $request_id;
        proxy_pass http://127.0.0.1:8000;
    }}
    location = /maps.js {{
        return 302 https://maps.googleapis.com/maps/api/js?key={GOOGLE_KEY}&libraries=places;
    }}
}}
""", secrets=[BEARER, SLACK_WEBHOOK, BASIC_AUTH, GOOGLE_KEY], kept=[COMMIT, INSTANCE_UUID, "$request_id", "privkey.pem"],
    kinds=["header", "slack-webhook", "header", "google-api-key"])

COOLIFY_ENV = Sample("/data/coolify/source/.env", f"""\
APP_ID={APP_ID}
APP_NAME=Coolify
APP_ENV=production
APP_KEY={APP_KEY}
APP_URL=https://coolify.luxima.id
DB_USERNAME=coolify
DB_PASSWORD={DB_PASSWORD}
REDIS_HOST=coolify-redis
INSTANCE_UUID={INSTANCE_UUID}
SOURCE_COMMIT={COMMIT}
SLACK_WEBHOOK_URL={SLACK_WEBHOOK_URL}
GH_PAT={GH_PAT}
STRIPE={STRIPE_LIVE}
STRIPE_PK={PK_LIVE}
SIGNING_SEED={SIGNING_SEED}
SAML_IDP_CERT={CERT_DER_B64}
ROOT_USER_EMAIL=admin@luxima.id
AUTOUPDATE=false
""", secrets=[APP_KEY, DB_PASSWORD, SLACK_WEBHOOK, GH_PAT, STRIPE_LIVE, SIGNING_SEED],
    kept=[APP_ID, "APP_ENV=production", INSTANCE_UUID, COMMIT, PK_LIVE, CERT_DER_B64, "admin@luxima.id"],
    kinds=["env", "env", "slack-webhook", "github-token", "stripe-key", "high-entropy"])

COMPOSE = Sample("/srv/apps/search/docker-compose.yml", f"""\
services:
  search:
    image: getmeili/meilisearch@{IMAGE_DIGEST}
    labels:
      - "org.opencontainers.image.revision={COMMIT}"
      - traefik.enable=true
      - "traefik.http.routers.search.rule=Host(`search.luxima.id`)"
    environment:
      - MEILI_ENV=production
      - MEILI_MASTER={MEILI_MASTER}
      - "SLACK_BOT={SLACK_BOT}"
      - MEILI_DB_PATH=/meili_data/data.ms
    volumes:
      - meili-data:/meili_data
  worker:
    image: ghcr.io/luxima/worker:2.4.1
    command: ["rclone", "sync", "--s3-access-key-id", "{AWS_KEY_ID}", "--s3-secret-access-key", "{AWS_SECRET}", "/data", "s3:uploads"]
    environment:
      AWS_REGION: eu-central-1
      UPLOAD_BUCKET: luxima-uploads-production
      SESSION_SEED: {SESSION_SEED}
      CACHE_VERSION: "{CACHE_VERSION}"
      WORKER_ID: {WORKER_UUID}
      DATABASE_URL: postgres://luxima:{DB_URL_PASSWORD}@db:5432/luxima
volumes:
  meili-data:
""", secrets=[MEILI_MASTER, SLACK_BOT, AWS_KEY_ID, AWS_SECRET, SESSION_SEED, DB_URL_PASSWORD],
    kept=[IMAGE_DIGEST, COMMIT, "traefik.enable=true", "MEILI_ENV=production", "luxima-uploads-production", CACHE_VERSION,
          WORKER_UUID],
    kinds=["high-entropy", "slack-token", "aws-access-key-id", "aws-secret-access-key", "high-entropy",
           "url-credentials"])

SUPABASE_ENV = Sample("/srv/supabase/.env", f"""\
############
# Secrets: change them before starting in production
############
POSTGRES_PASSWORD={PG_PASSWORD}
JWT_SECRET={JWT_SECRET}
ANON_KEY={ANON_JWT}
SERVICE_ROLE={SERVICE_JWT}
SB_SERVICE={SUPABASE_SECRET}
SB_CLIENT={SB_PUBLISHABLE}
DASHBOARD_USERNAME=supabase
DASHBOARD_PASSWORD={DASHBOARD_PASSWORD}

############
# Database
############
POSTGRES_HOST=db
POSTGRES_DB=postgres
POSTGRES_PORT=5432
POOLER_TENANT_ID=luxima-production
SITE_URL=https://app.luxima.id
SUPABASE_PUBLIC_URL=https://db.luxima.id
STUDIO_DEFAULT_ORGANIZATION="Luxima Digital"
IMGPROXY_ENABLE_WEBP_DETECTION=true
FUNCTIONS_VERIFY_JWT=false
""", secrets=[PG_PASSWORD, JWT_SECRET, ANON_JWT, SERVICE_JWT, SUPABASE_SECRET, DASHBOARD_PASSWORD],
    kept=[SB_PUBLISHABLE, "DASHBOARD_USERNAME=supabase", "POOLER_TENANT_ID=luxima-production", '"Luxima Digital"',
          "FUNCTIONS_VERIFY_JWT=false"],
    kinds=["env", "env", "env", "jwt", "supabase-secret-key", "env"])

GITHUB_ACTIONS = Sample("/srv/apps/api/.github/workflows/deploy.yml", """\
name: deploy
on:
  push:
    branches: [main]
env:
  REGISTRY: ghcr.io
  IMAGE_NAME: luxima/api
  GH_PAT: {GH_FINE}
  NPM_PUBLISH: {NPM_PUBLISH}
  SLACK_NOTIFY: {SLACK_USER}
  DEPLOY_TOKEN: ${{{{ secrets.DEPLOY_TOKEN }}}}
jobs:
  deploy:
    runs-on: ubuntu-24.04
    steps:
      - uses: actions/checkout@{ACTION_COMMIT}
      - name: Deploy
        run: ./scripts/deploy.sh
        env:
          DEPLOY_SSH: |
{key}          BUILD_SHA: ${{{{ github.sha }}}}
          APP_REVISION: {COMMIT}
""".format(GH_FINE=GH_FINE, NPM_PUBLISH=NPM_PUBLISH, SLACK_USER=SLACK_USER, ACTION_COMMIT=ACTION_COMMIT, COMMIT=COMMIT,
           key="".join("            " + ln + "\n" for ln in DEPLOY_SSH_KEY.splitlines())),
    secrets=[GH_FINE, NPM_PUBLISH, SLACK_USER], absent=DEPLOY_SSH_BODY,
    kept=["${{ secrets.DEPLOY_TOKEN }}", ACTION_COMMIT, "${{ github.sha }}", COMMIT, "IMAGE_NAME: luxima/api"],
    kinds=["github-token", "high-entropy", "slack-token", "private-key"])

APP_CONFIG = Sample("/srv/apps/api/config/production.json", f"""\
{{
  "name": "luxima-api",
  "version": "2.4.1",
  "commit": "{COMMIT}",
  "instanceId": "{INSTANCE_UUID}",
  "database": "postgres://luxima:{DB_URL_PASSWORD}@db.internal:5432/luxima",
  "stripe": {{
    "publishableKey": "{PK_LIVE}",
    "restricted": "{STRIPE_RESTRICTED}"
  }},
  "github": {{"appId": 912345, "installation": "{GH_APP}"}},
  "cdn": {{"integrity": "{SRI}", "caBundle": "{CERT_PEM_B64}"}},
  "features": ["search", "billing"]
}}
""", secrets=[DB_URL_PASSWORD, STRIPE_RESTRICTED, GH_APP],
    kept=[COMMIT, INSTANCE_UUID, PK_LIVE, SRI, CERT_PEM_B64, '"features": ["search", "billing"]'],
    kinds=["url-credentials", "stripe-key", "github-token"])

CORPUS = [NGINX_SITE, COOLIFY_ENV, COMPOSE, SUPABASE_ENV, GITHUB_ACTIONS, APP_CONFIG]
SECRETS = sorted({s for sample in CORPUS for s in [*sample.secrets, *sample.absent]})
LOOK_ALIKES = sorted({k for sample in CORPUS for k in sample.kept})

# What the scrubber cannot know: a random signing seed in an INI file under a name that says nothing (outside an
# environment the scrubber does not judge randomness, so that hashes and ids there stay readable); the gate does.
GATE_ONLY_SECRET = _rand(32)
GATE_ONLY = Sample("/etc/luxima/relay.ini", f"""\
[relay]
listen = 127.0.0.1:9000
signing = {GATE_ONLY_SECRET}
upstream = https://api.luxima.id
""", secrets=[], kept=[GATE_ONLY_SECRET], kinds=[])
