from __future__ import annotations

import asyncio
import re
import time

import nats.js.errors
import pytest
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, DiscardPolicy, RetentionPolicy, StreamConfig

from fedbus.bus import (
    BLOBS_BUCKET,
    JOB_ID_PATTERN,
    KV_BUCKET,
    MODELS_BUCKET,
    Subjects,
    connect,
    ensure_job_infrastructure,
    publish_with_retry,
    stream_limits,
)
from fedbus.bus.layout import REGISTRY_BUCKET
from fedbus.bus.server import EmbeddedNatsServer


def test_subject_names() -> None:
    s = Subjects("job-1")
    assert s.ctl("round_open") == "fedbus.job-1.ctl.round_open"
    assert s.ctl("round.open") == "fedbus.job-1.ctl.round.open"
    assert s.ctl_all == "fedbus.job-1.ctl.>"
    assert s.upd("eu", "w_7") == "fedbus.job-1.upd.eu.w_7"
    assert s.upd_all == "fedbus.job-1.upd.>"
    assert s.upd_region("eu") == "fedbus.job-1.upd.eu.*"
    assert s.agg("eu") == "fedbus.job-1.agg.eu"
    assert s.agg_all == "fedbus.job-1.agg.*"
    assert s.hb("w_7") == "fedbus.job-1.hb.w_7"
    assert s.hb_all == "fedbus.job-1.hb.*"
    assert s.metrics("w_7") == "fedbus.job-1.metrics.w_7"
    assert s.metrics_all == "fedbus.job-1.metrics.*"
    assert s.audit_of("w_7") == "fedbus.job-1.audit.w_7"
    assert s.audit_all == "fedbus.job-1.audit.>"


def test_stream_names_have_no_dots_and_keep_job_case() -> None:
    s = Subjects("Job_a-1", prefix="acme")
    names = [s.ctl_stream, s.upd_stream, s.agg_stream, s.metrics_stream, s.audit_stream]
    assert names == ["ACME_Job_a-1_CTL", "ACME_Job_a-1_UPD", "ACME_Job_a-1_AGG", "ACME_Job_a-1_METRICS", "ACME_Job_a-1_AUDIT"]
    assert Subjects("a").ctl_stream != Subjects("A").ctl_stream
    assert all("." not in n for n in names)
    assert s.ctl("x") == "acme.Job_a-1.ctl.x"


@pytest.mark.parametrize("job", ["", "a.b", "a*", ">", "a b", "x" * 65, "é", "a/b", None, 7])
def test_bad_job_ids_are_rejected(job: object) -> None:
    with pytest.raises(ValueError, match="job id"):
        Subjects(job)  # type: ignore[arg-type]


def test_good_job_ids_match_the_pattern() -> None:
    for job in ["a", "job-1", "JOB_2", "x" * 64]:
        assert re.match(JOB_ID_PATTERN, job)
        Subjects(job)


@pytest.mark.parametrize("prefix", ["", "a.b", "fed bus", "*"])
def test_bad_prefix_is_rejected(prefix: str) -> None:
    with pytest.raises(ValueError, match="prefix"):
        Subjects("job", prefix=prefix)


def test_bad_tokens_in_names_are_rejected() -> None:
    s = Subjects("job")
    with pytest.raises(ValueError, match="region"):
        s.upd("eu.west", "w1")
    with pytest.raises(ValueError, match="worker"):
        s.hb("w*")
    with pytest.raises(ValueError):
        s.ctl("round..open")
    with pytest.raises(ValueError):
        s.metrics("")


async def _stream_names(js) -> set[str]:
    return {info.config.name for info in await js.streams_info()}


def _expected(s: Subjects) -> set[str]:
    return {
        s.ctl_stream,
        s.upd_stream,
        s.agg_stream,
        s.metrics_stream,
        s.audit_stream,
        f"KV_{KV_BUCKET}",
        f"KV_{REGISTRY_BUCKET}",
        f"OBJ_{MODELS_BUCKET}",
        f"OBJ_{BLOBS_BUCKET}",
    }


