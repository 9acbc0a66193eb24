"""The ``authgate apikey`` and ``authgate device`` commands, against a SQLite store of their own."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from authgate.cli import app
from tests.conftest import FAST_HASHING, MASTER, PASSWORD


@pytest.fixture
def cli_env(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTHGATE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("AUTHGATE_MASTER_SECRET", MASTER)
    for name, value in FAST_HASHING.items():
        monkeypatch.setenv(f"AUTHGATE_{name.upper()}", str(value))
    monkeypatch.setenv("COLUMNS", "250")
    return CliRunner()


def test_apikey_create_list_and_revoke(cli_env):
    created = cli_env.invoke(app, ["apikey", "create", "reporting app"])
    assert created.exit_code == 0, created.output
    raw = re.search(r"(agk_\S+)", created.output).group(1)
    key_id = re.search(r"API key (\S+) created", created.output).group(1)
    listed = cli_env.invoke(app, ["apikey", "list"])
    assert key_id in listed.output and raw[:12] in listed.output and raw not in listed.output
    revoked = cli_env.invoke(app, ["apikey", "revoke", key_id])
    assert revoked.exit_code == 0 and "revoked" in revoked.output
    missing = cli_env.invoke(app, ["apikey", "revoke", "no-such-key"])
    assert missing.exit_code == 1


def test_device_list_and_revoke(cli_env):
    assert cli_env.invoke(app, ["user", "create", "dev@example.com",
                                "--password", PASSWORD]).exit_code == 0
    empty = cli_env.invoke(app, ["device", "list", "dev@example.com"])
    assert empty.exit_code == 0
    assert cli_env.invoke(app, ["device", "list", "nobody@example.com"]).exit_code == 1
    unknown = cli_env.invoke(app, ["device", "revoke", "no-such-device"])
    assert unknown.exit_code == 1 and "device_not_found" in unknown.output
