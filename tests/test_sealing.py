"""Sealed update bodies: the box itself, who seals to whom, and the verifier's order
(signature and header checks, ciphertext digest, then open, then decode)."""

from __future__ import annotations

import asyncio

import pytest
import torch
import yaml
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from nacl.bindings import crypto_scalarmult
from nacl.public import PrivateKey
from pydantic import ValidationError

from fedbus.bus import Subjects, connect, ensure_job_infrastructure
from fedbus.crypto.envelopes import EnvelopeVerifier, Rejection, seal
from fedbus.crypto.federation import Federation, FederationFile
from fedbus.crypto.keys import Identity, b64
from fedbus.crypto import sealing
from fedbus.crypto.sealing import (
    SEAL_HEADER,
    SEAL_MAGIC,
    SEAL_TAG,
    sealed_length,
    seal_pieces,
    SEAL_OVERHEAD,
    Opener,
    SealError,
    SealingUnavailable,
    SealTarget,
    open_body,
    seal_body,
    unsealed_recipients,
    update_seal_target,
)
from fedbus.jobspec import JobSpec
from fedbus.messaging import Messenger, verifier_for
from fedbus.protocol.messages import RoundOpen, Update, encode_body

JOB = "job-1"
NOW = 1_700_000_000_000
COORD = Identity.generate("coord", "coordinator")
AGG = Identity.generate("agg-eu", "aggregator", "eu")
W1 = Identity.generate("w1", "worker", "eu")
W2 = Identity.generate("w2", "worker", "us")
# A recognisable plaintext: 4 KiB of one float32 bit pattern.
PATTERN = torch.tensor([1.2345678], dtype=torch.float32).numpy().tobytes()
STATE = {"w": torch.full((1024,), 1.2345678, dtype=torch.float32)}
FIELDS = Update(round=1, base_version=0, num_samples=10, num_steps=2)


def federation(*identities: Identity, drop_keys=()) -> Federation:
    entries = []
    for ident in identities:
        entry = ident.participant_entry()
        if ident.id in drop_keys:
            entry.pop("encryption_key")
        entries.append(entry)
    return Federation(FederationFile.model_validate({"participants": entries}))


FED = federation(COORD, AGG, W1, W2)


def make_verifier(receiver: Identity | None = COORD, sealed_types=frozenset({"update"})) -> EnvelopeVerifier:
    opener = Opener.of(receiver) if receiver is not None else None
    return EnvelopeVerifier(FED, JOB, max_age_ms=120_000, max_future_ms=30_000, max_body_bytes=1 << 20,
                            opener=opener, sealed_types=sealed_types)


def sealed_update(to: Identity = COORD, sender: Identity = W1, body: bytes | None = None) -> bytes:
    plain = encode_body(FIELDS, STATE) if body is None else body
    ciphertext = seal_body(plain, to.encryption_public_key, sender_secret=sender.encryption_key)
    wire, _ = seal(sender, "update", job=JOB, round=1, body=ciphertext, ts_ms=NOW, sealed_to=to.id)
    return wire


def receive(verifier: EnvelopeVerifier, wire: bytes):
    opened = verifier.open(wire, now=NOW)
    return verifier.accept_body(opened, opened.inline_body, now=NOW)


# ---- the box ----------------------------------------------------------------------------

def test_a_sealed_body_is_a_chunked_stream_without_the_plaintext():
    plain = encode_body(FIELDS, STATE)
    box = seal_body(plain, COORD.encryption_public_key, sender_secret=W1.encryption_key)
    assert len(box) == sealed_length(len(plain)) == len(plain) + SEAL_OVERHEAD
    assert PATTERN * 4 in plain and PATTERN * 4 not in box
    assert open_body(box, COORD.encryption_key) == plain
    random_box = seal_body(plain, COORD.encryption_public_key)  # no sender key: a random ephemeral key
    assert random_box != seal_body(plain, COORD.encryption_public_key)
    assert open_body(random_box, COORD.encryption_key) == plain


