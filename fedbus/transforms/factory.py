"""Build a worker's pipeline once from the job spec (and the test-only attack)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedbus.aggregation.base import ClientUpdate
from fedbus.compression.codecs import codec_for
from fedbus.crypto.envelopes import Rejection
from fedbus.jobspec import JobSpec
from fedbus.protocol.codec import Tensor
from fedbus.protocol.envelope import EnvelopeHeader
from fedbus.protocol.messages import Update
from fedbus.transforms.attack import AttackTransform
from fedbus.transforms.base import LocalUpdate, Pipeline, Transform
from fedbus.transforms.clip import ClipUpdateNorm
from fedbus.transforms.compress import Compress
from fedbus.transforms.dp_noise import GaussianNoiseShare
from fedbus.transforms.encode import Encode
from fedbus.transforms.strategy import strategy_client_step
from fedbus.worker.attacks import Attack


def build_worker_pipeline(job: JobSpec, *, attack: Attack | None = None,
                          client_clip_norm: float | None = None) -> Pipeline:
    """train -> strategy client step -> clip -> DP noise share -> attack (testing only) -> compress -> encode.

    ``client_clip_norm``: clip each update's delta on the worker. ``privacy.dp`` with
    ``mode: distributed`` clips to its C and adds the worker's noise share;
    ``privacy.secure_aggregation`` alone clips to its ``clip`` (fedbus.secagg.rounds).
    """
    stages: list[Transform] = []
    if (step := strategy_client_step(job)) is not None:
        stages.append(step)
    dp = job.privacy.dp
    if dp is not None and dp.mode == "distributed":
        if client_clip_norm is not None:
            raise ValueError("privacy.dp in distributed mode clips to its own C; no second client clip")
        # Validation allows only a fixed clip in distributed mode.
        stages += [ClipUpdateNorm(dp.clip.fixed),
                   GaussianNoiseShare(dp.noise_multiplier, dp.clip.fixed, job.cohort.least_quorum)]
    elif client_clip_norm is not None:
        stages.append(ClipUpdateNorm(client_clip_norm))
    elif job.secagg_clip is not None:
        # Secure aggregation quantizes within the clip; the service masks the delta after encode.
        stages.append(ClipUpdateNorm(job.secagg_clip))
    if attack is not None and not attack.poisons_data:
        stages.append(AttackTransform(attack))
    if (codec := codec_for(job.compression)) is not None:
        stages.append(Compress(codec, error_feedback=getattr(job.compression, "error_feedback", False)))
    stages.append(Encode())
    return Pipeline(stages)


def decode_update(pipeline: Pipeline, sender: str, fields: Update, tensors: dict[str, Tensor] | None,
                  base: Mapping[str, torch.Tensor] | None = None) -> ClientUpdate:
    """The receiving side: wire form -> every stage's decode (reverse order) -> a contribution.

    ``pipeline`` is the one built from the same job spec (no attack: the receiver never
    undoes an attack). ``base``: the model of the update's ``base_version`` (None if the
    receiver has none), which a compressed delta is added to. Raises ``Rejection`` for a
    compressed part that fails its checks.
    """
    update: LocalUpdate = pipeline.decode(Encode.parse(fields, tensors).with_(base_state=base))
    return ClientUpdate(sender, update.num_samples, update.state, update.num_steps,
                        extra={**update.extra_scalars, **update.extra_groups})


def decode_received(pipeline: Pipeline, header: EnvelopeHeader, fields: Update, tensors: dict[str, Tensor] | None,
                    base: Mapping[str, torch.Tensor] | None) -> ClientUpdate:
    """``decode_update`` of a verified update message; a Rejection carries its header."""
    try:
        return decode_update(pipeline, header.sender, fields, tensors, base)
    except Rejection as rej:
        raise Rejection(rej.reason, rej.detail, header) from None
