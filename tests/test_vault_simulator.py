"""The Vault simulator answers as Vault 1.17 does, seen through hvac; the same tests run against a real Vault.

With VAULT_ADDR and VAULT_TOKEN set (a root token, or one allowed to mount engines and write
policies, roles and tokens), every server test here runs against that Vault instead of the
simulator, so what the simulator claims is checked against the real thing rather than against
itself. Each test mounts its own Transit and AppRole engines at fresh paths and removes them
after, and uses fresh names under ``secret/`` (a dev server's KV v2 mount). Tests that need the
simulator's clock (token and secret ID expiry) or its outage controls (sealing, injected 503s)
are skipped against a real server, with the reason; with the simulator (CI=true and no real
Vault included) nothing here is skipped.
"""

from __future__ import annotations

import base64
import dataclasses
import os
import time
import uuid
from typing import Any, Iterator

import hvac
import hvac.exceptions
import pytest
import requests

from tests.simulators.vault import _matches, _priority, parse_policy, VaultSimulator

REAL_VAULT = bool(os.environ.get("VAULT_ADDR") and os.environ.get("VAULT_TOKEN"))


@dataclasses.dataclass
class Server:
    url: str
    token: str
    sim: VaultSimulator | None

    def client(self, token: str | None = None) -> hvac.Client:
        return hvac.Client(url=self.url, token=token if token is not None else self.token)

    def simulator(self, why: str) -> VaultSimulator:
        """The simulator, for what only it can do; against a real Vault the test is skipped, saying why."""
        if self.sim is None:
            pytest.skip(f"needs the simulator: {why}")
        return self.sim


@pytest.fixture
def server() -> Iterator[Server]:
    if REAL_VAULT:
        yield Server(os.environ["VAULT_ADDR"], os.environ["VAULT_TOKEN"], None)
        return
    with VaultSimulator() as sim:
        yield Server(sim.url, sim.root_token, sim)
    assert not sim.internal_errors, "the simulator failed inside:\n" + "\n".join(sim.internal_errors)


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def transit(server: Server) -> Iterator[str]:
    """A Transit engine at a fresh mount path."""
    mount = _name("transit-sim")
    root = server.client()
    root.sys.enable_secrets_engine("transit", path=mount)
    yield mount
    root.sys.disable_secrets_engine(mount)


@pytest.fixture
def approle(server: Server) -> Iterator[str]:
    """An AppRole auth method at a fresh mount path."""
    mount = _name("approle-sim")
    root = server.client()
    root.sys.enable_auth_method("approle", path=mount)
    yield mount
    root.sys.disable_auth_method(mount)


@pytest.fixture
def policy(server: Server) -> Iterator[Any]:
    """Writes ACL policies under fresh names (returned), and deletes them after the test."""
    root, names = server.client(), []

    def write(text: str) -> str:
        names.append(_name("sim-policy"))
        root.sys.create_or_update_acl_policy(name=names[-1], policy=text)
        return names[-1]

    yield write
    for name in names:
        root.sys.delete_acl_policy(name)


@pytest.fixture
def kv_path(server: Server) -> Iterator[str]:
    """A fresh path under secret/, with all its versions removed after the test."""
    path = f"luxima-sim/{uuid.uuid4().hex[:8]}/s"
    yield path
    server.client().secrets.kv.v2.delete_metadata_and_all_versions(path=path, mount_point="secret")


def _errors_of(exc: hvac.exceptions.VaultError) -> str:
    return " ".join(exc.errors or [])


# -- the policy language --

