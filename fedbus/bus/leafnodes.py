"""A hub nats-server plus N regional leaf nodes, started from deploy/nats/*.conf
(by `fedbus demo --topology regional` and the tests).

    with leaf_topology(("eu", "us")) as topo:
        topo.hub_url, topo.region_url("eu"), topo.hub_monitor_url, topo.region_monitor_url("eu")
        topo.hub_domain == "hub"; topo.region_domain("eu") == "eu"; topo.leaf_name("eu")  # /leafz key

hub.conf and leaf-<region>.conf (leaf-eu.conf as the template for other regions) are
started as they are, with only server_name, listen/http ports, store_dir, the
JetStream domain, the hub's leafnodes port and the leaf remote's host:port rewritten
(each of those lines must occur exactly once, or this raises). 127.0.0.1, free ports,
temporary store dirs; only the PIDs started here are stopped. Yields once the hub's
/leafz lists every leaf and every leaf's /leafz lists the hub.

JetStream domains with nats-py 2.16 / nats-server 2.15 -- what tests/test_leafnodes.py shows
----------------------------------------------------------------------------------------
One account (FEDBUS) on every server, joined by the leaf connections; the hub has
`jetstream { domain: hub }`, each leaf `jetstream { domain: <region> }`.

API and prefixes
- `nc.jetstream(domain="hub")` sets the API prefix to `$JS.hub.API`; the servers answer
  `$JS.<domain>.API.>` anywhere in the topology. `nc.jetstream()` without a domain uses
  `$JS.API`, which each server keeps LOCAL (it is not forwarded over the leaf link):
  a client on the eu leaf then manages the eu domain, a client on the hub the hub.
  `account_info().domain` tells which JetStream answered.
- `nc.jsm(domain=...)` does NOT exist (TypeError): use `nc.jetstream(domain=...)` (a
  JetStreamManager subclass: add_stream, stream_info, add_consumer, ... all go to that
  domain) or `nc.jsm(prefix="$JS.hub.API")`.
- Stream (and consumer) creation in a domain: `await nc.jetstream(domain="eu").add_stream(...)`
  from any server, or plain `nc.jetstream().add_stream(...)` from a client on the eu leaf.
  Durable consumers live in the stream's domain (the coordinator can inspect them there).
- Stream lookups by subject (`js.subscribe(subject)` without `stream=`,
  `find_stream_name_by_subject`) only search the context's domain: on a leaf, a plain
  `nc.jetstream().subscribe("fedbus.J.ctl.>")` raises NotFoundError for the hub's CTL.

Publishing is routed by SUBJECT INTEREST, not by domain
- `js.publish()` is a plain request on the subject; the domain of the context plays no
  part. Whichever streams (in any domain) capture the subject store the message and ack.
  Check `ack.domain` / `ack.stream`, and pass `stream=` (Nats-Expected-Stream) to refuse
  a wrong capture.
- Stream subjects are only checked for overlap within ONE domain. A hub stream on
  `fedbus.J.upd.>` next to an eu stream on `fedbus.J.upd.eu.>` is accepted; then every
  eu update is stored twice, crosses the link, and the publisher gets two acks
  (nats-py keeps the first; with `stream=` the other one answers with an error first
  and the publish fails). So no two domains may hold streams with overlapping subjects.
- New stream interest reached the leaves within ~5 ms here; a publish before that gets
  NoStreamResponseError (no responders), as it does while the hub is down (instantly,
  no timeout). After a hub restart the leaf reconnected and hub streams took publishes
  again after ~1 s.

KV and Object Store across domains
- KV reads work from a leaf through the domain (`(await nc.jetstream(domain="hub")
  .key_value(b)).get/watch`). KV PUTS from a leaf do not: nats-py publishes on
  `$KV.<b>.<k>` and `$KV` interest does not cross a leaf link between domains
  (NoStreamResponseError). nats.go publishes on `$JS.<domain>.API.$KV.<b>.<k>` instead,
  which the hub maps back to `$KV.<b>.<k>`; from nats-py:
  `await js_hub.publish(f"$JS.hub.API.$KV.{b}.{k}", value)` (revision checks then need the
  Nats-Expected-Last-Subject-Sequence header by hand). Simplest: only hub clients write KV.
- Object Store: reads from a leaf through the domain work (fedbus BlobStore with
  `nc.jetstream(domain="hub")`). `$O` interest DOES cross: a bucket with the same name in
  two domains stores every put from a leaf in both (the bytes cross the link). Regional
  blobs need a region-specific bucket name (e.g. `fedbus-blobs-eu`), and the hub must not
  hold a bucket of that name.
- `js.create_object_store(config=ObjectStoreConfig(bucket=...))` overwrites the bucket
  with the (None) `bucket` argument: pass `bucket=` explicitly.

Mirrors
- A region can mirror a hub stream: `StreamConfig(name=..., mirror=StreamSource(name="<hub
  stream>", external=ExternalStream(api="$JS.hub.API")))` created in the region's domain.
  It caught up in ~0.2 s; N workers reading the mirror pull each message across the link
  once, N workers reading the hub stream through the domain pull it N times.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fedbus.bus.server import find_nats_server_binary, free_port

# deploy/nats of a source checkout (the demo and the tests run the shipped files).
DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "nats"
HUB_CONF = DEPLOY / "hub.conf"
HOST = "127.0.0.1"
HUB_DOMAIN = "hub"
_PORT_RETRIES = 3


class LeafTopologyError(RuntimeError):
    """A server did not start, or the leaf connections did not come up in time."""


def leaf_conf_for(region: str) -> Path:
    """deploy/nats/leaf-<region>.conf if it exists, else leaf-eu.conf as the template."""
    own = DEPLOY / f"leaf-{region}.conf"
    return own if own.exists() else DEPLOY / "leaf-eu.conf"


def _sub_once(text: str, pattern: str, repl: str, what: str, conf: Path) -> str:
    new, count = re.subn(pattern, repl, text, flags=re.MULTILINE)
    if count != 1:
        # The shipped file changed shape: fail loudly instead of running something else.
        raise LeafTopologyError(f"{conf.name}: expected exactly one {what} line, found {count}")
    return new


def rewrite_conf(
    conf: Path,
    *,
    port: int,
    http_port: int,
    store_dir: Path,
    domain: str,
    server_name: str,
    leaf_listen_port: int | None = None,
    hub_leaf_port: int | None = None,
) -> str:
    """The text of `conf` with only ports, paths, the domain, the server name and the
    leaf remote's host:port replaced. Every replaced line must occur exactly once."""
    text = conf.read_text()
    text = _sub_once(text, r"^server_name:.*$", f"server_name: {json.dumps(server_name)}", "server_name", conf)
    text = _sub_once(text, r"^listen:.*$", f"listen: {json.dumps(f'{HOST}:{port}')}", "listen", conf)
    text = _sub_once(text, r"^http:.*$", f"http: {json.dumps(f'{HOST}:{http_port}')}", "http", conf)
    text = _sub_once(text, r"^(\s+)store_dir:.*$", rf"\g<1>store_dir: {json.dumps(str(store_dir))}", "store_dir",
                     conf)
    text = _sub_once(text, r"^(\s+)domain:.*$", rf"\g<1>domain: {domain}", "jetstream domain", conf)
    if leaf_listen_port is not None:
        text = _sub_once(text, r"^(\s+)listen:.*$", rf"\g<1>listen: {json.dumps(f'{HOST}:{leaf_listen_port}')}",
                         "leafnodes listen", conf)
    if hub_leaf_port is not None:
        text = _sub_once(text, r'(nats-leaf://[^@"]*@)[^":/]+:\d+', rf"\g<1>{HOST}:{hub_leaf_port}",
                         "leaf remote url", conf)
    return text


