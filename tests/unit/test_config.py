"""Configuration loading (kybdr_agent/config.py): TOML plus KYBDR_* environment overrides, one ConfigError
naming each bad field, and no DSN password in errors or in the printed configuration."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from kybdr_agent import config as config_module
from kybdr_agent.config import AgentSettings, load_settings
from kybdr_agent.errors import ConfigError

SECRET = "Hunter2-Sekr1t"

VALID = """
[backup]
enabled = true
encryption = true
retention_days = 30
schedule = "15 3 * * *"

[compression]
algorithm = "gzip"
level = 9

[encryption]
key_file = "/etc/kybdr-agent/master.key"
old_key_files = ["/etc/kybdr-agent/old.key"]
frame_size_kib = 256

[repository]
url = "s3://backups-bucket/prod/pg"
region = "eu-west-1"
max_parts = 1000
upload_concurrency = 4

[database]
dsn = "host=/run/postgresql user=backup"
databases = ["app", "billing"]
"""

NO_ENCRYPTION = """
[backup]
encryption = false
"""


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Nothing from the developer's environment or /etc may leak into these tests."""
    for name in list(os.environ):
        if name.upper().startswith("KYBDR_"):
            monkeypatch.delenv(name)


def write(tmp_path: Path, text: str, name: str = "agent.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# /etc's real file must not leak in: the default location these tests see never exists.
NO_DEFAULT = Path("/nonexistent/kybdr-agent-tests/agent.toml")


def error_for(path: Path | None) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(path, default_path=NO_DEFAULT)
    return str(info.value)


# ------------------------------------------------------------------------------------------- loading


def test_valid_file_loads(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, VALID))
    assert isinstance(settings, AgentSettings)
    assert settings.backup.retention_days == 30
    assert settings.backup.schedule == "15 3 * * *"
    assert settings.compression.algorithm == "gzip"
    assert settings.compression.level == 9
    assert settings.encryption.key_file == Path("/etc/kybdr-agent/master.key")
    assert settings.encryption.old_key_files == [Path("/etc/kybdr-agent/old.key")]
    assert settings.encryption.frame_size_kib == 256
    assert settings.repository.scheme == "s3"
    assert settings.repository.bucket == "backups-bucket"
    assert settings.repository.prefix == "prod/pg"
    assert settings.repository.region == "eu-west-1"
    assert settings.repository.max_parts == 1000
    assert settings.repository.upload_concurrency == 4
    assert settings.repository.part_size_mib == 0  # default kept
    assert settings.database.databases == ["app", "billing"]
    assert settings.database.dsn == "host=/run/postgresql user=backup"


def test_file_repository(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, NO_ENCRYPTION + '[repository]\nurl = "file:///srv/kybdr/repo"\n'))
    assert settings.repository.scheme == "file"
    assert settings.repository.local_path == Path("/srv/kybdr/repo")


def test_empty_file_with_encryption_off_gives_defaults(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, NO_ENCRYPTION))
    assert settings.repository.url == config_module.DEFAULT_REPOSITORY_URL
    assert settings.compression.algorithm == "zstd"
    assert settings.repository.max_parts == 10_000


def test_settings_are_frozen(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, NO_ENCRYPTION))
    with pytest.raises(ValueError, match="frozen"):
        settings.repository.url = "s3://other"  # type: ignore[misc]


# ------------------------------------------------------------------------------------------ environment


def test_env_overrides_one_nested_field_and_keeps_the_rest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KYBDR_REPOSITORY__URL", "s3://other-bucket/elsewhere")
    settings = load_settings(write(tmp_path, VALID))
    assert settings.repository.url == "s3://other-bucket/elsewhere"
    assert settings.repository.region == "eu-west-1"
    assert settings.repository.max_parts == 1000
    assert settings.repository.upload_concurrency == 4
    assert settings.compression.algorithm == "gzip"


def test_env_overrides_a_section_absent_from_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KYBDR_DATABASE__MAINTENANCE_DATABASE", "template1")
    settings = load_settings(write(tmp_path, NO_ENCRYPTION))
    assert settings.database.maintenance_database == "template1"
    assert settings.database.connect_timeout_seconds == 15.0


def test_env_values_are_validated_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KYBDR_REPOSITORY__MAX_PARTS", "2")
    message = error_for(write(tmp_path, VALID))
    assert "repository.max_parts" in message


def test_default_location_may_be_absent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KYBDR_BACKUP__ENCRYPTION", "false")
    monkeypatch.setenv("KYBDR_REPOSITORY__URL", "file:///srv/repo")
    settings = load_settings(None, default_path=NO_DEFAULT)
    assert settings.backup.encryption is False
    assert settings.repository.url == "file:///srv/repo"


