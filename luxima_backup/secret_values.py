"""Secrets found by their value, whatever their name: well-known token formats and random-looking strings.

``config_secrets.scrub`` finds most secrets by the *name* they are set under; a token under a
name that says nothing (``GH_PAT``, ``STRIPE``, ``SERVICE_ROLE``) or that says the wrong thing
(``SLACK_WEBHOOK_URL``: a URL, so not secret by name) is found here by what it looks like.
Everything works on bytes and returns spans, so the caller can put a fingerprint exactly where
the secret was and the file keeps its shape.

The engine is detect-secrets (Yelp), used as a library of detectors rather than as a scanner:
its plugins' regular expressions (``denylist``), its JWT validity check, its Shannon entropy
and its UUID / sequence filters. Its scanning API (``detect_secrets.core.scan``) does not fit
a redactor, and was tried and left for these reasons:
  * it reports a line number and a value, never where in the line: a redactor needs the span.
    And the value is not always the secret: for a plugin regex with a group it is the group
    (GitHub's ``(ghp|gho|...)_...`` reports ``ghp``), a JWT is reported without its signature
    (the pattern ends lazily), a Stripe key is cut after 24 characters (newer keys are longer);
  * ``scan_file`` reads a file by name and decodes it as UTF-8, silently skipping any file that
    does not decode: it fails open, and our real files are never written to disk anyway;
  * its settings are process-global (``transient_settings`` swaps them for every thread, and
    our stages run in threads), and a plugin's ``verify``, when a setting enables it, sends the
    candidate secret to Slack, Stripe or AWS to try it;
  * its entropy plugins look only at quoted strings, with limits (4.5 bits per character for
    base64, 3.0 for hex) that no random string under about 24 characters can reach (a string
    of n characters has at most log2(n) bits per character), and that every quoted git commit
    id passes.
So matches are found here with ``finditer`` on the data (decoded as latin-1, one character per
byte, so offsets are byte offsets), and three things are added around each plugin's pattern:
a match that starts inside a longer word is not a token (``AKIA...`` within the base64 of a
certificate); a match is extended over the rest of the token, since several patterns stop at a
fixed length and no tail of a secret may stay in git; and a part of the match that is not
secret stays readable (``https://hooks.slack.com/services/``, Azure's ``AccountKey=``).

Token formats (``TOKEN_FORMATS``; kind, then the detect-secrets plugin or "here"):
  * slack-token ``xox[abposr]-...`` and slack-webhook ``hooks.slack.com/services/T.../B.../...``
    (SlackDetector); github-token ``ghp_``/``gho_``/``ghu_``/``ghs_``/``ghr_`` (GitHubTokenDetector)
    and ``github_pat_`` fine-grained tokens (here); gitlab-token (GitLabTokenDetector);
    aws-access-key-id ``AKIA``/``ASIA``/... and an ``aws...key = "<40>"`` secret (AWSKeyDetector),
    plus an AWS secret access key (40 base64 characters, random) within two lines of a key id
    (here); stripe-key ``sk_live_``/``rk_live_`` (StripeDetector) and ``sk_test_``/``rk_test_``
    (here) -- never the publishable ``pk_`` keys; google-api-key ``AIza...`` (here); jwt
    ``eyJ...eyJ...sig`` checked to decode to JSON (JwtTokenDetector; Supabase's anon and
    service-role keys are JWTs); supabase-secret-key ``sb_secret_`` (here); discord, openai,
    sendgrid, telegram, mailchimp, pypi, square tokens and azure-storage-key (their plugins).
  * Left out of detect-secrets' plugins: KeywordDetector (secrets by name: ``config_secrets``
    knows more syntaxes), IPPublicDetector (an address is no secret), ArtifactoryDetector (its
    ``AP[0-9A-F]...`` pattern matches ordinary upper-case words), TwilioKeyDetector (account
    and key SIDs are identifiers), the keyword-and-value IBM, Cloudant and SoftLayer detectors
    (found by name), BasicAuthDetector and PrivateKeyDetector (``config_secrets`` replaces the
    whole URL password and the whole PEM block; the gate uses PrivateKeyDetector's markers).

Random-looking values (``is_random``) are judged only where the caller knows a value's extent
and that it is a setting (``.env``-style files, Compose ``environment:``; the gate before each
commit: every ``name=value`` / ``name: value``). A value is random when it is one token of the
base64 / hex alphabet (``A-Za-z0-9+/_-``, ``=`` padding; a ``base64:`` prefix is looked through)
and:
  * all hex: at least 32 digits (128 bits) and hex entropy above 3.0 (detect-secrets' own limit,
    with its penalty for all-digit numbers);
  * otherwise: at least 20 characters, not words, and base64 entropy above 3.0. "Not words" is
    detect-secrets' gibberish filter (its ``gibberish`` extra: letter-pair probabilities of RFC
    text) with a limit of 3.3 instead of its 3.7: at 3.7 one random string of 20 characters in
    twenty passes for words; at 3.3 fewer than one in a hundred of any alphabet (lower-case and
    digits, mixed case, base64), one or two in a thousand at 32, while identifiers made of
    words and abbreviations (``APP_ENV_PRODUCTION``, ``europe-west3-docker-pkg``,
    ``ghcr-io-coollabsio-coolify``) score 2.4 to 3.2. Entropy is not what tells them apart: Shannon entropy per character cannot
    exceed log2 of the length, so a 20-character random string scores about 4.0 and
    ``SomeLongClassNameForThing`` 4.0 too; its limit only rules out repetitions (``aaaa...``).
Look-alikes that stay: UUIDs and sequences (detect-secrets' filters); ``sha256:...`` digests
and anything with ``:``, ``.``, ``@`` or blanks (not one token); public key material: base64
that decodes to PEM certificates or public keys, a DER certificate or public key, or an SSH
public key blob; Stripe ``pk_`` and Supabase ``sb_publishable_`` keys. Names are the caller's
to judge (``config_secrets``: a name saying digest, version, public or id keeps its value).
"""

