"""Secure aggregation inside training rounds (``privacy.secure_aggregation``): the pure pieces.

How a round runs (topology: flat; the coordinator is the SecAgg+ server):
1. The coordinator opens the round as always (``round.open``), then announces
   ``secagg.setup`` for the round's cohort; the key phases (advertise, share keys) run
   while the workers train.
2. A worker's pipeline clips its delta to C (``secure_aggregation.clip``, or privacy.dp's C
   in distributed mode, after which it adds its noise share); instead of publishing the
   update, the worker flattens the delta (float tensors, sorted by name), and the round's
   ``SecAggParticipant`` quantizes and masks it as its ``secagg.input``.
3. After the masked inputs (until the round's deadline) and the unmasking, the
   coordinator holds Σ Δ_i over the survivors, dequantized, and folds it as the round's
   FedAvg: a ``PartialAggregate`` of the rule in which every survivor weighs 1.

Weights: every worker weighs 1 (DP-FedAvg's weighting). Masking the weight alongside
w·Δ would let a worker's sample count scale its input past the quantizer's bound, and a
sample count is something the coordinator could not check; a fixed weight makes the claim
moot (``num_samples`` never leaves the worker).

The bound: |Δ_i|_2 <= C, so every coordinate is within C; with distributed DP a worker
adds N(0, σ_s²) per coordinate after clipping, so the quantizer's bound is
C + NOISE_TAILS·σ_s (a coordinate beyond it, probability < 1e-15 each, is clamped).
With n = |cohort| and scale s, ``fedbus.secagg.quantize`` picks bits so that the sum of n
inputs cannot wrap, and the dequantized sum is within n/(2s) of the float sum per
coordinate; the mean is then within 1/(2s).

Integer buffers (e.g. BatchNorm's counters) are not securely summed: they stay as the
base model has them.
"""

from __future__ import annotations

import numpy as np
import torch

from fedbus.aggregation.base import AggregationRule, State, is_averageable
from fedbus.aggregation.partial import Contributor, PartialAggregate
from fedbus.jobspec import JobSpec
from fedbus.privacy.noise import share_std
from fedbus.secagg.spec import RoundParams

NOISE_TAILS = 8.0  # standard deviations of the noise share the quantizer's range leaves room for


def float_names(state: State) -> list[str]:
    """The tensors a secure sum carries, in the order every party flattens them."""
    return sorted(k for k, v in state.items() if isinstance(v, torch.Tensor) and is_averageable(v)
                  and not v.is_complex())


def vector_length(state: State) -> int:
    return sum(state[k].numel() for k in float_names(state))


def flat_delta(new: State, base: State) -> np.ndarray:
    """Δ = new − base over the float tensors, flattened (float64) in ``float_names`` order."""
    parts = [(new[k].to(torch.float64) - base[k].to(torch.float64)).reshape(-1) for k in float_names(base)]
    return torch.cat(parts).numpy() if parts else np.zeros(0)


def unflatten(vector: np.ndarray, base: State) -> State:
    """``flat_delta``'s inverse: the vector back into the float tensors of ``base``."""
    if len(vector) != vector_length(base):
        raise ValueError(f"a secure sum of {len(vector)} values for a model of {vector_length(base)}")
    out, at = {}, 0
    for k in float_names(base):
        n = base[k].numel()
        out[k] = torch.from_numpy(np.ascontiguousarray(vector[at:at + n])).reshape(base[k].shape)
        at += n
    return out


def unmask_grace_ms(job: JobSpec) -> int:
    """How long after the masked-input deadline the round machine waits for the unmasked sum:
    the unmasking's phase timeout and as much again for reconstruction and the fold."""
    sa = job.privacy.secure_aggregation
    return 0 if sa is None else int(2 * sa.phase_timeout_s * 1000)


def coordinate_bound(job: JobSpec) -> float:
    """The quantizer's per-coordinate range B (see the module docstring)."""
    clip = job.secagg_clip
    if clip is None:
        raise ValueError("the job has no privacy.secure_aggregation")
    dp = job.privacy.dp
    if dp is not None and dp.mode == "distributed":
        return clip + NOISE_TAILS * share_std(dp.noise_multiplier, clip, job.cohort.least_quorum)
    return clip


def training_round_params(job: JobSpec, *, round: int, cohort: list[str], seed: bytes, base: State) -> RoundParams:
    sa = job.privacy.secure_aggregation
    assert sa is not None
    return sa.round_params(job=job.job, round=round, roster=list(cohort), seed=seed, length=vector_length(base),
                           bound=coordinate_bound(job))


def secure_sum_partial(rule: AggregationRule, base: State, base_version: int, delta_sum: np.ndarray,
                       survivors: list[str]) -> PartialAggregate:
    """The unmasked Σ Δ_i as the rule's partial aggregate, every survivor weighing 1."""
    template = rule.begin(base, base_version).partial()
    sums = unflatten(delta_sum, base)
    if set(sums) != set(template.sums):
        raise ValueError(f"secure sum of tensors {sorted(sums)}, the rule sums {sorted(template.sums)}")
    return PartialAggregate(rule=template.rule, base_version=base_version,
                            sums={k: sums[k].to(template.sums[k].dtype) for k in template.sums},
                            carry=template.carry, total_weight=float(len(survivors)), count=len(survivors),
                            contributors=[Contributor(w, 1.0, base_version) for w in survivors],
                            scalars=template.scalars, groups=template.groups)