def test_defaults_alone_need_a_key_file() -> None:
    message = error_for(None)
    assert "encryption.key_file" in message
    assert "defaults and KYBDR_* environment" in message


# --------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("toml", "field"),
    [
        (NO_ENCRYPTION + '[repository]\nurll = "s3://b"\n', "repository.urll"),
        ("[backup]\nencryption = false\nencrypt = true\n", "backup.encrypt"),
        (NO_ENCRYPTION + "[replication]\nenabled = true\n", "replication"),
        ("verbose = true\n" + NO_ENCRYPTION, "verbose"),
    ],
)
def test_unknown_key_is_named(tmp_path: Path, toml: str, field: str) -> None:
    message = error_for(write(tmp_path, toml))
    assert f"  {field}: unknown setting" in message


@pytest.mark.parametrize(
    ("toml", "field", "problem"),
    [
        ('[repository]\nurl = "ftp://x"\n', "repository.url", "must start with file:// or s3://"),
        ('[repository]\nurl = "file://relative/path"\n', "repository.url", "absolute path"),
        ('[repository]\nurl = "s3:///prefix"\n', "repository.url", "needs a bucket"),
        ("[repository]\nmax_parts = 2\n", "repository.max_parts", "greater than or equal to 4"),
        ("[repository]\nmax_parts = 10001\n", "repository.max_parts", "less than or equal to 10000"),
        ("[repository]\npart_size_mib = 3\n", "repository.part_size_mib", "at least 5 MiB"),
        ('[repository]\naddressing_style = "dns"\n', "repository.addressing_style", "'auto', 'path' or 'virtual'"),
        ("[compression]\nlevel = 23\n", "compression", "zstd level must be 1..22"),
        ('[compression]\nalgorithm = "gzip"\nlevel = 10\n', "compression", "gzip level must be 1..9"),
        ("[compression]\nthreads = 17\n", "compression.threads", "less than or equal to 16"),
        ("[encryption]\nframe_size_kib = 0\n", "encryption.frame_size_kib", "must be between 1 and 16384"),
        ("[encryption]\nframe_size_kib = 16385\n", "encryption.frame_size_kib", "must be between"),
        ("[backup]\nencryption = false\nretention_days = 0\n", "backup.retention_days", "greater than or equal to 1"),
        (
            "[backup]\nencryption = false\ncross_region = true\n",
            "backup",
            "cross_region = true needs cross_region_bucket",
        ),
        ('[backup]\nencryption = false\nenabled = "maybe"\n', "backup.enabled", "valid boolean"),
    ],
)
def test_bad_value_names_field_and_problem(tmp_path: Path, toml: str, field: str, problem: str) -> None:
    text = toml if "[backup]" in toml else NO_ENCRYPTION + toml
    message = error_for(write(tmp_path, text))
    lines = [line for line in message.splitlines() if line.startswith(f"  {field}: ")]
    assert lines, message
    assert problem in lines[0]


def test_bad_numbers_are_shown_but_strings_never_are(tmp_path: Path) -> None:
    """A string could be a DSN with a password in it, whatever field it landed in: never echo one."""
    message = error_for(write(tmp_path, NO_ENCRYPTION + '[repository]\nurl = "ftp://x"\nmax_parts = 2\n'))
    assert "(got 2)" in message
    assert "ftp://x" not in message
    assert "must start with file:// or s3://" in message
    assert str(tmp_path / "agent.toml") in message


def test_every_problem_is_reported(tmp_path: Path) -> None:
    toml = NO_ENCRYPTION + '[repository]\nurl = "ftp://x"\nmax_parts = 2\nbogus = 1\n'
    message = error_for(write(tmp_path, toml))
    assert "3 problem(s)" in message
    for field in ("repository.url", "repository.max_parts", "repository.bogus"):
        assert f"  {field}: " in message


@pytest.mark.parametrize(
    "text",
    ["[backup\nencryption = false\n", "encryption = \n", "[backup]\nencryption = false\nencryption = true\n", "a = 'x"],
)
def test_invalid_toml(tmp_path: Path, text: str) -> None:
    assert "not valid TOML" in error_for(write(tmp_path, text))


def test_missing_explicit_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    message = error_for(path)
    assert str(path) in message
    assert "does not exist" in message


def test_unreadable_config_path(tmp_path: Path) -> None:
    assert "cannot read config file" in error_for(tmp_path)


def test_non_utf8_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_bytes(b"[backup]\nencryption = false\n# caf\xe9 in latin-1\n")
    assert "agent.toml" in error_for(path)


