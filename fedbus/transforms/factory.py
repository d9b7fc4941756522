"""Build a worker's pipeline once from the job spec (and the test-only attack)."""

from __future__ import annotations

from fedbus.aggregation.base import ClientUpdate
from fedbus.jobspec import JobSpec
from fedbus.protocol.codec import Tensor
from fedbus.protocol.messages import Update
from fedbus.transforms.attack import AttackTransform
from fedbus.transforms.base import LocalUpdate, Pipeline, Transform
from fedbus.transforms.clip import ClipUpdateNorm
from fedbus.transforms.dp_noise import GaussianNoiseShare
from fedbus.transforms.encode import Encode
from fedbus.transforms.strategy import strategy_client_step
from fedbus.worker.attacks import Attack


def build_worker_pipeline(job: JobSpec, *, attack: Attack | None = None,
                          client_clip_norm: float | None = None) -> Pipeline:
    """train -> strategy client step -> clip -> DP noise share -> attack (testing only) -> encode.

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
    stages.append(Encode())
    return Pipeline(stages)


def decode_update(pipeline: Pipeline, sender: str, fields: Update, tensors: dict[str, Tensor] | None) -> ClientUpdate:
    """The receiving side: wire form -> every stage's decode (reverse order) -> a contribution.

    ``pipeline`` is the one built from the same job spec (no attack: the receiver never
    undoes an attack); today every decode but the wire parse is the identity.
    """
    update: LocalUpdate = pipeline.decode(Encode.parse(fields, tensors))
    return ClientUpdate(sender, update.num_samples, update.state, update.num_steps,
                        extra={**update.extra_scalars, **update.extra_groups})
