"""Scrubbing of service configs for the config-backup git repository: secrets become keyed fingerprints.

The config backup commits service configs (Nginx, Coolify's data and ``.env``, Docker Compose
files) to a git repository that is pushed to a remote. The real files go only to the encrypted
archive; the git copy goes through ``scrub`` first.

Why fingerprints rather than deletion: the git history is for reading diffs. A secret value is
replaced by ``luxima-redacted:hmac-sha256:<16 hex>``, so a diff still shows *that* a password
changed (and which one), equal secrets have equal fingerprints wherever they appear, and the
file keeps its shape (quotes, comments, indentation, the other lines byte for byte).

Why keyed: an unkeyed hash of a short password is brute-forced in minutes by anyone who can
read the remote. HMAC-SHA256 under a key the operator holds (at least 16 bytes, never in the
repository) makes a fingerprint useless without that key. 64 bits of it are shown: enough to
tell values apart, not meant to authenticate anything.

What is replaced, on bytes (files need not be UTF-8; nothing decodes them but as latin-1, one
character per byte, for detect-secrets' patterns):
  * a whole file, by a three-line placeholder (fingerprint and size), when its name matches a
    secret-file glob: ``*.key``, ``*.pem`` only when it holds a private key (a certificate is
    public), SSH keys (``id_rsa``, ``id_ed25519``, ...), PuTTY keys (``*.ppk``), keystores
    (``*.p12``, ``*.pfx``, ``*.jks``, ``*.keystore``), htpasswd files, Traefik's ``acme.json``, ``.pgpass``,
    ``.netrc``, ``.git-credentials``, plus the operator's globs. A glob without ``/`` is matched
    against the file's name, one with ``/`` against the whole path; case is ignored. An empty
    file stays empty.
  * a PEM private key block anywhere (``-----BEGIN ... PRIVATE KEY-----`` to its END line, or
    to the end of the data when the END line is missing), by one line:
    ``<fingerprint> -----... PRIVATE KEY kept only in the encrypted archive-----``.
  * the password in a URL's credentials anywhere: ``scheme://user:password@host`` keeps
    ``user`` and the host. (Unescaped ``@`` is not allowed in a password; a URL whose path holds
    an ``@`` after ``host:port`` may lose a little more than needed, never less.)
  * the credential of an ``Authorization: Bearer|Basic|Token ...`` header, the scheme kept.
  * the value of a setting whose *name* is secret, written as: dotenv/shell ``NAME=value``,
    ``export NAME="value"``, commented-out ``# NAME=value``, INI ``name = value``, Compose list
    items ``- NAME=value`` / ``- "NAME=value"``, YAML ``name: value`` (quoted, plain, or a ``|``
    / ``>`` block), JSON ``"name": "value"``, ``name=value`` inside a line (query strings, CLI
    options, systemd ``Environment=``), CLI options ``--name value``, space-separated directives
    (``requirepass x`` in redis.conf, ``secure_link_secret x;``) and Nginx
    ``proxy_set_header``/``add_header``/``fastcgi_param``/``set`` with a secret header or
    variable name. Quotes and syntax stay; only the value changes.
  * a value found by what it is, whatever its name and wherever it is (``secret_values``, on
    detect-secrets' detectors): a well-known token format (Slack tokens and webhooks, GitHub,
    GitLab, AWS key ids and the secret key next to one, Stripe secret keys, Google API keys,
    JWTs such as Supabase's anon and service-role keys, ...), only the secret part (a Slack
    webhook keeps ``https://hooks.slack.com/services/``);
  * a random-looking value (``secret_values.is_random``: 20+ characters of one base64 or hex
    token that is not words) of a setting whose name is not secret, where settings are an
    environment: ``.env``-style files (``.env``, ``.env.*``, ``*.env``, ``/etc/default/*``) and
    YAML under ``environment``/``env``/``args``/``x-...-env`` keys (Compose, GitHub Actions,
    Kubernetes). A name that says the value is a digest or version (SHA, COMMIT, REVISION,
    DIGEST, HASH, ...), public, or what it is about (the plain last words below: ``*_ID``,
    ``*_NAME``, ``*_URL``, ...) keeps it. Elsewhere a random-looking value is as often a hash
    or an id a reader needs: not replaced, but the gate asks (below);
  * matches of the operator's own patterns (group 1, or the whole match without a group).
Values the operator allows (``Rules.allow``, regexes matching the whole value) stay when they
are found by format or randomness only; under a secret name they are replaced all the same.
Binary data (a NUL byte: a database, a keytab, a keystore under another name, UTF-16 text) is
replaced whole, like a secret file (kind ``binary``): there is no text syntax to find a value
in, so the only safe choice is to keep it out of git; the archive has it. Positional secrets (``redis-cli -a pw``, ``["--requirepass", "x"]``)
are not found by name: cover them with patterns.

Secret names (case-insensitive; camelCase and ``-``/``.`` separators count as word breaks):
  * containing PASSWORD, PASSWD, PASSPHRASE, SECRET, TOKEN, API_KEY/APIKEY, ACCESS_KEY,
    PRIVATE_KEY, CREDENTIAL(S), ENCRYPTION_KEY, APP_KEY, AUTHORIZATION, BASICAUTH (Traefik's
    ``basicauth.users`` labels hold htpasswd hashes), REQUIREPASS, MASTERAUTH; DATABASE_URL;
  * with a word PASS, PWD, DSN, SALT or JWT (``DB_PASS``, ``SENTRY_DSN``; not Nginx's
    ``proxy_pass``, ``fastcgi_pass_header`` & co.), unless a word says the value is public
    (PUBLIC, PUB, PUBKEY, PUBLISHABLE);
  * ending in a word KEY after another word (``*_KEY``, ``ssl_certificate_key``), or in AUTH
    (``BASIC_AUTH``, Docker's ``"auth"``), with the same public exception.
  * but not when the last word says the value is about the secret rather than the secret:
    FILE(S), PATH, DIR, URL, URI, HOST, PORT, USER, USERNAME, NAME, ID, ENABLED/ENABLE,
    DISABLED/DISABLE, REQUIRED, TTL, EXPIRY, EXPIRES, EXPIRATION, LIFETIME, TIMEOUT, LENGTH,
    ALGORITHM, ALG, TYPE, METHOD (``DB_PASSWORD_FILE``, ``TOKEN_TTL``, ``AWS_ACCESS_KEY_ID``:
    by name an identifier; an ``AKIA...`` value is replaced by its format all the same, as
    secret scanners flag it, and its fingerprint still shows which key is in use). AUTH in
    another place is not secret (``AUTH_ENABLED``, ``auth_basic "Restricted"``).
Operator name patterns are searched in the name as written, case-insensitive, and win over
the exceptions.

Values that stay under a secret name, because they are not secrets and keep the diff readable:
  * empty values, and ``true``/``false``/``yes``/``no``/``on``/``off``/``null``/``none``/``~``;
  * references: ``${DB_PASSWORD}``, ``$DB_PASSWORD``, ``${X:?message}``, Nginx ``$host$uri``,
    ``{{ template }}``, GitHub Actions' ``${{ secrets.X }}``, a YAML alias ``*name``, this
    project's ``env:``/``file:``/``vault:``/``prefect-secret:`` references, and several of
    them joined by ``:/@.,_-``. A ``$NAME`` counts only in one case (``$DB_PASSWORD``,
    ``$host``): ``$Xy7q`` is more likely a password.
    A reference with a default (``${X:-default}``) is replaced: the default may be a secret;
  * file paths (``/etc/ssl/private/x.key``, ``./certs/x.pem``): a value starting with a
    well-known root (``/etc/``, ``/run/``, ``/var/``, ``/data/``, ...), or with ``~/``, ``./``
    or ``../`` and going on with a directory or a file extension, or ending in a key or
    certificate file extension. Random secrets do not look like these
    (``.`` and ``~`` are not base64 characters).

Scrubbing is deterministic (same data and key, same output) and idempotent: a fingerprint in
the input is never fingerprinted again, nor is a whole-file placeholder, and ``scrub`` repeats
its pass until a pass finds nothing, so its output is a fixed point.

The gate (``check``), before every commit, fails closed: a scrubbed file is scanned once more
with the same rules, widened to what scrubbing leaves for a person to decide: randomness in
every ``name=value`` / ``name: value`` / JSON setting of every file, and detect-secrets'
private key markers (PuTTY, SSH2) that no PEM rule replaces. Anything found keeps the host out
of the commit (``tasks.commit``).
"""

