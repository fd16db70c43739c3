"""The Vault simulator itself behaves as Vault's API documentation says, as seen through hvac."""

from __future__ import annotations

from typing import Iterator

import hvac
import hvac.exceptions
import pytest

from tests.simulators.vault import VaultSimulator, _matches, parse_policy


@pytest.fixture
def sim() -> Iterator[VaultSimulator]:
    with VaultSimulator() as s:
        yield s


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
    with pytest.raises(ValueError):
        parse_policy('path "x" { capabilities = ["fly"] }')
    with pytest.raises(ValueError):
        parse_policy("not a policy")


def test_tokens_see_only_what_their_policies_allow(sim: VaultSimulator) -> None:
    root = hvac.Client(url=sim.url, token=sim.root_token)
    root.sys.enable_secrets_engine("transit", path="transit")
    root.secrets.transit.create_key(name="a")
    root.secrets.transit.create_key(name="b")
    root.sys.create_or_update_acl_policy(name="only-a", policy='path "transit/datakey/plaintext/a" { capabilities = ["update"] }')
    token = root.auth.token.create(policies=["only-a"])["auth"]["client_token"]
    client = hvac.Client(url=sim.url, token=token)
    assert client.auth.token.lookup_self()["data"]["policies"] == ["default", "only-a"]
    resp = client.secrets.transit.generate_data_key(name="a", key_type="plaintext")
    assert resp["data"]["ciphertext"].startswith("vault:v1:") and len(resp["data"]["plaintext"]) == 44
    with pytest.raises(hvac.exceptions.Forbidden):
        client.secrets.transit.generate_data_key(name="b", key_type="plaintext")
    with pytest.raises(hvac.exceptions.Forbidden):
        client.secrets.transit.decrypt_data(name="a", ciphertext=resp["data"]["ciphertext"])
    with pytest.raises(hvac.exceptions.Forbidden):
        hvac.Client(url=sim.url, token="nope").secrets.transit.read_key(name="a")


def test_mounts_and_errors_follow_vault(sim: VaultSimulator) -> None:
    root = hvac.Client(url=sim.url, token=sim.root_token)
    mounts = root.sys.list_mounted_secrets_engines()["data"]
    assert mounts["secret/"]["options"] == {"version": "2"} and "transit/" not in mounts
    with pytest.raises(hvac.exceptions.InvalidPath):  # nothing mounted there yet
        root.secrets.transit.create_key(name="x")
    root.sys.enable_secrets_engine("transit", path="transit")
    with pytest.raises(hvac.exceptions.InvalidRequest, match="already in use"):
        root.sys.enable_secrets_engine("transit", path="transit")
    with pytest.raises(hvac.exceptions.InvalidRequest, match="encryption key not found"):
        root.secrets.transit.decrypt_data(name="absent", ciphertext="vault:v1:AAAA")
    root.secrets.transit.create_key(name="k")
    root.secrets.transit.rotate_key(name="k")
    assert root.secrets.transit.read_key(name="k")["data"]["latest_version"] == 2
    with pytest.raises(hvac.exceptions.InvalidRequest, match="greater than the latest"):
        root.secrets.transit.update_key_configuration(name="k", min_decryption_version=3)
    sim.seal()
    with pytest.raises(hvac.exceptions.VaultDown):
        root.secrets.transit.read_key(name="k")
    assert root.sys.read_health_status(method="GET").status_code == 503
    sim.unseal()


def test_approle_login_issues_a_token_with_the_role_policies(sim: VaultSimulator) -> None:
    root = hvac.Client(url=sim.url, token=sim.root_token)
    root.sys.enable_auth_method("approle", path="approle")
    root.auth.approle.create_or_update_approle(role_name="backup", token_policies=["backup"])
    role_id = root.auth.approle.read_role_id(role_name="backup")["data"]["role_id"]
    secret_id = root.auth.approle.generate_secret_id(role_name="backup")["data"]["secret_id"]
    client = hvac.Client(url=sim.url)
    auth = client.auth.approle.login(role_id=role_id, secret_id=secret_id)["auth"]
    assert auth["policies"] == ["backup", "default"] and auth["metadata"] == {"role_name": "backup"}
    assert client.is_authenticated()
    with pytest.raises(hvac.exceptions.InvalidRequest, match="invalid role or secret ID"):
        hvac.Client(url=sim.url).auth.approle.login(role_id=role_id, secret_id="wrong")
