"""A Modbus device for Shoal's adapter tests, on pymodbus (pinned in
scripts/test.sh): `modbus_sim.py tcp HOST PORT` or `modbus_sim.py rtu PATH`.

Holding registers (0-based):
  0-1    21.5 as float32, high word first
  2-3    21.5 as float32, low word first (word-swapped)
  10     setpoint, int16, writable (starts at 7)
  20     a register the device refuses to have written (read-only)
  50     answers only after 3 s (slower than any sane timeout)
  60-69  "server device busy" (exception 0x06) on every access
  100+   100 registers 0..99 (for the load figure)
Input registers 0-2: 11, 22, 33. Coils 0-3: on, off, on, off.
Anything else: illegal data address (0x02), pymodbus's own answer.
"""

import asyncio
import sys

from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice


async def action(fc, start_address, address, count, registers, set_values):
    if fc in (3, 6, 16, 23):
        wanted = range(address, address + count)
        if 50 in wanted:
            await asyncio.sleep(3.0)
        if any(60 <= a < 70 for a in wanted):
            return ExcCodes.DEVICE_BUSY
    return None


def device():
    return SimDevice(
        id=0,
        action=action,
        simdata=(
            [SimData(0, values=[True, False, True, False], datatype=DataType.BITS)],
            [SimData(0, values=[False, True, True, False], datatype=DataType.BITS)],
            [
                SimData(0, values=[0x41AC, 0x0000, 0x0000, 0x41AC], datatype=DataType.REGISTERS),
                SimData(10, values=[7], datatype=DataType.REGISTERS),
                SimData(20, values=[5], datatype=DataType.REGISTERS, readonly=True),
                SimData(50, values=[4242], datatype=DataType.REGISTERS),
                SimData(60, count=10, values=7, datatype=DataType.REGISTERS),
                SimData(100, values=list(range(100)), datatype=DataType.REGISTERS),
            ],
            [SimData(0, values=[11, 22, 33], datatype=DataType.REGISTERS)],
        ),
    )


async def main():
    mode = sys.argv[1]
    if mode == "tcp":
        server = ModbusTcpServer(device(), address=(sys.argv[2], int(sys.argv[3])))
    else:
        server = ModbusSerialServer(
            device(), port=sys.argv[2], baudrate=19200, bytesize=8, parity="N", stopbits=1
        )
    print("ready", flush=True)
    await server.serve_forever()


asyncio.run(main())