from __future__ import annotations

import bisect
import dataclasses
import fnmatch
import functools
import hashlib
import hmac
import posixpath
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, TypeVar

from . import secret_values
from .errors import ConfigError
from .settings import compile_secret_rule

_T = TypeVar("_T", str, bytes)

FINGERPRINT_PREFIX = "luxima-redacted:hmac-sha256:"
MIN_KEY_BYTES = 16
_MAX_PASSES = 16  # a bound that real data never nears (see scrub)
WHOLE_FILE_HEADER = b"# luxima-backup: secret file kept only in the encrypted archive\n"
DEFAULT_SECRET_FILES: tuple[str, ...] = (
    "*.key", "*.pem", "id_rsa", "id_dsa", "id_ecdsa", "id_ed25519", "*.p12", "*.pfx", "*.jks",
    "*.keystore", "*.ppk", "*.htpasswd", "htpasswd", "acme.json", ".pgpass", ".netrc", ".git-credentials",
)
_NEEDS_PRIVATE_KEY = {"*.pem"}  # a certificate-only PEM is public: only its private key makes it secret

_FINGERPRINT_RE = re.compile(rb"luxima-redacted:hmac-sha256:[0-9a-f]{16}")
_PLACEHOLDER_RE = re.compile(re.escape(WHOLE_FILE_HEADER) + rb"# fingerprint: luxima-redacted:hmac-sha256:[0-9a-f]{16}\n# size: [0-9]+ bytes\n\Z")
_PEM_BEGIN_RE = re.compile(rb"-----BEGIN [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----")

