"""The simulated PLC on its own: the memory and request log the other tests rely on."""

from harness import modbus_client


def test_plc_sim_holding_registers(plc_sim):
    client = modbus_client(plc_sim.port)
    try:
        low = client.read_holding_registers(0, count=10, device_id=1)
        high = client.read_holding_registers(65530, count=6, device_id=1)
    finally:
        client.close()

    assert not low.isError(), low
    assert low.registers == list(range(10))
    assert not high.isError(), high
    assert high.registers == [65530, 65531, 65532, 65533, 65534, 65535]


def test_plc_sim_input_registers_coils_inputs(plc_sim):
    client = modbus_client(plc_sim.port)
    try:
        inputs = client.read_input_registers(998, count=4, device_id=1)
        coils = client.read_coils(96, count=8, device_id=1)
        discrete = client.read_discrete_inputs(5, count=4, device_id=1)
    finally:
        client.close()

    assert inputs.registers == [30998, 30999, 30000, 30001]
    # Coils 96 and 99 are on, and from 100 on every coil is off.
    assert coils.bits[:8] == [True, False, False, True, False, False, False, False]
    assert discrete.bits[:4] == [False, True, False, True]


def test_plc_sim_write_then_read(plc_sim):
    client = modbus_client(plc_sim.port)
    try:
        written = client.write_register(40, 4321, device_id=1)
        read_back = client.read_holding_registers(40, count=2, device_id=1)
    finally:
        client.close()

    assert not written.isError()
    assert read_back.registers == [4321, 41]


def test_plc_sim_request_log(plc_sim):
    client = modbus_client(plc_sim.port)
    try:
        client.read_holding_registers(7, count=3, device_id=1)
        client.read_input_registers(2, count=1, device_id=5)
    finally:
        client.close()

    logged = plc_sim.wait_for_requests(2)
    assert logged == [
        {"unit": 1, "function": 3, "address": 7, "quantity": 3},
        {"unit": 5, "function": 4, "address": 2, "quantity": 1},
    ]
