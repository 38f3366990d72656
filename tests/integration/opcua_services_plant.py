"""An OPC UA server that plays a line controller with history, a folder of
many children and a second line, for the service tests.

Run as `python opcua_services_plant.py PORT`. It serves the namespace
`urn:plant:line1` on 127.0.0.1:PORT, without security and for anonymous
clients. Its nodes, by string node id:

- Line1 (object) with Line1.Press (object, browse name Press) holding
  Line1.Press.Temperature (Double 21.5, writable), Line1.Setpoint (Double
  40.0), Line1.Flow and Line1.Level (historized Doubles) and the folder
  Line1.Valves with the five Int32 variables Line1.Valves.Valve1 .. Valve5
  (values 1 .. 5).
- Line2 (object) with Line2.Speed (Double 7.0).

The history of Line1.Flow is the values in FLOW_HISTORY at one-second steps
from HISTORY_START; that of Line1.Level is LEVEL_HISTORY. The history store
returns at most HISTORY_PAGE values per request and a continuation point
for the rest. It prints `listening 127.0.0.1:PORT` once it accepts
connections and runs until it is terminated.
"""

from __future__ import annotations

import asyncio
import datetime
import signal
import sys

from asyncua import Server, ua
from asyncua.server.history import HistoryDict

NAMESPACE = "urn:plant:line1"
HISTORY_START = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
FLOW_HISTORY = [10.0, 11.5, 13.0, 12.25, 9.75]
LEVEL_HISTORY = [1.0, 2.0]
HISTORY_PAGE = 2
VALVES = 5


async def add_history(server: Server, node, values: list[float]) -> None:
    """Store `values` as the node's history, one second apart."""
    storage = server.iserver.history_manager.storage
    await storage.new_historized_node(node.nodeid, None)
    for offset, value in enumerate(values):
        timestamp = HISTORY_START + datetime.timedelta(seconds=offset)
        data_value = ua.DataValue(
            ua.Variant(value, ua.VariantType.Double),
            SourceTimestamp=timestamp,
            ServerTimestamp=timestamp,
        )
        await storage.save_node_value(node.nodeid, data_value)


async def serve(port: int) -> None:
    server = Server()
    await server.init()
    server.set_endpoint(f"opc.tcp://127.0.0.1:{port}/")
    server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
    server.iserver.history_manager.set_storage(HistoryDict(max_history_data_response_size=HISTORY_PAGE))
    index = await server.register_namespace(NAMESPACE)

    def double(parent, name: str, browse_name: str, value: float):
        return parent.add_variable(
            ua.NodeId(name, index), ua.QualifiedName(browse_name, index), ua.Variant(value, ua.VariantType.Double)
        )

    line = await server.nodes.objects.add_object(ua.NodeId("Line1", index), ua.QualifiedName("Line1", index))
    press = await line.add_object(ua.NodeId("Line1.Press", index), ua.QualifiedName("Press", index))
    temperature = await double(press, "Line1.Press.Temperature", "Temperature", 21.5)
    await temperature.set_writable()
    await double(line, "Line1.Setpoint", "Setpoint", 40.0)
    flow = await double(line, "Line1.Flow", "Flow", FLOW_HISTORY[-1])
    level = await double(line, "Line1.Level", "Level", LEVEL_HISTORY[-1])
    await add_history(server, flow, FLOW_HISTORY)
    await add_history(server, level, LEVEL_HISTORY)
    valves = await line.add_folder(ua.NodeId("Line1.Valves", index), ua.QualifiedName("Valves", index))
    for number in range(1, VALVES + 1):
        await valves.add_variable(
            ua.NodeId(f"Line1.Valves.Valve{number}", index),
            ua.QualifiedName(f"Valve{number}", index),
            ua.Variant(number, ua.VariantType.Int32),
        )
    other = await server.nodes.objects.add_object(ua.NodeId("Line2", index), ua.QualifiedName("Line2", index))
    await double(other, "Line2.Speed", "Speed", 7.0)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    async with server:
        print(f"listening 127.0.0.1:{port}", flush=True)
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1])))