def test_a_multi_chunk_body_opens_only_whole_and_in_order(monkeypatch):
    monkeypatch.setattr(sealing, "SEAL_CHUNK", 64)
    step = 64 + SEAL_TAG
    plain = bytes(range(256)) * 2  # 8 chunks of 64
    # Pieces that chunks straddle (gathered) and lie within (encrypted from the view), one empty.
    length, pieces = seal_pieces([plain[:100], b"", memoryview(plain)[100:]], COORD.encryption_public_key,
                                 sender_secret=W1.encryption_key)
    box = b"".join(pieces)
    assert len(box) == length == SEAL_HEADER + 8 * step
    assert open_body(box, COORD.encryption_key) == plain
    head, chunks = box[:SEAL_HEADER], [box[SEAL_HEADER + i * step:SEAL_HEADER + (i + 1) * step] for i in range(8)]
    damaged = [head + b"".join(chunks[:-1]),                            # cut at a chunk boundary
               head + chunks[0],                                          # only the first chunk
               head + b"".join([chunks[1], chunks[0], *chunks[2:]]),      # two chunks swapped
               head + b"".join([chunks[0], chunks[0], *chunks[2:]]),      # a chunk repeated
               head + b"".join(chunks) + chunks[-1],                      # a chunk appended
               box + bytes(5)]                                            # no length a body seals to
    for bad in damaged:
        with pytest.raises(SealError):
            open_body(bad, COORD.encryption_key)
    # Opened over itself (a fetched blob): the same plaintext, as a view of the buffer's start.
    buf = bytearray(box)
    opened = open_body(buf, COORD.encryption_key, in_place=True)
    assert bytes(opened) == plain and opened.obj is buf
    empty = seal_body(b"", COORD.encryption_public_key)
    assert len(empty) == SEAL_OVERHEAD and open_body(empty, COORD.encryption_key) == b""


def test_full_size_chunks_from_unaligned_pieces_seal_lazily_and_open_in_place():
    plain = bytes(range(251)) * 10_000  # 2.4 full chunks, gathered across piece boundaries
    pieces = [plain[:5], memoryview(plain)[5:1_500_000], bytearray(plain[1_500_000:])]
    length, stream = seal_pieces(pieces, COORD.encryption_public_key, sender_secret=W1.encryption_key)
    produced = list(stream)
    assert [len(p) for p in produced] == [SEAL_HEADER, 2 ** 20 + SEAL_TAG, 2 ** 20 + SEAL_TAG,
                                          len(plain) - 2 ** 21 + SEAL_TAG]
    box = seal_body(plain, COORD.encryption_public_key, sender_secret=W1.encryption_key)
    assert b"".join(produced) == box and len(box) == length
    assert bytes(open_body(bytearray(box), COORD.encryption_key, in_place=True)) == plain
    assert open_body(box, COORD.encryption_key) == plain


def _restream(box: bytes, chunks: list[bytes], last_flags: list[int], *, ad: bytes | None = None) -> bytes:
    """``chunks`` re-encrypted under ``box``'s header and key (sealed to COORD), with the
    given last-chunk flags: what only the recipient or the sender could forge."""
    header = box[:SEAL_HEADER]
    eph = header[len(SEAL_MAGIC):]
    key = sealing._body_key(crypto_scalarmult(bytes(COORD.encryption_key), eph), eph,
                            bytes(COORD.encryption_public_key))
    aead = AESGCM(key)
    return header + b"".join(aead.encrypt(i.to_bytes(11, "big") + bytes([flag]), chunk, header if ad is None else ad)
                             for i, (chunk, flag) in enumerate(zip(chunks, last_flags, strict=True)))


def test_only_the_last_chunk_may_carry_the_last_flag_and_it_must(monkeypatch):
    monkeypatch.setattr(sealing, "SEAL_CHUNK", 64)
    plain = bytes(range(256)) * 2
    box = seal_body(plain, COORD.encryption_public_key, sender_secret=W1.encryption_key)
    parts = [plain[i * 64:(i + 1) * 64] for i in range(8)]
    # The construction as specified: counter || flag nonces, the header as associated data.
    assert _restream(box, parts, [0] * 7 + [1]) == box
    # Re-flagged, a shorter body is a body (so what fails below is the flag, not the length).
    assert open_body(_restream(box, parts[:7], [0] * 6 + [1]), COORD.encryption_key) == plain[:448]
    forged = {"cut at a chunk boundary": _restream(box, parts[:7], [0] * 7),
              "no last chunk": _restream(box, parts, [0] * 8),
              "last flag moved": _restream(box, parts, [0, 0, 0, 1, 0, 0, 0, 0]),
              "last flag twice": _restream(box, parts, [0, 0, 0, 1, 0, 0, 0, 1]),
              "another header bound": _restream(box, parts, [0] * 7 + [1], ad=b"FBS3" + bytes(32)),
              # authentic chunks, but an empty last chunk after full ones is no sealed length
              "empty last chunk": _restream(box, [*parts, b""], [0] * 8 + [1])}
    for what, bad in forged.items():
        with pytest.raises(SealError):
            open_body(bad, COORD.encryption_key)
            pytest.fail(f"{what} opened")