from __future__ import annotations

import base64
import binascii
import bisect
import functools
import importlib.resources
import re
from dataclasses import dataclass
from typing import Callable, Iterator

from detect_secrets.filters.heuristic import is_potential_uuid, is_sequential_string
from detect_secrets.plugins.aws import AWSKeyDetector
from detect_secrets.plugins.azure_storage_key import AzureStorageKeyDetector
from detect_secrets.plugins.discord import DiscordBotTokenDetector
from detect_secrets.plugins.github_token import GitHubTokenDetector
from detect_secrets.plugins.gitlab_token import GitLabTokenDetector
from detect_secrets.plugins.high_entropy_strings import Base64HighEntropyString, HexHighEntropyString
from detect_secrets.plugins.jwt import JwtTokenDetector
from detect_secrets.plugins.mailchimp import MailchimpDetector
from detect_secrets.plugins.openai import OpenAIDetector
from detect_secrets.plugins.private_key import PrivateKeyDetector
from detect_secrets.plugins.pypi_token import PypiTokenDetector
from detect_secrets.plugins.sendgrid import SendGridDetector
from detect_secrets.plugins.slack import SlackDetector
from detect_secrets.plugins.square_oauth import SquareOAuthDetector
from detect_secrets.plugins.stripe import StripeDetector
from detect_secrets.plugins.telegram_token import TelegramBotTokenDetector
from gibberish_detector import serializer
from gibberish_detector.detector import Detector

_WORD_CHAR = re.compile(r"[A-Za-z0-9]")
_TOKEN_TAIL = re.compile(r"[A-Za-z0-9_\-]*")
_JWT_TAIL = re.compile(r"[A-Za-z0-9_\-.+/=]*")  # detect-secrets' JWT pattern ends lazily: the signature is this


@dataclass(frozen=True)
class TokenFormat:
    """One well-known token format: where its patterns come from and which part of a match is secret."""

    kind: str
    name: str  # detect-secrets' secret_type, or ours for the formats it lacks
    patterns: tuple[re.Pattern[str], ...]
    group: int = 0  # the secret is this group of a match
    keep: re.Pattern[str] | None = None  # a leading part of the match that is not secret and stays readable
    tail: re.Pattern[str] | None = _TOKEN_TAIL  # characters the token may go on with past the pattern's end
    valid: Callable[[str], bool] | None = None


def _plugin(kind: str, plugin: type, **kw: object) -> TokenFormat:
    return TokenFormat(kind, plugin.secret_type, tuple(plugin.denylist), **kw)  # type: ignore[attr-defined,arg-type]


def _own(kind: str, name: str, *patterns: str, **kw: object) -> TokenFormat:
    return TokenFormat(kind, name, tuple(re.compile(p) for p in patterns), **kw)  # type: ignore[arg-type]


_AWS_ID, _AWS_SECRET = AWSKeyDetector.denylist

