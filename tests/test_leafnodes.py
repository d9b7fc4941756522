"""The NATS side of the regional topology, on real servers started from deploy/nats:
a hub (JetStream domain `hub`) and two regional leaf nodes (domains `eu`, `us`).

What the aggregator design relies on, each shown with the servers' own counters
(fedbus.bus.monitor, /leafz on the hub):
  a. a stream in the `eu` domain captures the region's updates and they never cross;
  b. a client on a leaf publishes (with ack) into a hub stream and consumes the hub's
     control stream through `nc.jetstream(domain="hub")`;
  c. which subjects each domain's streams may hold: a hub stream covering
     `upd.eu.*` silently captures (and pulls across the link) every regional update;
  d. link bytes of N updates, regional vs flat.
Plus the KV / Object Store behaviour across domains that fedbus's buckets depend on.
Notes for wiring fedbus: tests/leaf_support.py (DOMAIN_NOTES).
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator

import nats
import nats.errors
import nats.js.errors
import pytest
from nats.js.api import AckPolicy, ConsumerConfig, ExternalStream, StreamConfig, StreamSource

from fedbus.bus import find_nats_server_binary
from fedbus.bus.blobs import BlobStore
from fedbus.bus.layout import Subjects
from fedbus.bus.monitor import LinkCounters, delta, leaf_link_bytes, server_counters
from tests.leaf_support import DEPLOY, HUB_CONF, LeafTopology, leaf_conf_for, leaf_topology, rewrite_conf, \
    wait_js_domain

KiB = 1024
PAYLOAD = 64 * KiB


# ---- configuration files (no servers) -----------------------------------------------------

@pytest.mark.parametrize("name", ["hub.conf", "leaf-eu.conf", "leaf-us.conf"])
def test_shipped_config_is_valid(name, tmp_path):
    out = subprocess.run([find_nats_server_binary(), "-c", str(DEPLOY / name), "-t"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "is valid" in out.stdout + out.stderr


def test_rewrite_touches_only_ports_paths_domain_name_and_remote(tmp_path):
    template = leaf_conf_for("eu")
    text = rewrite_conf(template, port=1111, http_port=2222, store_dir=tmp_path / "s", domain="ap",
                        server_name="leaf-ap", hub_leaf_port=3333)
    before, after = template.read_text().splitlines(), text.splitlines()
    assert len(before) == len(after)
    changed = [(a.strip(), b.strip()) for a, b in zip(before, after) if a != b]
    keys = sorted(b.split(":")[0] for _, b in changed)
    assert keys == ["domain", "http", "listen", "server_name", "store_dir", "url"], changed
    assert 'url: "nats-leaf://leaf:leaf-dev@127.0.0.1:3333"' in text
    assert "domain: ap" in text
    hub = rewrite_conf(HUB_CONF, port=1, http_port=2, store_dir=tmp_path, domain="hub", server_name="h",
                       leaf_listen_port=4444)
    assert 'listen: "127.0.0.1:4444"' in hub and "domain: hub" in hub


def test_monitor_delta_per_link_and_after_reconnect():
    a = {"eu": LinkCounters(1, 2, 100, 200), "us": LinkCounters(5, 5, 50, 50)}
    b = {"eu": LinkCounters(3, 2, 400, 260), "us": LinkCounters(1, 0, 10, 0), "ap": LinkCounters(1, 1, 7, 7)}
    d = delta(a, b)
    assert d["eu"] == LinkCounters(2, 0, 300, 60) and d["eu"].total_bytes == 360
    assert d["us"] == LinkCounters(1, 0, 10, 0)  # counters went down: a new connection, counted from zero
    assert d["ap"] == LinkCounters(1, 1, 7, 7)
    assert delta(LinkCounters(1, 1, 1, 1), LinkCounters(2, 3, 4, 5)) == LinkCounters(1, 2, 3, 4)
    with pytest.raises(TypeError):
        delta(a, LinkCounters())


def test_monitor_unreachable_is_an_error():
    from fedbus.bus.monitor import MonitorError
    from fedbus.bus.server import free_port

    with pytest.raises(MonitorError, match="cannot read"):
        leaf_link_bytes(f"http://127.0.0.1:{free_port()}", timeout=0.5)


# ---- the running topology ------------------------------------------------------------------

@pytest.fixture(scope="module")
def topo() -> Iterator[LeafTopology]:
    with leaf_topology(("eu", "us")) as t:
        yield t


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 45))


async def _connect(url: str) -> nats.NATS:
    return await nats.connect(url, connect_timeout=2, max_reconnect_attempts=0)


def _link(topo: LeafTopology) -> dict[str, LinkCounters]:
    return leaf_link_bytes(topo.hub_monitor_url)


async def _stream_msgs(js, stream: str) -> int:
    return (await js.stream_info(stream)).state.messages


async def _until(check, what: str, timeout: float = 5.0) -> None:
    """Poll an async predicate (bounded): a message captured by a stream in another
    domain arrives after the local stream's ack, so counters are read after it lands."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        if loop.time() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.02)