def test_a_chunk_from_another_body_does_not_open_under_this_header(monkeypatch):
    monkeypatch.setattr(sealing, "SEAL_CHUNK", 64)
    step = 64 + SEAL_TAG
    plain = bytes(range(256)) * 2
    other = bytes(reversed(plain))  # same length, so every chunk lines up
    box, foreign = (seal_body(p, COORD.encryption_public_key, sender_secret=W1.encryption_key) for p in (plain, other))
    spliced = box[:SEAL_HEADER + 2 * step] + foreign[SEAL_HEADER + 2 * step:SEAL_HEADER + 3 * step] \
        + box[SEAL_HEADER + 3 * step:]
    assert len(spliced) == len(box) and spliced != box
    for bad in (spliced, box[:SEAL_HEADER] + foreign[SEAL_HEADER:]):
        with pytest.raises(SealError):
            open_body(bad, COORD.encryption_key)
    assert open_body(foreign, COORD.encryption_key) == other


def test_the_same_update_seals_to_the_same_bytes_and_nothing_else_does():
    plain = encode_body(FIELDS, STATE)
    box = seal_body(plain, COORD.encryption_public_key, sender_secret=W1.encryption_key)
    # A resend is recognised by its digest: same sender, plaintext and recipient, same bytes.
    assert box == seal_body(plain, COORD.encryption_public_key, sender_secret=W1.encryption_key)
    other = plain[:-1] + bytes([plain[-1] ^ 1])
    others = [seal_body(other, COORD.encryption_public_key, sender_secret=W1.encryption_key),
              seal_body(plain, AGG.encryption_public_key, sender_secret=W1.encryption_key),
              seal_body(plain, COORD.encryption_public_key, sender_secret=W2.encryption_key)]
    # A fresh ephemeral key (the first 32 bytes) for any other plaintext, recipient or sender.
    assert len({b[4:36] for b in [box, *others]}) == 4


@pytest.mark.parametrize("damage", ["wrong_key", "flipped", "truncated", "short"])
def test_a_box_that_does_not_open_raises_seal_error(damage):
    box = bytearray(seal_body(b"x" * 100, COORD.encryption_public_key, sender_secret=W1.encryption_key))
    key = COORD.encryption_key
    if damage == "wrong_key":
        key = AGG.encryption_key
    elif damage == "flipped":
        box[60] ^= 0x01
    elif damage == "truncated":
        box = box[:-1]
    else:
        box = box[:SEAL_OVERHEAD - 1]
    with pytest.raises(SealError):
        open_body(bytes(box), key)


# ---- the verifier -----------------------------------------------------------------------

def test_a_sealed_update_verifies_opens_and_decodes():
    wire = sealed_update()
    assert PATTERN * 4 not in wire
    fields, tensors = receive(make_verifier(), wire)
    assert fields == FIELDS and torch.equal(tensors["w"], STATE["w"])


def test_a_flipped_ciphertext_byte_fails_the_signed_digest_before_opening():
    wire = bytearray(sealed_update())
    wire[-10] ^= 0x01
    with pytest.raises(Rejection) as err:
        receive(make_verifier(), bytes(wire))
    assert err.value.reason == "digest_mismatch"


def test_a_resealed_body_under_the_genuine_header_fails_the_digest():
    # Anyone can seal bytes to the coordinator; they do not match what w1 signed.
    genuine = sealed_update()
    forged_body = seal_body(encode_body(FIELDS, {"w": torch.zeros(1024)}), COORD.encryption_public_key)
    head = genuine[: len(genuine) - (len(encode_body(FIELDS, STATE)) + SEAL_OVERHEAD)]
    with pytest.raises(Rejection) as err:
        receive(make_verifier(), head + forged_body)
    assert err.value.reason == "digest_mismatch"


def test_a_box_resigned_by_someone_else_fails_the_signature():
    impostor = Identity("w1", "worker", "eu", Identity.generate("x", "worker").signing_key)
    with pytest.raises(Rejection) as err:
        receive(make_verifier(), sealed_update(sender=impostor))
    assert err.value.reason == "bad_signature"