def test_encryption_without_key_file(tmp_path: Path) -> None:
    message = error_for(write(tmp_path, "[backup]\nencryption = true\n"))
    assert "backup.encryption is on but encryption.key_file is not set" in message
    assert "keygen" in message


def test_encryption_with_key_file_loads(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, '[encryption]\nkey_file = "/etc/kybdr-agent/master.key"\n'))
    assert settings.backup.encryption is True
    assert settings.encryption.key_file == Path("/etc/kybdr-agent/master.key")


# --------------------------------------------------------------------------------------- secret DSNs


@pytest.mark.parametrize(
    "dsn",
    [
        f"postgresql://backup:{SECRET}@db.example.com:5432/app",
        f"host=db user=backup password={SECRET}",
        f"host=db user=backup password='{SECRET}'",
    ],
)
def test_valid_dsn_password_absent_from_errors_elsewhere(tmp_path: Path, dsn: str) -> None:
    toml = NO_ENCRYPTION + f'[repository]\nurl = "ftp://x"\n[database]\ndsn = "{dsn}"\n'
    message = error_for(write(tmp_path, toml))
    assert "repository.url" in message
    assert SECRET not in message


@pytest.mark.parametrize(
    "dsn",
    [
        f"postgresql://backup:{SECRET}@db:notaport/app",
        f"postgresql://backup:{SECRET}@db/app?bogus=1",
        f"host=db password={SECRET} bogus=1",
        f"host=db password='{SECRET}",
        f"host=db password={SECRET} port",
    ],
)
def test_invalid_dsn_error_names_field_but_not_password(tmp_path: Path, dsn: str) -> None:
    message = error_for(write(tmp_path, NO_ENCRYPTION + f'[database]\ndsn = "{dsn}"\n'))
    assert "database.dsn" in message
    assert SECRET not in message


def test_invalid_dsn_from_environment_does_not_leak(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KYBDR_DATABASE__DSN", f"postgresql://backup:{SECRET}@db:x/app")
    message = error_for(write(tmp_path, NO_ENCRYPTION))
    assert "database.dsn" in message
    assert SECRET not in message


def test_dsn_missing_equals_does_not_leak(tmp_path: Path) -> None:
    message = error_for(write(tmp_path, NO_ENCRYPTION + f'[database]\ndsn = "password {SECRET} host=db"\n'))
    assert SECRET not in message


def test_dsn_in_place_of_database_table_does_not_leak(tmp_path: Path) -> None:
    toml = f'database = "postgresql://backup:{SECRET}@db/app"\n' + NO_ENCRYPTION
    message = error_for(write(tmp_path, toml))
    assert SECRET not in message


@pytest.mark.parametrize(
    "dsn",
    [
        f"postgresql://backup:{SECRET}@db.example.com:5432/app?sslmode=require",
        f"host=db user=backup password={SECRET}",
        f"host=db user=backup password='{SECRET}' sslmode=verify-full",
    ],
)
def test_masked_hides_dsn_password(tmp_path: Path, dsn: str) -> None:
    settings = load_settings(write(tmp_path, NO_ENCRYPTION + f'[database]\ndsn = "{dsn}"\n'))
    assert settings.database.dsn == dsn
    masked = settings.masked()
    assert SECRET not in json.dumps(masked)
    assert "password=********" in masked["database"]["dsn"]
    assert "db" in masked["database"]["dsn"]


def test_masked_keeps_passwordless_dsn_and_everything_else(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, VALID))
    masked = settings.masked()
    assert masked["database"]["dsn"] == "host=/run/postgresql user=backup"
    assert masked["repository"]["url"] == "s3://backups-bucket/prod/pg"
    assert masked["encryption"]["key_file"] == "/etc/kybdr-agent/master.key"
    json.dumps(masked)  # JSON-ready for ``config check``


def test_masked_from_environment_dsn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KYBDR_DATABASE__DSN", f"postgresql://backup:{SECRET}@db/app")
    settings = load_settings(write(tmp_path, NO_ENCRYPTION))
    assert SECRET not in json.dumps(settings.masked())


# ----------------------------------------------------------------------------- bounds (issue 7, item 11)