def test_policy_parsing_and_globs() -> None:
    rules = parse_policy('''
        # comment
        path "transit/decrypt/+" { capabilities = ["update"] }
        path "secret/data/luxima/*" {
          capabilities = ["read", "list"]
        }
    ''')
    assert rules == [("transit/decrypt/+", {"update"}), ("secret/data/luxima/*", {"read", "list"})]
    assert _matches("transit/decrypt/+", "transit/decrypt/k1")
    assert not _matches("transit/decrypt/+", "transit/decrypt/k1/extra")
    assert _matches("secret/data/luxima/*", "secret/data/luxima/a/b")
    assert not _matches("secret/data/luxima/*", "secret/data/other")
    # Vault's priority between matching patterns: an exact path over globs, a later first wildcard,
    # no trailing glob, fewer "+" segments, then the longer pattern.
    ranked = sorted(["secret/*", "secret/data/*", "secret/+/app", "secret/data/app", "+/data/app"], key=_priority)
    assert ranked == ["+/data/app", "secret/*", "secret/+/app", "secret/data/*", "secret/data/app"]
    with pytest.raises(ValueError):
        parse_policy('path "x" { capabilities = ["fly"] }')
    with pytest.raises(ValueError):
        parse_policy("not a policy")


def test_tokens_see_only_what_their_policies_allow(server: Server, transit: str, policy: Any) -> None:
    root = server.client()
    root.secrets.transit.create_key(name="a", mount_point=transit)
    root.secrets.transit.create_key(name="b", mount_point=transit)
    name = policy(f'path "{transit}/datakey/plaintext/a" {{ capabilities = ["update"] }}')
    token = root.auth.token.create(policies=[name], ttl="1h")["auth"]["client_token"]
    client = server.client(token)
    assert client.auth.token.lookup_self()["data"]["policies"] == sorted(["default", name])
    resp = client.secrets.transit.generate_data_key(name="a", key_type="plaintext", mount_point=transit)
    assert resp["data"]["ciphertext"].startswith("vault:v1:") and len(resp["data"]["plaintext"]) == 44
    with pytest.raises(hvac.exceptions.Forbidden, match="permission denied"):
        client.secrets.transit.generate_data_key(name="b", key_type="plaintext", mount_point=transit)
    with pytest.raises(hvac.exceptions.Forbidden, match="permission denied"):
        client.secrets.transit.decrypt_data(name="a", ciphertext=resp["data"]["ciphertext"], mount_point=transit)
    with pytest.raises(hvac.exceptions.Forbidden) as err:
        server.client("hvs.not-a-token").secrets.transit.read_key(name="a", mount_point=transit)
    assert "permission denied" in _errors_of(err.value) and "invalid token" in _errors_of(err.value)
    anonymous = requests.get(f"{server.url}/v1/{transit}/keys/a", timeout=5)  # hvac would send VAULT_TOKEN
    assert (anonymous.status_code, anonymous.json()) == (400, {"errors": ["missing client token"]})


