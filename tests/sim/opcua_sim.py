"""An OPC UA server for Shoal's adapter tests, on asyncua (pinned in
scripts/test.sh): `opcua_sim.py PORT`, endpoint
opc.tcp://127.0.0.1:PORT/shoal/, no security, anonymous.

ns=2;s=Device1 holds:
  ns=2;s=Setpoint  Double, writable (starts at 1.5)
  ns=2;s=Counter   Int32, read-only for clients, counts seconds
  ns=2;s=Label     String "pump-1"
"""

import asyncio
import logging
import sys

from asyncua import Server, ua


async def main(port):
    logging.basicConfig(level=logging.ERROR)
    server = Server()
    await server.init()
    server.set_endpoint(f"opc.tcp://127.0.0.1:{port}/shoal/")
    server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
    ns = await server.register_namespace("urn:shoal:test")
    dev = await server.nodes.objects.add_object(ua.NodeId("Device1", ns), ua.QualifiedName("Device1", ns))
    setpoint = await dev.add_variable(
        ua.NodeId("Setpoint", ns), ua.QualifiedName("Setpoint", ns), 1.5, varianttype=ua.VariantType.Double
    )
    await setpoint.set_writable()
    counter = await dev.add_variable(
        ua.NodeId("Counter", ns), ua.QualifiedName("Counter", ns), 0, varianttype=ua.VariantType.Int32
    )
    await dev.add_variable(
        ua.NodeId("Label", ns), ua.QualifiedName("Label", ns), "pump-1", varianttype=ua.VariantType.String
    )
    async with server:
        print("ready", flush=True)
        n = 0
        while True:
            await asyncio.sleep(1)
            n += 1
            await counter.write_value(ua.Variant(n, ua.VariantType.Int32))


asyncio.run(main(int(sys.argv[1])))