# --- secret names ----------------------------------------------------------------------

_ALWAYS = ("DATABASE_URL",)
_STRONG = (
    "PASSWORD", "PASSWD", "PASSPHRASE", "SECRET", "TOKEN", "API_KEY", "APIKEY", "ACCESS_KEY",
    "ACCESSKEY", "PRIVATE_KEY", "PRIVATEKEY", "CREDENTIAL", "ENCRYPTION_KEY", "APP_KEY",
    "AUTHORIZATION", "BASICAUTH", "BASIC_AUTH", "REQUIREPASS", "MASTERAUTH",
)
_WEAK_WORDS = {"PASS", "PWD", "DSN", "SALT", "JWT"}
_PUBLIC_WORDS = {"PUBLIC", "PUB", "PUBKEY", "PUBLISHABLE"}
_PASS_TO = {"PROXY", "FASTCGI", "UWSGI", "SCGI", "GRPC", "MEMCACHED"}  # nginx's proxy_pass & co. pass requests on
_PLAIN_LAST = {
    "FILE", "FILES", "PATH", "DIR", "URL", "URI", "HOST", "PORT", "USER", "USERNAME", "NAME", "ID",
    "ENABLED", "ENABLE", "DISABLED", "DISABLE", "REQUIRED", "TTL", "EXPIRY", "EXPIRES",
    "EXPIRATION", "LIFETIME", "TIMEOUT", "LENGTH", "ALGORITHM", "ALG", "TYPE", "METHOD",
}


def _words(name: str) -> str:
    """``clientSecret`` -> ``CLIENT_SECRET``, ``X-Api-Key`` -> ``X_API_KEY``, ``APIKey`` -> ``API_KEY``."""
    name = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name)
    name = re.sub(r"([A-Z]{2,})([A-Z][a-z])", r"\1_\2", name)
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").upper()


@functools.lru_cache(maxsize=4096)
def is_secret_name(name: str) -> bool:
    """Whether the built-in rules hold a setting called ``name`` to be secret (see the module docstring)."""
    norm = _words(name)
    words = [w for w in norm.split("_") if w]
    if not words:
        return False
    if any(s in norm for s in _ALWAYS):
        return True
    if words[-1] in _PLAIN_LAST:
        return False
    if any(s in norm for s in _STRONG):
        return True
    if _PUBLIC_WORDS.intersection(words):
        return False
    weak = [w for i, w in enumerate(words) if w in _WEAK_WORDS and not (w == "PASS" and i and words[i - 1] in _PASS_TO)]
    if weak:
        return True
    return words == ["AUTH"] or (len(words) >= 2 and words[-1] in ("KEY", "AUTH"))


# --- values that stay ------------------------------------------------------------------

_TRIVIAL = {b"true", b"false", b"yes", b"no", b"on", b"off", b"null", b"none", b"~"}
_REFERENCE_RE = re.compile(
    rb"\$\{\{[^{}]*\}\}"                                                # GitHub Actions' ${{ secrets.X }}
    rb"|\$\{[A-Za-z_][A-Za-z0-9_]*(?::?\?[^}]*)?\}"                    # ${X}, ${X:?message}; not ${X:-default}
    rb"|\$(?:[A-Z_][A-Z0-9_]*|[a-z_][a-z0-9_]*)(?![A-Za-z0-9_])"     # $DB_PASSWORD, nginx $host: one case,
    rb"|\{\{[^{}]*\}\}"                                               # as a password like $Xy7q seldom is
)
_BETWEEN_REFERENCES_RE = re.compile(rb"[\s:/@.,_\-]*")               # $host:$port, ${USER}@${HOST}
_SECRET_REF_RE = re.compile(rb"(?:env|file|vault|prefect-secret):\S+\Z")
_YAML_ALIAS_RE = re.compile(rb"\*[\w\-]+\Z")
_PATH_RE = re.compile(
    rb"/(?:etc|run|var|usr|opt|srv|home|root|data|certs|ssl|secrets|tmp|app|config|mnt|media)/[\w.\-/@+]*\Z"
    rb"|(?:~|\.{1,2})/[\w.\-@+]*(?:/[\w.\-/@+]*|\.[A-Za-z]{1,10})\Z"  # ~/x alone may be a password; ~/.ssh/x is not
    rb"|[\w.\-/]*\.(?:key|pem|crt|cer|der|p12|pfx|jks|keystore|htpasswd|pub)\Z"
)


