"""The topic tree of DESIGN.md, in one place.

Everything that builds or parses a topic goes through `Topics`, so the tree is
written down exactly once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_PREFIX = "edge/v1"

# Device ids double as MQTT client ids and topic levels (DESIGN: [A-Za-z0-9_-]{1,64}).
DEVICE_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
POOL_RE = DEVICE_ID_RE
# Model names, versions and job ids end up in topics and file names.
NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def has_wildcard(topic: str) -> bool:
    return "+" in topic or "#" in topic


def topic_prefix_problem(prefix: str) -> str | None:
    """Why `prefix` cannot root the topic tree, or None.

    Topics starting with `$` are the broker's own (`$SYS/...`, MQTT 5 section 4.7.2): a
    broker does not let clients publish there, and `#` subscriptions do not match them. An
    empty level (`a//b`, a leading or trailing `/`) is legal MQTT but never what was meant.
    """
    if not prefix:
        return "must not be empty"
    if prefix.startswith("$"):
        return "must not start with '$' (topics starting with '$' belong to the broker)"
    if has_wildcard(prefix):
        return "must not hold the wildcards '+' or '#'"
    if "\0" in prefix:
        return "must not hold a NUL character"
    if "" in prefix.split("/"):
        return "must not have an empty level (a leading, trailing or doubled '/')"
    return None


def reply_prefix_problem(reply: str, prefix: str) -> str | None:
    """Why `reply` (a resolved `jobs.reply_prefixes` entry) cannot bound Response Topics
    under the tree rooted at `prefix`, or None.

    A reply prefix is matched as the start of a string: without its trailing `/`,
    `edge/v1/reply` would also admit `edge/v1/replyX/...`, and one that covers the device
    or pool tree (`edge/v1/`) would let any client have answers published onto other
    devices' job topics.
    """
    if not reply.endswith("/"):
        return "must end with '/' (it is matched as the start of a topic)"
    problem = topic_prefix_problem(reply[:-1])
    if problem is not None:
        return problem
    for tree in (f"{prefix}/dev/", f"{prefix}/pool/", f"{prefix}/artifacts/"):
        if tree.startswith(reply):
            return (f"covers {tree}... : a job could then have its answer published on another "
                    "device's topics")
    return None


@dataclass(frozen=True)
class Topics:
    """Topics of one device under one prefix."""

    prefix: str
    device_id: str

    def _dev(self, leaf: str) -> str:
        return f"{self.prefix}/dev/{self.device_id}/{leaf}"

    @property
    def state(self) -> str:
        return self._dev("state")

    @property
    def desired(self) -> str:
        return self._dev("desired")

    @property
    def reported(self) -> str:
        return self._dev("reported")

    @property
    def jobs(self) -> str:
        return self._dev("jobs")

    @property
    def results(self) -> str:
        return self._dev("results")

    @property
    def telemetry(self) -> str:
        return self._dev("telemetry")

    @property
    def events(self) -> str:
        return self._dev("events")

    @property
    def artifact_chunks(self) -> str:
        # Answers to this device's chunk requests (mqtt:// artifacts).
        return self._dev("artifacts")

    @property
    def artifact_requests(self) -> str:
        return artifact_requests(self.prefix)

    def pool_jobs(self, pool: str) -> str:
        return f"{self.prefix}/pool/{pool}/jobs"

    def pool_subscription(self, pool: str) -> str:
        # A shared subscription hands each pool job to exactly one agent of the pool.
        return f"$share/{pool}/{self.pool_jobs(pool)}"


def artifact_requests(prefix: str) -> str:
    """Where agents ask the fleet's chunk server for ranges of mqtt:// artifacts."""
    return f"{prefix}/artifacts/req"


def device_topic(prefix: str, device_id: str, leaf: str) -> str:
    return f"{prefix}/dev/{device_id}/{leaf}"


def device_wildcard(prefix: str, leaf: str) -> str:
    """`edge/v1/dev/+/<leaf>`: what a fleet tool subscribes to."""
    return f"{prefix}/dev/+/{leaf}"


def device_of(prefix: str, topic: str) -> str | None:
    """The device id of a `{prefix}/dev/{dev}/...` topic, or None."""
    head = f"{prefix}/dev/"
    if not topic.startswith(head):
        return None
    rest = topic[len(head):]
    dev, _, _ = rest.partition("/")
    return dev or None


def reply_prefix(prefix: str) -> str:
    """Default root under which clients ask for responses."""
    return f"{prefix}/reply/"
