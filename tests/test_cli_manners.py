"""The ``giftcard`` command line as operators use it: settings refused by name before anything starts,
``--version``, ``--log-level``, ``--database-url``, ``db`` commands that say which database they act
on, ``export transactions`` to stdout, and a progress bar only on a terminal (issue 26, items 2 and 5)."""

from __future__ import annotations

import asyncio
import csv
import fcntl
import io
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from importlib.metadata import version
from urllib.parse import urlsplit, urlunsplit

import pytest

from hub.config import ENVIRONMENT_NAMES, SettingRefused, Settings, variable_of
from tests.giftcard_cli import ROOT, giftcard
from tests.test_projections import write_cards

README = ROOT / "README.md"

# ---- item 2: settings refused by name ------------------------------------------------------------

BAD_SETTINGS = [
    ("GIFTCARD_STATEMENT_TIMEOUT_S", "15s", "is not a number of seconds (> 0 and <= 3600, e.g. 5)"),
    ("GIFTCARD_RUN_PROJECTIONS", "flase", "is not true or false (true, false, 1, 0, yes or no)"),
    ("GIFTCARD_POOL_SIZE_MAX", "-3", "is not a whole number (>= 2 and <= 1000, e.g. 20)"),
    ("GIFTCARD_WEBHOOK_ATTEMPTS_MAX", "0", "is not a whole number (>= 1 and <= 1000, e.g. 10)"),
    ("GIFTCARD_HOLD_TTL", "3 weeks", "is not a duration (a duration such as 3600, 90s, 30m, 72h or 7d; 0: off)"),
    ("GIFTCARD_DEFAULT_CURRENCY", "XXQ", "is not an ISO 4217 currency code (a code such as USD, EUR or JPY)"),
    (
        "GIFTCARD_TRUSTED_PROXIES",
        "10.0.0.0/33",
        "is not a comma-separated list of CIDRs ('10.0.0.0/33' is not an IP address or CIDR)",
    ),
]


@pytest.mark.parametrize(("variable", "value", "allowed"), BAD_SETTINGS)
async def test_a_bad_setting_ends_the_run_with_one_line_naming_it_and_exit_2(
    variable, value, allowed, database_url, tmp_path
):
    # `db upgrade` would write to the database; `serve` would start listening: neither may start.
    for command in (("db", "upgrade"), ("serve", "--port", "9")):
        code, out, err = await giftcard(
            {"GIFTCARD_DATABASE_URL": database_url, "GIFTCARD_DATA_DIR": str(tmp_path), variable: value}, *command
        )
        assert (code, out) == (2, ""), (command, err[-2000:])
        assert err == f"giftcard: {variable}={value!r} {allowed}\n"


async def test_a_refused_database_url_never_shows_its_password(tmp_path):
    code, _, err = await giftcard({"GIFTCARD_DATABASE_URL": "mysql://ops:hunter2@db:3306/x"}, "keys", "list")
    assert code == 2 and "hunter2" not in err
    assert err == "giftcard: GIFTCARD_DATABASE_URL='mysql://ops:***@db:3306/x' is not a PostgreSQL URL " + (
        "(postgresql://user@host:5432/name, several host:port for a failover)\n"
    )
    assert not (tmp_path / "pgdata").exists()


def test_settings_are_typed_with_their_ranges():
    def read(**environ: str) -> Settings:
        return Settings.from_env({f"GIFTCARD_{k.upper()}": v for k, v in environ.items()})

    assert read().run_projections is True and read().statement_timeout_s == 5.0
    for word, meant in [("yes", True), ("No", False), ("0", False), ("TRUE", True), (" false ", False)]:
        assert read(run_projections=word).run_projections is meant
        assert read(run_webhooks=word).run_webhooks is meant
    settings = read(statement_timeout_s="2.5", pool_size_max="3", hold_ttl="72h", provider_allowlist="a, ,10.0.0.0/8")
    assert (settings.statement_timeout_s, settings.pool_size_max, settings.hold_ttl_s) == (2.5, 3, 72 * 3600)
    assert settings.provider_allowlist == ("a", "10.0.0.0/8")
    assert read(pool_size_max="").pool_size_max == 20  # empty: unset
    for name, value in [("statement_timeout_s", "0"), ("statement_timeout_s", "nan"), ("pool_size_max", "1e9")]:
        with pytest.raises(SettingRefused, match=f"GIFTCARD_{name.upper()}="):
            read(**{name: value})
    with pytest.raises(SettingRefused, match="off"):  # "off" was once a false, and "on" a true
        read(run_projections="off")


def test_a_secret_setting_is_never_shown_by_the_settings():
    settings = Settings.from_env(
        {"GIFTCARD_SECRET_KEY": "s3cret-root", "GIFTCARD_APP_TOKEN": "s3cret-token", "GIFTCARD_APP_KEY": "key-1"}
    )
    assert settings.secret_key == "s3cret-root" and "key-1" in repr(settings)
    assert "s3cret" not in repr(settings) and "s3cret" not in str(settings)
    assert "hunter2" not in repr(Settings(database_url="postgresql://ops:hunter2@db/giftcard"))


def test_every_setting_is_in_the_readme_configuration_table_with_its_default():
    rows = configuration_rows()
    documented = {variable for variables in rows for variable in variables.split(" / ")}
    assert documented == {variable_of(name) for name in ENVIRONMENT_NAMES}
    defaults = Settings()
    for variables, default in rows.items():
        for variable in variables.split(" / "):
            name = next(n for n in ENVIRONMENT_NAMES if variable_of(n) == variable)
            value = getattr(defaults, name)
            if isinstance(value, bool):
                assert f"`{str(value).lower()}`" in default, variable
            elif isinstance(value, int | float) and value:
                assert f"`{value:g}`" in default, (variable, default)