async def _is(js, stream: str, n: int) -> bool:
    return await _stream_msgs(js, stream) >= n


async def _settle_interest() -> None:
    # Interest for a new stream's subjects reaches the other servers asynchronously
    # (measured: well under 100 ms here); a publish before that sees no responders.
    await asyncio.sleep(0.3)


@pytest.mark.e2e
def test_topology_domains_answer(topo):
    links = _link(topo)
    assert set(links) == {topo.leaf_name("eu"), topo.leaf_name("us")}

    async def main():
        hub, eu = await _connect(topo.hub_url), await _connect(topo.region_url("eu"))
        try:
            for nc in (hub, eu):
                for domain in ("hub", "eu", "us"):
                    await wait_js_domain(nc, domain)
                    assert (await nc.jetstream(domain=domain).account_info()).domain == domain
            # Without a domain, a client talks to the JetStream of the server it is on.
            assert (await eu.jetstream().account_info()).domain == "eu"
            assert (await hub.jetstream().account_info()).domain == "hub"
            # nc.jsm() takes no domain: pass the API prefix (a pitfall, see DOMAIN_NOTES).
            with pytest.raises(TypeError):
                eu.jsm(domain="hub")
            assert (await eu.jsm(prefix="$JS.hub.API").account_info()).domain == "hub"
        finally:
            await hub.close()
            await eu.close()

    run(main())


@pytest.mark.e2e
def test_a_regional_updates_stay_in_region(topo):
    s, n = Subjects("ja"), 200

    async def main():
        eu = await _connect(topo.region_url("eu"))
        try:
            js = eu.jetstream()  # the eu domain
            await js.add_stream(StreamConfig(name=f"{s.upd_stream}_EU", subjects=[f"fedbus.{s.job}.upd.eu.>"]))
            links0, hub0 = _link(topo), server_counters(topo.hub_monitor_url)
            body = b"u" * PAYLOAD
            for i in range(n):
                ack = await js.publish(s.upd("eu", f"w{i % 4}"), body)
                assert (ack.stream, ack.domain) == (f"{s.upd_stream}_EU", "eu")
            links, hub = delta(links0, _link(topo)), delta(hub0, server_counters(topo.hub_monitor_url))
            info = await js.stream_info(f"{s.upd_stream}_EU")
            return links, hub, info.state.messages
        finally:
            await eu.close()

    links, hub, stored = run(main())
    payload = n * PAYLOAD
    crossed = sum(c.total_bytes for c in links.values())
    print(f"\n(a) {n} x {PAYLOAD} B = {payload} B published on the eu leaf into the eu domain: "
          f"hub<->leaf links carried {crossed} B ({links}); hub /varz moved {hub.total_bytes} B")
    assert stored == n
    # Not one update's worth of bytes crosses; the hub server sees none of it either.
    assert crossed < PAYLOAD, links
    assert hub.in_bytes < PAYLOAD, hub