def test_ensure_job_infrastructure_is_idempotent(nats_server: EmbeddedNatsServer) -> None:
    s = Subjects("job-1")

    async def main() -> None:
        nc = await connect(nats_server.url, "test-layout", first_connect_timeout=5)
        try:
            js = nc.jetstream()
            await ensure_job_infrastructure(js, s)
            await publish_with_retry(js, s.ctl("job.open"), b"1", msg_id="n1")
            await ensure_job_infrastructure(js, s)  # again: no error, data kept
            assert await _stream_names(js) == _expected(s)
            assert (await js.stream_info(s.ctl_stream)).state.messages == 1
            # every family lands in its stream
            await publish_with_retry(js, s.upd("eu", "w1"), b"u")
            await publish_with_retry(js, s.agg("eu"), b"a")
            await publish_with_retry(js, s.metrics("w1"), b"m")
            await publish_with_retry(js, s.audit_of("coordinator"), b"r")
            for name in (s.upd_stream, s.agg_stream, s.metrics_stream, s.audit_stream):
                assert (await js.stream_info(name)).state.messages == 1
            kv = await js.key_value(KV_BUCKET)
            await kv.put("job-1", b"state")
            assert (await kv.get("job-1")).value == b"state"
        finally:
            await nc.close()

    asyncio.run(main())


def test_ensure_job_infrastructure_concurrently_and_after_restart(nats_server: EmbeddedNatsServer) -> None:
    s = Subjects("job-2")

    async def from_many_connections() -> None:
        ncs = [await connect(nats_server.url, f"test-layout-{i}", first_connect_timeout=5) for i in range(2)]
        try:
            await asyncio.gather(*(ensure_job_infrastructure(nc.jetstream(), s) for nc in ncs))
            await asyncio.gather(*(ensure_job_infrastructure(nc.jetstream(), s) for nc in ncs))
            assert await _stream_names(ncs[0].jetstream()) == _expected(s)
        finally:
            for nc in ncs:
                await nc.close()

    asyncio.run(from_many_connections())
    nats_server.kill()
    nats_server.start()
    asyncio.run(from_many_connections())


def test_streams_get_the_limits_of_their_role(nats_server: EmbeddedNatsServer) -> None:
    s = Subjects("job-limits")

    async def main() -> None:
        nc = await connect(nats_server.url, "test-layout", first_connect_timeout=5)
        try:
            js = nc.jetstream()
            await ensure_job_infrastructure(js, s, max_message_bytes=256 * 1024)
            limits = stream_limits(256 * 1024)
            for family, name in (("CTL", s.ctl_stream), ("UPD", s.upd_stream), ("AGG", s.agg_stream),
                                 ("METRICS", s.metrics_stream), ("AUDIT", s.audit_stream)):
                cfg = (await js.stream_info(name)).config
                want = limits[family]
                assert cfg.retention == RetentionPolicy.LIMITS, name
                assert cfg.max_msgs_per_subject == want.max_msgs_per_subject, name
                assert cfg.max_msgs == want.max_msgs > 0, name
                assert cfg.max_bytes == want.max_bytes > 0, name
                assert cfg.max_age == pytest.approx(want.max_age_s) and cfg.max_age > 0, name
                assert cfg.max_msg_size == want.max_msg_size > 0, name
                assert cfg.discard == want.discard, name
                assert cfg.duplicate_window == pytest.approx(120.0), name
            # Streams that carry models and updates take an inline message plus header room;
            # every per-worker stream caps each subject, so one sender cannot fill it.
            upd = (await js.stream_info(s.upd_stream)).config
            assert 256 * 1024 < upd.max_msg_size <= 256 * 1024 + 64 * 1024
            for name in (s.ctl_stream, s.upd_stream, s.agg_stream, s.metrics_stream):
                assert (await js.stream_info(name)).config.max_msgs_per_subject > 0
            # The audit chain is never cut silently: a full audit stream refuses new records.
            assert (await js.stream_info(s.audit_stream)).config.discard == DiscardPolicy.NEW
            assert (await js.stream_info(s.upd_stream)).config.discard == DiscardPolicy.OLD
        finally:
            await nc.close()

    asyncio.run(main())