def test_writes_need_update_unless_vault_checks_existence(server: Server, transit: str, policy: Any, kv_path: str) -> None:
    """Vault's datakey and decrypt are updates: ``create`` alone is denied. Where a backend checks
    existence (Transit encrypt, KV v2 data), a write to something new needs ``create``, to something existing ``update``."""
    root = server.client()
    root.secrets.transit.create_key(name="k", mount_point=transit)
    wrapped = root.secrets.transit.generate_data_key(name="k", key_type="plaintext", mount_point=transit)["data"]

    def client_with(text: str) -> hvac.Client:
        return server.client(root.auth.token.create(policies=[policy(text)], ttl="1h")["auth"]["client_token"])

    create_only = client_with(f'''
        path "{transit}/datakey/plaintext/k" {{ capabilities = ["create"] }}
        path "{transit}/decrypt/k" {{ capabilities = ["create"] }}
        path "{transit}/encrypt/*" {{ capabilities = ["create"] }}
        path "secret/data/{kv_path}" {{ capabilities = ["create", "read"] }}
    ''')
    with pytest.raises(hvac.exceptions.Forbidden, match="permission denied"):
        create_only.secrets.transit.generate_data_key(name="k", key_type="plaintext", mount_point=transit)
    with pytest.raises(hvac.exceptions.Forbidden, match="permission denied"):
        create_only.secrets.transit.decrypt_data(name="k", ciphertext=wrapped["ciphertext"], mount_point=transit)
    with pytest.raises(hvac.exceptions.Forbidden, match="permission denied"):  # k exists: an update
        create_only.secrets.transit.encrypt_data(name="k", plaintext="aGk=", mount_point=transit)
    new = create_only.secrets.transit.encrypt_data(name="fresh", plaintext="aGk=", mount_point=transit)  # upserts the key
    assert new["data"]["ciphertext"].startswith("vault:v1:")
    create_only.secrets.kv.v2.create_or_update_secret(path=kv_path, secret={"v": "1"}, mount_point="secret")
    with pytest.raises(hvac.exceptions.Forbidden, match="permission denied"):  # the secret exists now: an update
        create_only.secrets.kv.v2.create_or_update_secret(path=kv_path, secret={"v": "2"}, mount_point="secret")

    update_only = client_with(f'''
        path "{transit}/datakey/plaintext/k" {{ capabilities = ["update"] }}
        path "{transit}/decrypt/k" {{ capabilities = ["update"] }}
        path "{transit}/encrypt/*" {{ capabilities = ["update"] }}
    ''')
    assert update_only.secrets.transit.generate_data_key(name="k", key_type="plaintext", mount_point=transit)["data"]["plaintext"]
    assert update_only.secrets.transit.decrypt_data(name="k", ciphertext=wrapped["ciphertext"], mount_point=transit)["data"]["plaintext"] == wrapped["plaintext"]
    with pytest.raises(hvac.exceptions.Forbidden, match="permission denied"):  # a new key would be created
        update_only.secrets.transit.encrypt_data(name="other", plaintext="aGk=", mount_point=transit)


def test_mounts_and_errors_follow_vault(server: Server, transit: str) -> None:
    root = server.client()
    mounts = root.sys.list_mounted_secrets_engines()["data"]
    assert mounts["secret/"]["options"] == {"version": "2"} and mounts[f"{transit}/"]["type"] == "transit"
    with pytest.raises(hvac.exceptions.InvalidPath, match="no handler for route"):  # nothing mounted there
        root.secrets.transit.create_key(name="x", mount_point=_name("nothing"))
    with pytest.raises(hvac.exceptions.InvalidRequest, match="already in use"):
        root.sys.enable_secrets_engine("transit", path=transit)
    with pytest.raises(hvac.exceptions.InvalidRequest, match="encryption key not found"):
        root.secrets.transit.decrypt_data(name="absent", ciphertext="vault:v1:AAAA", mount_point=transit)
    with pytest.raises(hvac.exceptions.InvalidPath) as err:  # a key that does not exist reads as a bare 404
        root.secrets.transit.read_key(name="absent", mount_point=transit)
    assert err.value.errors == []
    with pytest.raises(hvac.exceptions.InvalidRequest, match="failed to parse JSON input"):
        root.adapter.request("POST", f"/v1/{transit}/keys/k", data="{not json")


def test_sealed_vault_and_injected_failures_are_503(server: Server, transit: str) -> None:
    sim = server.simulator("a test cannot seal a shared real Vault or make it answer 503")
    root = server.client()
    root.secrets.transit.create_key(name="k", mount_point=transit)
    sim.seal()
    try:
        with pytest.raises(hvac.exceptions.VaultDown, match="Vault is sealed"):
            root.secrets.transit.read_key(name="k", mount_point=transit)
        assert root.sys.read_health_status(method="GET").status_code == 503
    finally:
        sim.unseal()
    sim.fail_next(1, 503)
    with pytest.raises(hvac.exceptions.VaultDown):
        root.secrets.transit.read_key(name="k", mount_point=transit)
    assert root.secrets.transit.read_key(name="k", mount_point=transit)["data"]["latest_version"] == 1


# -- Transit --

