"""One contract suite for every key provider (file, Vault KV, Vault Transit), plus Vault specifics.

The Vault providers run hvac against the Vault simulator, or a real Vault when VAULT_ADDR and
VAULT_TOKEN are set. Each test uses its own Transit key or KV path, so runs never collide.
"""

from __future__ import annotations

import base64
import dataclasses
import uuid
from pathlib import Path
from typing import Any, Callable

import hvac
import pytest

from luxima_backup.envelope import WrappedKey
from luxima_backup.errors import ConfigError, KeyProviderError, WrongKeyError, is_transient
from luxima_backup.keys import KeyFileProvider, KeyProvider, VaultKVProvider, VaultTransitProvider, new_master_key
from luxima_backup.settings import VaultSettings

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
    retire_old: Callable[[], KeyProvider] | None  # a provider for which pre-rotation keys are gone


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

    return Keys("file", lambda: KeyFileProvider(paths[-1], paths[:-1]), rotate, lambda: KeyFileProvider(paths[-1]))


def _kv_keys(vault: dict[str, Any], admin: hvac.Client) -> Keys:
    path = f"luxima-test/{uuid.uuid4().hex[:8]}/master"
    admin.secrets.kv.v2.create_or_update_secret(path=path, secret={"key": new_master_key()}, mount_point="secret")
    cfg = vault_settings(vault, kv_path=path)

    def rotate() -> None:
        admin.secrets.kv.v2.create_or_update_secret(path=path, secret={"key": new_master_key()}, mount_point="secret")

    return Keys("vault-kv", lambda: VaultKVProvider(cfg), rotate, None)


def _transit_keys(vault: dict[str, Any], admin: hvac.Client) -> Keys:
    name = f"luxima-test-{uuid.uuid4().hex[:8]}"
    admin.secrets.transit.create_key(name=name)
    cfg = vault_settings(vault, transit_key=name)

    def retire() -> KeyProvider:
        latest = admin.secrets.transit.read_key(name=name)["data"]["latest_version"]
        admin.secrets.transit.update_key_configuration(name=name, min_decryption_version=latest)
        return VaultTransitProvider(cfg)

    return Keys("vault-transit", lambda: VaultTransitProvider(cfg),
                lambda: admin.secrets.transit.rotate_key(name=name), retire)


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
    if keys.retire_old is None:
        assert keys.kind == "vault-kv"  # KV keeps every version; retiring one is Vault's metadata job
        return
    before = keys.provider().new_data_key()
    keys.rotate()
    provider = keys.retire_old()
    with pytest.raises((WrongKeyError, KeyProviderError)) as err:
        provider.unwrap(before.wrapped)
    assert not is_transient(err.value)
    assert before.wrapped.key_id.split("/")[-1] in str(err.value) or "too old" in str(err.value)


# -- Vault specifics --

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
    from luxima_backup.sandbox import free_port

    monkeypatch.setenv(TOKEN_ENV, "any")
    provider = VaultTransitProvider(vault_settings({"url": f"http://127.0.0.1:{free_port()}"}))
    with pytest.raises(KeyProviderError) as err:
        provider.new_data_key()
    assert is_transient(err.value) and "cannot reach Vault" in str(err.value)


def _approle(admin: hvac.Client, policy: str) -> tuple[str, str]:
    name = f"luxima-backup-{uuid.uuid4().hex[:6]}"
    admin.sys.create_or_update_acl_policy(name=name, policy=policy)
    admin.auth.approle.create_or_update_approle(role_name=name, token_policies=[name])
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
    """)
    monkeypatch.setenv("LUXIMA_TEST_ROLE_ID", role_id)
    monkeypatch.setenv("LUXIMA_TEST_SECRET_ID", secret_id)
    approle = {"auth": "approle", "role_id": "env:LUXIMA_TEST_ROLE_ID", "secret_id": "env:LUXIMA_TEST_SECRET_ID", "token": None}
    provider = VaultTransitProvider(vault_settings(vault, transit_key=name, **approle))
    key = provider.new_data_key()
    assert provider.unwrap(key.wrapped) == key.plaintext

    other = f"luxima-test-{uuid.uuid4().hex[:8]}"
    admin.secrets.transit.create_key(name=other)
    with pytest.raises(KeyProviderError, match="denied") as err:
        VaultTransitProvider(vault_settings(vault, transit_key=other, **approle)).new_data_key()
    assert not is_transient(err.value) and "policy" in (err.value.hint or "")

    monkeypatch.setenv("LUXIMA_TEST_SECRET_ID", str(uuid.uuid4()))
    with pytest.raises(KeyProviderError, match="AppRole") as err:
        VaultTransitProvider(vault_settings(vault, transit_key=name, **approle)).new_data_key()
    assert not is_transient(err.value) and "secret_id" in (err.value.hint or "")
    assert secret_id not in str(err.value) and role_id not in str(err.value)


def test_bad_token_is_refused_clearly(vault: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TOKEN_ENV, "hvs.not-a-token")
    with pytest.raises(KeyProviderError, match="denied") as err:
        VaultTransitProvider(vault_settings(vault)).new_data_key()
    assert not is_transient(err.value) and "hvs.not-a-token" not in str(err.value)


def test_missing_kv_secret_names_the_path(vault: dict[str, Any], admin: hvac.Client) -> None:
    with pytest.raises(KeyProviderError, match="luxima-test/absent") as err:
        VaultKVProvider(vault_settings(vault, kv_path="luxima-test/absent")).new_data_key()
    assert not is_transient(err.value)


def test_key_file_problems_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="keys generate"):
        KeyFileProvider(tmp_path / "absent")
    (tmp_path / "short").write_text(base64.b64encode(b"x" * 16).decode())
    with pytest.raises(ConfigError, match="32 bytes"):
        KeyFileProvider(tmp_path / "short")