def _is_plain_value(value: bytes, yaml_plain: bool = False) -> bool:
    """A value under a secret name that is not itself a secret: empty, a flag, a reference, a path."""
    v = value.strip()
    if not v or v.lower() in _TRIVIAL or _SECRET_REF_RE.match(v) or _PATH_RE.match(v):
        return True
    if yaml_plain and _YAML_ALIAS_RE.match(v):
        return True
    unescaped = v.replace(b"$$", b"X")  # Compose's $$ is a literal $, not a reference
    rest, n = _REFERENCE_RE.subn(b"", unescaped)
    return n > 0 and _BETWEEN_REFERENCES_RE.fullmatch(rest) is not None


# --- the rules -------------------------------------------------------------------------

_NAME = rb"[A-Za-z_][A-Za-z0-9_.\-]*"
_DQ = rb'"(?P<dq>(?:[^"\\]|\\[\s\S])*)"'            # may span lines
_DQ_LINE = rb'"(?P<dq>(?:[^"\\\r\n]|\\.)*)"'
_SQ_LINE = rb"'(?P<sq>[^'\r\n]*)'"
_BRACED = rb"\$\{[^}\r\n]{0,200}\}"  # ${X:?may have blanks}: one word, whatever it holds


def _bare(excluded: bytes) -> bytes:
    """One character of an unquoted word, a ${...} counting as one (and only so: no backtracking to try both)."""
    return rb"(?:" + _BRACED + rb"|\$(?!\{[^}\r\n]{0,200}\})|[^$" + excluded + rb"])"


_EOL = rb"[ \t]*(?:[ \t]\#[^\r\n]*)?(?=\r?\n|\Z)"     # an inline comment needs a blank before its #
_VALUE_GROUPS = ("v", "dq", "sq", "block", "arr", "bare")


@dataclass(frozen=True)
class _Rule:
    """A value after a name: ``head`` finds the name (cheaply), ``full`` continues it with the value."""

    kind: str
    head: re.Pattern[bytes]
    full: re.Pattern[bytes]
    by_name: bool = True       # the value counts only when the name group is a secret name
    quote_bare: bool = False   # a bare replacement is quoted (JSON stays JSON)


def _rule(kind: str, head: bytes, value: bytes, flags: int = 0, **kw: bool) -> _Rule:
    # The value is only matched after the name passed: matching both at once would scan the
    # value of every name in a run like a=a=a=..., quadratic in the line's length.
    flags |= re.MULTILINE | re.VERBOSE
    return _Rule(kind, re.compile(head, flags), re.compile(head + value, flags), **kw)


_PEM_RE = re.compile(
    rb"-----BEGIN (?P<label>[A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?)-----(?:.*?-----END (?P=label)-----|.*)", re.DOTALL
)
_URL_RE = re.compile(rb"(?<![A-Za-z0-9+.\-])(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*)://(?P<user>[^:/?#@\s\"'<>]*):(?P<v>[^@\s\"'<>]{1,1024})@")

# In order: a value found by an earlier rule is not looked at again by a later one, so the
# narrow rules (the password inside a URL, the credential after "Bearer") come first and a
# DATABASE_URL keeps its user and host readable.
_RULES: tuple[_Rule, ...] = (
    _rule("header", rb"(?<![\w-])(?P<name>(?:proxy-)?authorization)",
          rb"""["']?(?:[ \t]*[:=][ \t]*|[ \t]+)["']?(?:bearer|basic|token|bot|apikey|api-key)[ \t]+(?P<v>[^\s"';,]+)""",
          re.IGNORECASE, by_name=False),
    _rule("nginx", rb"""^[ \t]*(?:proxy_set_header|grpc_set_header|add_header|fastcgi_param|uwsgi_param|scgi_param|set)
          [ \t]+(?P<name>\$?[A-Za-z_][\w\-]*)[ \t]+""",
          rb"(?:" + _DQ_LINE + rb"|" + _SQ_LINE + rb"""|(?P<bare>[^\s;"'][^\s;]*))(?:[ \t]+always)?[ \t]*;"""),
    _rule("env", rb"""^[ \t]*(?:\#[ \t]*)?-[ \t]+(?P<q>["'])(?P<name>""" + _NAME + rb")[ \t]*=",
          rb"(?P<v>(?:(?!(?P=q))[^\r\n\\]|\\.)*)(?P=q)"),
    _rule("env", rb"^[ \t]*(?:\#[ \t]*)?(?:-[ \t]+)?(?:export[ \t]+)?(?P<name>" + _NAME + rb")[ \t]*=[ \t]*",
          rb"(?:" + _DQ + _EOL + rb"|" + _SQ_LINE + _EOL + rb"|(?P<bare>[^\r\n]*?)" + _EOL + rb")"),
    _rule("yaml", rb"^(?P<ind>[ \t]*)(?:-[ \t]+)?(?P<name>" + _NAME + rb")[ \t]*:[ \t]+(?:[!&]\S*[ \t]+)*",
          rb"(?:" + _DQ + _EOL + rb"""
            |'(?P<sq>(?:[^']|'')*)'""" + _EOL + rb"""
            |[|>][-+0-9]*[ \t]*(?:\#[^\r\n]*)?\r?\n
             (?P<block>(?:[ \t]*\r?\n)*(?P=ind)[ \t]+\S[^\r\n]*(?:(?:\r?\n[ \t]*)*\r?\n(?P=ind)[ \t]+\S[^\r\n]*)*)
            |(?![|>][-+0-9]*[ \t]*(?:\#[^\r\n]*)?(?:\r?\n|\Z))(?P<bare>[^\s\#][^\r\n]*?)""" + _EOL + rb")"),
    _rule("json", rb"""(?P<kq>["'])(?P<name>""" + _NAME + rb")(?P=kq)[ \t]*:[ \t]*",
          rb"(?:" + _DQ_LINE + rb"""|(?P<arr>\[[^\[\]{}\r\n]*\])
            |(?P<bare>[^\s,}\]\["'{][^\r\n,}\]]*?)(?=[ \t]*(?:[,}\]]|[ \t]\#|\r?\n|\Z)))""", quote_bare=True),
    _rule("assignment", rb"(?<![\w.$\-])-{0,2}(?P<name>" + _NAME + rb")=(?!=)",
          rb"(?:" + _DQ_LINE + rb"|" + _SQ_LINE + rb"|(?P<bare>" + _bare(rb"""\s"'&;,<>)}\]""") + rb"+))"),
    _rule("flag", rb"(?<![\w\-])--?(?P<name>[A-Za-z][\w\-]*)[ \t]+",
          rb"(?:" + _DQ_LINE + rb"|" + _SQ_LINE + rb"|(?P<bare>(?!-)" + _bare(rb"""\s"';&|,\]""") + rb"+))"),
    _rule("directive", rb"^[ \t]*(?P<name>" + _NAME + rb")[ \t]+",
          rb"(?:" + _DQ_LINE + rb"|" + _SQ_LINE + rb"|(?P<bare>(?![\#{\"'])" + _bare(rb"\s;") + rb"""+))
            [ \t]*;?[ \t]*(?:\#[^\r\n]*)?(?=\r?\n|\Z)"""),
)