def _get_json(url: str, timeout: float = 1.0) -> dict | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return json.loads(resp.read())
    except (urllib.error.URLError, OSError, ValueError):
        return None


@dataclass
class NodeProc:
    """One nats-server this module started (and only this module stops)."""

    name: str
    domain: str
    conf_template: Path
    port: int
    http_port: int
    store_dir: Path
    conf_path: Path
    log_path: Path
    leaf_listen_port: int | None = None
    hub_leaf_port: int | None = None
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://{HOST}:{self.port}"

    @property
    def monitor_url(self) -> str:
        return f"http://{HOST}:{self.http_port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def write_conf(self) -> None:
        self.conf_path.write_text(rewrite_conf(
            self.conf_template, port=self.port, http_port=self.http_port, store_dir=self.store_dir,
            domain=self.domain, server_name=self.name, leaf_listen_port=self.leaf_listen_port,
            hub_leaf_port=self.hub_leaf_port))

    def start(self, timeout: float = 10.0) -> None:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self.write_conf()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([find_nats_server_binary(), "-c", str(self.conf_path)],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise LeafTopologyError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            health = _get_json(f"{self.monitor_url}/healthz?js-enabled-only=true")
            if health is not None and health.get("status") == "ok":
                return
            if time.monotonic() > deadline:
                self.stop()
                raise LeafTopologyError(f"{self.name} not healthy after {timeout}s:\n{self.log_tail()}")
            time.sleep(0.05)

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM then SIGKILL, this Popen's own PID only."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@dataclass
class LeafTopology:
    """What the tests (and later the aggregator's e2e test) need to reach the servers."""

    hub: NodeProc
    leaves: dict[str, NodeProc] = field(default_factory=dict)

    @property
    def hub_url(self) -> str:
        return self.hub.url

    @property
    def hub_monitor_url(self) -> str:
        return self.hub.monitor_url

    @property
    def hub_domain(self) -> str:
        return self.hub.domain

    @property
    def regions(self) -> list[str]:
        return list(self.leaves)

    def region_url(self, region: str) -> str:
        return self.leaves[region].url

    def region_monitor_url(self, region: str) -> str:
        return self.leaves[region].monitor_url

    def region_domain(self, region: str) -> str:
        return self.leaves[region].domain

    def leaf_name(self, region: str) -> str:
        """The leaf's server name: its key in fedbus.bus.monitor.leaf_link_bytes(hub)."""
        return self.leaves[region].name

    def wait_leafs_connected(self, timeout: float = 15.0) -> None:
        """Until the hub's /leafz lists every leaf and every leaf's /leafz lists the hub."""
        want = {leaf.name for leaf in self.leaves.values()}
        deadline = time.monotonic() + timeout
        while True:
            doc = _get_json(f"{self.hub.monitor_url}/leafz") or {}
            have = {leaf.get("name") for leaf in doc.get("leafs") or []}
            spokes_ok = all(
                len((_get_json(f"{leaf.monitor_url}/leafz") or {}).get("leafs") or []) == 1
                for leaf in self.leaves.values()
            )
            if want <= have and spokes_ok:
                return
            for node in (self.hub, *self.leaves.values()):
                if not node.running():
                    raise LeafTopologyError(f"{node.name} exited:\n{node.log_tail()}")
            if time.monotonic() > deadline:
                tails = "\n".join(f"--- {n.name}\n{n.log_tail(10)}" for n in (self.hub, *self.leaves.values()))
                raise LeafTopologyError(f"leafs not connected after {timeout}s: hub sees {sorted(have)}, "
                                        f"want {sorted(want)}\n{tails}")
            time.sleep(0.1)

    def stop(self) -> None:
        for node in (*self.leaves.values(), self.hub):
            node.stop()


def _start_with_port_retry(node: NodeProc, repick: list[str]) -> None:
    for attempt in range(1, _PORT_RETRIES + 1):
        try:
            node.start()
            return
        except LeafTopologyError as err:
            if attempt == _PORT_RETRIES or "address already in use" not in str(err):
                raise
            for attr in repick:
                setattr(node, attr, free_port(HOST))


@contextmanager
def leaf_topology(regions: Sequence[str] = ("eu", "us"), *, base_dir: Path | None = None,
                  connect_timeout: float = 15.0) -> Iterator[LeafTopology]:
    """Start hub.conf and one leaf-<region>.conf per region; stop them all on exit.

    Each leaf's JetStream domain is its region name (so `regions` must be valid
    domain names, distinct from "hub"). Yields once every leaf connection is up.
    """
    if len(set(regions)) != len(regions) or HUB_DOMAIN in regions:
        raise ValueError(f"regions must be distinct and not {HUB_DOMAIN!r}: {regions}")
    owned = tempfile.TemporaryDirectory(prefix="fedbus-leaf-") if base_dir is None else None
    root = Path(owned.name) if owned is not None else Path(base_dir)  # type: ignore[arg-type]
    root.mkdir(parents=True, exist_ok=True)

    def node(name: str, domain: str, template: Path, **ports: int) -> NodeProc:
        return NodeProc(name=name, domain=domain, conf_template=template, port=free_port(HOST),
                        http_port=free_port(HOST), store_dir=root / f"store-{domain}",
                        conf_path=root / f"{domain}.conf", log_path=root / f"{domain}.log", **ports)

    topo = LeafTopology(hub=node("fedbus-hub", HUB_DOMAIN, HUB_CONF, leaf_listen_port=free_port(HOST)))
    try:
        _start_with_port_retry(topo.hub, ["port", "http_port", "leaf_listen_port"])
        for region in regions:
            leaf = node(f"fedbus-leaf-{region}", region, leaf_conf_for(region),
                        hub_leaf_port=topo.hub.leaf_listen_port)  # type: ignore[arg-type]
            topo.leaves[region] = leaf
            _start_with_port_retry(leaf, ["port", "http_port"])
        topo.wait_leafs_connected(connect_timeout)
        yield topo
    finally:
        topo.stop()
        if owned is not None:
            owned.cleanup()


async def wait_js_domain(nc, domain: str, timeout: float = 10.0) -> None:
    """Until `domain`'s JetStream API answers this connection (interest for
    $JS.<domain>.API.> propagates over the leaf link shortly after it connects)."""
    js = nc.jetstream(domain=domain, timeout=1.0)
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            info = await js.account_info()
            if info.domain != domain:
                raise LeafTopologyError(f"asked domain {domain!r}, answered by {info.domain!r}")
            return
        except LeafTopologyError:
            raise
        except Exception as err:  # noqa: BLE001 - timeouts / no responders until interest arrives
            last = err
            await asyncio.sleep(0.1)
    raise LeafTopologyError(f"JetStream domain {domain!r} not reachable after {timeout}s: {last!r}")
