"""The globals in the manifest and in what the CLI prints (kybdr_agent/backup/manifest.py, cli_output.py): an old
manifest without them still loads, a manifest cannot point at another backup's globals, and people see whether
role passwords were stored and what a --with-globals restore created."""

from __future__ import annotations

import argparse

import pytest

from kybdr_agent.backup.catalog import manifest_document
from kybdr_agent.backup.manifest import GlobalsObject, Manifest, globals_key_path
from kybdr_agent.cli_output import print_manifest, print_restore
from tests.unit.test_manifest import VALID_ID, manifest_fields


def _globals(key: str, passwords: bool = True) -> GlobalsObject:
    return GlobalsObject(
        object_key=key,
        sql_bytes=2000,
        compressed_bytes=700,
        stored_bytes=2048,
        sha256="ab" * 32,
        frames=1,
        stream_header="00" * 39,
        role_passwords=passwords,
        pg_dumpall_version="pg_dumpall (PostgreSQL) 15.18",
    )


def test_a_manifest_without_globals_loads_and_one_with_them_round_trips() -> None:
    old = Manifest(**manifest_fields())
    assert old.globals is None
    assert Manifest.from_json(old.to_json().replace(b'  "globals": null,\n', b"")) == old
    made = Manifest(**manifest_fields(), globals=_globals(globals_key_path("app", VALID_ID)))
    assert Manifest.from_json(made.to_json()) == made


def test_a_manifest_cannot_name_another_backups_globals() -> None:
    elsewhere = globals_key_path("app", "20200101T000000Z-deadbeef")
    with pytest.raises(ValueError, match="own folder"):
        Manifest(**manifest_fields(), globals=_globals(elsewhere))


def test_show_says_whether_role_passwords_were_stored(capsys: pytest.CaptureFixture[str]) -> None:
    args = argparse.Namespace(json=False)
    made = Manifest(**manifest_fields(), globals=_globals(globals_key_path("app", VALID_ID), passwords=False))
    print_manifest(manifest_document(made), args)
    print_manifest(manifest_document(Manifest(**manifest_fields())), args)
    out = capsys.readouterr().out
    assert f"backups/app/{VALID_ID}/globals (2.0 KiB, without role passwords)" in out
    assert "made before roles were recorded" in out


def test_restore_prints_what_the_globals_did(capsys: pytest.CaptureFixture[str]) -> None:
    result = {
        "backup_id": VALID_ID,
        "target_database": "copy",
        "replaced_existing": False,
        "dump_bytes": 1 << 20,
        "seconds": 1.5,
        "globals": {"roles_created": ["a", "b"], "roles_existing": ["postgres"], "tablespaces_created": []},
    }
    print_restore(result, argparse.Namespace(json=False))
    out = capsys.readouterr().out
    assert "globals: 2 role(s) created, 1 already there and left as they were, 0 tablespace(s) created" in out