def test_stream_without_limits_is_updated_in_place(nats_server: EmbeddedNatsServer) -> None:
    s = Subjects("job-3")

    async def main() -> None:
        nc = await connect(nats_server.url, "test-layout", first_connect_timeout=5)
        try:
            js = nc.jetstream()
            # As an older fedbus created it: no limits; and an operator's metadata on it.
            await js.add_stream(StreamConfig(name=s.upd_stream, subjects=[s.upd_all], duplicate_window=30,
                                             metadata={"owner": "ops"}))
            for i in range(3):
                await publish_with_retry(js, s.upd("eu", f"w{i}"), b"u")
            await ensure_job_infrastructure(js, s)
            cfg = (await js.stream_info(s.upd_stream)).config
            want = stream_limits()["UPD"]
            assert (cfg.max_msgs_per_subject, cfg.max_bytes, cfg.max_msg_size) == (
                want.max_msgs_per_subject, want.max_bytes, want.max_msg_size)
            assert cfg.duplicate_window == pytest.approx(120.0)
            assert (cfg.metadata or {}).get("owner") == "ops"  # fields we do not manage are kept
            assert (await js.stream_info(s.upd_stream)).state.messages == 3  # data kept
            # Calling again changes nothing and does not fail.
            await ensure_job_infrastructure(js, s)
            assert (await js.stream_info(s.upd_stream)).config.max_bytes == want.max_bytes
            # Another job size limit is applied to the existing streams too.
            await ensure_job_infrastructure(js, s, max_message_bytes=4096)
            assert (await js.stream_info(s.upd_stream)).config.max_msg_size == stream_limits(4096)["UPD"].max_msg_size
        finally:
            await nc.close()

    asyncio.run(main())


def test_stream_with_other_subjects_is_refused(nats_server: EmbeddedNatsServer) -> None:
    s = Subjects("job-6")

    async def main() -> None:
        nc = await connect(nats_server.url, "test-layout", first_connect_timeout=5)
        try:
            js = nc.jetstream()
            await js.add_stream(StreamConfig(name=s.upd_stream, subjects=["elsewhere.>"]))
            with pytest.raises(RuntimeError, match="exists with subjects"):
                await ensure_job_infrastructure(js, s)
        finally:
            await nc.close()

    asyncio.run(main())


def test_flood_on_one_update_subject_neither_evicts_nor_blocks_other_workers(nats_server: EmbeddedNatsServer) -> None:
    s = Subjects("job-flood")
    cap = stream_limits()["UPD"].max_msgs_per_subject

    async def main() -> None:
        nc = await connect(nats_server.url, "test-layout", first_connect_timeout=5)
        try:
            js = nc.jetstream()
            await ensure_job_infrastructure(js, s, max_message_bytes=4096)
            honest = await publish_with_retry(js, s.upd("eu", "w02"), b"honest update of w02")
            # w01's subject gets far more than its cap (acked publishes, bounded).
            flood = 5 * cap
            for i in range(flood):
                await js.publish(s.upd("eu", "w01"), b"junk %d" % i)
            info = await js.stream_info(s.upd_stream, subjects_filter=s.upd_all)
            assert info.state.subjects == {s.upd("eu", "w01"): cap, s.upd("eu", "w02"): 1}
            # w02's update is still there, unchanged; w01 kept only its newest messages.
            kept = await js.get_msg(s.upd_stream, honest.seq)
            assert kept.data == b"honest update of w02"
            assert (await js.get_last_msg(s.upd_stream, s.upd("eu", "w01"))).data == b"junk %d" % (flood - 1)
            # Nobody is blocked: other workers and w01 itself can still publish.
            await publish_with_retry(js, s.upd("eu", "w03"), b"w03")
            await publish_with_retry(js, s.upd("eu", "w01"), b"w01 after the flood")
            assert (await js.stream_info(s.upd_stream)).state.messages == cap + 2
            # Junk larger than an inline message is refused by the stream itself.
            with pytest.raises(nats.js.errors.BadRequestError):
                await js.publish(s.upd("eu", "w04"), b"x" * (stream_limits(4096)["UPD"].max_msg_size + 1))
        finally:
            await nc.close()

    asyncio.run(main())


def test_publish_with_retry_deduplicates_by_msg_id(nats_server: EmbeddedNatsServer) -> None:
    s = Subjects("job-4")

    async def main() -> None:
        nc = await connect(nats_server.url, "test-layout", first_connect_timeout=5)
        try:
            js = nc.jetstream()
            await ensure_job_infrastructure(js, s)
            first = await publish_with_retry(js, s.ctl("x"), b"1", msg_id="nonce-1")
            again = await publish_with_retry(js, s.ctl("x"), b"1", headers={"nats-msg-id": "nonce-1"})
            assert again.seq == first.seq and again.duplicate
            other = await publish_with_retry(js, s.ctl("x"), b"1")  # generated id: a new message
            assert other.seq == first.seq + 1
        finally:
            await nc.close()

    asyncio.run(main())


