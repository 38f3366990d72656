"""Fixtures that start sluice and its peers for the integration tests.

SLUICE_BIN must name the sluice binary; a missing binary or tool is an error,
never a skip.
"""

from __future__ import annotations

import os
import shutil

import pytest

import harness


@pytest.fixture(scope="session")
def sluice_bin() -> str:
    path = os.environ.get("SLUICE_BIN")
    if not path:
        pytest.fail("SLUICE_BIN is not set: point it at the sluice binary, e.g. target/release/sluice")
    if not os.access(path, os.X_OK):
        pytest.fail(f"SLUICE_BIN={path} is not an executable file: run `cargo build --release` first")
    return path


@pytest.fixture(scope="session")
def mbpoll_bin() -> str:
    path = shutil.which("mbpoll")
    if path is None:
        pytest.fail("mbpoll not found: install the Debian package mbpoll")
    return path


@pytest.fixture
def plc_sim(sluice_bin, tmp_path):
    """A fresh `sluice plc-sim` with its request log in the test's folder."""
    folder = tmp_path / "plc"
    folder.mkdir()
    sim = harness.PlcSim(sluice_bin, folder)
    yield sim
    sim.stop()


@pytest.fixture
def start_plc_sim(sluice_bin, tmp_path):
    """A factory for more simulated PLCs, each with its own folder."""
    started: list[harness.PlcSim] = []

    def start(name: str) -> harness.PlcSim:
        folder = tmp_path / name
        folder.mkdir()
        sim = harness.PlcSim(sluice_bin, folder)
        started.append(sim)
        return sim

    yield start
    for sim in started:
        sim.stop()


@pytest.fixture
def start_gateway(sluice_bin, tmp_path):
    """A factory that writes a configuration and starts `sluice run` on it."""
    started: list[harness.Gateway] = []

    def start(listeners, devices, rules, name: str = "test-gw") -> harness.Gateway:
        folder = tmp_path / f"gateway-{len(started)}"
        folder.mkdir()
        gateway = harness.Gateway(sluice_bin, folder, listeners, devices, rules, name)
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        gateway.stop()


@pytest.fixture
def silent_plc():
    server = harness.SilentPlc()
    yield server
    server.stop()
