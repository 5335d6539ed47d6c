"""The command line's own decisions (the commands themselves are tested where their work is:
check-config and import-customers in test_config.py, serve in tests/reliability)."""

from __future__ import annotations

import logging

import pytest

from router.cli import demo_tokens_allowed, main


@pytest.mark.parametrize(("host", "public_base_url", "allowed"), [
    ("127.0.0.1", "http://127.0.0.1:8080", True),  # the README's demo
    ("localhost", "http://localhost:8080", True),
    ("::1", "http://[::1]:8080", True),
    ("0.0.0.0", "http://127.0.0.1:8080", False),  # reachable from other machines
    ("192.0.2.10", "http://192.0.2.10:8080", False),
    # a reverse proxy on the same machine reaches a loopback listener: the public URL tells
    ("127.0.0.1", "https://kontakt.example.org", False),
    ("127.0.0.1", "https://203.0.113.5", False),
])
def test_demo_tokens_only_for_a_service_on_this_machine_alone(host: str, public_base_url: str, allowed: bool) -> None:
    assert demo_tokens_allowed(host, public_base_url) is allowed


def test_serve_refuses_a_channel_setting_naming_the_file_and_key(tmp_path, capsys) -> None:
    """It died with a traceback, while check-config had said OK."""
    from router.config import DEFAULT_CONFIG

    text = DEFAULT_CONFIG.read_text("utf-8")
    assert "forward_timeout = 20" in text
    bad = tmp_path / "bad.toml"
    bad.write_text(text.replace("forward_timeout = 20", 'forward_timeout = "zwanzig"'), "utf-8")
    assert main(["serve", "--config", str(bad), "--port", "0", "--data-dir", str(tmp_path / "data")]) == 1
    err = capsys.readouterr().err
    assert f"{bad}: channels.phone.forward_timeout" in err and "Traceback" not in err


@pytest.mark.parametrize(("old", "new", "key"), [
    ('"bau@example.org" = { unit = "bauhotline"', '"bau@example.org" = { unit = "Bauhotline"',
     "channels.email.addresses.bau@example.org.unit"),
    ('bauhotline = "+493012345670"', 'bau-hotline = "+493012345670"', "channels.phone.forward_numbers.bau-hotline"),
])
def test_a_channel_setting_naming_a_unit_that_does_not_exist_is_refused_by_both_commands(tmp_path, capsys, old, new, key):
    """check-config and serve said OK; every mail to the address was then refused (its unit
    hint no unit id), or the unit's calls were never put through."""
    from router.config import DEFAULT_CONFIG

    text = DEFAULT_CONFIG.read_text("utf-8")
    assert old in text
    bad = tmp_path / "bad.toml"
    bad.write_text(text.replace(old, new), "utf-8")
    assert main(["check-config", str(bad)]) == 1
    assert main(["serve", "--config", str(bad), "--port", "0", "--data-dir", str(tmp_path / "data")]) == 1
    err = capsys.readouterr().err
    assert err.count(f"{bad}: {key}") == 2 and "unknown unit" in err and "Traceback" not in err


def test_a_port_out_of_range_is_refused_naming_the_option(capsys) -> None:
    """With uvloop the service listened on some other port; without, a traceback."""
    with pytest.raises(SystemExit) as stopped:
        main(["serve", "--port", "99999"])
    assert stopped.value.code == 2 and "--port: a port is 0 to 65535, not 99999" in capsys.readouterr().err


@pytest.mark.parametrize(("value", "level"), [("debug", logging.DEBUG), ("Warning", logging.WARNING), ("verbose", logging.INFO)])
def test_the_log_level_is_read_in_any_case_and_an_unknown_one_is_info(monkeypatch, capsys, value, level) -> None:
    """"debug" in lower case ended every command, check-config too, in a traceback."""
    from router.cli import _log_level

    monkeypatch.setenv("CONTACT_ROUTER_LOG_LEVEL", value)
    assert _log_level() == level
    assert ("unknown level" in capsys.readouterr().err) == (value == "verbose")


def test_serve_on_a_port_in_use_or_a_data_folder_that_is_a_file_says_so_in_one_line(tmp_path, capsys) -> None:
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        assert main(["serve", "--port", str(port), "--data-dir", str(tmp_path / "data")]) == 1
    finally:
        taken.close()
    err = capsys.readouterr().err
    assert f"--port {port}" in err and "address already in use" in err and "Traceback" not in err
    afile = tmp_path / "afile"
    afile.write_text("", "utf-8")
    assert main(["serve", "--port", "0", "--data-dir", str(afile)]) == 1
    err = capsys.readouterr().err
    assert f"--data-dir {afile}" in err and "Traceback" not in err


