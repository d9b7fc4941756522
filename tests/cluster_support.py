"""A 3-node JetStream cluster from the shipped deploy/nats/cluster-node*.conf files.

The files are run as they are, except for what cannot be shared on one machine with
other test runs: every 127.0.0.1:PORT (client, monitoring, cluster listen and the
routes) is mapped to a free port, and each node's store_dir goes to a temporary
directory. Everything else (server_name, the cluster name, JetStream) is the shipped
text. A file that no longer has the expected keys fails loudly instead of silently
running something else.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import nats

from fedbus.bus.server import find_nats_server_binary, free_port

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "nats"
CLUSTER_FILES = tuple(DEPLOY / f"cluster-node{i}.conf" for i in (1, 2, 3))

_ADDR = re.compile(r"127\.0\.0\.1:(\d+)")
_STORE = re.compile(r'(store_dir\s*:\s*)("[^"]*"|\S+)')
_NAME = re.compile(r"^\s*server_name\s*:\s*(\S+)\s*$", re.M)
_CLIENT = re.compile(r"^listen\s*:\s*127\.0\.0\.1:(\d+)\s*$", re.M)  # top level: no indentation
_HTTP = re.compile(r"^http\s*:\s*127\.0\.0\.1:(\d+)\s*$", re.M)


def port_map(texts: list[str]) -> dict[int, int]:
    """Every port the configs name (listen, http, cluster listen, routes) -> a free one."""
    ports = sorted({int(p) for text in texts for p in _ADDR.findall(text)})
    fresh: dict[int, int] = {}
    for port in ports:
        new = free_port()
        while new in fresh.values():
            new = free_port()
        fresh[port] = new
    return fresh


def rewrite_config(text: str, ports: dict[int, int], store_dir: Path) -> str:
    """The shipped config with its 127.0.0.1 ports remapped and its store_dir replaced."""
    if len(_STORE.findall(text)) != 1:
        raise ValueError("expected exactly one jetstream store_dir in the config")
    if not (_NAME.search(text) and _CLIENT.search(text) and _HTTP.search(text) and "routes" in text):
        raise ValueError("expected server_name, listen, http and cluster routes in the config")
    out = _ADDR.sub(lambda m: f"127.0.0.1:{ports[int(m.group(1))]}", text)
    return _STORE.sub(lambda m: m.group(1) + json.dumps(str(store_dir)), out)


@dataclass
class ClusterNode:
    name: str
    config: Path
    client_port: int
    http_port: int
    log_file: Path
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.client_port}"

    @property
    def monitor(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def get(self, path: str, timeout: float = 2.0) -> dict:
        with urllib.request.urlopen(self.monitor + path, timeout=timeout) as resp:
            return json.loads(resp.read())


class NatsCluster:
    """Three nats-server processes from deploy/nats/cluster-node{1,2,3}.conf, owned by this
    object: it stops (and kills) only the PIDs it started."""

    def __init__(self, work_dir: Path, files: tuple[Path, ...] = CLUSTER_FILES):
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        texts = [f.read_text() for f in files]
        ports = port_map(texts)
        self.nodes: list[ClusterNode] = []
        for path, text in zip(files, texts):
            name = _NAME.search(text).group(1).strip('"')  # type: ignore[union-attr]
            config = self.work_dir / path.name
            config.write_text(rewrite_config(text, ports, self.work_dir / f"store-{name}"))
            self.nodes.append(ClusterNode(
                name=name, config=config,
                client_port=ports[int(_CLIENT.search(text).group(1))],  # type: ignore[union-attr]
                http_port=ports[int(_HTTP.search(text).group(1))],  # type: ignore[union-attr]
                log_file=self.work_dir / f"{name}.log"))
        if len({n.name for n in self.nodes}) != len(self.nodes):
            raise ValueError("cluster nodes need distinct server_name values")

    @property
    def urls(self) -> str:
        """All client URLs, comma-separated: what `--nats` takes for a cluster."""
        return ",".join(n.url for n in self.nodes)

    def node(self, name: str) -> ClusterNode:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(f"no cluster node named {name!r} (have {[n.name for n in self.nodes]})")

    def start(self, timeout: float = 30.0) -> "NatsCluster":
        binary = find_nats_server_binary()
        for n in self.nodes:
            with open(n.log_file, "ab") as log:
                n.proc = subprocess.Popen([binary, "-c", str(n.config)], stdin=subprocess.DEVNULL,
                                          stdout=log, stderr=log, start_new_session=True)
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float, nodes: list[ClusterNode] | None = None) -> None:
        """Until every (running) node is healthy and they agree on one JetStream meta leader."""
        nodes = nodes if nodes is not None else [n for n in self.nodes if n.running]
        deadline = time.monotonic() + timeout
        last = "not polled"
        while time.monotonic() < deadline:
            for n in nodes:
                if n.proc is not None and n.proc.poll() is not None:
                    raise RuntimeError(f"{n.name} exited with {n.proc.returncode}:\n{self.tail(n)}")
            try:
                leaders = set()
                for n in nodes:
                    with urllib.request.urlopen(n.monitor + "/healthz", timeout=2.0) as resp:
                        if resp.status != 200:
                            raise OSError(f"{n.name} healthz {resp.status}")
                    meta = n.get("/jsz").get("meta_cluster") or {}
                    leaders.add(meta.get("leader"))
                if len(leaders) == 1 and None not in leaders and "" not in leaders:
                    return
                last = f"meta leaders seen: {leaders}"
            except (urllib.error.URLError, OSError, ValueError) as err:
                last = repr(err)
            time.sleep(0.2)
        raise TimeoutError(f"cluster not ready in {timeout} s ({last})\n" + "\n".join(self.tail(n) for n in nodes))

    def kill(self, name: str) -> float:
        """SIGKILL one node (its own PID); returns time.time() of the kill."""
        n = self.node(name)
        assert n.proc is not None and n.proc.poll() is None, f"{name} is not running"
        n.proc.kill()
        at = time.time()
        n.proc.wait(timeout=10)
        return at

    def stop(self) -> None:
        for n in self.nodes:
            if n.proc is not None and n.proc.poll() is None:
                n.proc.terminate()
        for n in self.nodes:
            if n.proc is not None:
                try:
                    n.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    n.proc.kill()
                    n.proc.wait(timeout=10)

    def tail(self, n: ClusterNode, lines: int = 20) -> str:
        try:
            text = n.log_file.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            text = []
        return f"--- {n.name} (pid {n.pid})\n" + "\n".join(text)

    def client_node(self, client_name: str) -> str | None:
        """The server_name of the running node where a client connection named exactly
        ``client_name`` is open (from each node's /connz), or None."""
        for n in self.nodes:
            if not n.running:
                continue
            try:
                conns = n.get("/connz?limit=1024").get("connections") or []
            except (urllib.error.URLError, OSError, ValueError):
                continue
            if any(c.get("name") == client_name for c in conns):
                return n.name
        return None

    def wait_client_node(self, client_name: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.client_node(client_name)
            if found is not None:
                return found
            time.sleep(0.1)
        raise TimeoutError(f"no node has a connection named {client_name!r} after {timeout} s")

    @property
    def running_urls(self) -> str:
        return ",".join(n.url for n in self.nodes if n.running)

    def stream_leader(self, stream: str, timeout: float = 15.0) -> str:
        """server_name of the Raft leader of ``stream`` (JetStream API stream_info().cluster.leader)."""
        return asyncio.run(_stream_leader(self.running_urls, stream, timeout))

    def all_leaders(self) -> dict[str, str]:
        """Every stream's leader server_name (KV buckets and object stores are streams too)."""
        return asyncio.run(_all_leaders(self.running_urls))

    def stream_cluster(self, stream: str) -> dict:
        return asyncio.run(_stream_cluster(self.running_urls, stream, 5.0))


async def _stream_cluster(urls: str, stream: str, timeout: float) -> dict:
    async def quiet(_err: Exception) -> None:  # nats-py's default prints tracebacks
        return None

    nc = await nats.connect(servers=urls.split(","), connect_timeout=2, max_reconnect_attempts=3,
                            allow_reconnect=True, error_cb=quiet)
    try:
        info = await asyncio.wait_for(nc.jetstream().stream_info(stream), timeout)
        cluster = info.cluster
        return {"leader": cluster.leader if cluster else None,
                "replicas": [{"name": r.name, "current": r.current} for r in (cluster.replicas or [])]
                if cluster else [], "num_replicas": info.config.num_replicas}
    finally:
        await nc.close()


async def _stream_leader(urls: str, stream: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            info = await asyncio.wait_for(_stream_cluster(urls, stream, 5.0), 8.0)
            if info["leader"]:
                return info["leader"]
            last = info
        except Exception as err:  # noqa: BLE001 - the stream may not exist yet; retried, bounded
            last = err
        await asyncio.sleep(0.2)
    raise TimeoutError(f"no leader for stream {stream} after {timeout} s (last: {last!r})")


# ---- one fedbus job on the cluster, with one node SIGKILLed mid-job ------------------------

COORDINATOR_CONN = "fedbus-coordinator-coordinator"  # the coordinator's main connection name
CASES = ("stream_leader", "coordinator_node")


@dataclass
class FailoverResult:
    case: str
    killed: str  # server_name of the SIGKILLed node
    leaders_before: dict[str, str]  # stream -> leader server_name at the kill
    coordinator_node: str  # where the coordinator was connected at the kill
    killed_after_round: int
    kill_time: float
    summary: dict
    rounds: int
    workers: list[str]
    sent: dict[int, set[str]]  # round -> workers that logged update.sent (or resent) for it
    closes: dict[int, int]  # round -> round.closed events in the coordinator log
    close_times: list[tuple[int, float]]  # (round, unix time) of each round.closed, in order
    coordinator_events: list[dict]  # the coordinator's JSON log lines
    leaders_after: dict[str, str]
    killed_address: str  # its client host:port
    led_by_victim: list[str]  # every stream (KV and object stores included) and consumer the victim led

    def victim_consumers(self) -> dict[str, int]:
        """How many consumers of each stream the victim led (ordered consumers are R1: lost with it)."""
        out: dict[str, int] = {}
        for x in self.led_by_victim:
            if "/" in x:
                stream = x.split("/", 1)[0]
                out[stream] = out.get(stream, 0) + 1
        return out

    def coordinator_reconnects(self) -> list[str]:
        """Servers (host:port) the coordinator's connections reconnected to."""
        return [str(e.get("server")) for e in self.coordinator_events if e.get("event") == "nats.reconnected"]

    @property
    def accepted(self) -> dict[int, set[str]]:
        return {int(r["round"]): set(r.get("accepted_workers") or []) for r in self.summary.get("rounds", [])
                if r.get("status") == "aggregated"}

    @property
    def lost(self) -> list[tuple[int, str]]:
        """Updates a worker sent for a round that closed aggregated and that the round did
        not accept."""
        acc = self.accepted
        return sorted((r, w) for r, ws in self.sent.items() if r in acc for w in ws - acc[r])

    @property
    def gaps(self) -> list[float]:
        """Seconds between consecutive round.closed events in the coordinator's log. (The
        event is logged once the round's model is committed, so a commit stuck on a
        leaderless KV / object store stream counts; summary rows' elapsed_s is taken at
        the close decision, before the commit, and misses that part: see row_gaps.)"""
        t = [at for _, at in self.close_times]
        return [b - a for a, b in zip(t, t[1:])]

    @property
    def row_gaps(self) -> list[float]:
        """Seconds between consecutive summary rows (elapsed_s, at each close decision)."""
        el = [float(r["elapsed_s"]) for r in self.summary.get("rounds", []) if r.get("elapsed_s") is not None]
        return [b - a for a, b in zip(el, el[1:])]

    @property
    def stall_s(self) -> float:
        """The longest gap between consecutive round closes (coordinator log)."""
        return max(self.gaps, default=float("nan"))

    @property
    def row_stall_s(self) -> float:
        return max(self.row_gaps, default=float("nan"))

    def count(self, event: str) -> int:
        return sum(1 for e in self.coordinator_events if e.get("event") == event)

    @property
    def kill_to_next_close_s(self) -> float:
        after = [t for _, t in self.close_times if t > self.kill_time]
        return (after[0] - self.kill_time) if after else float("nan")

    @property
    def median_gap_s(self) -> float:
        g = sorted(self.gaps)
        return g[len(g) // 2] if g else float("nan")

    def describe(self) -> str:
        return (f"[{self.case}] killed {self.killed} after round {self.killed_after_round} "
                f"(leaders {self.leaders_before}, coordinator on {self.coordinator_node}); "
                f"rounds {self.summary.get('rounds_completed')}/{self.rounds}, "
                f"accepted {self.summary.get('updates_accepted')}, lost {len(self.lost)}; "
                f"stall (longest gap between round closes) {self.stall_s:.2f} s, "
                f"kill -> next close {self.kill_to_next_close_s:.2f} s, median gap {self.median_gap_s:.2f} s, "
                f"longest gap between summary rows {self.row_stall_s:.2f} s; "
                f"coordinator: {self.count('commit.failed')} commit.failed, "
                f"{self.count('consumer.fetch_failed')} consumer.fetch_failed, "
                f"{self.count('nats.reconnected')} nats.reconnected; "
                f"the victim led streams {[x for x in self.led_by_victim if '/' not in x]} and "
                f"{self.victim_consumers()} consumers; leaders after {self.leaders_after}")


def _parse_ts(text: str) -> float:
    from datetime import datetime
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _json_lines(path: Path) -> list[dict]:
    out = []
    if path.exists():
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
    return out


def run_failover(work_dir: Path, case: str, *, rounds: int = 8, num_workers: int = 3, kill_after_round: int = 2,
                 job_timeout: float = 90.0, job_id: str = "cluster-failover") -> FailoverResult:
    """A fresh 3-node cluster from deploy/nats, a fedbus job with transport.replicas 3 run
    by CLI processes that are given all three URLs, and one node SIGKILLed once round
    ``kill_after_round`` closed: the update stream's leader (``stream_leader``) or the node
    the coordinator is connected to (``coordinator_node``)."""
    from fedbus.jobspec import EvaluationSpec, TransportSpec
    from fedbus.bus.layout import KV_BUCKET, Subjects
    from tests.e2e_support import LocalFederation, small_job, wait_for_round

    if case not in CASES:
        raise ValueError(f"case must be one of {CASES}")
    work_dir = Path(work_dir)
    cluster = NatsCluster(work_dir / "nats").start()
    job = small_job(job_id, rounds=rounds, min_workers=num_workers, min_updates=num_workers, deadline_s=30.0,
                    transport=TransportSpec(replicas=3), evaluation=EvaluationSpec(final_round=False))
    subjects = Subjects(job.job, job.transport.prefix)
    streams = {"upd": subjects.upd_stream, "ctl": subjects.ctl_stream, "kv": f"KV_{KV_BUCKET}"}
    fed = LocalFederation(work_dir / "run", cluster.urls, job, num_workers)
    try:
        fed.start_coordinator()
        for p in fed.federation.workers():
            fed.start_worker(p.id)
        # Look up first (it takes a moment and rounds are quick), then kill right after the
        # close of round kill_after_round: the kill lands in the next round.
        wait_for_round(fed, kill_after_round - 1, timeout=job_timeout)
        leaders = {k: cluster.stream_leader(s) for k, s in streams.items()}
        all_leaders = cluster.all_leaders()
        coordinator_node = cluster.wait_client_node(COORDINATOR_CONN, timeout=5)
        victim = leaders["upd"] if case == "stream_leader" else coordinator_node
        wait_for_round(fed, kill_after_round, timeout=job_timeout)
        kill_time = cluster.kill(victim)
        code = fed.wait_coordinator(timeout=job_timeout)
        fed.wait_all(timeout=20)
        assert code == 0, f"coordinator exited {code}:\n{fed.tail_logs()}"
        leaders_after = {}
        for k, s in streams.items():
            try:
                leaders_after[k] = cluster.stream_leader(s, timeout=10)
            except TimeoutError as err:
                leaders_after[k] = f"none ({err})"
    finally:
        fed.stop()
        cluster.stop()

    logs = fed.run_dir / "logs"
    coord = _json_lines(logs / "coordinator.log")
    closes: dict[int, int] = {}
    close_times = []
    for e in coord:
        if e.get("event") == "round.closed":
            closes[int(e["round"])] = closes.get(int(e["round"]), 0) + 1
            close_times.append((int(e["round"]), _parse_ts(e["timestamp"])))
    workers = [p.id for p in fed.federation.workers()]
    sent: dict[int, set[str]] = {}
    for w in workers:
        for e in _json_lines(logs / f"{w}.log"):
            if e.get("event") in ("update.sent", "update.resent"):
                sent.setdefault(int(e["round"]), set()).add(w)
    before = [r for r, t in close_times if t <= kill_time]
    return FailoverResult(case=case, killed=victim, leaders_before=leaders, coordinator_node=coordinator_node,
                          killed_after_round=max(before, default=0), kill_time=kill_time, summary=fed.summary(),
                          rounds=rounds, workers=workers, sent=sent, closes=closes, close_times=close_times,
                          coordinator_events=coord, leaders_after=leaders_after,
                          killed_address=cluster.node(victim).url[len("nats://"):],
                          led_by_victim=sorted(s for s, lead in all_leaders.items() if lead == victim))


async def _all_leaders(urls: str) -> dict[str, str]:
    async def quiet(_err: Exception) -> None:
        return None

    nc = await nats.connect(servers=urls.split(","), connect_timeout=2, max_reconnect_attempts=3,
                            allow_reconnect=True, error_cb=quiet)
    try:
        jsm = nc.jsm()
        infos = await asyncio.wait_for(jsm.streams_info(), 10.0)
        out = {i.config.name: (i.cluster.leader if i.cluster else None) for i in infos}
        # Consumers have Raft groups (durable: the stream's replicas) or one home (ephemeral
        # and ordered consumers: R1) of their own: "stream/consumer" -> leader.
        for i in infos:
            for c in await asyncio.wait_for(jsm.consumers_info(i.config.name), 10.0):
                out[f"{i.config.name}/{c.name}"] = c.cluster.leader if c.cluster else None
        return out
    finally:
        await nc.close()
