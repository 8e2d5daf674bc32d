"""The wire contract that the agent and the operator side both stand on (docs/protocol.md).

It imports neither edgeinfer.agent nor edgeinfer.fleet nor edgeinfer.runtimes: the daemon
and the SDK each build on it, never on each other.
"""
