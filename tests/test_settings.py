"""Settings: the example loads, and every bad value stops the run with a message that says what to fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from luxima_backup.errors import ConfigError
from luxima_backup.settings import load_settings

EXAMPLE = Path(__file__).parent.parent / "config" / "luxima-backup.example.toml"


def test_example_settings_file_is_valid() -> None:
    s = load_settings(EXAMPLE, reload=True)
    assert s.keys.provider == "vault-transit" and s.database().dbname == "postgres"
    assert str(s.database().password) == "env:LUXIMA_DB_PASSWORD"


def test_environment_overrides_the_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LUXIMA_BACKUP__STORAGE__BUCKET", "other-bucket")
    assert load_settings(EXAMPLE, reload=True).storage.bucket == "other-bucket"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "s.toml"
    path.write_text(EXAMPLE.read_text() + text)
    return path


def test_inline_secret_is_refused_without_echoing_it(tmp_path: Path) -> None:
    text = EXAMPLE.read_text().replace('"env:LUXIMA_DB_PASSWORD"', '"hunter2-inline"')
    path = tmp_path / "s.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_settings(path, reload=True)
    assert "databases.main.password" in str(err.value) and "not a secret reference" in str(err.value)
    assert "hunter2-inline" not in str(err.value)


def test_misspelt_key_and_bad_reference_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"db_backup.compresion"):
        load_settings(_write(tmp_path, "\n[db_backup.compresion]\n"), reload=True)
    text = EXAMPLE.read_text().replace('database = "main"\ncompression', 'database = "nope"\ncompression')
    (tmp_path / "b.toml").write_text(text)
    with pytest.raises(ConfigError, match=r"db_backup.database = 'nope' is not one of"):
        load_settings(tmp_path / "b.toml", reload=True)


def test_key_file_provider_must_be_enabled_explicitly(tmp_path: Path) -> None:
    text = EXAMPLE.read_text().replace('provider = "vault-transit"', 'provider = "file"\nkey_file = "/tmp/k"')
    (tmp_path / "k.toml").write_text(text)
    with pytest.raises(ConfigError, match="allow_key_file = true"):
        load_settings(tmp_path / "k.toml", reload=True)


def test_missing_settings_file_says_how_to_give_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--config PATH"):
        load_settings(tmp_path / "absent.toml", reload=True)


@pytest.mark.parametrize("old,new,message", [
    ('host = "storage1"\npath', 'host = "nowhere"\npath', r"files_backup.sources.userfiles.host = 'nowhere' is not one of \[hosts.\*\]"),
    ('path = "/srv/storage/files"', 'path = "srv/storage/files"', r"files_backup.sources.userfiles: .*absolute directory"),
    ('bucket = "avatars"\n', '', r"files_backup.sources.avatars: .*needs bucket"),
    ('max_shrink_percent = 50', 'max_shrink_percent = 150', r"files_backup.sources.userfiles.max_shrink_percent"),
])
def test_file_sources_are_checked_at_load(tmp_path: Path, old: str, new: str, message: str) -> None:
    text = EXAMPLE.read_text()
    assert old in text
    (tmp_path / "f.toml").write_text(text.replace(old, new))
    with pytest.raises(ConfigError, match=message):
        load_settings(tmp_path / "f.toml", reload=True)


def test_example_file_sources_load() -> None:
    s = load_settings(EXAMPLE, reload=True)
    assert s.file_source("userfiles").kind == "ssh" and s.hosts["storage1"].port == 22
    assert str(s.file_source("avatars").secret_access_key) == "env:SUPABASE_S3_SECRET_KEY"
    with pytest.raises(ConfigError, match="no file source named"):
        s.file_source("nope")


def test_example_config_hosts_load() -> None:
    s = load_settings(EXAMPLE, reload=True)
    app1 = s.config_host("app1")
    assert "/etc/nginx/" in app1.paths and app1.services["nginx"].validate_command == "nginx -t"
    assert s.configs.retention_days == 90 and s.configs.git.over_ssh and s.configs.storage is None
    assert s.config_repo == s.work_dir / "config-repo"
    with pytest.raises(ConfigError, match="no config host named"):
        s.config_host("nope")


@pytest.mark.parametrize("old,new,message", [
    ('[configs.hosts.app1', '[configs.hosts.app2', r"configs.hosts.app2 has no \[hosts.app2\]"),
    ('  "/etc/nginx/",\n', '  "etc/nginx/",\n', r"configs.hosts.app1.paths must be absolute"),
    ('known_hosts = "/etc/luxima-backup/git_known_hosts"', '', r"configs.git.known_hosts is needed for an SSH remote"),
    ('paths = ["/etc/nginx/"]\nvalidate', 'paths = ["/etc/../nginx/"]\nvalidate', r"services paths must be absolute"),
    ('drift_alert = true', 'drift_alert = true\nfingerprint = "x"', r"configs.fingerprint\b.*Extra inputs"),
    ('remote = "ssh://git@git.internal/', 'remote = "https://bot:ghp_abcdef@git.internal/', r"must not hold a user, password or token"),
    ('remote = "ssh://git@git.internal/', 'remote = "https://ghp_abcdef@git.internal/', r"must not hold a user, password or token"),
    ('remote = "ssh://git@git.internal/', 'remote = "git://git.internal/', r"git:// transport is not supported"),
    ('names = ["^LUXIMA_.*_SEAL$"]', 'names = ["(unclosed"]', r"configs.secrets.names: '\(unclosed' is not a valid regular expression"),
])
def test_config_hosts_are_checked_at_load(tmp_path: Path, old: str, new: str, message: str) -> None:
    text = EXAMPLE.read_text()
    assert old in text
    (tmp_path / "c.toml").write_text(text.replace(old, new))
    with pytest.raises(ConfigError, match=message):
        load_settings(tmp_path / "c.toml", reload=True)


@pytest.mark.parametrize("remote,ssh", [("ssh://git@h/x.git", True), ("git+ssh://git@h/x.git", True), ("git@h:ops/x.git", True),
                                        ("/srv/git/x.git", False), ("https://h/x.git", False), ("file:///srv/x.git", False),
                                        ("./x.git", False)])
def test_git_remote_transport(remote: str, ssh: bool) -> None:
    from luxima_backup.settings import ConfigGit

    assert ConfigGit(remote=remote, known_hosts=Path("/k")).over_ssh is ssh