@pytest.mark.e2e
def test_b_leaf_publishes_to_hub_and_reads_hub_control(topo):
    s = Subjects("jb")

    async def main():
        hub, eu = await _connect(topo.hub_url), await _connect(topo.region_url("eu"))
        try:
            # The coordinator (on the hub) owns CTL and AGG in the hub domain.
            hjs = hub.jetstream()
            await hjs.add_stream(StreamConfig(name=s.ctl_stream, subjects=[s.ctl_all]))
            await hjs.add_stream(StreamConfig(name=s.agg_stream, subjects=[s.agg_all]))
            await _settle_interest()

            # The eu aggregator: JetStream publish with ack into the hub's AGG stream.
            ejs = eu.jetstream(domain="hub")
            partial = b"p" * PAYLOAD
            before = _link(topo)
            ack = await ejs.publish(s.agg("eu"), partial, stream=s.agg_stream)
            agg_link = delta(before, _link(topo))[topo.leaf_name("eu")]
            assert (ack.stream, ack.domain, ack.seq) == (s.agg_stream, "hub", 1)
            assert agg_link.in_bytes >= PAYLOAD  # it really crossed leaf -> hub, once
            assert agg_link.in_bytes < 2 * PAYLOAD

            # The coordinator reads it back from its own domain.
            psub = await hjs.pull_subscribe(s.agg_all, durable="coord", stream=s.agg_stream)
            got = await psub.fetch(1, timeout=5)
            assert got[0].subject == s.agg("eu") and got[0].data == partial
            await got[0].ack_sync()

            # Control hub -> leaf: an ordered consumer and a durable pull, both through the hub domain.
            await hjs.publish(s.ctl("round.open"), b"round 1", stream=s.ctl_stream)
            ordered = await ejs.subscribe(s.ctl_all, ordered_consumer=True)
            msg = await ordered.next_msg(timeout=5)
            assert (msg.subject, msg.data) == (s.ctl("round.open"), b"round 1")
            pull = await ejs.pull_subscribe(s.ctl_all, durable="agg-eu", stream=s.ctl_stream)
            got = await pull.fetch(1, timeout=5)
            assert got[0].data == b"round 1"
            await got[0].ack_sync()
            # The durable lives in the hub domain, where the coordinator can see it.
            assert (await hjs.consumer_info(s.ctl_stream, "agg-eu")).num_ack_pending == 0

            # Without domain="hub" the leaf's own JetStream is asked, which has no CTL stream.
            with pytest.raises(nats.js.errors.NotFoundError):
                await eu.jetstream().subscribe(s.ctl_all, ordered_consumer=True)
            await ordered.unsubscribe()
        finally:
            await hub.close()
            await eu.close()

    run(main())


@pytest.mark.e2e
def test_c_hub_stream_over_regional_subjects_captures_them(topo):
    """Stream subjects are not checked for overlap ACROSS domains. A hub stream on
    `fedbus.<job>.upd.>` (today's flat UPD stream) creates interest on the hub, so
    every update published on a leaf is stored twice (leaf and hub) and crosses the
    link; the publisher gets two acks and nats-py keeps whichever comes first."""
    s = Subjects("jc")
    eu_stream = f"{s.upd_stream}_EU"

    async def main():
        hub, eu = await _connect(topo.hub_url), await _connect(topo.region_url("eu"))
        try:
            hjs, ejs = hub.jetstream(), eu.jetstream()
            await ejs.add_stream(StreamConfig(name=eu_stream, subjects=[f"fedbus.{s.job}.upd.eu.>"]))
            # Right layout: the hub's update stream holds only subjects no region
            # captures (here the hub's own region, for workers attached to the hub).
            await hjs.add_stream(StreamConfig(name=s.upd_stream, subjects=[f"fedbus.{s.job}.upd.hub.>"]))
            await _settle_interest()
            body = b"c" * PAYLOAD
            before = _link(topo)
            for i in range(10):
                ack = await ejs.publish(s.upd("eu", "w1"), body)
                assert (ack.stream, ack.domain) == (eu_stream, "eu")
            good = delta(before, _link(topo))[topo.leaf_name("eu")]
            assert (await hjs.stream_info(s.upd_stream)).state.messages == 0
            # A hub-side publisher on a regional subject is stored by the REGION, not the hub.
            ack = await hjs.publish(s.upd("eu", "w2"), b"from the hub")
            assert (ack.stream, ack.domain) == (eu_stream, "eu")

            # Wrong layout: widen the hub stream to the flat `upd.>`. The server accepts it.
            await hjs.update_stream(StreamConfig(name=s.upd_stream, subjects=[s.upd_all]))
            await _settle_interest()
            before = _link(topo)
            for i in range(10):
                await ejs.publish(s.upd("eu", "w1"), body)
            await _until(lambda: _is(hjs, s.upd_stream, 10), "hub stream holds the 10 regional updates")
            bad = delta(before, _link(topo))[topo.leaf_name("eu")]
            hub_msgs = await _stream_msgs(hjs, s.upd_stream)
            # Raw request: both streams answer.
            inbox = eu.new_inbox()
            sub = await eu.subscribe(inbox)
            await eu.publish(s.upd("eu", "w3"), b"x", reply=inbox)
            acks = []
            for _ in range(3):
                try:
                    acks.append((await sub.next_msg(timeout=1)).data)
                except nats.errors.TimeoutError:
                    break
            await hjs.delete_stream(s.upd_stream)
            return good, bad, hub_msgs, acks
        finally:
            await hub.close()
            await eu.close()

    good, bad, hub_msgs, acks = run(main())
    print(f"\n(c) 10 x {PAYLOAD} B on upd.eu.*: hub UPD on upd.hub.> -> link {good.total_bytes} B; "
          f"hub UPD on upd.> -> link {bad.total_bytes} B, hub stored {hub_msgs}; raw acks {acks}")
    assert good.total_bytes < PAYLOAD
    assert hub_msgs == 10  # not more: nothing else was published on upd.eu.* meanwhile
    assert bad.in_bytes >= 10 * PAYLOAD
    assert len(acks) == 2 and {b'"domain":"eu"' in a for a in acks} == {True, False}