def test_a_signed_body_that_is_no_box_is_unsealable_and_does_not_burn_the_nonce():
    verifier = make_verifier()
    junk, _ = seal(W1, "update", job=JOB, round=1, body=b"\x00" * 200, ts_ms=NOW, sealed_to="coord")
    with pytest.raises(Rejection) as err:
        receive(verifier, junk)
    assert err.value.reason == "unsealable_body"
    assert len(verifier.replay_guard) == 0


def test_a_body_sealed_to_someone_else_is_refused_on_the_header():
    verifier = make_verifier()
    with pytest.raises(Rejection) as err:
        verifier.open(sealed_update(to=AGG), now=NOW)  # before any body (or blob) is read
    assert err.value.reason == "unsealable_body" and "agg-eu" in err.value.detail
    with pytest.raises(Rejection) as err:
        make_verifier(receiver=None, sealed_types=frozenset()).open(sealed_update(), now=NOW)
    assert err.value.reason == "unsealable_body"


def test_only_sealable_types_may_be_sealed_and_required_ones_must_be():
    body = encode_body(RoundOpen(round=1, model_version=0, cohort=["w1"], deadline_ms=NOW + 1000), STATE)
    box = seal_body(body, COORD.encryption_public_key)
    wire, _ = seal(COORD, "round.open", job=JOB, round=1, body=box, ts_ms=NOW, sealed_to="coord")
    with pytest.raises(Rejection) as err:
        make_verifier().open(wire, now=NOW)
    assert err.value.reason == "unsealable_body"
    plain, _ = seal(W1, "update", job=JOB, round=1, body=encode_body(FIELDS, STATE), ts_ms=NOW)
    with pytest.raises(Rejection) as err:
        make_verifier().open(plain, now=NOW)
    assert err.value.reason == "unsealed_body"
    fields, _ = receive(make_verifier(sealed_types=frozenset()), plain)  # not required: accepted
    assert fields == FIELDS


# ---- who seals to whom ------------------------------------------------------------------

def test_workers_seal_to_the_coordinator_or_their_regions_aggregator():
    flat = update_seal_target("auto", FED, "w1", regional=False)
    assert flat == SealTarget("coord", COORD.encryption_public_key)
    assert update_seal_target("auto", FED, "w1", regional=True) == SealTarget("agg-eu", AGG.encryption_public_key)
    assert update_seal_target(False, FED, "w1", regional=False) is None
    assert update_seal_target("auto", FED, "w2", regional=True) is None  # region us has no aggregator


def test_auto_falls_back_to_plain_and_true_refuses_without_a_key():
    old = federation(COORD, AGG, W1, W2, drop_keys={"coord"})
    assert update_seal_target("auto", old, "w1", regional=False) is None
    assert unsealed_recipients("auto", old, regional=False) == ["coord"]
    with pytest.raises(SealingUnavailable, match="coord"):
        unsealed_recipients(True, old, regional=False)
    # Regional: w2's region (us) has no aggregator, so nobody could open its updates.
    with pytest.raises(SealingUnavailable, match="w2"):
        update_seal_target(True, FED, "w2", regional=True)
    assert unsealed_recipients("auto", FED, regional=True) == ["aggregator of us"]
    assert unsealed_recipients(False, old, regional=False) == []


def test_recipients_refuse_plain_updates_only_when_sealing_is_mandatory():
    for mode, required in (("auto", frozenset()), (True, frozenset({"update"})), (False, frozenset())):
        job = JobSpec(job=JOB, task="fedbus.tasks.digits:task", rounds=1, security={"seal_updates": mode})
        verifier = verifier_for(job, FED, receiver=COORD)
        assert verifier.sealed_types == required and verifier.opener.opens_for("coord")
        assert not verifier.opener.opens_for("agg-eu")
    assert verifier_for(job, FED).opener is None  # a worker opens nothing


def test_job_spec_seal_updates_defaults_to_auto():
    base = {"job": "j", "task": "fedbus.tasks.digits:task", "rounds": 1}
    assert JobSpec.model_validate(base).security.seal_updates == "auto"
    for value in (True, False, "auto"):
        spec = JobSpec.model_validate(yaml.safe_load(yaml.safe_dump({**base, "security": {"seal_updates": value}})))
        assert spec.security.seal_updates == value
    with pytest.raises(ValidationError):
        JobSpec.model_validate({**base, "security": {"seal_updates": "sometimes"}})


# ---- keys and the federation file -------------------------------------------------------

