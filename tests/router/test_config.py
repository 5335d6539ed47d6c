"""Configuration: the example organisation loads; broken files name the file and the key."""

from __future__ import annotations

import json

import pytest

from router.cli import main
from router.config import DEFAULT_CONFIG, ConfigError, load_config
from router.testing import load_raw_config


def test_example_organisation_matches_the_design():
    config = load_config(DEFAULT_CONFIG, env={})
    assert set(config.units) == {"kundenservice", "vertrieb", "bauhotline", "stoerung", "tiefbau-muster"}
    assert config.fallback_unit == "kundenservice"
    assert config.units["tiefbau-muster"].escalate_to == "bauhotline"
    assert config.units["bauhotline"].escalate_to == "kundenservice"
    assert config.units["bauhotline"].oversees == ("tiefbau-muster",)
    area = config.areas["musterstadt-nord"]
    assert area.unit == "tiefbau-muster" and "12345" in area.postcodes
    assert area.point == (52.52, 13.405, 800)
    assert {s.name: s.token for s in config.staff} == {"admin": "demo-admin", "hotline": "demo-hotline", "contractor": "demo-contractor"}
    assert all(s.demo for s in config.staff)
    assert config.channels["email"]["addresses"]["bau@example.org"]["unit"] == "bauhotline"


def test_environment_overrides_demo_tokens():
    config = load_config(DEFAULT_CONFIG, env={"CONTACT_ROUTER_TOKEN_ADMIN": "a-real-secret-token"})
    admin = next(s for s in config.staff if s.name == "admin")
    assert admin.token == "a-real-secret-token" and not admin.demo


def _write(tmp_path, data) -> str:
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(data))
    return str(path)


@pytest.mark.parametrize(
    ("change", "key"),
    [
        (lambda d: d["units"]["vertrieb"].__setitem__("escalate_to", "nirgendwo"), "units.vertrieb.escalate_to"),
        (lambda d: d["units"]["vertrieb"].__setitem__("first_response_hours", "acht"), "units.vertrieb.first_response_hours"),
        (lambda d: d["service"].__setitem__("fallback_unit", "nobody"), "service.fallback_unit"),
        (lambda d: d["rules"][0].__setitem__("unit", "ghost"), "rules.0.unit"),
        (lambda d: d["areas"]["musterstadt-nord"]["point"].__setitem__("lat", 123), "areas.musterstadt-nord.point.lat"),
        (lambda d: d["units"]["kundenservice"].__setitem__("escalate_to", "vertrieb"), "units.kundenservice.escalate_to"),
        (lambda d: d["units"]["vertrieb"].__setitem__("colour", "blue"), "units.vertrieb"),
        (lambda d: d["templates"]["ack"].__setitem__("de", "Antwort bis {deadline"), "templates.ack.de"),
        (lambda d: d["templates"]["ack"].__setitem__("en", "Case {0}"), "templates.ack.en"),
    ],
)
def test_broken_config_names_file_and_key(tmp_path, change, key):
    data = load_raw_config()
    change(data)
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert any(p == key for p, _ in info.value.errors), info.value.errors
    assert str(info.value).startswith(path)


def test_check_config_command(tmp_path, capsys):
    assert main(["check-config", str(DEFAULT_CONFIG)]) == 0
    assert "OK" in capsys.readouterr().out
    data = load_raw_config()
    data["units"]["vertrieb"]["escalate_to"] = "nirgendwo"
    path = _write(tmp_path, data)
    assert main(["check-config", path]) == 1
    err = capsys.readouterr().err
    assert f"{path}: units.vertrieb.escalate_to: unknown unit 'nirgendwo'" in err
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("[units\nname=")
    assert main(["check-config", str(bad_toml)]) == 1
    assert "not valid TOML" in capsys.readouterr().err
    assert main(["check-config", str(tmp_path / "missing.toml")]) == 1


