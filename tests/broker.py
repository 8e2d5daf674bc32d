"""The tests' broker is the same local mosquitto the demo starts."""

from edgeinfer.fleet.localbroker import Broker, free_port, wait_port

__all__ = ["Broker", "free_port", "wait_port"]