@pytest.mark.e2e
def test_d_link_bytes_regional_vs_flat(topo):
    """N updates from 4 eu workers: regional (eu-domain stream + one partial into the
    hub's AGG) vs flat (the same updates into a hub-domain UPD stream)."""
    reg, flat, n = Subjects("jdreg"), Subjects("jdflat"), 40
    workers = [f"w{i}" for i in range(4)]

    async def main():
        hub, eu = await _connect(topo.hub_url), await _connect(topo.region_url("eu"))
        try:
            hjs, ejs, ehub = hub.jetstream(), eu.jetstream(), eu.jetstream(domain="hub")
            await ejs.add_stream(StreamConfig(name=f"{reg.upd_stream}_EU", subjects=[f"fedbus.{reg.job}.upd.eu.>"]))
            await hjs.add_stream(StreamConfig(name=reg.agg_stream, subjects=[reg.agg_all]))
            await hjs.add_stream(StreamConfig(name=flat.upd_stream, subjects=[flat.upd_all]))
            await _settle_interest()
            body = b"d" * PAYLOAD

            before = _link(topo)
            for i in range(n):
                ack = await ejs.publish(reg.upd("eu", workers[i % 4]), body)
                assert ack.domain == "eu"
            # The aggregator forwards one partial of the same size (a mean of the updates).
            ack = await ehub.publish(reg.agg("eu"), body, stream=reg.agg_stream)
            assert ack.domain == "hub"
            regional = delta(before, _link(topo))

            before = _link(topo)
            for i in range(n):
                ack = await ehub.publish(flat.upd("eu", workers[i % 4]), body, stream=flat.upd_stream)
                assert ack.domain == "hub"
            flat_d = delta(before, _link(topo))
            return regional, flat_d
        finally:
            await hub.close()
            await eu.close()

    regional, flat_d = run(main())
    leaf = "fedbus-leaf-eu"
    r, f = regional[leaf], flat_d[leaf]
    print(f"\n(d) {n} updates x {PAYLOAD} B from the eu leaf: regional link {r.total_bytes} B "
          f"(in {r.in_bytes}, out {r.out_bytes}); flat link {f.total_bytes} B (in {f.in_bytes}, out {f.out_bytes}); "
          f"ratio {f.total_bytes / max(r.total_bytes, 1):.1f}")
    assert f.in_bytes >= n * PAYLOAD
    assert PAYLOAD <= r.in_bytes < 2 * PAYLOAD
    assert f.total_bytes >= (n / 2) * r.total_bytes
    # The us leaf saw none of it.
    assert regional["fedbus-leaf-us"].total_bytes < KiB and flat_d["fedbus-leaf-us"].total_bytes < KiB