TOKEN_FORMATS: tuple[TokenFormat, ...] = (
    # the Slack webhook before the token: both are SlackDetector's, and the URL keeps its host readable
    TokenFormat("slack-webhook", "Slack Webhook", (SlackDetector.denylist[1],),
                keep=re.compile(r"https://hooks\.slack\.com/services/", re.IGNORECASE)),
    TokenFormat("slack-token", SlackDetector.secret_type, (SlackDetector.denylist[0],)),
    _plugin("github-token", GitHubTokenDetector),
    _own("github-token", "GitHub Fine-Grained Token", r"github_pat_[A-Za-z0-9_]{22,}"),
    _plugin("gitlab-token", GitLabTokenDetector),
    TokenFormat("aws-access-key-id", AWSKeyDetector.secret_type, (_AWS_ID,)),
    TokenFormat("aws-secret-access-key", "AWS Secret Access Key", (_AWS_SECRET,), group=1, tail=None),
    _plugin("stripe-key", StripeDetector),
    _own("stripe-key", "Stripe Test Key", r"[rs]k_test_[0-9a-zA-Z]{24,}"),
    _own("google-api-key", "Google API Key", r"AIza[0-9A-Za-z\-_]{35}"),
    _plugin("jwt", JwtTokenDetector, tail=_JWT_TAIL, valid=JwtTokenDetector.is_formally_valid),
    _own("supabase-secret-key", "Supabase Secret Key", r"sb_secret_[A-Za-z0-9_\-]{20,}"),
    _plugin("discord-token", DiscordBotTokenDetector),
    _plugin("openai-key", OpenAIDetector),
    _plugin("sendgrid-key", SendGridDetector),
    _plugin("telegram-token", TelegramBotTokenDetector),
    _plugin("mailchimp-key", MailchimpDetector),
    _plugin("pypi-token", PypiTokenDetector),
    _plugin("square-token", SquareOAuthDetector),
    _plugin("azure-storage-key", AzureStorageKeyDetector, keep=re.compile(r"AccountKey="), tail=None),
)

# An AWS secret access key has no prefix: 40 base64 characters, found only next to a key id.
_AWS_SECRET_NEARBY = re.compile(r"(?<![A-Za-z0-9+/=])[A-Za-z0-9+/]{40}(?![A-Za-z0-9+/=])")
_AWS_LINES_AROUND = 2

# PrivateKeyDetector's markers (PuTTY, SSH2 and PEM key headers): the gate's last word on key material.
PRIVATE_KEY_MARKERS: tuple[re.Pattern[str], ...] = tuple(PrivateKeyDetector.denylist)


@dataclass(frozen=True)
class Token:
    """A secret found by its format: its span in the data and what it is."""

    start: int
    end: int
    kind: str
    name: str


def find_tokens(data: bytes) -> list[Token]:
    """Every well-known token in ``data`` (non-overlapping, first format first), and AWS secret keys near key ids."""
    text = data.decode("latin-1")  # one character per byte: offsets are byte offsets
    found: list[Token] = []
    starts: list[int] = []  # of the tokens found so far, sorted; they never overlap
    ends: list[int] = []

    def free(start: int, end: int) -> bool:
        i = bisect.bisect_left(starts, end) - 1
        return i < 0 or ends[i] <= start

    def add(start: int, end: int, kind: str, name: str) -> None:
        i = bisect.bisect_left(starts, start)
        starts.insert(i, start)
        ends.insert(i, end)
        found.append(Token(start, end, kind, name))

    for fmt in TOKEN_FORMATS:
        for pattern in fmt.patterns:
            for m in pattern.finditer(text):
                span = _token_span(text, m, fmt)
                if span is not None and free(*span):
                    add(*span, fmt.kind, fmt.name)
    for tok in [t for t in found if t.kind == "aws-access-key-id"]:
        lo, hi = _lines_around(text, tok.start, _AWS_LINES_AROUND)
        for m in _AWS_SECRET_NEARBY.finditer(text, lo, hi):
            if free(*m.span()) and _random_base64(m.group()):
                add(*m.span(), "aws-secret-access-key", "AWS Secret Access Key")
    return sorted(found, key=lambda t: t.start)


def _token_span(text: str, m: re.Match[str], fmt: TokenFormat) -> tuple[int, int] | None:
    start, end = m.span(fmt.group)
    if start < 0:
        return None
    if fmt.group == 0 and start > 0 and _WORD_CHAR.match(text, start) and _WORD_CHAR.match(text, start - 1):
        return None  # starts inside a longer word: a look-alike within base64, not a token
    if fmt.keep is not None and (k := fmt.keep.match(text, start, end)) is not None:
        start = k.end()
    if fmt.tail is not None:
        end = fmt.tail.match(text, end).end()
    if fmt.valid is not None and not fmt.valid(text[m.start(fmt.group):end]):
        return None
    return (start, end) if start < end else None