_ENV_FILE_NAMES = {".env", "env", ".envrc", "environment"}
_YAML_KEY_RE = re.compile(rb"""(?:-[ \t]+)?(?P<key>"[^"\r\n]*"|'[^'\r\n]*'|[^\s\#'"\-:][^\r\n:]*?)[ \t]*:(?:[ \t]|$)""")
_ENV_KEY_RE = re.compile(rb"environment|env|args|x-[\w.\-]*env[\w.\-]*|[\w.\-]*[_\-]env", re.IGNORECASE)


def _environment_lines(data: bytes) -> set[int]:
    """Lines (1-based) of a YAML document that are inside a mapping or list under an environment-like key."""
    inside: set[int] = set()
    stack: list[tuple[int, bytes]] = []  # (indentation, key) of the mappings the line is in
    for n, line in enumerate(data.split(b"\n"), start=1):
        text = line.strip()
        if not text or text.startswith(b"#"):
            continue
        indent = len(line) - len(line.lstrip(b" \t"))
        item = text[:1] == b"-"
        # A list may sit at its key's own indentation (environment:\n- A=b); a key there closes it.
        while stack and (stack[-1][0] > indent or (stack[-1][0] == indent and not item)):
            stack.pop()
        if stack and _ENV_KEY_RE.fullmatch(stack[-1][1]):
            inside.add(n)
        if (m := _YAML_KEY_RE.match(text)) is not None:
            stack.append((indent + m.start("key"), m.group("key").strip(b"\"'")))
    return inside


@dataclass(frozen=True)
class Finding:
    """One replaced secret: where, what kind, under which name or pattern -- never the value."""

    path: str
    line: int  # 1-based line of the original data; 0 for a whole file
    # env, yaml, json, assignment, flag, directive, nginx (by name); header, url-credentials, private-key,
    # whole-file, binary; a token format (secret_values.TOKEN_FORMATS: slack-token, jwt, ...); high-entropy; custom
    kind: str
    name: str  # the setting's name, the token format's, the glob, or the operator's pattern