def test_check_config_names_the_channels_on_and_warns_of_settings_nobody_reads(tmp_path, capsys):
    """A misspelt ``[channels.whatsap]`` said OK, and the channel the settings were meant for
    stayed off without a word, in check-config and in serve's log alike."""
    data = load_raw_config()
    data["channels"]["whatsap"] = {"enabled": True}
    path = _write(tmp_path, data)
    assert main(["check-config", path]) == 0
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        f"{path}: channels.whatsap: warning: no installed plugin or channel is named 'whatsap'; these settings are not read"
    ]
    [ok] = captured.out.splitlines()
    assert ok.startswith(f"{path}: OK (5 units, 5 rules, 1 area; channels on: ") and "webform" in ok, ok


def test_check_config_warns_of_status_links_no_page_serves(tmp_path, capsys):
    """With the web form channel off, no status page is served: the example's acknowledgement
    and call-back SMS sent residents a link that answered 404, and check-config said OK."""
    data = load_raw_config()
    data["channels"]["webform"]["enabled"] = False
    path = _write(tmp_path, data)
    assert main(["check-config", path]) == 0
    warnings = capsys.readouterr().err.splitlines()
    assert warnings == [
        f"{path}: templates.{where}: warning: {{status_url}} is a status page, which only the webform channel serves,"
        " and it is off: the sentence with the link is left out"
        for where in ("ack.de", "ack.en", "callback_failed.de", "callback_failed.en")
    ]
    assert main(["check-config", str(DEFAULT_CONFIG)]) == 0
    assert capsys.readouterr().err == ""


def test_import_customers_command(tmp_path, capsys):
    csv_path = tmp_path / "customers.csv"
    csv_path.write_text("customer_number,name,email,phone,street,postcode,city\nKD-1,Erika Müller,erika@example.net,,Lindenweg 3,12345,Musterstadt\n", encoding="utf-8")
    assert main(["import-customers", str(csv_path), "--data-dir", str(tmp_path / "data")]) == 0
    assert "imported 1 customers" in capsys.readouterr().out
    import sqlite3

    rows = sqlite3.connect(tmp_path / "data" / "contact-router.sqlite3").execute("SELECT customer_number, name FROM customers").fetchall()
    assert rows == [("KD-1", "Erika Müller")]
    bad = tmp_path / "bad.csv"
    bad.write_text("nummer,name\n1,x\n")
    assert main(["import-customers", str(bad), "--data-dir", str(tmp_path / "data")]) == 1


def test_import_customers_reports_repeated_numbers_and_counts_customers(tmp_path, capsys):
    """It said "imported 3 customers" for one customer given three times, the last one kept."""
    csv_path = tmp_path / "customers.csv"
    csv_path.write_text("customer_number;name;email\nK-6;Erika;alt@example.net\nk-6;Erika;neu@example.net\n K-6 ;Erika;\n"
                        "K-7;Jan;jan@example.net\n", encoding="utf-8")
    data = str(tmp_path / "data")
    assert main(["import-customers", str(csv_path), "--data-dir", data]) == 1  # split at "," it has no such column
    assert "--delimiter ';'" in capsys.readouterr().err
    assert main(["import-customers", str(csv_path), "--data-dir", data, "--delimiter", ";"]) == 0
    captured = capsys.readouterr()
    assert "imported 2 customers" in captured.out
    assert "K-6 appears 3 times; the last row counts" in captured.err


@pytest.mark.parametrize(("text", "says"), [
    # an unquoted comma in a name shifted every later column: the e-mail address stored as the phone
    ("customer_number,name,email,phone\nK-1,Müller, Hans,hans@example.net,+4930123456\n",
     "line 2: 5 fields where the header has 4 (a delimiter inside a value needs quotes)"),
    ("customer_number,name,email,phone\nK-1,Erika\n", "line 2: 2 fields where the header has 4;"),
    ("customer_number,name\n" + "K-1,Erika\n" * 3 + 'K-2,"' + "x" * 140000 + '"\n', "line 5: field larger than field limit"),
])
def test_import_customers_refuses_a_row_that_does_not_fit_naming_its_line(tmp_path, capsys, text, says):
    csv_path = tmp_path / "customers.csv"
    csv_path.write_text(text, encoding="utf-8")
    assert main(["import-customers", str(csv_path), "--data-dir", str(tmp_path / "data")]) == 1
    err = capsys.readouterr().err
    assert says in err and "nothing was imported" in err and "Traceback" not in err
    import sqlite3

    assert sqlite3.connect(tmp_path / "data" / "contact-router.sqlite3").execute("SELECT COUNT(*) FROM customers").fetchone() == (0,)