@pytest.mark.e2e
def test_kv_and_object_store_across_domains(topo):
    """The job KV and model bucket live on the hub; what a leaf client can do with them."""

    async def main():
        hub, eu = await _connect(topo.hub_url), await _connect(topo.region_url("eu"))
        try:
            hjs, ejs, ehub = hub.jetstream(), eu.jetstream(), eu.jetstream(domain="hub")
            kv_hub = await hjs.create_key_value(bucket="kvx")
            await kv_hub.put("state", b"hub-written")
            await _settle_interest()
            kv = await ehub.key_value("kvx")
            # Reads and watches work through the domain (direct get / consumers on $JS.hub.API).
            assert (await kv.get("state")).value == b"hub-written"
            watcher = await kv.watch("state")
            # The watcher marks the end of the initial values with None; across a leaf link
            # that marker can arrive before the value itself, so skip it (at most twice).
            seen = [await watcher.updates(timeout=5)]
            while seen[-1] is None and len(seen) < 3:
                seen.append(await watcher.updates(timeout=5))
            assert seen[-1] is not None and seen[-1].value == b"hub-written", seen
            await watcher.stop()
            # nats-py puts on $KV.<bucket>.<key>; $KV interest does not cross a leaf link
            # between domains, so a put from the leaf finds no stream.
            with pytest.raises(nats.js.errors.NoStreamResponseError):
                await kv.put("state", b"leaf-written")
            # What nats.go does with a domain: publish on $JS.<domain>.API.$KV.<bucket>.<key>;
            # the hub maps it back to $KV.<bucket>.<key>.
            ack = await ehub.publish("$JS.hub.API.$KV.kvx.state", b"leaf-written")
            assert (ack.stream, ack.domain) == ("KV_kvx", "hub")
            assert (await kv_hub.get("state")).value == b"leaf-written"

            # Object store: the model bucket on the hub, read from the leaf through the domain.
            await hjs.create_object_store("objx")
            model = bytes(range(256)) * 4096  # 1 MiB
            ref = await BlobStore(hub, hjs, "objx").put("model-1", model)
            before = _link(topo)
            got = await BlobStore(eu, ehub, "objx").get("model-1", expected_digest=ref.digest)
            model_read = delta(before, _link(topo))[topo.leaf_name("eu")]
            assert bytes(got) == model and model_read.out_bytes >= len(model)

            # A bucket with the SAME name in both domains: $O interest crosses, so a put
            # from the leaf is stored twice and crosses the link.
            await hjs.create_object_store("blobx")
            await ejs.create_object_store("blobx")
            await _settle_interest()
            before = _link(topo)
            await BlobStore(eu, ejs, "blobx").put("u", model)
            await _until(lambda: _is(hjs, "OBJ_blobx", 3), "hub bucket holds the 2 chunks and the meta")
            same_name = delta(before, _link(topo))[topo.leaf_name("eu")]
            hub_copy = (await hjs.stream_info("OBJ_blobx")).state.bytes
            # A region-specific bucket name keeps them local.
            await ejs.create_object_store("blobx-eu")
            before = _link(topo)
            await BlobStore(eu, ejs, "blobx-eu").put("u", model)
            own_name = delta(before, _link(topo))[topo.leaf_name("eu")]
            return model_read, same_name, hub_copy, own_name
        finally:
            await hub.close()
            await eu.close()

    model_read, same_name, hub_copy, own_name = run(main())
    print(f"\nobject store: model read 1 MiB from leaf via hub domain: link {model_read.total_bytes} B; "
          f"same-name bucket put: link {same_name.total_bytes} B, hub copy {hub_copy} B; "
          f"region-named bucket put: link {own_name.total_bytes} B")
    assert same_name.in_bytes >= 1024 * KiB and hub_copy >= 1024 * KiB
    assert own_name.total_bytes < KiB


