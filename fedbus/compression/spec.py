"""The job spec's ``compression`` section (pydantic; ``schemas/`` is generated from it).

    compression: {method: none}                      # the default: full float weights
    compression: {method: fp16}                      # or bf16: the delta in 16-bit floats
    compression: {method: int8, chunk_size: 1024}    # unbiased stochastic int8, one scale per chunk
    compression: {method: topk, fraction: 0.01, error_feedback: true}

Every method but ``none`` sends the delta y - x, not the weights: a 16-bit, 8-bit or sparse
form of the weights themselves would lose what training changed. What combinations mean
is checked with the rest of the job (``JobSpec._check_compression``).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

_CONFIG = ConfigDict(extra="forbid", allow_inf_nan=False)
MAX_CHUNK = 1 << 24


class NoCompression(BaseModel):
    """Float tensors travel as the trained weights, in the model's dtype."""
    model_config = _CONFIG
    method: Literal["none"] = "none"


class CastCompression(BaseModel):
    """The delta rounded to a 16-bit float: fp16 (more mantissa) or bf16 (float32's range)."""
    model_config = _CONFIG
    method: Literal["fp16", "bf16"]


class Int8Compression(BaseModel):
    """Unbiased stochastic int8 of the delta, one float32 scale per chunk (``fedbus.compression.codecs``)."""
    model_config = _CONFIG
    method: Literal["int8"]
    chunk_size: int = Field(1024, ge=16, le=MAX_CHUNK,
                            description="elements sharing one scale max|x|/127; smaller chunks quantize finer and "
                                        "cost 4 bytes each")
    entropy_coding: bool = Field(True, description="deflate the int8 codes (most are near 0, so they carry far "
                                                   "fewer than 8 bits); the receiver inflates into a buffer of the "
                                                   "model's size and no more")


class TopKCompression(BaseModel):
    """The k = ceil(fraction * n) largest-magnitude entries of each tensor's delta (plus, with
    error feedback, what earlier rounds left out)."""
    model_config = _CONFIG
    method: Literal["topk"]
    fraction: float = Field(0.01, gt=0, le=1, description="share of each float tensor's entries sent")
    error_feedback: bool = Field(True, description="keep what was not sent on the worker and add it to the next "
                                                   "round's delta (persisted with the worker's strategy state)")


CompressionSpec = Annotated[NoCompression | CastCompression | Int8Compression | TopKCompression,
                            Field(discriminator="method")]