def test_key_files_keep_both_keys_and_old_ones_still_load(tmp_path):
    path = tmp_path / "w1.key"
    W1.save(path)
    loaded = Identity.load(path)
    assert bytes(loaded.encryption_key) == bytes(W1.encryption_key)
    assert bytes(loaded.signing_key) == bytes(W1.signing_key)
    # The two key pairs are independent: neither public key is the other's.
    assert bytes(loaded.public_key) != bytes(loaded.encryption_public_key)
    data = yaml.safe_load(path.read_text())
    del data["encryption_private_key"], data["encryption_key"]
    path.write_text(yaml.safe_dump(data))
    old = Identity.load(path)
    assert old.encryption_key is None and "encryption_key" not in old.participant_entry()


def test_the_federation_lists_encryption_keys_once_and_matching_the_key_file():
    entries = [p.participant_entry() for p in (COORD, W1)]
    twin = dict(W2.participant_entry(), encryption_key=entries[1]["encryption_key"])
    with pytest.raises(ValidationError, match="share an encryption key.*w1, w2"):
        FederationFile.model_validate({"participants": [*entries, twin]})
    with pytest.raises(ValidationError, match="encryption_key must be 32 bytes"):
        FederationFile.model_validate({"participants": [dict(entries[0], encryption_key="AAAA")]})
    other = Identity("coord", "coordinator", "default", COORD.signing_key, PrivateKey.generate())
    with pytest.raises(ValueError, match="another encryption key"):
        FED.listed_as(other, "coordinator")
    assert FED.listed_as(COORD, "coordinator").id == "coord"


# ---- over a real nats-server: a sealed body in the Object Store --------------------------

async def _sealed_blob_roundtrip(url: str) -> tuple[bool, object]:
    subjects = Subjects(JOB)
    nc = await connect(url, name="seal-test", first_connect_timeout=10)
    try:
        js = nc.jetstream()
        await ensure_job_infrastructure(js, subjects)
        messenger = Messenger(nc, js, W1, subjects, inline_max_bytes=1024)
        big = {"w": torch.full((64 * 1024,), 1.2345678, dtype=torch.float32)}
        target = update_seal_target("auto", FED, "w1", regional=False)
        header = await messenger.publish(subjects.upd("eu", "w1"), FIELDS, big, round=1, seal_to=target)
        assert header.blob is not None and header.sealed_to == "coord"
        stored = await messenger.blobs.get(header.blob.name)
        job = JobSpec(job=JOB, task="fedbus.tasks.digits:task", rounds=1)
        msg = await (await js.subscribe(subjects.upd_all, ordered_consumer=True)).next_msg(timeout=10)
        got = await Messenger(nc, js, COORD, subjects, inline_max_bytes=1024).receive(
            verifier_for(job, FED, receiver=COORD), msg.data, sender_token="w1", offload=True)
        return PATTERN * 16 in stored, got
    finally:
        await nc.close()


def test_a_large_sealed_update_is_stored_sealed_and_opens_at_its_recipient(nats_server):
    plaintext_in_store, got = asyncio.run(_sealed_blob_roundtrip(nats_server.url))
    assert not plaintext_in_store
    assert got.sealed and torch.equal(got.tensors["w"], torch.full((64 * 1024,), 1.2345678))


def test_keys_gen_writes_both_pairs_and_the_federation_lists_both_public_keys(tmp_path, capsys):
    from fedbus.cli import main

    assert main(["keys", "gen", "--id", "coordinator", "--role", "coordinator", "--out", str(tmp_path / "k")]) == 0
    assert main(["keys", "gen", "--id", "w1", "--role", "worker", "--out", str(tmp_path / "k")]) == 0
    printed = capsys.readouterr().out
    assert main(["keys", "federation", "--keys", str(tmp_path / "k"), "--out", str(tmp_path / "fed.yaml")]) == 0
    fed = Federation.load(tmp_path / "fed.yaml")
    for pid in ("coordinator", "w1"):
        ident = Identity.load(tmp_path / "k" / f"{pid}.key")
        assert bytes(fed.encryption_key(pid)) == bytes(ident.encryption_public_key)
        assert fed.listed_as(ident, ident.role).id == pid
        secrets = (b64(bytes(ident.signing_key)), b64(bytes(ident.encryption_key)))
        assert not any(s in printed or s in (tmp_path / "fed.yaml").read_text() for s in secrets)
    # New federations seal by default: the coordinator is every flat worker's recipient.
    assert update_seal_target("auto", fed, "w1", regional=False).recipient == "coordinator"
