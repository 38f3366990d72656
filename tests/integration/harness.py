"""Processes, configuration files and polling helpers for the integration tests.

Everything listens on 127.0.0.1 with ports chosen by the operating system.
Every process started here is stopped by its process id: terminate first,
then kill after a bounded wait.
"""

from __future__ import annotations

import json
import queue
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable

from pymodbus.client import ModbusTcpClient

STARTUP_TIMEOUT = 15.0
POLL_TIMEOUT = 10.0
POLL_INTERVAL = 0.02
STOP_TIMEOUT = 5.0

PLC_LISTENING = re.compile(r"^listening 127\.0\.0\.1:(\d+)$")
GATEWAY_LISTENING = re.compile(r"^listening (\S+) 127\.0\.0\.1:(\d+)$")


def wait_for(condition: Callable[[], Any], timeout: float = POLL_TIMEOUT, what: str = "condition"):
    """Poll `condition` until it returns a truthy value and return that value.

    Raises AssertionError naming `what` when `timeout` seconds pass first.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(POLL_INTERVAL)


def free_port() -> int:
    """Return a loopback port that nothing listens on at the time of the call."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def modbus_client(port: int, timeout: float = 5.0) -> ModbusTcpClient:
    """Return a connected pymodbus client that never retries a request."""
    client = ModbusTcpClient("127.0.0.1", port=port, timeout=timeout, retries=0)
    if not client.connect():
        raise AssertionError(f"pymodbus could not connect to 127.0.0.1:{port}")
    return client


class Process:
    """A child process whose standard output is read line by line."""

    def __init__(self, args: list[str], stderr_path: Path, cwd: Path | None = None):
        self.args = args
        self.stderr_path = stderr_path
        self._stderr = stderr_path.open("wb")
        self.popen = subprocess.Popen(
            args,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read_stdout, daemon=True)
        self._reader.start()

    def _read_stdout(self) -> None:
        for line in self.popen.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def read_line(self, timeout: float = STARTUP_TIMEOUT) -> str:
        """Return the next line of standard output.

        Raises AssertionError when the process exits or stays silent for
        `timeout` seconds.
        """
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(
                f"{self.args[0]} printed no line within {timeout} s; stderr: {self.stderr_text()}"
            ) from None
        if line is None:
            self.popen.wait(timeout=STOP_TIMEOUT)
            raise AssertionError(
                f"{' '.join(self.args)} exited with {self.popen.returncode}; stderr: {self.stderr_text()}"
            )
        return line

    def stderr_text(self) -> str:
        self._stderr.flush()
        return self.stderr_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=STOP_TIMEOUT)
        self._reader.join(timeout=STOP_TIMEOUT)
        self.popen.stdout.close()
        self._stderr.close()


def read_json_lines(path: Path) -> list[dict]:
    """Return the complete JSON lines of `path`, ignoring a partly written last line."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines(keepends=True):
        if not line.endswith("\n"):
            break
        records.append(json.loads(line))
    return records


class PlcSim:
    """`sluice plc-sim` on a port chosen by the operating system."""

    def __init__(self, sluice_bin: str, workdir: Path):
        self.log_path = workdir / "plc-requests.jsonl"
        self.process = Process(
            [sluice_bin, "plc-sim", "--bind", "127.0.0.1:0", "--log", str(self.log_path)],
            stderr_path=workdir / "plc-sim.stderr",
        )
        line = self.process.read_line()
        match = PLC_LISTENING.match(line)
        if match is None:
            self.process.stop()
            raise AssertionError(f"plc-sim printed {line!r}, expected 'listening 127.0.0.1:PORT'")
        self.port = int(match.group(1))
        self.address = f"127.0.0.1:{self.port}"

    def requests(self) -> list[dict]:
        return read_json_lines(self.log_path)

    def wait_for_requests(self, count: int, timeout: float = POLL_TIMEOUT) -> list[dict]:
        """Wait until the log contains at least `count` requests and return them all."""
        return wait_for(
            lambda: (lambda found: found if len(found) >= count else None)(self.requests()),
            timeout,
            f"{count} requests in the plc-sim log",
        )

    def stop(self) -> None:
        self.process.stop()


def toml_value(value: Any) -> str:
    """Render a Python value as a TOML value, with dictionaries as inline tables."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        items = ", ".join(f"{toml_key(key)} = {toml_value(item)}" for key, item in value.items())
        return "{ " + items + " }" if items else "{}"
    raise TypeError(f"no TOML form for {value!r}")


