"""Many simulated agents as real MQTT clients in one process (`edge-fleet simulate`,
fleet/cli/simulate.py, and the fleet benchmarks).

    with Simulator(SimConfig(devices=1000, broker_url="mqtt://localhost:1883")) as sim:
        sim.wait_connected()

Each simulated device is its own MQTT v5 client (client id = device id) and speaks the
agent's side of docs/protocol.md: a retained will/birth on `state`, a retained
`reported`, periodic `telemetry` in the agent's shape (per model `ok`, `errors`,
`latency_ms` percentiles, host health), `events` for deploys, and it applies `desired`
manifests: after a short simulated install each model serves, except a model named by
`--fail NAME` or `--fail NAME:VERSION`, which is reported `failed` (the previous version
of that name keeps serving, as on a real agent, and the applied revision stays).

Light on purpose: no models are downloaded or run. All clients of a group share one
network thread that multiplexes their sockets with `selectors` (sockmux.py), so a
thousand devices need one thread and a few tens of MB, not a thousand threads.
Everything a device does (publish, timers, installs) happens on its group's thread;
`threads` splits the devices over that many groups.

- device.py: `SimDevice` (its documents, how it applies a manifest), `SimConfig`, `SimStats`;
- group.py: `DeviceGroup` (each device's MQTT session) and `Simulator`;
- sockmux.py: `SocketMux`, many paho clients on one network thread.

For load and integration tests of the controller, rollouts and the broker, never against
a broker whose ACL ties each identity to one device (all simulated devices share one
identity: the `--username`/TLS options given).
"""

from edgeinfer.fleet.simulator.device import SIM_AGENT_VERSION, SimConfig, SimDevice, SimStats
from edgeinfer.fleet.simulator.group import Simulator

__all__ = ["SIM_AGENT_VERSION", "SimConfig", "SimDevice", "SimStats", "Simulator"]