def _lines_around(text: str, pos: int, n: int) -> tuple[int, int]:
    lo = pos
    for _ in range(n + 1):
        lo = text.rfind("\n", 0, lo)
        if lo < 0:
            lo = 0
            break
    hi = pos
    for _ in range(n + 1):
        hi = text.find("\n", hi + 1)
        if hi < 0:
            hi = len(text)
            break
    return lo, hi


def private_key_markers(data: bytes) -> Iterator[tuple[int, int]]:
    """Spans of detect-secrets' private key markers (``BEGIN RSA PRIVATE KEY``, ``PuTTY-User-Key-File-2``, ...)."""
    text = data.decode("latin-1")
    for pattern in PRIVATE_KEY_MARKERS:
        for m in pattern.finditer(text):
            yield m.span()


# --- random-looking values ---------------------------------------------------------------

_B64 = Base64HighEntropyString()
_HEX = HexHighEntropyString()
HEX_MIN_LENGTH = 32
HEX_LIMIT = _HEX.entropy_limit  # 3.0, detect-secrets' default
MIN_LENGTH = 20
BASE64_LIMIT = 3.0
WORDS_LIMIT = 3.3  # gibberish score (mean -log probability of letter pairs) up to which a string is words
# Words of a setting's name that say its value is a digest or a version, not a secret (the caller looks).
DIGEST_WORDS = frozenset({"SHA", "SHA1", "SHA256", "SHA384", "SHA512", "SHASUM", "MD5", "COMMIT", "REVISION", "REV",
                          "DIGEST", "HASH", "CHECKSUM", "ETAG", "INTEGRITY", "VERSION", "BUILD", "REF"})
_ONE_TOKEN = re.compile(rb"[A-Za-z0-9+/_\-]+={0,3}")
_HEX_RE = re.compile(r"[0-9a-fA-F]+")
_PUBLIC_PREFIXES = ("pk_live_", "pk_test_", "sb_publishable_")
_PUBLIC_PEM = {b"CERTIFICATE", b"TRUSTED CERTIFICATE", b"PUBLIC KEY", b"X509 CRL"}


def is_random(value: bytes) -> bool:
    """Whether a setting's value looks like a random secret (see the module docstring; names are the caller's)."""
    v = value.strip()
    if v[:7] == b"base64:":
        v = v[7:]
    if not _ONE_TOKEN.fullmatch(v):
        return False
    s = v.decode("ascii")
    core = s.rstrip("=")
    if is_potential_uuid(s) or is_sequential_string(core) or s.startswith(_PUBLIC_PREFIXES):
        return False
    if _HEX_RE.fullmatch(core):
        return len(core) >= HEX_MIN_LENGTH and _HEX.calculate_shannon_entropy(core) > HEX_LIMIT
    return _random_base64(core) and not _public_key_material(s)


def _random_base64(s: str) -> bool:
    return len(s) >= MIN_LENGTH and not _made_of_words(s) and _B64.calculate_shannon_entropy(s) > BASE64_LIMIT


@functools.lru_cache(maxsize=1)
def _gibberish() -> Detector:
    """detect-secrets' gibberish model (letter pairs of RFC text), as its ``gibberish`` filter loads it."""
    text = importlib.resources.files("detect_secrets.filters.gibberish").joinpath("rfc.model").read_text()
    return Detector(serializer.deserialize(text), WORDS_LIMIT)


def _made_of_words(s: str) -> bool:
    return not _gibberish().is_gibberish(s.lower())  # the model knows lower-case letters only, as in detect-secrets


def _public_key_material(s: str) -> bool:
    """Base64 of a certificate or public key (PEM or DER), or of an SSH public key blob."""
    try:
        raw = base64.b64decode((s.replace("-", "+").replace("_", "/") + "=" * (-len(s) % 4)).encode(), validate=True)
    except (binascii.Error, ValueError):
        return False
    if raw.lstrip().startswith(b"-----BEGIN "):
        return set(re.findall(rb"-----BEGIN ([A-Z0-9 ]+)-----", raw)) <= _PUBLIC_PEM
    if re.match(rb"\x00\x00\x00[\x07-\x30](?:ssh-|ecdsa-sha2-|sk-)", raw):
        return True
    if raw[:1] == b"\x30":  # DER: a SEQUENCE, which a private key is too; only what parses as public stays
        from cryptography import x509
        from cryptography.hazmat.primitives.serialization import load_der_public_key

        for load in (x509.load_der_x509_certificate, load_der_public_key):
            try:
                load(raw)
                return True
            except (ValueError, TypeError):
                continue
    return False