def configuration_rows() -> dict[str, str]:
    """``| `GIFTCARD_A` / `GIFTCARD_B` | default | meaning |`` rows: {"GIFTCARD_A / GIFTCARD_B": default}."""
    section = README.read_text().split("## Configuration", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if line.startswith("| `GIFTCARD_"):
            rows[" / ".join(re.findall(r"`(GIFTCARD_\w+)`", cells[0]))] = cells[1]
    return rows


# ---- item 5: the command line's manners -------------------------------------------------------------


async def test_version_is_the_installed_distributions():
    code, out, err = await giftcard({"GIFTCARD_POOL_SIZE_MAX": "-3"}, "--version")  # whatever the environment
    assert (code, out, err) == (0, f"giftcard {version('giftcard-hub')}\n", "")


async def test_db_status_and_grant_say_which_database_and_never_start_an_embedded_one(database_url, tmp_path):
    for command in (("db", "status"), ("db", "grant", "giftcard_service")):
        code, out, err = await giftcard({"GIFTCARD_DATA_DIR": str(tmp_path)}, *command)
        assert (code, out) == (2, ""), err[-2000:]
        assert (
            f"giftcard {' '.join(command[:2])}: no database named: set GIFTCARD_DATABASE_URL or pass --database-url"
            in err
        )
        assert not any(tmp_path.iterdir()), "no embedded PostgreSQL started"
    code, out, err = await giftcard({}, "--database-url", database_url, "db", "status")
    assert code == 0 and "synchronously replicated: NO" in out
    assert err.startswith(f"database: {database_url}\n")
    # The test server trusts local connections: a password in the URL is ignored by it, hidden by us.
    parts = urlsplit(database_url)
    user = parts.netloc.rpartition("@")[0].partition(":")[0] or "postgres"
    with_password = urlunsplit(parts._replace(netloc=f"{user}:hunter2@{parts.netloc.rpartition('@')[2]}"))
    code, _, err = await giftcard({}, "--database-url", with_password, "db", "status")
    assert code == 0 and "hunter2" not in err and f"database: postgresql://{user}:***@" in err


async def test_database_url_option_wins_over_the_variable(database_url):
    code, out, err = await giftcard(
        {"GIFTCARD_DATABASE_URL": "postgresql://nobody@127.0.0.1:9/none"},
        "--database-url",
        database_url,
        "keys",
        "list",
    )
    assert code == 0 and out.startswith("app key"), err[-2000:]
    code, _, err = await giftcard({}, "--database-url", "mysql://x@y/z", "keys", "list")
    assert code == 2 and "--database-url: not a PostgreSQL URL" in err


async def test_export_transactions_defaults_to_csv_and_writes_to_stdout(pool, ledger, clock, database_url):
    await write_cards(ledger, clock, 2, "stdout")
    code, out, err = await giftcard({"GIFTCARD_DATABASE_URL": database_url}, "export", "transactions", "--output", "-")
    assert code == 0, err[-2000:]
    rows = list(csv.DictReader(io.StringIO(out)))
    assert len(rows) == 10 and {row["operation"] for row in rows} >= {"Credit", "Debit"}
    assert "exported 10 row(s) to" in err and "exported" not in out  # the summary keeps off the data
    code, out, _ = await giftcard({"GIFTCARD_DATABASE_URL": database_url}, "export", "transactions", "--help")
    assert code == 0 and "(default csv)" in out and "- writes to stdout" in out


async def test_projections_run_once_shows_a_bar_on_a_terminal_only(pool, ledger, clock, database_url):
    await write_cards(ledger, clock, 2, "bar")
    env = {"GIFTCARD_DATABASE_URL": database_url}
    code, out, err = await giftcard(env, "projections", "run", "--once")
    assert code == 0 and "caught up: 36 event(s) applied" in out
    assert "\r" not in err and "event/s" not in err  # no bar in a container's log
    logged = [json.loads(line) for line in err.splitlines()]
    assert any(line["message"].startswith("projection ") for line in logged)  # JSON lines off a terminal

    await write_cards(ledger, clock, 1, "bar-tty")
    out, terminal = await asyncio.to_thread(run_with_terminal_stderr, env, "projections", "run", "--once")
    assert "caught up: 18 event(s) applied" in out
    assert "projections: 100%" in terminal and "18/18" in terminal
    assert "INFO hub.cli.projections projection " in terminal and '{"ts"' not in terminal  # readable lines

    await write_cards(ledger, clock, 1, "quiet")
    code, out, err = await giftcard(env, "--log-level", "warning", "projections", "run", "--once")
    assert code == 0 and "caught up: 18 event(s) applied" in out and err == ""


def run_with_terminal_stderr(env: dict[str, str], *args: str) -> tuple[str, str]:
    """(stdout, what a terminal on stderr showed) of ``giftcard args``."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("GIFTCARD_")}
    leader, follower = pty.openpty()
    # A real terminal has a size; a fresh pty's 0 columns would leave tqdm no room to draw in.
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    with subprocess.Popen(
        [sys.executable, "-m", "hub.cli", *args],
        cwd=ROOT,
        env={**inherited, "GIFTCARD_NATIVE_PROVIDER_ID": "VtexGiftCard", **env},
        stdout=subprocess.PIPE,
        stderr=follower,
    ) as process:
        os.close(follower)
        shown = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the child closed its end
                break
            if not chunk:
                break
            shown += chunk
        out = process.stdout.read().decode()
        assert process.wait(timeout=120) == 0, shown.decode()[-2000:]
    os.close(leader)
    return out, shown.decode(errors="replace")
