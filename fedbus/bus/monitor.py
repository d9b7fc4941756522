"""Read a nats-server's own traffic counters from its monitoring (http) port.

What crossed a hub<->leaf link is measured by the servers, not estimated by fedbus:

- `/varz`: the whole server's `in_msgs`, `out_msgs`, `in_bytes`, `out_bytes`
  (all connections: clients, routes, leaf nodes).
- `/leafz`: one entry per leaf node connection with the same four counters. Read on
  the HUB, `in_*` is what the leaf sent to the hub and `out_*` what the hub sent to the
  leaf; read on a leaf, the other way round.

The byte counters count message bytes (payload plus NATS headers) as the server
accounts them, not TCP/protocol overhead. Counters only grow while a connection lives;
a leaf that reconnects starts its `/leafz` entry from zero again (`delta` then reports
the new connection's counters, never negative numbers).

Pure urllib with short timeouts, so a demo or a benchmark can call it between phases.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

DEFAULT_TIMEOUT_S = 2.0


class MonitorError(RuntimeError):
    """A monitoring endpoint could not be read or did not return the expected JSON."""


@dataclass(frozen=True)
class LinkCounters:
    """Messages and bytes in each direction, as one server counts them."""

    in_msgs: int = 0
    out_msgs: int = 0
    in_bytes: int = 0
    out_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        return self.in_bytes + self.out_bytes

    @property
    def total_msgs(self) -> int:
        return self.in_msgs + self.out_msgs

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "LinkCounters":
        try:
            return cls(
                in_msgs=int(data["in_msgs"]),
                out_msgs=int(data["out_msgs"]),
                in_bytes=int(data["in_bytes"]),
                out_bytes=int(data["out_bytes"]),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise MonitorError(f"missing or bad traffic counters in {sorted(data)}: {err}") from err

    def __sub__(self, other: "LinkCounters") -> "LinkCounters":
        return LinkCounters(
            self.in_msgs - other.in_msgs,
            self.out_msgs - other.out_msgs,
            self.in_bytes - other.in_bytes,
            self.out_bytes - other.out_bytes,
        )

    def __add__(self, other: "LinkCounters") -> "LinkCounters":
        return LinkCounters(
            self.in_msgs + other.in_msgs,
            self.out_msgs + other.out_msgs,
            self.in_bytes + other.in_bytes,
            self.out_bytes + other.out_bytes,
        )


def _get_json(monitor_url: str, path: str, timeout: float) -> dict[str, Any]:
    url = monitor_url.rstrip("/") + path
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            body = resp.read()
    except (urllib.error.URLError, OSError) as err:
        raise MonitorError(f"cannot read {url}: {err}") from err
    try:
        data = json.loads(body)
    except ValueError as err:
        raise MonitorError(f"{url} did not return JSON: {err}") from err
    if not isinstance(data, dict):
        raise MonitorError(f"{url} returned {type(data).__name__}, expected an object")
    return data


def varz(monitor_url: str, *, timeout: float = DEFAULT_TIMEOUT_S) -> dict[str, Any]:
    """The raw /varz document."""
    return _get_json(monitor_url, "/varz", timeout)


def leafz(monitor_url: str, *, timeout: float = DEFAULT_TIMEOUT_S) -> dict[str, Any]:
    """The raw /leafz document (`leafs`: one entry per leaf node connection)."""
    return _get_json(monitor_url, "/leafz", timeout)


def server_counters(monitor_url: str, *, timeout: float = DEFAULT_TIMEOUT_S) -> LinkCounters:
    """The whole server's traffic counters (/varz)."""
    return LinkCounters.from_json(varz(monitor_url, timeout=timeout))


def leaf_link_bytes(hub_monitor_url: str, *, timeout: float = DEFAULT_TIMEOUT_S) -> dict[str, LinkCounters]:
    """Counters of every leaf node connection of a server, keyed by the remote server's name.

    Read on the hub: `in_*` = leaf -> hub, `out_*` = hub -> leaf. Two connections from
    servers with the same name (a misconfiguration) are summed under that name;
    a connection without a name is keyed by `ip:port`.
    """
    doc = leafz(hub_monitor_url, timeout=timeout)
    leafs = doc.get("leafs") or []
    if not isinstance(leafs, list):
        raise MonitorError(f"/leafz 'leafs' is {type(leafs).__name__}, expected a list")
    out: dict[str, LinkCounters] = {}
    for leaf in leafs:
        name = leaf.get("name") or f"{leaf.get('ip')}:{leaf.get('port')}"
        counters = LinkCounters.from_json(leaf)
        out[name] = out[name] + counters if name in out else counters
    return out


def delta(
    before: LinkCounters | dict[str, LinkCounters], after: LinkCounters | dict[str, LinkCounters]
) -> Any:
    """What happened between two readings.

    For one `LinkCounters`: `after - before`. For dicts (from `leaf_link_bytes`): per
    name in `after`; a name missing from `before` (a new connection) counts from zero.
    A counter that went DOWN means the connection was re-established in between: the
    new connection's counters are returned rather than a negative number (what the old
    connection carried after `before` is lost; the servers do not keep it).
    """
    if isinstance(before, LinkCounters) and isinstance(after, LinkCounters):
        return _delta_one(before, after)
    if isinstance(before, dict) and isinstance(after, dict):
        return {name: _delta_one(before.get(name, LinkCounters()), now) for name, now in after.items()}
    raise TypeError("delta() takes two LinkCounters or two dicts of them")


def _delta_one(before: LinkCounters, after: LinkCounters) -> LinkCounters:
    diff = after - before
    if min(diff.in_msgs, diff.out_msgs, diff.in_bytes, diff.out_bytes) < 0:
        return after  # counters restarted: a new connection
    return diff