def test_serve_whose_service_fails_to_start_exits_instead_of_hanging(tmp_path) -> None:
    """A channel service that fails as the app starts (here the e-mail channel's SMTP listener
    on a port in use; a third-party plugin's service that raises before its ``yield`` does the
    same) printed its one line and returned 1, but the process never ended: the store's writer
    thread, opened by an earlier start-up step, was never closed. A supervisor saw a service
    that runs and listens on nothing."""
    import os
    import socket
    import subprocess
    import sys

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    smtp_port = taken.getsockname()[1]
    code = ("import sys; from router.cli import main; "
            f"sys.exit(main(['serve', '--port', '0', '--data-dir', {str(tmp_path / 'data')!r}]))")
    env = {**os.environ, "SMTP_LISTEN_PORT": str(smtp_port)}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            pytest.fail(f"serve was still running 30 s after its start failed:\n{out.decode(errors='replace')[-600:]}")
    finally:
        taken.close()
    assert proc.returncode == 1, out
    assert b"channel 'email' (plugin email) could not start" in out and b"address already in use" in out, out


@pytest.mark.parametrize("problem", ["read-only", "database is a folder", "not a database"])
def test_serve_on_a_database_it_cannot_open_says_so_in_one_line(tmp_path, capsys, problem) -> None:
    """A data folder the service may not write to (a volume mounted read-only, wrong owner), a
    database path that is a folder, or a file that is no database: expected conditions for an
    operator, which should end serve with one line naming the data folder, as a port in use
    does. It printed a 40-line traceback of sqlite3's error instead."""
    import os

    data = tmp_path / "data"
    data.mkdir()
    db = data / "contact-router.sqlite3"
    if problem == "read-only":
        if os.geteuid() == 0:
            pytest.skip("root writes to a read-only folder; run as another user (or on a read-only mount)")
        data.chmod(0o555)
    elif problem == "database is a folder":
        db.mkdir()
    else:
        db.write_bytes(b"this is no SQLite database, just text long enough to have a header" * 4)
    try:
        assert main(["serve", "--port", "0", "--data-dir", str(data)]) == 1
    finally:
        data.chmod(0o755)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-800:]
    assert f"--data-dir {data}" in err, err[-800:]


def test_serve_on_a_full_disk_says_so_in_one_line(tmp_path, capsys, monkeypatch) -> None:
    """A fresh data folder on a full volume: the migrations cannot be written. serve ended with
    two chained tracebacks whose last line, the one a journal shows, blamed something else:
    "cannot rollback - no transaction is active" (SQLite had rolled back itself, and the
    migration's ROLLBACK raised over the real error). Here the disk is made full by capping the
    database's pages: serve raises sqlite3's "database or disk is full" out of main() as a
    traceback; on a real 64 KiB tmpfs it is the two tracebacks above."""
    import router.store.sqlite as sqlite_store

    connect = sqlite_store._connect

    def capped(path):
        conn = connect(path)
        conn.execute("PRAGMA max_page_count=8")
        return conn

    monkeypatch.setattr(sqlite_store, "_connect", capped)
    monkeypatch.setenv("SMTP_LISTEN_PORT", "0")
    try:
        code = main(["serve", "--port", "0", "--data-dir", str(tmp_path / "data")])
    except Exception as exc:  # noqa: BLE001 - what an operator would see
        pytest.fail(f"serve raised {type(exc).__name__}: {exc}")
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert "full" in err and "cannot rollback" not in err, err[-800:]


def test_serve_on_a_data_folder_another_serve_holds_is_refused_in_one_line(tmp_path, capsys) -> None:
    """Two services on one folder each ran the outbox and the escalation scheduler on the same
    database: acknowledgements sent twice, cases escalated twice. The lock is held here as a
    running serve holds it (two real processes, and the lock after SIGKILL: tests/reliability)."""
    import os

    from router.cli import LOCK_FILE, data_dir_lock

    data = tmp_path / "data"
    with data_dir_lock(data):
        assert (data / LOCK_FILE).read_text("ascii") == f"{os.getpid()}\n"
        assert main(["serve", "--port", "0", "--data-dir", str(data)]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert f"the data folder {data} is in use by another contact-router (PID {os.getpid()})" in err, err
        assert not (data / "contact-router.sqlite3").exists()  # refused before it opened anything
    # Released with its holder; the file stays, naming a process that has ended, and blocks nothing.
    with data_dir_lock(data):
        pass