@dataclass
class Rules:
    """What ``scrub`` replaces: the built-in rules (module docstring) plus the operator's extensions.

    ``name_patterns`` are searched (case-insensitive) in setting names, and a match makes the
    name secret; ``value_patterns`` are searched in the data, group 1 (or the whole match) being
    a secret; ``secret_files`` are globs of files that are secret as a whole; ``allow`` are
    known-safe values: a value found only by its format or randomness that one of them matches
    in full stays. ``gate``: the check before a commit (``for_gate``), which judges randomness in
    every setting of every file, not only in environments.
    """

    name_patterns: list[re.Pattern[str]] = field(default_factory=list)
    value_patterns: list[re.Pattern[bytes]] = field(default_factory=list)
    secret_files: list[str] = field(default_factory=lambda: list(DEFAULT_SECRET_FILES))
    allow: list[re.Pattern[bytes]] = field(default_factory=list)
    gate: bool = False

    @classmethod
    def default(
        cls,
        extra_value_names: Iterable[str] = (),
        extra_patterns: Iterable[str] = (),
        extra_secret_files: Iterable[str] = (),
        allow: Iterable[str] = (),
    ) -> "Rules":
        """The built-in rules and the operator's; an invalid regex raises ``ConfigError`` naming it."""
        return cls(
            name_patterns=[_compile(p, "secret-name", lambda s: compile_secret_rule("names", s)) for p in extra_value_names],
            value_patterns=[_compile(p, "secret-value", lambda s: compile_secret_rule("patterns", s)) for p in extra_patterns],
            secret_files=[*DEFAULT_SECRET_FILES, *extra_secret_files],
            allow=[_compile(p, "allow", lambda s: compile_secret_rule("allow", s)) for p in allow],
        )

    def for_gate(self) -> "Rules":
        """The same rules, as the gate before a commit applies them (see ``check``)."""
        return dataclasses.replace(self, gate=True)

    def allowed(self, value: bytes) -> bool:
        """Whether the operator holds ``value`` to be safe: one of the ``allow`` patterns matches all of it."""
        return any(p.fullmatch(value) for p in self.allow)

    def random_setting(self, name: str, value: bytes) -> bool:
        """Whether the value of a setting whose name is not secret still looks like a random secret.

        A name that says the value is a digest or version, public, or what it is about (``*_ID``,
        ``*_NAME``, ``*_URL``, ...: the words that make a name plain) keeps its value readable.
        """
        words = [w for w in _words(name).split("_") if w]
        if not words or secret_values.DIGEST_WORDS.intersection(words) or _PUBLIC_WORDS.intersection(words) \
                or words[-1] in _PLAIN_LAST or words[-1] in ("IDS", "UUID", "GUID"):
            return False
        return secret_values.is_random(value) and not self.allowed(value.strip())

    def is_secret_name(self, name: str) -> bool:
        """Whether a setting called ``name`` holds a secret, by the built-in rules or the operator's."""
        return is_secret_name(name) or any(p.search(name) for p in self.name_patterns)

    def secret_file(self, path: str, data: bytes) -> str | None:
        """The glob that makes ``path`` a whole-secret file, or None."""
        base = posixpath.basename(path).lower()
        for glob in self.secret_files:
            target = path.lower() if "/" in glob else base
            if fnmatch.fnmatchcase(target, glob.lower()):
                if glob in _NEEDS_PRIVATE_KEY and not _PEM_BEGIN_RE.search(data):
                    continue
                return glob
        return None


def _compile(pattern: str, what: str, compile_: Callable[[str], re.Pattern[_T]]) -> re.Pattern[_T]:
    try:
        return compile_(pattern)
    except (re.error, TypeError, AttributeError) as exc:
        raise ConfigError(
            f"invalid {what} pattern {pattern!r}: {exc}",
            hint="fix or remove it in the config backup's secret rules (Python regular expression syntax)",
        ) from None


# --- scrubbing -------------------------------------------------------------------------


def fingerprint(value: bytes, key: bytes) -> str:
    """``luxima-redacted:hmac-sha256:`` and the first 16 hex digits of HMAC-SHA256(key, value)."""
    _check_key(key)
    return FINGERPRINT_PREFIX + hmac.new(key, value, hashlib.sha256).hexdigest()[:16]


def _check_key(key: bytes) -> None:
    if not isinstance(key, bytes) or len(key) < MIN_KEY_BYTES:
        raise ConfigError(
            f"the config fingerprint key must be at least {MIN_KEY_BYTES} bytes",
            hint="use a random key (e.g. 32 bytes) that is kept out of the git repository",
        )


def whole_file_placeholder(data: bytes, key: bytes) -> bytes:
    """What the git copy of a secret file holds: its fingerprint and size."""
    return WHOLE_FILE_HEADER + b"# fingerprint: %s\n# size: %d bytes\n" % (fingerprint(data, key).encode(), len(data))


