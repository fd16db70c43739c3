"""One contract suite for every key provider (file, Vault KV, Vault Transit), plus Vault specifics.

The Vault providers run hvac against the Vault simulator, or a real Vault when VAULT_ADDR and
VAULT_TOKEN are set. Each test uses its own Transit key or KV path, so runs never collide. Tests
that age tokens and secret IDs need the simulator's clock and are skipped against a real Vault.
"""

from __future__ import annotations

import base64
import dataclasses
import re
import uuid
from pathlib import Path
from typing import Any, Callable

import hvac
import pytest
from pydantic import ValidationError

from luxima_backup import vault as vault_mod
from luxima_backup.envelope import WrappedKey
from luxima_backup.errors import ConfigError, KeyProviderError, WrongKeyError, is_transient
from luxima_backup.keys import KeyFileProvider, KeyProvider, VaultKVProvider, VaultTransitProvider, new_master_key
from luxima_backup.settings import VaultSettings
from tests.simulators.vault import VaultSimulator

TOKEN_ENV = "LUXIMA_TEST_VAULT_TOKEN"


def vault_settings(vault: dict[str, Any], **overrides: Any) -> VaultSettings:
    fields = {"address": vault["url"], "token": f"env:{TOKEN_ENV}", "timeout": 5, **overrides}
    return VaultSettings.model_validate(fields)


@dataclasses.dataclass
class Keys:
    """One provider kind under test: how to get a provider, rotate its key, and retire an old one."""

    kind: str
    provider: Callable[[], KeyProvider]
    rotate: Callable[[], None]
    retire_old: Callable[[], KeyProvider]  # a provider for which pre-rotation keys are gone
    retired: tuple[type[Exception], str, str]  # the error unwrapping a retired key gives: class, message, hint


