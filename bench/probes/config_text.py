"""Probe: config values that cannot work (issue 12, point 8), through `edge-agent run`.

Each case is written to a file and run for a few seconds against an unreachable broker;
the probe prints whether the agent refused the config (exit 78, one line naming the key),
started anyway, or died with a traceback. Figures, not a test: tests/test_config.py asserts.

    python -m bench.probes.config_text
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

CASES: list[tuple[str, bytes, dict[str, str]]] = [
    ("file not UTF-8", b"device_id: gw\xff\xfe1\n", {}),
    ("lone surrogate in broker.url", b'broker:\n  url: "mqtt://\\udcff:1883"\n', {}),
    ("env var not UTF-8", b"device_id: gw-1\n", {"EDGE_AGENT_TOPIC_PREFIX": "a\udcffb"}),
    ("topic_prefix: $SYS/x", b"topic_prefix: $SYS/x\n", {}),
    ("reply_prefixes: [edge/v1]", b"jobs:\n  reply_prefixes: [edge/v1]\n", {}),
    ("reply_prefixes: [edge/v1/]", b"jobs:\n  reply_prefixes: [edge/v1/]\n", {}),
]


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="probe-config-") as tmp:
        for name, content, env in CASES:
            path = Path(tmp) / "agent.yaml"
            # Port 9 on loopback: nothing answers, so a config that is accepted just waits.
            head = b"broker: {url: 'mqtt://127.0.0.1:9'}\n" if b"broker" not in content else b""
            path.write_bytes(head + content)
            environ = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
            environ["EDGE_AGENT_STATE_DIR"] = str(Path(tmp) / "state")
            environ.update(env)
            try:
                res = subprocess.run([sys.executable, "-m", "edgeinfer.agent.cli", "run", "--config",
                                      str(path)], check=False, capture_output=True, text=True,
                                     timeout=6,
                                     env=environ, errors="backslashreplace")
            except subprocess.TimeoutExpired as exc:
                err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else ""
                verdict = "TRACEBACK (still running)" if "Traceback" in err else "ACCEPTED (running)"
                print(f"{name:30} {verdict}")
                continue
            lines = res.stderr.strip().splitlines()
            if "Traceback" in res.stderr:
                verdict = f"TRACEBACK, exit {res.returncode}"
            else:
                verdict = f"refused, exit {res.returncode}: {lines[-1] if lines else ''}"
            print(f"{name:30} {verdict}")


if __name__ == "__main__":
    main()