def toml_key(key: Any) -> str:
    text = str(key)
    if re.fullmatch(r"[A-Za-z0-9_-]+", text):
        return text
    return json.dumps(text)


def toml_table(header: str, fields: dict) -> str:
    lines = [header]
    lines += [f"{toml_key(key)} = {toml_value(value)}" for key, value in fields.items()]
    return "\n".join(lines) + "\n"


def listener(name: str = "north", **fields) -> dict:
    """Return a plain Modbus listener on a port chosen by the operating system."""
    return {"name": name, "protocol": "modbus", "bind": "127.0.0.1:0", **fields}


def device(name: str, address: str, **fields) -> dict:
    return {"name": name, "address": address, "unit": 1, "timeout_ms": 2000, **fields}


# The sources of a vendor that owns every loopback address, so that every
# test client is identified as that vendor.
LOOPBACK_SOURCES = ["127.0.0.0/8"]


def acme_rules(*allows: dict, sources: list[str] = LOOPBACK_SOURCES) -> dict[str, str]:
    """Return the rules folder contents for the single vendor "acme"."""
    return {"acme.toml": rule_file("acme", sources, list(allows))}


def rule_file(vendor: str, sources: list[str], allows: list[dict]) -> str:
    text = toml_table("[vendor]", {"name": vendor, "sources": sources})
    for allow in allows:
        text += "\n" + toml_table("[[allow]]", allow)
    return text


class Gateway:
    """`sluice run` with a configuration written to its own folder."""

    def __init__(
        self,
        sluice_bin: str,
        workdir: Path,
        listeners: list[dict],
        devices: list[dict],
        rules: dict[str, str],
        name: str = "test-gw",
    ):
        self.workdir = workdir
        self.name = name
        self.config_path = write_config(workdir, listeners, devices, rules, name)
        self._launch(sluice_bin, len(listeners))

    def _launch(self, sluice_bin: str, startup_lines: int) -> None:
        """Start `sluice run` on `self.config_path` and read the `listening`
        lines of `startup_lines` sockets, then `ready`."""
        self.events_path = self.workdir / "audit" / "events.jsonl"
        self.process = Process(
            [sluice_bin, "run", "--config", str(self.config_path)],
            stderr_path=self.workdir / "gateway.stderr",
        )
        self.ports: dict[str, int] = {}
        try:
            self._read_startup(startup_lines)
        except BaseException:
            self.process.stop()
            raise

    def _read_startup(self, listener_count: int) -> None:
        for _ in range(listener_count):
            line = self.process.read_line()
            match = GATEWAY_LISTENING.match(line)
            if match is None:
                raise AssertionError(f"gateway printed {line!r}, expected 'listening NAME 127.0.0.1:PORT'")
            self.ports[match.group(1)] = int(match.group(2))
        line = self.process.read_line()
        if line != "ready":
            raise AssertionError(f"gateway printed {line!r}, expected 'ready'")

    @property
    def port(self) -> int:
        """The port of the only listener."""
        (port,) = self.ports.values()
        return port

    def events(self) -> list[dict]:
        """Return every event of the audit log, across its segments, in order."""
        records = []
        for segment in sorted(self.events_path.parent.glob("audit-*.jsonl")):
            records.extend(read_json_lines(segment))
        return records

    def wait_for_events(self, predicate: Callable[[dict], bool], count: int = 1, what: str = "events") -> list[dict]:
        """Wait until at least `count` events match `predicate` and return the matches."""

        def matching():
            found = [event for event in self.events() if predicate(event)]
            return found if len(found) >= count else None

        return wait_for(matching, what=f"{count} {what} in {self.events_path}")

    def stop(self) -> None:
        self.process.stop()


def write_config(
    workdir: Path,
    listeners: list[dict],
    devices: list[dict],
    rules: dict[str, str],
    name: str = "test-gw",
) -> Path:
    """Write gateway.toml and rules/*.toml into `workdir` and return the gateway.toml path."""
    text = toml_table(
        "[gateway]", {"name": name, "timezone": "UTC", "rules": "rules", "allow_root": True}
    )
    for entry in listeners:
        text += "\n" + toml_table("[[listener]]", entry)
    for entry in devices:
        text += "\n" + toml_table("[[device]]", entry)
    text += "\n" + toml_table("[audit]", {"path": "audit"})
    config_path = workdir / "gateway.toml"
    config_path.write_text(text)
    rules_dir = workdir / "rules"
    rules_dir.mkdir(exist_ok=True)
    for file_name, content in rules.items():
        (rules_dir / file_name).write_text(content)
    return config_path