@pytest.fixture
def admin(vault: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> hvac.Client:
    monkeypatch.setenv(TOKEN_ENV, vault["token"])
    return hvac.Client(url=vault["url"], token=vault["token"])


def _file_keys(tmp_path: Path) -> Keys:
    paths = [tmp_path / "k1"]
    paths[0].write_text(new_master_key())

    def rotate() -> None:
        paths.append(tmp_path / f"k{len(paths) + 1}")
        paths[-1].write_text(new_master_key())

    return Keys("file", lambda: KeyFileProvider(paths[-1], paths[:-1]), rotate, lambda: KeyFileProvider(paths[-1]),
                (WrongKeyError, r"this backup was encrypted with key file file:[0-9a-f]{16}, but the key file\(s\) given are",
                 "keys.old_key_files"))


def _kv_keys(vault: dict[str, Any], admin: hvac.Client) -> Keys:
    path = f"luxima-test/{uuid.uuid4().hex[:8]}/master"
    admin.secrets.kv.v2.create_or_update_secret(path=path, secret={"key": new_master_key()}, mount_point="secret")
    cfg = vault_settings(vault, kv_path=path)

    def rotate() -> None:
        admin.secrets.kv.v2.create_or_update_secret(path=path, secret={"key": new_master_key()}, mount_point="secret")

    def retire() -> KeyProvider:
        # Retiring a KV master key is deleting its version; KV keeps it, soft-deleted, until undeleted or destroyed.
        admin.secrets.kv.v2.delete_secret_versions(path=path, versions=[1], mount_point="secret")
        return VaultKVProvider(cfg)

    return Keys("vault-kv", lambda: VaultKVProvider(cfg), rotate, retire,
                (KeyProviderError, rf"^version 1 of Vault secret secret/{path} was deleted \(at \d{{4}}-",
                 f"vault kv undelete -mount=secret -versions=1 {path}"))


def _transit_keys(vault: dict[str, Any], admin: hvac.Client) -> Keys:
    name = f"luxima-test-{uuid.uuid4().hex[:8]}"
    admin.secrets.transit.create_key(name=name)
    cfg = vault_settings(vault, transit_key=name)

    def retire() -> KeyProvider:
        latest = admin.secrets.transit.read_key(name=name)["data"]["latest_version"]
        admin.secrets.transit.update_key_configuration(name=name, min_decryption_version=latest)
        return VaultTransitProvider(cfg)

    return Keys("vault-transit", lambda: VaultTransitProvider(cfg),
                lambda: admin.secrets.transit.rotate_key(name=name), retire,
                (KeyProviderError, rf"^version 1 of Transit key transit/keys/{name}, which wrapped this backup's data key, "
                                   r"is retired: it is below the key's min_decryption_version \(ciphertext or signature "
                                   r"version is disallowed by policy \(too old\)\)$",
                 f"vault write transit/keys/{name}/config min_decryption_version=1"))


@pytest.fixture(params=["file", "vault-kv", "vault-transit"])
def keys(request: pytest.FixtureRequest, tmp_path: Path) -> Keys:
    if request.param == "file":
        return _file_keys(tmp_path)
    vault = request.getfixturevalue("vault")
    admin = request.getfixturevalue("admin")
    return _kv_keys(vault, admin) if request.param == "vault-kv" else _transit_keys(vault, admin)


# -- the contract --

def test_data_key_round_trip(keys: Keys) -> None:
    provider = keys.provider()
    first, second = provider.new_data_key(), provider.new_data_key()
    assert len(first.plaintext) == 32 and first.plaintext != second.plaintext  # fresh per backup
    assert first.wrapped.provider == keys.kind
    assert base64.b64encode(first.plaintext).decode() not in first.wrapped.wrapped
    assert keys.provider().unwrap(first.wrapped) == first.plaintext  # a new instance, as a restore would


def test_tampered_wrapped_key_is_a_wrong_key_error(keys: Keys) -> None:
    wrapped = keys.provider().new_data_key().wrapped
    raw = wrapped.wrapped
    prefix, _, body = raw.rpartition(":")  # Transit's "vault:vN:" prefix stays intact
    blob = bytearray(base64.b64decode(body))
    blob[len(blob) // 2] ^= 0x01
    bad = dataclasses.replace(wrapped, wrapped=(prefix + ":" if prefix else "") + base64.b64encode(bytes(blob)).decode())
    with pytest.raises(WrongKeyError) as err:
        keys.provider().unwrap(bad)
    assert not is_transient(err.value)


def test_key_of_another_provider_is_refused_by_name(keys: Keys) -> None:
    foreign = WrappedKey("some-other-provider", "elsewhere/key", "AAAA", 1)
    with pytest.raises(WrongKeyError, match="some-other-provider") as err:
        keys.provider().unwrap(foreign)
    assert err.value.hint and "keys.provider" in err.value.hint


def test_rotation_keeps_old_backups_readable(keys: Keys) -> None:
    before = keys.provider().new_data_key()
    keys.rotate()
    after = keys.provider().new_data_key()
    assert (after.wrapped.key_id, after.wrapped.key_version) != (before.wrapped.key_id, before.wrapped.key_version)
    provider = keys.provider()
    assert provider.unwrap(before.wrapped) == before.plaintext
    assert provider.unwrap(after.wrapped) == after.plaintext


def test_retired_key_gives_a_clear_permanent_error(keys: Keys) -> None:
    before = keys.provider().new_data_key()
    keys.rotate()
    provider = keys.retire_old()
    after = provider.new_data_key()  # new backups go on, under the current key
    assert provider.unwrap(after.wrapped) == after.plaintext
    cls, message, hint = keys.retired
    with pytest.raises(cls) as err:
        provider.unwrap(before.wrapped)
    assert type(err.value) is cls and re.search(message, err.value.message), repr(err.value)
    assert hint in (err.value.hint or "") and not is_transient(err.value)


def test_macs_authenticate_catalog_documents_across_rotation(keys: Keys) -> None:
    """What the catalog signs manifests with: a MAC names its key, survives a rotation, and any change fails it."""
    provider = keys.provider()
    message = b"luxima-backup/manifest/v1\ndb/main/2026/11/30/x.manifest.json\n{...}"
    before = provider.sign(message)
    assert before["provider"] == keys.kind and before["alg"] == "hmac-sha256"
    keys.rotate()
    after = keys.provider().sign(message)
    checker = keys.provider()  # a new instance, as a restore on another day would be
    assert checker.verify([(message, before), (message, after)]) == [None, None]
    altered = checker.verify([(message + b" ", before), (message.replace(b"main", b"mai2"), after)])
    assert all(why and "does not match" in why for why in altered), altered
    assert checker.verify([(message, {**after, "provider": "elsewhere"})])[0].startswith("it was signed by the 'elsewhere' key provider")
    assert "malformed" in (checker.verify([(message, {"value": 1})])[0] or "")
    assert checker.verify([]) == []


def test_a_mac_of_a_retired_key_is_a_verdict_not_a_crash(keys: Keys) -> None:
    message = b"an index"
    old = keys.provider().sign(message)
    keys.rotate()
    provider = keys.retire_old()
    new = provider.sign(message)
    why_old, why_new = provider.verify([(message, old), (message, new)])
    assert why_old and why_new is None, why_old


# -- Vault specifics --

def test_transit_verifies_many_macs_in_batches_of_its_own(vault: dict[str, Any], admin: hvac.Client) -> None:
    """A catalog rebuilt from 300 manifests asks Vault twice (256 a batch), and each verdict lands on its own item."""
    name = f"luxima-test-{uuid.uuid4().hex[:8]}"
    admin.secrets.transit.create_key(name=name)
    provider = VaultTransitProvider(vault_settings(vault, transit_key=name))
    items = [(f"manifest {i}".encode(), provider.sign(f"manifest {i}".encode())) for i in range(300)]
    items[7] = (b"manifest 7, altered", items[7][1])
    items[280] = (items[280][0], {**items[280][1], "value": "vault:v9:" + items[280][1]["value"].split(":")[2]})
    verdicts = provider.verify(items)
    assert [i for i, v in enumerate(verdicts) if v is not None] == [7, 280]
    assert "does not match" in (verdicts[7] or "") and "version is too new" in (verdicts[280] or "")


@pytest.mark.parametrize("provider_cls", [VaultTransitProvider, VaultKVProvider])
def test_vault_unavailable_is_transient(vault: dict[str, Any], admin: hvac.Client, provider_cls: Any) -> None:
    sim = vault["simulator"]
    if sim is None:
        pytest.skip("a real Vault cannot be made unavailable by the tests")  # the simulator case always runs
    keys = _transit_keys(vault, admin) if provider_cls is VaultTransitProvider else _kv_keys(vault, admin)
    provider = keys.provider()
    wrapped = provider.new_data_key().wrapped
    sim.seal()
    try:
        with pytest.raises(KeyProviderError) as err:
            provider.new_data_key()
        assert is_transient(err.value) and "unavailable" in str(err.value)
        with pytest.raises(KeyProviderError) as err:
            provider.unwrap(wrapped)
        assert is_transient(err.value)
    finally:
        sim.unseal()
    sim.fail_next(1, 503)  # a standby or overloaded node answers 503 once
    with pytest.raises(KeyProviderError) as err:
        provider.new_data_key()
    assert is_transient(err.value)
    assert provider.unwrap(wrapped)  # and then it works again


def test_unreachable_vault_is_transient(monkeypatch: pytest.MonkeyPatch) -> None:
    from devkit.sandbox import free_port

    monkeypatch.setenv(TOKEN_ENV, "any")
    provider = VaultTransitProvider(vault_settings({"url": f"http://127.0.0.1:{free_port()}"}))
    with pytest.raises(KeyProviderError) as err:
        provider.new_data_key()
    assert is_transient(err.value) and "cannot reach Vault" in str(err.value)


APPROLE = {"auth": "approle", "role_id": "env:LUXIMA_TEST_ROLE_ID", "secret_id": "env:LUXIMA_TEST_SECRET_ID", "token": None}


def _approle(admin: hvac.Client, policy: str, **role: Any) -> tuple[str, str]:
    name = f"luxima-backup-{uuid.uuid4().hex[:6]}"
    admin.sys.create_or_update_acl_policy(name=name, policy=policy)
    admin.auth.approle.create_or_update_approle(role_name=name, token_policies=[name], **role)
    role_id = admin.auth.approle.read_role_id(role_name=name)["data"]["role_id"]
    secret_id = admin.auth.approle.generate_secret_id(role_name=name)["data"]["secret_id"]
    return role_id, secret_id


def test_approle_login_with_a_least_privilege_policy(vault: dict[str, Any], admin: hvac.Client,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"luxima-test-{uuid.uuid4().hex[:8]}"
    admin.secrets.transit.create_key(name=name)
    # What docs/ recommends for the backup role: data keys and decrypt on one Transit key, nothing else.
    role_id, secret_id = _approle(admin, f"""
        path "transit/datakey/plaintext/{name}" {{ capabilities = ["update"] }}
        path "transit/decrypt/{name}" {{ capabilities = ["update"] }}
        path "transit/hmac/{name}" {{ capabilities = ["update"] }}
        path "transit/verify/{name}" {{ capabilities = ["update"] }}
    """)
    monkeypatch.setenv("LUXIMA_TEST_ROLE_ID", role_id)
    monkeypatch.setenv("LUXIMA_TEST_SECRET_ID", secret_id)
    provider = VaultTransitProvider(vault_settings(vault, transit_key=name, **APPROLE))
    key = provider.new_data_key()
    assert provider.unwrap(key.wrapped) == key.plaintext
    assert provider.verify([(b"catalog", provider.sign(b"catalog"))]) == [None]  # the catalog's MACs, same policy

    other = f"luxima-test-{uuid.uuid4().hex[:8]}"
    admin.secrets.transit.create_key(name=other)
    with pytest.raises(KeyProviderError, match="denied") as err:
        VaultTransitProvider(vault_settings(vault, transit_key=other, **APPROLE)).new_data_key()
    assert not is_transient(err.value) and "policy" in (err.value.hint or "")

    monkeypatch.setenv("LUXIMA_TEST_SECRET_ID", str(uuid.uuid4()))
    with pytest.raises(KeyProviderError, match="AppRole") as err:
        VaultTransitProvider(vault_settings(vault, transit_key=name, **APPROLE)).new_data_key()
    assert not is_transient(err.value) and "secret_id" in (err.value.hint or "")
    assert secret_id not in str(err.value) and role_id not in str(err.value)


def test_bad_token_is_refused_clearly(vault: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TOKEN_ENV, "hvs.not-a-token")
    with pytest.raises(KeyProviderError) as err:
        VaultTransitProvider(vault_settings(vault)).new_data_key()
    assert type(err.value) is KeyProviderError
    assert err.value.message == "Vault denied access while authenticating to Vault: permission denied; invalid token"
    assert "expired, revoked or wrong" in (err.value.hint or "")
    assert not is_transient(err.value) and "hvs.not-a-token" not in str(err.value)


def test_missing_kv_secret_names_the_path(vault: dict[str, Any], admin: hvac.Client) -> None:
    with pytest.raises(KeyProviderError) as err:
        VaultKVProvider(vault_settings(vault, kv_path="luxima-test/absent")).new_data_key()
    assert type(err.value) is KeyProviderError and err.value.message == "Vault has no secret at secret/luxima-test/absent"
    assert "kv_path" in (err.value.hint or "") and not is_transient(err.value)


def test_a_deleted_or_destroyed_kv_master_key_is_named_not_a_crash(vault: dict[str, Any], admin: hvac.Client) -> None:
    """KV v2 answers a deleted version with a 404 carrying its metadata: the error names the path and the
    version, says it was deleted (or destroyed), and how to undelete it."""
    keys = _kv_keys(vault, admin)
    path = keys.provider().path
    sub = path.removeprefix("secret/")
    before = keys.provider().new_data_key()
    admin.secrets.kv.v2.delete_latest_version_of_secret(path=sub, mount_point="secret")
    with pytest.raises(KeyProviderError) as err:  # the next backup: the latest version is gone
        keys.provider().new_data_key()
    assert type(err.value) is KeyProviderError and not is_transient(err.value)
    assert re.fullmatch(rf"the latest version \(1\) of Vault secret {path} was deleted \(at \d{{4}}-.+\)", err.value.message)
    assert err.value.hint == f"undelete it if it is still needed: vault kv undelete -mount=secret -versions=1 {sub}"
    with pytest.raises(KeyProviderError, match=rf"^version 1 of Vault secret {path} was deleted"):  # a restore
        keys.provider().unwrap(before.wrapped)

    admin.secrets.kv.v2.undelete_secret_versions(path=sub, versions=[1], mount_point="secret")
    assert keys.provider().unwrap(before.wrapped) == before.plaintext
    admin.secrets.kv.v2.destroy_secret_versions(path=sub, versions=[1], mount_point="secret")
    with pytest.raises(KeyProviderError) as err:
        keys.provider().unwrap(before.wrapped)
    assert type(err.value) is KeyProviderError and err.value.message == f"version 1 of Vault secret {path} was destroyed"
    assert "cannot be recovered" in (err.value.hint or "")
    with pytest.raises(KeyProviderError, match=rf"^the latest version \(1\) of Vault secret {path} was destroyed") as err:
        keys.provider().new_data_key()
    assert f"vault kv put -mount=secret {sub} key=" in (err.value.hint or "")


def test_a_transit_ciphertext_newer_than_the_key_is_a_wrong_key(vault: dict[str, Any], admin: hvac.Client) -> None:
    """The key was deleted and made again (or this is another Vault): Vault answers "version is too new"."""
    keys = _transit_keys(vault, admin)
    name = keys.provider().key_id.split("/")[-1]
    keys.rotate()
    keys.rotate()
    wrapped = keys.provider().new_data_key().wrapped
    assert wrapped.key_version == 3
    admin.secrets.transit.update_key_configuration(name=name, deletion_allowed=True)
    admin.secrets.transit.delete_key(name=name)
    admin.secrets.transit.create_key(name=name)
    with pytest.raises(WrongKeyError) as err:
        keys.provider().unwrap(wrapped)
    assert err.value.message == (f"Vault's Transit key transit/keys/{name} has no version 3, which wrapped this backup's "
                                 "data key (invalid ciphertext: version is too new)")
    assert "deleted and created again" in (err.value.hint or "") and not is_transient(err.value)


def test_a_v0_transit_header_is_read_as_version_1(vault: dict[str, Any], admin: hvac.Client) -> None:
    """Vault reads "vault:v0:" as version 1 (keys once started at zero); the project passes it through and names v1."""
    keys = _transit_keys(vault, admin)
    made = keys.provider().new_data_key()
    v0 = dataclasses.replace(made.wrapped, wrapped=made.wrapped.wrapped.replace("vault:v1:", "vault:v0:"), key_version=0)
    assert keys.provider().unwrap(v0) == made.plaintext
    keys.rotate()
    with pytest.raises(KeyProviderError) as err:
        keys.retire_old().unwrap(v0)
    assert type(err.value) is KeyProviderError and err.value.message.startswith("version 1 of Transit key")
    assert (err.value.hint or "").endswith("min_decryption_version=1")


def test_a_corrupt_transit_header_is_refused_not_unreachable(vault: dict[str, Any], admin: hvac.Client) -> None:
    """Vault answers a malformed ciphertext with a 400: permanent, never "cannot reach Vault"."""
    keys = _transit_keys(vault, admin)
    wrapped = keys.provider().new_data_key().wrapped
    for bad, said in (("vault:v1:@@not-base64@@", "invalid ciphertext: could not decode base64"),
                      ("vault:vX:AAAA", "invalid ciphertext: version number could not be decoded"),
                      ("vault:v1:" + base64.b64encode(b"short").decode(), "invalid ciphertext length")):
        with pytest.raises(WrongKeyError) as err:
            keys.provider().unwrap(dataclasses.replace(wrapped, wrapped=bad, key_version=None))
        assert err.value.message.endswith(said) and not is_transient(err.value)


def test_malformed_requests_are_permanent_refusals_with_vaults_reason(vault: dict[str, Any], admin: hvac.Client) -> None:
    """A 400 with Vault's ``{"errors": [...]}`` is a permanent KeyProviderError carrying Vault's reason."""
    name = _transit_keys(vault, admin).provider().key_id.split("/")[-1]
    cases = [
        (lambda: admin.secrets.transit.update_key_configuration(name=name, min_decryption_version=5),
         "cannot set min decryption version of 5, latest key version is 1"),
        (lambda: admin.secrets.transit.update_key_configuration(name=name, min_decryption_version=-1),
         "min decryption version cannot be negative"),
        (lambda: admin.secrets.transit.update_key_configuration(name=name, min_decryption_version="two"),
         'Field validation failed: error converting input two for field "min_decryption_version"'),
        (lambda: admin.secrets.transit.encrypt_data(name=name, plaintext="not base64!"),
         "illegal base64 data at input byte 3"),
    ]
    for call, said in cases:
        with pytest.raises(KeyProviderError) as err:
            with vault_mod.translate_errors("configuring the key"):
                call()
        assert type(err.value) is KeyProviderError and not is_transient(err.value)
        assert err.value.message.startswith(f"Vault refused the request while configuring the key: {said}")


def test_a_transit_key_name_with_a_slash_is_refused(vault: dict[str, Any], admin: hvac.Client) -> None:
    """Vault's Transit paths cannot name such a key: the settings refuse it at start, and a header naming
    one gets Vault's 404 as a clear, permanent error."""
    with pytest.raises(ValidationError, match="'team/key' is not a Transit key name"):
        vault_settings(vault, transit_key="team/key")
    foreign = WrappedKey("vault-transit", "transit/keys/team/key", "vault:v1:AAAA", 1)
    with pytest.raises(KeyProviderError) as err:
        VaultTransitProvider(vault_settings(vault)).unwrap(foreign)
    assert type(err.value) is KeyProviderError and not is_transient(err.value)
    assert err.value.message == "Vault path not found while unwrapping the data key with Transit key transit/keys/team/key: unsupported path"


def test_a_create_only_policy_is_denied_with_a_hint(vault: dict[str, Any], admin: hvac.Client,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Transit datakey and decrypt are updates in Vault's ACLs: a policy granting only ``create`` is refused."""
    name = f"luxima-test-{uuid.uuid4().hex[:8]}"
    admin.secrets.transit.create_key(name=name)
    role_id, secret_id = _approle(admin, f"""
        path "transit/datakey/plaintext/{name}" {{ capabilities = ["create"] }}
        path "transit/decrypt/{name}" {{ capabilities = ["create"] }}
    """)
    monkeypatch.setenv("LUXIMA_TEST_ROLE_ID", role_id)
    monkeypatch.setenv("LUXIMA_TEST_SECRET_ID", secret_id)
    with pytest.raises(KeyProviderError) as err:
        VaultTransitProvider(vault_settings(vault, transit_key=name, **APPROLE)).new_data_key()
    assert type(err.value) is KeyProviderError and not is_transient(err.value)
    assert err.value.message == f"Vault denied access while generating a data key with Transit key transit/keys/{name}: permission denied"
    assert "'update' capability, 'create' is not enough" in (err.value.hint or "")


# -- tokens that expire during a run (the simulator's clock) --

@pytest.fixture
def sim(vault: dict[str, Any]) -> VaultSimulator:
    if vault["simulator"] is None:
        pytest.skip("needs the simulator's clock: a real Vault's tokens and secret IDs cannot be aged on demand")
    return vault["simulator"]


def _approle_provider(vault: dict[str, Any], admin: hvac.Client, monkeypatch: pytest.MonkeyPatch,
                      **role: Any) -> tuple[VaultTransitProvider, str, str]:
    name = f"luxima-test-{uuid.uuid4().hex[:8]}"
    admin.secrets.transit.create_key(name=name)
    role_id, secret_id = _approle(admin, f"""
        path "transit/datakey/plaintext/{name}" {{ capabilities = ["update"] }}
        path "transit/decrypt/{name}" {{ capabilities = ["update"] }}
    """, **role)
    monkeypatch.setenv("LUXIMA_TEST_ROLE_ID", role_id)
    monkeypatch.setenv("LUXIMA_TEST_SECRET_ID", secret_id)
    return VaultTransitProvider(vault_settings(vault, transit_key=name, **APPROLE)), role_id, secret_id


def test_an_approle_token_that_expires_mid_run_logs_in_again(vault: dict[str, Any], admin: hvac.Client, sim: VaultSimulator,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    provider, _, _ = _approle_provider(vault, admin, monkeypatch, token_ttl="1m", token_max_ttl="1m")
    logins = sim.logins()
    key = provider.new_data_key()
    assert sim.logins() == logins + 1
    sim.advance_clock(61)  # the backup's upload outlived the token
    assert provider.unwrap(key.wrapped) == key.plaintext  # the verify
    assert sim.logins() == logins + 2
    assert provider.new_data_key().plaintext and sim.logins() == logins + 2  # the new token serves on


@pytest.mark.parametrize("limit, wait", [({"secret_id_num_uses": 1}, [61]), ({"secret_id_ttl": "90s"}, [61, 61])],
                         ids=["used-up", "expired"])
def test_an_approle_that_cannot_log_in_again_says_why(vault: dict[str, Any], admin: hvac.Client, sim: VaultSimulator,
                                                       monkeypatch: pytest.MonkeyPatch, limit: dict[str, Any], wait: list[int]) -> None:
    provider, role_id, secret_id = _approle_provider(vault, admin, monkeypatch, token_ttl="1m", **limit)
    key = provider.new_data_key()
    for seconds in wait[:-1]:
        sim.advance_clock(seconds)
        assert provider.unwrap(key.wrapped) == key.plaintext  # logged in again while the secret ID still could
    sim.advance_clock(wait[-1])
    with pytest.raises(KeyProviderError) as err:
        provider.unwrap(key.wrapped)
    assert type(err.value) is KeyProviderError and not is_transient(err.value)
    assert err.value.message == "Vault refused the AppRole login: invalid role or secret ID"
    assert "may have expired or run out of uses" in (err.value.hint or "")
    assert secret_id not in str(err.value) and role_id not in str(err.value)


def test_an_expired_static_token_is_refused_with_a_hint(vault: dict[str, Any], admin: hvac.Client, sim: VaultSimulator,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    keys = _transit_keys(vault, admin)
    name = keys.provider().key_id.split("/")[-1]
    token = admin.auth.token.create(policies=["root"], ttl="1m")["auth"]["client_token"]
    monkeypatch.setenv(TOKEN_ENV, token)
    provider = VaultTransitProvider(vault_settings(vault, transit_key=name))
    key = provider.new_data_key()
    sim.advance_clock(61)
    with pytest.raises(KeyProviderError) as err:
        provider.unwrap(key.wrapped)
    assert type(err.value) is KeyProviderError and not is_transient(err.value)
    assert err.value.message == "Vault denied access while authenticating to Vault: permission denied; invalid token"
    assert "expired, revoked or wrong" in (err.value.hint or "") and token not in str(err.value)


def test_key_file_problems_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="keys generate"):
        KeyFileProvider(tmp_path / "absent")
    (tmp_path / "short").write_text(base64.b64encode(b"x" * 16).decode())
    with pytest.raises(ConfigError, match="32 bytes"):
        KeyFileProvider(tmp_path / "short")