def test_key_description_maps_versions_to_unix_creation_times(server: Server, transit: str) -> None:
    root = server.client()
    root.secrets.transit.create_key(name="k", mount_point=transit)
    root.secrets.transit.rotate_key(name="k", mount_point=transit)
    data = root.secrets.transit.read_key(name="k", mount_point=transit)["data"]
    assert (data["type"], data["latest_version"], data["min_decryption_version"]) == ("aes256-gcm96", 2, 1)
    assert sorted(data["keys"]) == ["1", "2"]
    assert all(type(t) is int and abs(t - time.time()) < 120 for t in data["keys"].values()), data["keys"]
    assert data["deletion_allowed"] is False and data["supports_encryption"] is True


def test_key_names_cannot_contain_a_slash(server: Server, transit: str) -> None:
    """Transit paths take a key name of word characters, '-' and '.': a name with '/' matches no route."""
    root = server.client()
    with pytest.raises(hvac.exceptions.InvalidPath, match="unsupported path"):
        root.secrets.transit.create_key(name="team/key", mount_point=transit)
    with pytest.raises(hvac.exceptions.InvalidPath, match="unsupported path"):
        root.secrets.transit.generate_data_key(name="team/key", key_type="plaintext", mount_point=transit)
    with pytest.raises(hvac.exceptions.InvalidPath, match="unsupported path"):
        root.secrets.transit.decrypt_data(name="team/key", ciphertext="vault:v1:AAAA", mount_point=transit)
    root.secrets.transit.create_key(name="team.key-1_a", mount_point=transit)  # what a name may hold
    with pytest.raises(hvac.exceptions.InvalidRequest, match="Invalid path, must be 'plaintext' or 'wrapped'"):
        root.adapter.post(f"/v1/{transit}/datakey/raw/team.key-1_a", json={})


def test_decrypt_checks_the_ciphertext_as_keysutil_does(server: Server, transit: str) -> None:
    root = server.client()
    root.secrets.transit.create_key(name="k", mount_point=transit)
    made = root.secrets.transit.generate_data_key(name="k", key_type="plaintext", mount_point=transit)["data"]
    body = made["ciphertext"].removeprefix("vault:v1:")

    def decrypt(ciphertext: str) -> str:
        return root.secrets.transit.decrypt_data(name="k", ciphertext=ciphertext, mount_point=transit)["data"]["plaintext"]

    def refused(ciphertext: str) -> str:
        with pytest.raises(hvac.exceptions.InvalidRequest) as err:
            decrypt(ciphertext)
        return _errors_of(err.value)

    assert decrypt("vault:v0:" + body) == made["plaintext"]  # v0 is read as v1: keys once started at zero
    assert refused("vault:v2:" + body) == "invalid ciphertext: version is too new"
    assert refused("v1:" + body) == "invalid ciphertext: no prefix"
    assert refused("vault:v1") == "invalid ciphertext: wrong number of fields"
    assert refused("vault:vX:" + body) == "invalid ciphertext: version number could not be decoded"
    assert refused("vault:v1:@@" + body) == "invalid ciphertext: could not decode base64"
    assert refused("vault:v1:" + base64.b64encode(b"short").decode()) == "invalid ciphertext length"
    blob = bytearray(base64.b64decode(body))
    blob[-1] ^= 1
    assert refused("vault:v1:" + base64.b64encode(bytes(blob)).decode()) == "cipher: message authentication failed"

    root.secrets.transit.rotate_key(name="k", mount_point=transit)
    root.secrets.transit.update_key_configuration(name="k", min_decryption_version=2, mount_point=transit)
    too_old = "ciphertext or signature version is disallowed by policy (too old)"
    assert refused(made["ciphertext"]) == too_old
    assert refused("vault:v0:" + body) == too_old