class SilentPlc:
    """A TCP server that accepts connections and reads requests but never sends a response."""

    def __init__(self):
        self.server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(16)
        self.server.settimeout(0.1)
        self.port = self.server.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self.received = 0
        self._stopping = threading.Event()
        self._connections: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stopping.is_set():
            try:
                connection, _ = self.server.accept()
            except socket.timeout:
                self._drain()
                continue
            connection.setblocking(False)
            self._connections.append(connection)

    def _drain(self) -> None:
        for connection in self._connections:
            try:
                self.received += len(connection.recv(65536))
            except (BlockingIOError, OSError):
                pass

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=STOP_TIMEOUT)
        for connection in self._connections:
            connection.close()
        self.server.close()


def write_state_config(
    workdir: Path,
    listeners: list[dict],
    devices: list[dict],
    states: list[dict],
    rules: dict[str, str],
    name: str = "test-gw",
) -> Path:
    """Write the files of `write_config` with one `[[state]]` table per entry of `states`."""
    config_path = write_config(workdir, listeners, devices, rules, name)
    text = config_path.read_text()
    for entry in states:
        text += "\n" + toml_table("[[state]]", entry)
    config_path.write_text(text)
    return config_path


class StateGateway(Gateway):
    """`sluice run` on a configuration that also polls operational states."""

    def __init__(
        self,
        sluice_bin: str,
        workdir: Path,
        listeners: list[dict],
        devices: list[dict],
        states: list[dict],
        rules: dict[str, str],
        name: str = "test-gw",
    ):
        self.workdir = workdir
        self.name = name
        self.config_path = write_state_config(workdir, listeners, devices, states, rules, name)
        self._launch(sluice_bin, len(listeners))


def send_hangup(gateway: Gateway) -> None:
    """Send SIGHUP to the gateway process, which makes it reload its files."""
    gateway.process.popen.send_signal(signal.SIGHUP)


def connect_from(source_ip: str, port: int, timeout: float = 10.0) -> socket.socket:
    """Open a TCP connection to 127.0.0.1:`port` from the loopback address `source_ip`."""
    return socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source_ip, 0))


def vendor_rule_file(vendor: dict, allows: list[dict]) -> str:
    """Return a rule file whose `[vendor]` table contains every key of
    `vendor`, such as `max_sessions` or `rate`."""
    text = toml_table("[vendor]", vendor)
    for allow in allows:
        text += "\n" + toml_table("[[allow]]", allow)
    return text


