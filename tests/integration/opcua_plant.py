"""A small OPC UA server that plays a plant's line controller.

Run as `python opcua_plant.py PORT`. It serves the namespace
`urn:plant:line1` on 127.0.0.1:PORT, without security and for anonymous
clients. Its string node ids are Line1, Line1.Press, Line1.Press.Temperature
(21.5), Line1.Setpoint (40.0, writable), Line1.Recipe ("R-17", writable),
and the methods Line1.Scale (returns its Double argument times 2) and
Line1.Purge (returns nothing). It prints `listening 127.0.0.1:PORT` once it
accepts connections and runs until it is terminated.
"""

from __future__ import annotations

import asyncio
import signal
import sys

from asyncua import Server, ua

NAMESPACE = "urn:plant:line1"


def scale(parent, value):
    return [ua.Variant(value.Value * 2, ua.VariantType.Double)]


def purge(parent):
    return []


async def serve(port: int) -> None:
    server = Server()
    await server.init()
    server.set_endpoint(f"opc.tcp://127.0.0.1:{port}/")
    server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
    index = await server.register_namespace(NAMESPACE)

    line = await server.nodes.objects.add_object(ua.NodeId("Line1", index), ua.QualifiedName("Line1", index))
    press = await line.add_object(ua.NodeId("Line1.Press", index), ua.QualifiedName("Press", index))
    await press.add_variable(
        ua.NodeId("Line1.Press.Temperature", index),
        ua.QualifiedName("Temperature", index),
        ua.Variant(21.5, ua.VariantType.Double),
    )
    setpoint = await line.add_variable(
        ua.NodeId("Line1.Setpoint", index),
        ua.QualifiedName("Setpoint", index),
        ua.Variant(40.0, ua.VariantType.Double),
    )
    await setpoint.set_writable()
    recipe = await line.add_variable(
        ua.NodeId("Line1.Recipe", index),
        ua.QualifiedName("Recipe", index),
        ua.Variant("R-17", ua.VariantType.String),
    )
    await recipe.set_writable()
    await line.add_method(
        ua.NodeId("Line1.Scale", index),
        ua.QualifiedName("Scale", index),
        scale,
        [ua.VariantType.Double],
        [ua.VariantType.Double],
    )
    await line.add_method(ua.NodeId("Line1.Purge", index), ua.QualifiedName("Purge", index), purge, [], [])

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    async with server:
        print(f"listening 127.0.0.1:{port}", flush=True)
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1])))