@pytest.mark.e2e
def test_region_mirror_of_hub_control_crosses_once(topo):
    """Workers reading the hub's CTL each pull it across the link; a mirror in the
    region's domain pulls it once and the workers read locally."""
    s, workers = Subjects("jm"), 4

    async def main():
        hub, eu = await _connect(topo.hub_url), await _connect(topo.region_url("eu"))
        try:
            hjs, ejs, ehub = hub.jetstream(), eu.jetstream(), eu.jetstream(domain="hub")
            await hjs.add_stream(StreamConfig(name=s.ctl_stream, subjects=[s.ctl_all]))
            await _settle_interest()
            event = b"m" * PAYLOAD  # a round.open carrying a small model inline

            async def read_all(js, stream) -> None:
                for w in range(workers):
                    await js.add_consumer(stream, ConsumerConfig(durable_name=f"w{w}", ack_policy=AckPolicy.EXPLICIT))
                    psub = await js.pull_subscribe_bind(f"w{w}", stream)
                    msgs = await psub.fetch(1, timeout=5)
                    assert msgs[0].data == event
                    await msgs[0].ack()
                    await psub.unsubscribe()

            await hjs.publish(s.ctl("round.open"), event)
            before = _link(topo)
            await read_all(ehub, s.ctl_stream)
            direct = delta(before, _link(topo))[topo.leaf_name("eu")]

            before = _link(topo)
            mirror = f"{s.ctl_stream}_EU"
            await ejs.add_stream(StreamConfig(
                name=mirror, mirror=StreamSource(name=s.ctl_stream, external=ExternalStream(api="$JS.hub.API"))))
            for _ in range(100):
                if (await ejs.stream_info(mirror)).state.messages == 1:
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("mirror did not catch up in 5 s")
            await read_all(ejs, mirror)
            mirrored = delta(before, _link(topo))[topo.leaf_name("eu")]
            return direct, mirrored
        finally:
            await hub.close()
            await eu.close()

    direct, mirrored = run(main())
    print(f"\nCTL event of {PAYLOAD} B read by {workers} eu workers: via hub domain link {direct.out_bytes} B "
          f"hub->leaf; via an eu mirror {mirrored.out_bytes} B")
    assert direct.out_bytes >= workers * PAYLOAD
    assert PAYLOAD <= mirrored.out_bytes < 2 * PAYLOAD


@pytest.mark.e2e
def test_hub_outage_regions_keep_accepting_updates(tmp_path):
    """While the hub is down a region's stream keeps accepting updates; a publish into
    the hub's AGG fails at once (no responders, not a timeout) and succeeds again
    once the leaf has reconnected (about a second: the leaf's reconnect interval)."""
    s = Subjects("jo")

    async def main(topo: LeafTopology):
        hub = await _connect(topo.hub_url)
        eu = await nats.connect(topo.region_url("eu"), connect_timeout=2)
        try:
            ejs, ehub = eu.jetstream(), eu.jetstream(domain="hub")
            await ejs.add_stream(StreamConfig(name=f"{s.upd_stream}_EU", subjects=[f"fedbus.{s.job}.upd.eu.>"]))
            await hub.jetstream().add_stream(StreamConfig(name=s.agg_stream, subjects=[s.agg_all]))
            await hub.close()
            await _settle_interest()
            assert (await ehub.publish(s.agg("eu"), b"p1", stream=s.agg_stream)).seq == 1

            topo.hub.kill()
            for i in range(5):
                ack = await ejs.publish(s.upd("eu", "w1"), b"u")
                assert ack.domain == "eu"
            with pytest.raises(nats.js.errors.NoStreamResponseError):
                await ehub.publish(s.agg("eu"), b"p2", stream=s.agg_stream, timeout=2)

            topo.hub.start()
            loop = asyncio.get_running_loop()
            t0, failures = loop.time(), 0
            while True:
                try:
                    ack = await ehub.publish(s.agg("eu"), b"p2", stream=s.agg_stream, timeout=1)
                    break
                except (nats.js.errors.NoStreamResponseError, nats.errors.TimeoutError):
                    failures += 1
                    assert loop.time() - t0 < 20, "hub AGG not reachable 20 s after the hub restarted"
                    await asyncio.sleep(0.1)
            # The hub kept its store: the second partial follows the first.
            assert (ack.stream, ack.domain, ack.seq) == (s.agg_stream, "hub", 2)
            return loop.time() - t0, (await ejs.stream_info(f"{s.upd_stream}_EU")).state.messages
        finally:
            await eu.close()

    with leaf_topology(("eu",), base_dir=tmp_path) as topo:
        back_after, stored = run(main(topo))
    print(f"\nhub outage: 5 regional updates stored while the hub was down; hub AGG reachable again "
          f"{back_after:.2f} s after the hub restarted")
    assert stored == 5