def test_key_configuration_is_validated(server: Server, transit: str) -> None:
    root = server.client()
    root.secrets.transit.create_key(name="k", mount_point=transit)

    def configure(**fields: Any) -> dict[str, Any]:
        return root.adapter.post(f"/v1/{transit}/keys/k/config", json=fields)

    def refused(**fields: Any) -> str:
        with pytest.raises(hvac.exceptions.InvalidRequest) as err:
            configure(**fields)
        return _errors_of(err.value)

    assert refused(min_decryption_version=3) == "cannot set min decryption version of 3, latest key version is 1"
    assert refused(min_decryption_version=-1) == "min decryption version cannot be negative"
    message = refused(min_decryption_version="two")
    assert message.startswith("Field validation failed") and "min_decryption_version" in message
    assert "forcing minimum to 1" in " ".join(configure(min_decryption_version=0)["warnings"])
    assert root.secrets.transit.read_key(name="k", mount_point=transit)["data"]["min_decryption_version"] == 1
    with pytest.raises(hvac.exceptions.InvalidRequest, match="no existing key named absent could be found"):
        root.adapter.post(f"/v1/{transit}/keys/absent/config", json={"min_decryption_version": 1})
    with pytest.raises(hvac.exceptions.InvalidRequest, match="deletion is not allowed for this key"):
        root.secrets.transit.delete_key(name="k", mount_point=transit)
    configure(deletion_allowed=True)
    root.secrets.transit.delete_key(name="k", mount_point=transit)
    with pytest.raises(hvac.exceptions.InvalidPath):
        root.secrets.transit.read_key(name="k", mount_point=transit)


def test_encrypt_needs_base64_plaintext(server: Server, transit: str) -> None:
    root = server.client()
    with pytest.raises(hvac.exceptions.InvalidRequest, match="illegal base64 data at input byte 3"):
        root.secrets.transit.encrypt_data(name="k", plaintext="not base64!", mount_point=transit)
    with pytest.raises(hvac.exceptions.InvalidRequest, match="missing plaintext to encrypt"):
        root.adapter.post(f"/v1/{transit}/encrypt/k", json={})
    made = root.secrets.transit.encrypt_data(name="k", plaintext=base64.b64encode(b"hello").decode(), mount_point=transit)
    plain = root.secrets.transit.decrypt_data(name="k", ciphertext=made["data"]["ciphertext"], mount_point=transit)
    assert base64.b64decode(plain["data"]["plaintext"]) == b"hello"


# -- tokens --

def test_token_ttl_lookup_and_renewal(server: Server) -> None:
    root = server.client()
    me = root.auth.token.lookup_self()["data"]
    if "root" in me["policies"]:
        assert (me["ttl"], me["expire_time"]) == (0, None)
        with pytest.raises(hvac.exceptions.InvalidRequest, match="lease is not renewable"):
            root.auth.token.renew_self()
    auth = root.auth.token.create(policies=["default"], ttl="1h", explicit_max_ttl="2h")["auth"]
    assert (auth["lease_duration"], auth["renewable"]) == (3600, True)
    client = server.client(auth["client_token"])
    data = client.auth.token.lookup_self()["data"]
    assert data["creation_ttl"] == 3600 and 3590 <= data["ttl"] <= 3600 and data["explicit_max_ttl"] == 7200
    assert isinstance(data["expire_time"], str) and data["renewable"] is True
    renewed = client.auth.token.renew_self(increment="3h")
    assert 7190 <= renewed["auth"]["lease_duration"] <= 7200  # held to the explicit max TTL
    assert any("capped" in w for w in renewed["warnings"] or [])
    fixed = root.auth.token.create(policies=["default"], ttl="1h", renewable=False)["auth"]
    with pytest.raises(hvac.exceptions.InvalidRequest, match="lease is not renewable"):
        server.client(fixed["client_token"]).auth.token.renew_self()