@pytest.mark.parametrize(
    ("toml", "field", "problem"),
    [
        ("[daemon]\nhousekeeping_interval = -5\n", "daemon.housekeeping_interval", "between 1s and 1d"),
        ('[daemon]\nhousekeeping_interval = "0s"\n', "daemon.housekeeping_interval", "between 1s and 1d"),
        ('[daemon]\nhousekeeping_interval = "2d"\n', "daemon.housekeeping_interval", "between 1s and 1d"),
        ('[daemon]\nsweep_older_than = "31d"\n', "daemon.sweep_older_than", "between 0s and 30d"),
        ('[daemon]\nsweep_older_than = "99999999999999y"\n', "daemon.sweep_older_than", "at most 100 years"),
        ("[daemon]\nsweep_older_than = 1e400\n", "daemon.sweep_older_than", "at most 100 years"),
        ("[backup]\nencryption = false\nretention_days = 36501\n", "backup.retention_days", "less than or equal"),
        ('[daemon]\nservice_user = "bad user"\n', "daemon.service_user", "should match pattern"),
        ('[control]\nsocket = "relative.sock"\n', "control.socket", "absolute path"),
        ('[control]\nsocket = "/' + "s" * 120 + '"\n', "control.socket", "at most 107 bytes"),
        ('[database]\ndatabases = ["' + "d" * 64 + '"]\n', "database.databases", "1 to 63 bytes"),
        ('[repository]\nurl = "s3://bad bucket/x"\n', "repository.url", "bucket name"),
        ('[repository]\nendpoint_url = "ftp://minio:21"\n', "repository.endpoint_url", "http:// or https://"),
        ('[repository]\nendpoint_url = "http://minio:0"\n', "repository.endpoint_url", "port"),
        ('[repository]\nendpoint_url = "http://minio:99999"\n', "repository.endpoint_url", "not a valid URL"),
        ('[repository]\nregion = "eu west"\n', "repository.region", "should match pattern"),
        ('[control]\ntcp_listen = "bad host:80"\n', "control.tcp_listen", "not a valid host"),
    ],
)
def test_bounded_values(tmp_path: Path, toml: str, field: str, problem: str) -> None:
    text = toml if "[backup]" in toml else NO_ENCRYPTION + toml
    message = error_for(write(tmp_path, text))
    lines = [line for line in message.splitlines() if line.startswith(f"  {field}: ")]
    assert lines, message
    assert problem in lines[0], lines[0]


def test_sweep_grace_defaults_to_zero_and_durations_accept_seconds(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, NO_ENCRYPTION + "[daemon]\nhousekeeping_interval = 90\n"))
    assert settings.daemon.sweep_older_than.total_seconds() == 0
    assert settings.daemon.housekeeping_interval.total_seconds() == 90
    assert settings.daemon.service_user == "kybdr"


def test_endpoint_url_with_credentials_is_refused_without_echoing_them(tmp_path: Path) -> None:
    toml = NO_ENCRYPTION + f'[repository]\nurl = "s3://b/p"\nendpoint_url = "https://admin:{SECRET}@minio:9000"\n'
    message = error_for(write(tmp_path, toml))
    assert "repository.endpoint_url: must not contain credentials" in message
    assert SECRET not in message


def test_mask_url_hides_a_password() -> None:
    assert config_module.mask_url(f"https://admin:{SECRET}@minio:9000/x") == "https://admin:********@minio:9000/x"
    assert config_module.mask_url("https://minio:9000") == "https://minio:9000"


def test_validator_messages_never_quote_the_string(tmp_path: Path) -> None:
    """The cron parser quotes what it could not parse; a DSN pasted into schedule must not come back."""
    toml = f'[backup]\nencryption = false\nschedule = "postgresql://u:{SECRET}@db/app"\n'
    message = error_for(write(tmp_path, toml))
    assert "backup.schedule" in message
    assert SECRET not in message


def test_config_is_read_once_so_a_pipe_works(tmp_path: Path) -> None:
    """``--config <(generate-config)``: the file can be read only once."""
    fifo = tmp_path / "agent.fifo"
    os.mkfifo(fifo)

    def feed() -> None:
        with open(fifo, "w") as fh:
            fh.write(NO_ENCRYPTION + "[repository]\nmax_parts = 1000\n")

    writer = threading.Thread(target=feed)
    writer.start()
    settings = load_settings(fifo)
    writer.join()
    assert settings.repository.max_parts == 1000


def test_a_huge_config_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(NO_ENCRYPTION + "#" * (2 << 20) + "\n")
    assert "larger than 1 MiB" in error_for(path)


def test_a_directory_as_config_is_one_error(tmp_path: Path) -> None:
    assert "Is a directory" in error_for(tmp_path)


def test_problems_are_capped_and_control_characters_escaped(tmp_path: Path) -> None:
    toml = NO_ENCRYPTION + "".join(f'"bad\\u001b[31mkey{n}" = 1\n' for n in range(40))
    message = error_for(write(tmp_path, toml))
    assert "40 problem(s)" in message
    assert "… and 20 more" in message
    assert "\x1b" not in message
