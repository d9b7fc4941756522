"""A fedbus job on a 3-node JetStream cluster (deploy/nats/cluster-node*.conf, real
nats-server processes) with transport.replicas 3 survives a SIGKILLed node: the leader
of the job's update stream, or the node the coordinator is connected to. Nothing a
worker sent for a round that closed is missing from it, and the stall is printed."""

from __future__ import annotations

import asyncio
import re

import pytest

from fedbus.bus.connection import connect
from fedbus.bus.server import free_port
from tests.cluster_support import CLUSTER_FILES, NatsCluster, port_map, rewrite_config, run_failover

ROUNDS = 10
WORKERS = 3


# ---- fedbus.bus.connection.connect: one --nats value naming several servers ----------------

def test_connect_takes_comma_separated_servers(nats_server):
    dead = f"nats://127.0.0.1:{free_port()}"

    async def go() -> None:
        # Both in the pool; the dead one is tried first and skipped.
        nc = await connect(f"{dead}, {nats_server.url}", name="t", first_connect_timeout=10, dont_randomize=True)
        try:
            assert [u.netloc for u in nc.servers][:2] == [dead[len("nats://"):], f"127.0.0.1:{nats_server.port}"]
            assert nc.connected_url.port == nats_server.port
        finally:
            await nc.close()
        nc = await connect(nats_server.url, name="t", first_connect_timeout=10)  # one URL, as before
        try:
            assert [u.port for u in nc.servers][:1] == [nats_server.port]
        finally:
            await nc.close()
        with pytest.raises(ValueError):
            await connect(" , ", name="t", first_connect_timeout=1)

    asyncio.run(asyncio.wait_for(go(), 30))


# ---- the shipped configs are what runs --------------------------------------------------

_ADDR = re.compile(r"127\.0\.0\.1:(\d+)")


def _mask(text: str) -> str:
    return re.sub(r'store_dir\s*:\s*("[^"]*"|\S+)', "store_dir: X", _ADDR.sub("ADDR", text))


def test_cluster_loader_changes_only_ports_and_store_dirs(tmp_path):
    texts = [f.read_text() for f in CLUSTER_FILES]
    ports = port_map(texts)
    # client, monitoring and cluster ports of three nodes, all distinct, all remapped
    assert len(ports) == 9 and len(set(ports.values())) == 9
    for text in texts:
        out = rewrite_config(text, ports, tmp_path / "store")
        assert f'store_dir: "{tmp_path / "store"}"' in out
        # the same text once addresses and the store path are masked
        assert _mask(out) == _mask(text)
        # and every address mapped, in place
        assert _ADDR.findall(out) == [str(ports[int(p)]) for p in _ADDR.findall(text)]
    cluster = NatsCluster(tmp_path / "c")
    assert [n.name for n in cluster.nodes] == ["fedbus-n1", "fedbus-n2", "fedbus-n3"]
    assert all(n.config.read_text().count("nats-route://") == 3 for n in cluster.nodes)


# ---- acceptance 5: SIGKILL a node mid-job --------------------------------------------------

def _check_no_update_lost(r) -> None:
    s = r.summary
    assert s["reason"] == "completed", r.describe()
    assert s["rounds_completed"] == ROUNDS, r.describe()
    # every round closed once, aggregated, with every worker in it
    assert r.closes == {i: 1 for i in range(1, ROUNDS + 1)}, r.closes
    rows = s["rounds"]
    assert sorted(int(x["round"]) for x in rows) == list(range(1, ROUNDS + 1)), rows
    assert all(x["status"] == "aggregated" for x in rows), rows
    assert r.accepted == {i: set(r.workers) for i in range(1, ROUNDS + 1)}, r.accepted
    assert s["updates_accepted"] == ROUNDS * WORKERS, r.describe()
    # 0 lost: every update a worker logged as sent for a round is in that round's contributors
    assert set(r.sent) >= set(range(1, ROUNDS + 1)), r.sent
    assert r.lost == [], r.lost
    # the kill landed mid-job: rounds closed before and after it
    assert 1 <= r.killed_after_round < ROUNDS, r.describe()
    assert sum(1 for _, t in r.close_times if t > r.kill_time) == ROUNDS - r.killed_after_round


def _report(r, record_property) -> None:
    """The stall goes to stdout (pytest -s), the junit properties and, on failure, the report."""
    print("\n" + r.describe())
    record_property("stall_s", round(r.stall_s, 3))
    record_property("kill_to_next_close_s", round(r.kill_to_next_close_s, 3))
    record_property("lost", len(r.lost))


@pytest.mark.e2e
@pytest.mark.timeout(150)
def test_sigkill_update_stream_leader_mid_job(tmp_path, record_property):
    r = run_failover(tmp_path, "stream_leader", rounds=ROUNDS, num_workers=WORKERS, kill_after_round=3)
    _report(r, record_property)
    _check_no_update_lost(r)
    assert r.killed == r.leaders_before["upd"]
    assert "FEDBUS_cluster-failover_UPD" in r.led_by_victim
    # a new leader was elected among the two survivors
    assert r.leaders_after["upd"] in {"fedbus-n1", "fedbus-n2", "fedbus-n3"} - {r.killed}, r.leaders_after


@pytest.mark.e2e
@pytest.mark.timeout(150)
def test_sigkill_coordinators_node_mid_job(tmp_path, record_property):
    r = run_failover(tmp_path, "coordinator_node", rounds=ROUNDS, num_workers=WORKERS, kill_after_round=3)
    _report(r, record_property)
    _check_no_update_lost(r)
    assert r.killed == r.coordinator_node
    # the coordinator's connections moved to surviving nodes
    moved = r.coordinator_reconnects()
    assert moved and r.killed_address not in moved, (r.killed_address, moved)