def make_certificates(folder: Path) -> dict[str, Path]:
    """Create a test CA and a server certificate for 127.0.0.1 with the openssl
    command line tool; return the paths of `ca`, `cert` and `key`."""
    paths = {
        "ca": folder / "ca.crt",
        "ca_key": folder / "ca.key",
        "cert": folder / "server.crt",
        "key": folder / "server.key",
        "csr": folder / "server.csr",
        "ext": folder / "server.ext",
    }
    openssl = ["openssl"]
    subprocess.run(
        openssl + ["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                   "-keyout", str(paths["ca_key"]), "-out", str(paths["ca"]), "-days", "2",
                   "-subj", "/CN=sluice test CA"],
        check=True, capture_output=True,
    )
    subprocess.run(
        openssl + ["req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                   "-keyout", str(paths["key"]), "-out", str(paths["csr"]), "-subj", "/CN=127.0.0.1"],
        check=True, capture_output=True,
    )
    paths["ext"].write_text(
        "subjectAltName = IP:127.0.0.1, DNS:localhost\n"
        "basicConstraints = CA:FALSE\n"
        "keyUsage = digitalSignature\n"
        "extendedKeyUsage = serverAuth, clientAuth\n"
    )
    subprocess.run(
        openssl + ["x509", "-req", "-in", str(paths["csr"]), "-CA", str(paths["ca"]),
                   "-CAkey", str(paths["ca_key"]), "-CAcreateserial", "-out", str(paths["cert"]),
                   "-days", "2", "-extfile", str(paths["ext"])],
        check=True, capture_output=True,
    )
    return {"ca": paths["ca"], "cert": paths["cert"], "key": paths["key"]}


class CollectServer:
    """`sluice collect` on 127.0.0.1, on a given port or one chosen by the
    operating system."""

    def __init__(self, sluice_bin: str, workdir: Path, certificates: dict[str, Path], port: int = 0):
        self.out = workdir / "collected.jsonl"
        self.process = Process(
            [sluice_bin, "collect", "--bind", f"127.0.0.1:{port}",
             "--tls-cert", str(certificates["cert"]), "--tls-key", str(certificates["key"]),
             "--out", str(self.out)],
            stderr_path=workdir / f"collect-{port}.stderr",
        )
        line = self.process.read_line()
        match = PLC_LISTENING.match(line)
        if match is None:
            self.process.stop()
            raise AssertionError(f"sluice collect printed {line!r}, expected 'listening 127.0.0.1:PORT'")
        self.port = int(match.group(1))

    def ids(self) -> list[str]:
        return [event["id"] for event in read_json_lines(self.out)]

    def stop(self) -> None:
        self.process.stop()


class CollectorGateway(Gateway):
    """`sluice run` whose gateway.toml also has `extra` appended, such as
    `[[collector]]` sections, and whose audit log is sealed every
    `seal_every` records."""

    def __init__(
        self,
        sluice_bin: str,
        workdir: Path,
        listeners: list[dict],
        devices: list[dict],
        rules: dict[str, str],
        extra: str,
        seal_every: int = 20,
        name: str = "test-gw",
    ):
        self.workdir = workdir
        self.name = name
        self.config_path = write_config(workdir, listeners, devices, rules, name)
        text = self.config_path.read_text()
        text = text.replace('[audit]\npath = "audit"\n', f'[audit]\npath = "audit"\nseal_every = {seal_every}\n')
        self.config_path.write_text(text + "\n" + extra)
        subprocess.run(
            [sluice_bin, "audit", "init", "--config", str(self.config_path)],
            check=True, capture_output=True, timeout=STARTUP_TIMEOUT,
        )
        self._launch(sluice_bin, len(listeners))


class Rsyslog:
    """Debian's rsyslogd in the foreground with a generated configuration: a
    TLS syslog listener (imtcp, gtls driver, anonymous clients) on 127.0.0.1
    that writes each message's MSG part as one line of `out`."""

    def __init__(self, workdir: Path, certificates: dict[str, Path], port: int):
        self.port = port
        self.out = workdir / "rsyslog.out"
        self.config = workdir / "rsyslog.conf"
        self.pidfile = workdir / "rsyslog.pid"
        spool = workdir / "rsyslog-spool"
        spool.mkdir(exist_ok=True)
        self.config.write_text(
            f'global(workDirectory="{spool}"\n'
            f'       defaultNetstreamDriver="gtls"\n'
            f'       defaultNetstreamDriverCAFile="{certificates["ca"]}"\n'
            f'       defaultNetstreamDriverCertFile="{certificates["cert"]}"\n'
            f'       defaultNetstreamDriverKeyFile="{certificates["key"]}")\n'
            'module(load="imtcp" StreamDriver.Name="gtls" StreamDriver.Mode="1"\n'
            '       StreamDriver.AuthMode="anon")\n'
            f'input(type="imtcp" address="127.0.0.1" port="{port}" ruleset="sluice"\n'
            '      SupportOctetCountedFraming="on")\n'
            'template(name="message" type="string" string="%msg%\\n")\n'
            'ruleset(name="sluice") {\n'
            f'    action(type="omfile" file="{self.out}" template="message")\n'
            '}\n'
        )
        self.process = Process(
            ["/usr/sbin/rsyslogd", "-n", "-f", str(self.config), "-i", str(self.pidfile)],
            stderr_path=workdir / "rsyslog.stderr",
        )

    def wait_listening(self, timeout: float = STARTUP_TIMEOUT) -> None:
        def accepts():
            if self.process.popen.poll() is not None:
                raise AssertionError(f"rsyslogd exited with {self.process.popen.returncode}: {self.process.stderr_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return True
            except OSError:
                return False

        wait_for(accepts, timeout=timeout, what=f"rsyslogd listening on 127.0.0.1:{self.port}")

    def messages(self) -> list[str]:
        if not self.out.exists():
            return []
        return [line for line in self.out.read_text().splitlines(keepends=True) if line.endswith("\n")]

    def stop(self) -> None:
        self.process.stop()