def test_a_token_past_its_ttl_is_gone(server: Server) -> None:
    sim = server.simulator("a real Vault's tokens cannot be aged on demand")
    root = server.client()
    client = server.client(root.auth.token.create(policies=["default"], ttl=60)["auth"]["client_token"])
    sim.advance_clock(50)
    assert client.auth.token.renew_self(increment=60)["auth"]["lease_duration"] == 60
    sim.advance_clock(50)  # 100 s after creation: alive, thanks to the renewal
    assert 9 <= client.auth.token.lookup_self()["data"]["ttl"] <= 10
    sim.advance_clock(11)
    with pytest.raises(hvac.exceptions.Forbidden) as err:
        client.auth.token.lookup_self()
    assert "permission denied" in _errors_of(err.value) and "invalid token" in _errors_of(err.value)
    assert not client.is_authenticated()


# -- AppRole --

def _role(server: Server, mount: str, **settings: Any) -> tuple[str, str]:
    root = server.client()
    name = _name("role")
    root.auth.approle.create_or_update_approle(role_name=name, token_policies=["backup"], mount_point=mount, **settings)
    role_id = root.auth.approle.read_role_id(role_name=name, mount_point=mount)["data"]["role_id"]
    return name, role_id


def test_approle_login_issues_a_token_with_the_role_policies(server: Server, approle: str) -> None:
    root = server.client()
    name, role_id = _role(server, approle, token_ttl="10m", token_max_ttl="20m")
    made = root.auth.approle.generate_secret_id(role_name=name, mount_point=approle)["data"]
    assert (made["secret_id_ttl"], made["secret_id_num_uses"]) == (0, 0)
    client = hvac.Client(url=server.url)
    auth = client.auth.approle.login(role_id=role_id, secret_id=made["secret_id"], mount_point=approle)["auth"]
    assert auth["policies"] == ["backup", "default"] and auth["metadata"] == {"role_name": name}
    assert auth["lease_duration"] == 600 and auth["renewable"] is True
    assert client.is_authenticated()
    renewed = client.auth.token.renew_self(increment="1h")
    assert 1190 <= renewed["auth"]["lease_duration"] <= 1200  # held to token_max_ttl
    with pytest.raises(hvac.exceptions.InvalidRequest, match="invalid role or secret ID"):
        hvac.Client(url=server.url).auth.approle.login(role_id=role_id, secret_id=str(uuid.uuid4()), mount_point=approle)
    with pytest.raises(hvac.exceptions.InvalidRequest, match="invalid role or secret ID"):
        hvac.Client(url=server.url).auth.approle.login(role_id=str(uuid.uuid4()), secret_id=made["secret_id"], mount_point=approle)


def test_a_secret_id_is_used_up_after_its_uses(server: Server, approle: str) -> None:
    root = server.client()
    name, role_id = _role(server, approle, secret_id_num_uses=2)
    secret_id = root.auth.approle.generate_secret_id(role_name=name, mount_point=approle)["data"]["secret_id"]
    hvac.Client(url=server.url).auth.approle.login(role_id=role_id, secret_id=secret_id, mount_point=approle)
    left = root.auth.approle.read_secret_id(role_name=name, secret_id=secret_id, mount_point=approle)
    assert left["data"]["secret_id_num_uses"] == 1
    hvac.Client(url=server.url).auth.approle.login(role_id=role_id, secret_id=secret_id, mount_point=approle)
    with pytest.raises(hvac.exceptions.InvalidRequest, match="invalid role or secret ID"):
        hvac.Client(url=server.url).auth.approle.login(role_id=role_id, secret_id=secret_id, mount_point=approle)


