"""`sluice check` and `sluice run` on broken configurations."""

import re
import subprocess
from pathlib import Path

PROBLEM = re.compile(r"^(?P<file>[^:\s][^:]*):(?P<line>\d+):(?P<column>\d+): (?P<message>.+)$")

GATEWAY_TOML = """\
[gateway]
name = "broken"
timezone = "UTC"
rules = "rules"

[[listener]]
name = "north"
protocol = "modbus"
bind = "127.0.0.1:0"
device = "plc-9"

[[device]]
name = "plc"
address = "127.0.0.1:1502"
unit = 1

[audit]
path = "audit"
"""

ACME_TOML = """\
[vendor]
name = "acme"
sources = ["127.0.0.0/8"]

[[allow]]
device = "plc"
functions = ["read_holding_registers"]
addresses = ["0-999"]
colour = "red"
"""


def write_broken_config(folder: Path) -> None:
    (folder / "gateway.toml").write_text(GATEWAY_TOML)
    (folder / "rules").mkdir()
    (folder / "rules" / "acme.toml").write_text(ACME_TOML)


def problems(output: str, folder: Path) -> list[tuple[Path, int, int, str]]:
    """Parse `file:line:col: message` lines, with each file resolved against `folder`."""
    found = []
    for line in output.splitlines():
        match = PROBLEM.match(line)
        if match:
            path = (folder / match["file"]).resolve()
            found.append((path, int(match["line"]), int(match["column"]), match["message"]))
    return sorted(found)


def assert_expected_problems(found, folder: Path) -> None:
    gateway_toml = (folder / "gateway.toml").resolve()
    acme_toml = (folder / "rules" / "acme.toml").resolve()
    assert [(path, line, column) for path, line, column, _ in found] == sorted(
        [(gateway_toml, 10, 10), (acme_toml, 9, 1)]
    )
    messages = {path: message for path, _, _, message in found}
    # The listener names a device that the file does not define.
    assert "plc-9" in messages[gateway_toml]
    # `[[allow]]` has no key named colour.
    assert "colour" in messages[acme_toml]


def test_check_lists_problems(sluice_bin, tmp_path):
    write_broken_config(tmp_path)

    completed = subprocess.run(
        [sluice_bin, "check", "--config", "gateway.toml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )

    assert completed.returncode == 1, completed.stderr
    assert_expected_problems(problems(completed.stdout + completed.stderr, tmp_path), tmp_path)


def test_run_refuses_broken_config(sluice_bin, tmp_path):
    write_broken_config(tmp_path)

    completed = subprocess.run(
        [sluice_bin, "run", "--config", "gateway.toml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )

    assert completed.returncode == 64
    assert completed.stdout == ""
    assert_expected_problems(problems(completed.stderr, tmp_path), tmp_path)


def test_check_accepts_valid_config(sluice_bin, tmp_path):
    write_broken_config(tmp_path)
    (tmp_path / "gateway.toml").write_text(GATEWAY_TOML.replace('"plc-9"', '"plc"'))
    (tmp_path / "rules" / "acme.toml").write_text(ACME_TOML.replace('colour = "red"\n', ""))

    completed = subprocess.run(
        [sluice_bin, "check", "--config", "gateway.toml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )

    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert problems(completed.stdout + completed.stderr, tmp_path) == []


def test_check_reports_toml_syntax_error(sluice_bin, tmp_path):
    write_broken_config(tmp_path)
    # An unterminated string on line 2 stops the parse of the rules file.
    (tmp_path / "rules" / "acme.toml").write_text(ACME_TOML.replace('"acme"', '"acme'))

    completed = subprocess.run(
        [sluice_bin, "check", "--config", "gateway.toml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )

    assert completed.returncode == 1
    found = problems(completed.stdout + completed.stderr, tmp_path)
    acme_toml = (tmp_path / "rules" / "acme.toml").resolve()
    # The gateway file still names plc-9, so its problem is listed too.
    assert [(path, line) for path, line, _, _ in found] == sorted(
        [((tmp_path / "gateway.toml").resolve(), 10), (acme_toml, 2)]
    )


def test_check_reports_tag_outside_mirror(sluice_bin, tmp_path):
    write_broken_config(tmp_path)
    gateway = GATEWAY_TOML.replace('"plc-9"', '"plc"').replace(
        "unit = 1\n",
        'unit = 1\nmirror = [{ kind = "holding_register", start = 0, count = 100 }]\n',
    )
    # Line 25 contains the address of a float32 at registers 99 and 100, one past the block.
    gateway += '\n[[tag]]\ndevice = "plc"\nname = "Plc.Flow"\nkind = "holding_register"\naddress = 99\ntype = "float32"\n'
    (tmp_path / "gateway.toml").write_text(gateway)
    (tmp_path / "rules" / "acme.toml").write_text(ACME_TOML.replace('colour = "red"\n', ""))

    completed = subprocess.run(
        [sluice_bin, "check", "--config", "gateway.toml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )

    assert completed.returncode == 1
    found = problems(completed.stdout + completed.stderr, tmp_path)
    assert found == [
        (
            (tmp_path / "gateway.toml").resolve(),
            25,
            11,
            'tag[1]: holding_register 99-100 lies in no mirror block of device "plc", '
            "and tags read their values from the mirror; "
            'add { kind = "holding_register", start = 99, count = 2 } '
            "to the device's mirror list, or widen a block to cover it",
        )
    ]