def test_import_customers_knows_its_columns_by_any_spelling_and_names_those_it_leaves(tmp_path, capsys):
    """A header "Name,E-Mail,Telefon" was taken, and every customer stored without name, e-mail
    and phone, matching no claim; rows without a number were left out without a word."""
    csv_path = tmp_path / "customers.csv"
    csv_path.write_text("Customer Number,Name,E-Mail,Telefon\nK-7,Erika,Erika@Example.net,030 1234\n,Jan,jan@example.net,\n",
                        encoding="utf-8")
    assert main(["import-customers", str(csv_path), "--data-dir", str(tmp_path / "data")]) == 0
    captured = capsys.readouterr()
    assert "imported 1 customers" in captured.out
    assert "columns not imported: 'Telefon'" in captured.err and "1 rows without a customer number" in captured.err
    import sqlite3

    rows = sqlite3.connect(tmp_path / "data" / "contact-router.sqlite3").execute(
        "SELECT customer_number, name, email, phone FROM customers").fetchall()
    assert rows == [("K-7", "Erika", "erika@example.net", None)]


@pytest.mark.parametrize("delimiter", ["", ";;", "\n"])
def test_import_customers_refuses_a_delimiter_that_is_not_one(tmp_path, capsys, delimiter):
    csv_path = tmp_path / "customers.csv"
    csv_path.write_text("customer_number\nK-1\n", encoding="utf-8")
    assert main(["import-customers", str(csv_path), "--data-dir", str(tmp_path / "data"), "--delimiter", delimiter]) == 1
    err = capsys.readouterr().err
    assert "--delimiter" in err and "Traceback" not in err


def test_import_customers_takes_tab_separated_files(tmp_path, capsys):
    csv_path = tmp_path / "customers.tsv"
    csv_path.write_text("customer_number\tname\nK-1\tErika\n", encoding="utf-8")
    assert main(["import-customers", str(csv_path), "--data-dir", str(tmp_path / "data"), "--delimiter", "tab"]) == 0
    assert "imported 1 customers" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("change", "key", "says"),
    [
        (lambda d: d["service"].update(timezone="Mars/Olympus"), "service.timezone", "unknown timezone 'Mars/Olympus'"),
        (lambda d: d["business_hours"]["site"].update(mon=["07:00-24:30"]), "business_hours.site", ""),
        (lambda d: d["units"]["vertrieb"].update(first_response_hours=float("inf")), "units.vertrieb.first_response_hours", ""),
        (lambda d: d["service"].update(reopen_days=float("inf")), "service.reopen_days", ""),
        (lambda d: (d["business_hours"]["office"].clear(), d["business_hours"]["office"].update(mon=["08:00-08:01"]),
                    d["units"]["vertrieb"].update(first_response_hours=100)),
         "units.vertrieb.first_response_hours", "no deadline within a year"),
        # nan passed minimum and maximum, and stopped the escalation scheduler for good
        (lambda d: d["service"].update(escalation_check_seconds=float("nan")), "service.escalation_check_seconds",
         "not a number"),
        (lambda d: d["service"].update(reopen_days=float("nan")), "service.reopen_days", "not a number"),
        # a channel's own settings: check-config said OK, and serve died with a traceback
        (lambda d: d["channels"]["phone"].update(forward_timeout="zwanzig"), "channels.phone.forward_timeout", ""),
        (lambda d: d["channels"]["email"].update(ack_per_hour="x"), "channels.email.ack_per_hour", ""),
        # an $env reference the schema does not reach: a TypeError traceback
        (lambda d: d["channels"]["phone"].update(region={"$env": ["REGION"]}), "channels.phone.region", "$env"),
        # overlapping intervals were counted twice: deadlines came early
        (lambda d: d["business_hours"]["office"].update(mon=["08:00-12:00", "10:00-18:00"]), "business_hours.office",
         "overlap"),
    ],
)
def test_values_that_would_fail_at_run_time_are_refused_at_load_naming_the_key(tmp_path, capsys, change, key, says):
    data = load_raw_config()
    change(data)
    path = tmp_path / "broken.toml"
    path.write_text(_toml(data))
    assert main(["check-config", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"{path}: {key}" in err and says in err and "Traceback" not in err


def _toml(data) -> str:
    """TOML for the few value types the example configuration has (inf is valid TOML)."""
    import math

    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, float) and math.isinf(v):
            return "inf"
        if isinstance(v, float) and math.isnan(v):
            return "nan"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v, ensure_ascii=False)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{json.dumps(k)} = {value(x)}" for k, x in v.items()) + "}"
        raise TypeError(v)

    return "\n".join(f"{json.dumps(k)} = {value(v)}" for k, v in data.items()) + "\n"