def test_a_secret_id_and_the_tokens_it_gave_expire(server: Server, approle: str) -> None:
    sim = server.simulator("a real Vault's secret IDs and tokens cannot be aged on demand")
    root = server.client()
    name, role_id = _role(server, approle, secret_id_ttl="2m", token_ttl="1m", token_max_ttl="90s")
    made = root.auth.approle.generate_secret_id(role_name=name, mount_point=approle)["data"]
    assert made["secret_id_ttl"] == 120
    client = hvac.Client(url=server.url)
    assert client.auth.approle.login(role_id=role_id, secret_id=made["secret_id"], mount_point=approle)["auth"]["lease_duration"] == 60
    assert client.auth.token.renew_self(increment="1h")["auth"]["lease_duration"] == 90
    sim.advance_clock(91)
    assert not client.is_authenticated()
    client.auth.approle.login(role_id=role_id, secret_id=made["secret_id"], mount_point=approle)  # still within its 2 minutes
    sim.advance_clock(30)
    with pytest.raises(hvac.exceptions.InvalidRequest, match="invalid role or secret ID"):
        client.auth.approle.login(role_id=role_id, secret_id=made["secret_id"], mount_point=approle)
    assert root.adapter.post(f"/v1/auth/{approle}/role/{name}/secret-id/lookup", json={"secret_id": made["secret_id"]}).status_code == 204


# -- KV v2 --

def test_kv_deletes_are_soft_and_reads_say_so(server: Server, kv_path: str) -> None:
    kv = server.client().secrets.kv.v2
    kv.create_or_update_secret(path=kv_path, secret={"key": "one"}, mount_point="secret")
    kv.create_or_update_secret(path=kv_path, secret={"key": "two"}, mount_point="secret")
    kv.delete_latest_version_of_secret(path=kv_path, mount_point="secret")
    with pytest.raises(hvac.exceptions.InvalidPath) as err:
        kv.read_secret_version(path=kv_path, mount_point="secret", raise_on_deleted_version=True)
    deleted = err.value.json["data"]
    assert deleted["data"] is None and deleted["metadata"]["version"] == 2 and deleted["metadata"]["deletion_time"]
    assert not deleted["metadata"]["destroyed"]
    assert kv.read_secret_version(path=kv_path, version=1, mount_point="secret", raise_on_deleted_version=True)["data"]["data"] == {"key": "one"}
    meta = kv.read_secret_metadata(path=kv_path, mount_point="secret")["data"]
    assert meta["current_version"] == 2 and meta["versions"]["2"]["deletion_time"] and meta["versions"]["1"]["deletion_time"] == ""

    kv.undelete_secret_versions(path=kv_path, versions=[2], mount_point="secret")
    assert kv.read_secret_version(path=kv_path, mount_point="secret", raise_on_deleted_version=True)["data"]["data"] == {"key": "two"}
    kv.destroy_secret_versions(path=kv_path, versions=[1], mount_point="secret")
    with pytest.raises(hvac.exceptions.InvalidPath) as err:
        kv.read_secret_version(path=kv_path, version=1, mount_point="secret", raise_on_deleted_version=True)
    assert err.value.json["data"]["data"] is None and err.value.json["data"]["metadata"]["destroyed"] is True
    with pytest.raises(hvac.exceptions.InvalidPath) as err:  # a version never written: a bare 404
        kv.read_secret_version(path=kv_path, version=9, mount_point="secret", raise_on_deleted_version=True)
    assert err.value.errors == []
    with pytest.raises(hvac.exceptions.InvalidPath) as err:
        kv.read_secret_version(path=kv_path + "-absent", mount_point="secret", raise_on_deleted_version=True)
    assert err.value.errors == []


def test_responses_carry_vaults_envelope(server: Server, transit: str) -> None:
    server.client().secrets.transit.create_key(name="k", mount_point=transit)
    resp = requests.get(f"{server.url}/v1/{transit}/keys/k", headers={"X-Vault-Token": server.token}, timeout=5)
    assert resp.status_code == 200 and resp.headers["Content-Type"] == "application/json"
    body = resp.json()
    assert {"request_id", "lease_id", "renewable", "lease_duration", "data", "wrap_info", "warnings", "auth"} <= set(body)
    assert body["data"]["name"] == "k" and body["auth"] is None