class _Spans:
    """Non-overlapping byte ranges already judged: replaced, a fingerprint already, or a value that stays."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []

    def overlaps(self, start: int, end: int) -> bool:
        i = bisect.bisect_left(self._starts, end) - 1
        return i >= 0 and self._ends[i] > start

    def add(self, start: int, end: int) -> None:
        i = bisect.bisect_left(self._starts, start)
        self._starts.insert(i, start)
        self._ends.insert(i, end)


def _whole(path: str, data: bytes, key: bytes, rules: Rules) -> tuple[bytes, list[Finding]] | None:
    """The git copy of a file that is secret as a whole or binary (a placeholder), or None for a text file."""
    _check_key(key)
    glob = rules.secret_file(path, data)
    if glob is not None:
        if not data or _PLACEHOLDER_RE.match(data):
            return data, []
        return whole_file_placeholder(data, key), [Finding(path, 0, "whole-file", glob)]
    if b"\0" in data:  # fail closed: no syntax to find secrets in, so none of it goes to git
        if _PLACEHOLDER_RE.match(data):
            return data, []
        return whole_file_placeholder(data, key), [Finding(path, 0, "binary", "binary data")]
    return None


def scrub(path: str, data: bytes, key: bytes, rules: Rules) -> tuple[bytes, list[Finding]]:
    """The git-safe copy of the file ``path`` holding ``data``, and what was replaced in it."""
    if (whole := _whole(path, data, key, rules)) is not None:
        return whole
    # A fingerprint can change what the text around it looks like to another rule (a name
    # glued to a replaced value, a ${ whose } was inside a key): scrub again until nothing is
    # found, so that the result is a fixed point and scrubbing it again finds nothing. Each pass
    # that finds something turns text that is no fingerprint into fingerprints, so this ends;
    # real files need a second pass only to confirm.
    out, findings, shifts = _Scrub(path, data, key, rules).run()
    maps, more, passes = [shifts], findings, 1
    while more and passes < _MAX_PASSES:
        out, more, shifts = _Scrub(path, out, key, rules).run()
        findings += [dataclasses.replace(f, line=_line_before(f.line, maps)) for f in more]
        maps.append(shifts)
        passes += 1
    return out, sorted(findings, key=lambda f: f.line)


def check(path: str, data: bytes, key: bytes, rules: Rules) -> list[Finding]:
    """What is still secret-looking in a scrubbed file (the gate before a commit); empty when it may be committed.

    The file goes through a pass of ``scrub`` once more, under ``rules.for_gate()``: scrubbed
    output is a fixed point of ``scrub``, so whatever is found now is either what scrubbing
    missed or what only the gate looks at (a random value in a setting outside an environment,
    a private key marker detect-secrets knows and no PEM rule replaces). Lines are the checked
    file's.
    """
    if (whole := _whole(path, data, key, rules)) is not None:
        return whole[1]
    findings = _Scrub(path, data, key, rules.for_gate()).run()[1]  # one pass: what it finds is in this data
    return sorted(findings, key=lambda f: f.line)


def _line_before(line: int, maps: list[list[tuple[int, int]]]) -> int:
    """The line of the original data that ``line`` of the latest pass's input came from."""
    for shifts in reversed(maps):
        i = bisect.bisect_left(shifts, (line, -1))
        line += shifts[i - 1][1] if i else 0
    return line