def _directory(data_dir) -> list[tuple[str, str]]:
    import sqlite3

    with sqlite3.connect(data_dir / "contact-router.sqlite3") as conn:
        return conn.execute("SELECT customer_number, name FROM customers ORDER BY customer_number").fetchall()


def test_import_customers_names_the_line_that_is_not_utf8_and_imports_nothing(tmp_path, capsys):
    """A file saved as Latin-1 half-way down: no row of it lands, and the directory keeps what
    it held; the error names the line (it named a byte offset within a block of the file)."""
    data = tmp_path / "data"
    first = tmp_path / "first.csv"
    first.write_text("customer_number,name\nK-1,Erika Müller\n", encoding="utf-8")
    assert main(["import-customers", str(first), "--data-dir", str(data)]) == 0
    capsys.readouterr()
    mixed = tmp_path / "mixed.csv"
    mixed.write_bytes("\ufeffcustomer_number,name\nK-1,Erika Neu\nK-2,Jan Groß\n".encode() + "K-3,Jörg Weiß\n".encode("latin-1"))
    assert main(["import-customers", str(mixed), "--data-dir", str(data)]) == 1
    err = capsys.readouterr().err
    assert "line 4 is not UTF-8 (byte 6 of the line)" in err and "nothing was imported" in err
    assert "Traceback" not in err
    assert _directory(data) == [("K-1", "Erika Müller")]


def test_import_customers_keeps_a_byte_order_mark_and_quoted_lines_apart(tmp_path, capsys):
    path = tmp_path / "excel.csv"
    path.write_bytes('\ufeffcustomer_number;name;street\r\nK-1;"Müller;\r\nErika";"Am Bach 1"\r\nK-2;Jan;\r\n'.encode())
    assert main(["import-customers", str(path), "--data-dir", str(tmp_path / "data"), "--delimiter", ";"]) == 0
    assert "imported 2 customers" in capsys.readouterr().out
    assert _directory(tmp_path / "data") == [("K-1", "Müller;\r\nErika"), ("K-2", "Jan")]


def test_import_customers_reads_the_file_as_it_goes(tmp_path, capsys):
    """A file of 60,000 customers (5 MB) was held whole as a list of dicts (about 60 MB of
    Python objects here; 800 MB for a 100 MB file). Read row by row, what Python holds at the
    peak is the set of numbers seen."""
    import tracemalloc

    path = tmp_path / "big.csv"
    with path.open("w", encoding="utf-8") as fh:
        fh.write("customer_number,name,email,phone,street,postcode,city\n")
        for n in range(60_000):
            fh.write(f"KD-{n:07d},Erika Mustermann {n},erika.{n}@example.net,+4915112{n:06d},Lindenweg {n},12345,Musterstadt\n")
    tracemalloc.start()
    try:
        assert main(["import-customers", str(path), "--data-dir", str(tmp_path / "data")]) == 0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "imported 60000 customers" in capsys.readouterr().out
    assert peak < 20_000_000, peak