def test_publish_with_retry_survives_a_server_restart(nats_server: EmbeddedNatsServer) -> None:
    s = Subjects("job-5")

    async def main() -> None:
        nc = await connect(nats_server.url, "test-retry", first_connect_timeout=5)
        try:
            js = nc.jetstream()
            await ensure_job_infrastructure(js, s)
            nats_server.kill()

            def restart_later() -> None:
                time.sleep(1.0)
                nats_server.start()

            restart = asyncio.get_running_loop().run_in_executor(None, restart_later)
            ack = await publish_with_retry(js, s.ctl("x"), b"1", msg_id="during-outage", timeout=1.0, attempts=30)
            await restart
            assert ack.seq == 1
            assert (await js.stream_info(s.ctl_stream)).state.messages == 1
        finally:
            await nc.close()

    asyncio.run(main())


def test_consumer_filtered_on_listed_workers_is_never_delivered_junk(nats_server: EmbeddedNatsServer) -> None:
    s = Subjects("job-filter")
    listed = [("eu", f"w{i:03d}") for i in range(500)]  # filters scale to a real federation
    assert s.upd_listed(listed + listed[:3]) == sorted(s.upd(r, w) for r, w in listed)

    async def main() -> None:
        nc = await connect(nats_server.url, "test-layout", first_connect_timeout=5)
        try:
            js = nc.jetstream()
            await ensure_job_infrastructure(js, s)
            await js.add_consumer(s.upd_stream, ConsumerConfig(
                durable_name="coordinator-updates", filter_subjects=s.upd_listed(listed),
                deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.EXPLICIT))
            psub = await js.pull_subscribe_bind("coordinator-updates", s.upd_stream)
            for i in range(2000):  # junk under ids nobody listed, before and after the real ones
                nc_subject = s.upd("eu", f"x{i}")
                await nc.publish(nc_subject, b"junk")
                if i == 1000:
                    for _, w in listed[:3]:
                        await publish_with_retry(js, s.upd("eu", w), w.encode())
            await nc.flush()
            await publish_with_retry(js, s.upd("eu", "w499"), b"w499")  # acked: everything before is stored
            assert (await js.stream_info(s.upd_stream)).state.messages == 2004
            info = await js.consumer_info(s.upd_stream, "coordinator-updates")
            assert info.num_pending == 4
            msgs = await psub.fetch(batch=100, timeout=2)
            assert [m.data for m in msgs] == [b"w000", b"w001", b"w002", b"w499"]
        finally:
            await nc.close()

    asyncio.run(main())


def test_a_store_too_small_for_the_limits_fails_with_a_clear_error(nats_server_factory) -> None:
    # The streams' max_bytes are reserved up front against the server's store.
    reserved = sum(lim.max_bytes for lim in stream_limits().values())
    small = nats_server_factory(max_file_store=reserved - 1)
    roomy = nats_server_factory(max_file_store=reserved + 64 * 1024 * 1024)  # plus KV and object stores

    async def main() -> None:
        for server, fits in ((small, False), (roomy, True)):
            nc = await connect(server.url, "test-layout", first_connect_timeout=5)
            try:
                if fits:
                    await ensure_job_infrastructure(nc.jetstream(), Subjects("job-store"))
                else:
                    with pytest.raises(RuntimeError, match="cannot reserve its max_bytes"):
                        await ensure_job_infrastructure(nc.jetstream(), Subjects("job-store"))
            finally:
                await nc.close()

    asyncio.run(main())


def test_without_a_message_limit_streams_take_what_the_server_takes(nats_server_factory) -> None:
    server = nats_server_factory(max_payload=4 * 1024 * 1024)
    s = Subjects("job-payload")

    async def main() -> None:
        nc = await connect(server.url, "test-layout", first_connect_timeout=5)
        try:
            js = nc.jetstream()
            await ensure_job_infrastructure(js, s)
            assert (await js.stream_info(s.upd_stream)).config.max_msg_size == stream_limits(4 * 1024 * 1024)["UPD"].max_msg_size
            # A 3 MiB inline update (a job with a raised inline limit) is stored.
            ack = await publish_with_retry(js, s.upd("eu", "w1"), b"u" * (3 * 1024 * 1024))
            assert ack.seq == 1
        finally:
            await nc.close()

    asyncio.run(main())