class _Scrub:
    """One file's scrub: the values found so far, so that no byte is replaced twice."""

    def __init__(self, path: str, data: bytes, key: bytes, rules: Rules):
        self.path, self.data, self.key, self.rules = path, data, key, rules
        self.taken = _Spans()
        self.replacements: list[tuple[int, int, bytes]] = []
        self.findings: list[tuple[int, Finding]] = []
        self.unnamed: list[tuple[int, int, str, bool]] = []  # values of settings whose name is not secret
        self._newlines: list[int] | None = None
        self._env_lines: set[int] | None = None
        base = posixpath.basename(path).lower()
        self.env_file = (base in _ENV_FILE_NAMES or base.startswith(".env.") or base.endswith(".env")
                         or "/etc/default/" in path)
        self.yaml_file = base.endswith((".yml", ".yaml"))

    def run(self) -> tuple[bytes, list[Finding], list[tuple[int, int]]]:
        data = self.data
        for m in _PEM_RE.finditer(data):  # first, and whatever it spans: key material never stays
            # The fingerprint starts where BEGIN was and the line ends in dashes as END did: what
            # ran into the key on either side meets the same text next time (idempotence).
            label = m.group("label")
            self.replace(m.start(), m.end(), self.fp(m.group()) + b" -----" + label + b" kept only in the encrypted archive-----",
                         "private-key", label.decode())
        for m in _FINGERPRINT_RE.finditer(data):  # already scrubbed: idempotence
            if not self.taken.overlaps(*m.span()):
                self.taken.add(*m.span())
        for m in _URL_RE.finditer(data):
            if self.taken.overlaps(*m.span("v")):
                continue
            if _is_plain_value(m.group("v")):  # postgres://app:${DB_PASSWORD}@db: the whole URL stays readable
                self.taken.add(*m.span("v"))
                continue
            name = (m.group("scheme") + b"://" + m.group("user")).decode("utf-8", "backslashreplace")
            self.replace(*m.span("v"), self.fp(m.group("v")), "url-credentials", name)
        for rule in _RULES:
            pos = 0
            while (m := rule.head.search(data, pos)) is not None:
                pos = self.named_value(rule, m)
        # Formats after names: a token within a secret-named value went with the whole value.
        for tok in secret_values.find_tokens(data):
            value = data[tok.start:tok.end]
            if not self.taken.overlaps(tok.start, tok.end) and not self.rules.allowed(value):
                self.replace(tok.start, tok.end, self.fp(value), tok.kind, tok.name)
        for start, end, name, quote in self.unnamed:
            value = data[start:end]
            if not self.taken.overlaps(start, end) and self.rules.random_setting(name, value):
                self.replace(start, end, b'"%s"' % self.fp(value) if quote else self.fp(value), "high-entropy", name)
        if self.rules.gate:  # found, not replaced: a marker has no extent (scrub replaces PEM blocks and *.ppk files)
            for start, end in secret_values.private_key_markers(data):
                if not self.taken.overlaps(start, end):
                    self.taken.add(start, end)
                    self.findings.append((start, Finding(self.path, self.line(start), "private-key",
                                                         data[start:end].decode("latin-1"))))
        for pattern in self.rules.value_patterns:
            g = 1 if pattern.groups else 0
            for m in pattern.finditer(data):
                start, end = m.span(g)
                if start < end and not self.taken.overlaps(start, end):
                    self.replace(start, end, self.fp(data[start:end]), "custom",
                                 pattern.pattern.decode("utf-8", "backslashreplace"))

        # shifts: (line of the output, newlines removed up to it), for replacements of several lines
        out, last, removed, shifts = [], 0, 0, []
        for start, end, new in sorted(self.replacements):
            out += [data[last:start], new]
            last = end
            if lost := data.count(b"\n", start, end):
                removed += lost
                shifts.append((self.line(start) - removed + lost, removed))
        out.append(data[last:])
        return b"".join(out), [f for _, f in sorted(self.findings, key=lambda pf: pf[0])], shifts

    def named_value(self, rule: _Rule, head: re.Match[bytes]) -> int:
        """Replace the value after one name if it is a secret; returns where the search goes on."""
        # Unless the value is replaced, the search goes on right after the name: the value
        # (OPTS="--token=x") may hold a secret of its own.
        resume = head.end("name")
        name = head.group("name").decode("ascii", "backslashreplace")
        secret = not rule.by_name or self.rules.is_secret_name(name.lstrip("$"))
        if not secret and not self.judges_randomness(rule.kind, head.start()):
            return resume
        m = rule.full.match(self.data, head.start())
        if m is None:
            return resume
        group = next(g for g in _VALUE_GROUPS if g in rule.full.groupindex and m.start(g) >= 0)
        start, end = m.span(group)
        if group == "block":
            start = end - len(self.data[start:end].lstrip())
        value = self.data[start:end]
        if not value or self.taken.overlaps(start, end):
            return resume
        if not secret:  # judged once formats are known: a token's kind says more than "random"
            if not _is_plain_value(value, rule.kind == "yaml" and group == "bare"):
                self.unnamed.append((start, end, name, rule.quote_bare and group in ("bare", "arr")))
            return resume
        if _is_plain_value(value, rule.kind == "yaml" and group == "bare"):
            # Judged once: a later rule must not take the same ${DB_PASSWORD} or the text around
            # a kept "Bearer $jwt" for a secret.
            self.taken.add(start, end)
            return resume
        if rule.kind == "yaml" and group == "bare" and value[:1] in b"[{" and value[-1:] not in b"]}":
            return resume  # a flow collection that goes on below: its keys are looked at one by one
        new = self.fp(value)
        if rule.quote_bare and group in ("bare", "arr"):
            new = b'"' + new + b'"'
        self.replace(start, end, new, rule.kind, name)
        return m.end()

    def judges_randomness(self, kind: str, offset: int) -> bool:
        """Whether a setting found by a ``kind`` rule at ``offset`` has its value judged by randomness too.

        Scrubbing does so where settings are an environment: ``.env``-style files, and YAML
        mappings or lists under ``environment``, ``env``, ``args``, ``x-...-env`` (Compose,
        GitHub Actions, Kubernetes). Elsewhere a long random-looking value is as often a hash, a
        verification code or an id that a reader of the diff needs: the gate stops the commit
        and asks the operator instead (a rule to replace it, or ``allow`` to keep it).
        """
        if kind not in ("env", "yaml", "json"):
            return False
        if self.rules.gate:
            return True
        if kind == "env" and self.env_file:
            return True
        if kind == "json" or not self.yaml_file:
            return False
        if self._env_lines is None:
            self._env_lines = _environment_lines(self.data)
        return self.line(offset) in self._env_lines

    def fp(self, value: bytes) -> bytes:
        return fingerprint(value, self.key).encode()

    def replace(self, start: int, end: int, new: bytes, kind: str, name: str) -> None:
        self.taken.add(start, end)
        self.replacements.append((start, end, new))
        self.findings.append((start, Finding(self.path, self.line(start), kind, name)))

    def line(self, offset: int) -> int:
        if self._newlines is None:
            self._newlines = [m.start() for m in re.finditer(b"\n", self.data)]
        return bisect.bisect_left(self._newlines, offset) + 1