@pytest.mark.parametrize("newline", ["\r", "\n", "\r\n"], ids=["CR (old Mac Excel)", "LF", "CRLF"])
def test_import_customers_takes_every_line_ending_and_names_the_line_that_is_not_utf8(tmp_path, capsys, newline):
    """A file with CR alone between its lines stopped importing when the file was read in binary."""
    path = tmp_path / "customers.csv"
    lines = ["customer_number;name", "K-1;Erika Müller", "K-2;Jan Groß"]
    path.write_bytes(newline.join(lines).encode() + newline.encode())
    assert main(["import-customers", str(path), "--data-dir", str(tmp_path / "data"), "--delimiter", ";"]) == 0
    assert "imported 2 customers" in capsys.readouterr().out
    assert _directory(tmp_path / "data") == [("K-1", "Erika Müller"), ("K-2", "Jan Groß")]
    broken = tmp_path / "broken.csv"
    broken.write_bytes(newline.join(lines).encode() + newline.encode() + "K-3;Jörg".encode("latin-1") + newline.encode())
    assert main(["import-customers", str(broken), "--data-dir", str(tmp_path / "data"), "--delimiter", ";"]) == 1
    assert "line 4 is not UTF-8 (byte 6 of the line)" in capsys.readouterr().err


def test_a_response_time_no_year_can_hold_is_refused_without_counting_out_the_days(tmp_path, capsys, monkeypatch):
    """A calendar of a minute a week and a response time of a year: counting it out day by day
    took seconds, until the date overflowed, before the refusal."""
    from router.hours import BusinessHours

    counted = []
    original = BusinessHours.add

    def add(self, start, hours):
        counted.append(hours)
        return original(self, start, hours)

    monkeypatch.setattr(BusinessHours, "add", add)
    data = load_raw_config()
    data["business_hours"]["office"].clear()
    data["business_hours"]["office"].update(mon=["08:00-08:01"])
    data["units"]["vertrieb"].update(first_response_hours=8760)
    path = tmp_path / "sparse.toml"
    path.write_text(_toml(data))
    assert main(["check-config", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"{path}: units.vertrieb.first_response_hours" in err and "no deadline within a year" in err
    assert "Traceback" not in err
    assert counted and 8760 not in counted  # the other units' deadlines were counted out, this one not


def test_import_customers_on_a_database_it_cannot_use_says_so_in_one_line(tmp_path, capsys):
    """A data folder whose database is no database, or was written by a newer release, ended
    the import in a traceback; it is one line naming the file, and nothing is imported."""
    import sqlite3

    csv_path = tmp_path / "customers.csv"
    csv_path.write_text("customer_number,name\nKD-1,Erika Müller\n", encoding="utf-8")
    newer, garbage = tmp_path / "newer", tmp_path / "garbage"
    assert main(["import-customers", str(csv_path), "--data-dir", str(newer)]) == 0
    conn = sqlite3.connect(newer / "contact-router.sqlite3")
    conn.execute("DELETE FROM customers")
    conn.execute("INSERT INTO schema_migrations (version, name, applied_at) VALUES (999, 'later', '2027-01-01T00:00:00Z')")
    conn.commit()
    conn.close()
    garbage.mkdir()
    (garbage / "contact-router.sqlite3").write_bytes(b"not a database, " * 512)
    capsys.readouterr()
    for data, says in ((newer, "schema version 999"), (garbage, "file is not a database")):
        assert main(["import-customers", str(csv_path), "--data-dir", str(data)]) == 1
        err = capsys.readouterr().err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert str(data / "contact-router.sqlite3") in err and says in err and "nothing was imported" in err, err
    conn = sqlite3.connect(newer / "contact-router.sqlite3")
    assert conn.execute("SELECT COUNT(*) FROM customers").fetchone() == (0,)
    conn.close()
