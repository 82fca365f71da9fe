"""LoRA deltas and DoRA, in fp32. Pure tensor math; mirrors peft.tuners.lora.layer and lora.dora."""

from __future__ import annotations

import torch


def lora_delta(
    lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, fan_in_fan_out: bool = False
) -> torch.Tensor:
    """scaling * B @ A in fp32: A [r, in], B [out, r] -> [out, in] (transposed with fan_in_fan_out)."""
    delta = (lora_B.float() @ lora_A.float()) * scaling
    return delta.T if fan_in_fan_out else delta


def add_lora_(
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    fan_in_fan_out: bool = False,
) -> torch.Tensor:
    """weight += scaling * B @ A, in place on an fp32 weight (one fused addmm); returns weight.

    Warning: mutates `weight`. Equal to weight + lora_delta(...) up to float summation order.
    """
    if fan_in_fan_out:
        return weight.addmm_(lora_A.float().T, lora_B.float().T, alpha=scaling)
    return weight.addmm_(lora_B.float(), lora_A.float(), alpha=scaling)


def embedding_delta(
    lora_embedding_A: torch.Tensor, lora_embedding_B: torch.Tensor, scaling: float
) -> torch.Tensor:
    """scaling * (B @ A).T in fp32: A [r, num_embeddings], B [dim, r] -> [num_embeddings, dim]."""
    return (lora_embedding_B.float() @ lora_embedding_A.float()).T * scaling


def dora_merge(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """DoRA merge in fp32: magnitude / ||W + delta||_row * (W + delta), as peft's Linear.merge with use_dora.

    weight, delta: [out, in] (already in torch Linear layout); magnitude: [out].
    """
    merged = weight.float() + delta.float()
    norm = torch.linalg.norm(merged, dim=1)
    return (magnitude.float() / norm).view(-1, 1) * merged


def parameter_delta(
    lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, experts: int, swapped: bool
) -> torch.Tensor:
    """PEFT's ParamWrapper delta (LoRA on a parameter, target_parameters) in fp32.

    2-D parameter (experts == 1): scaling * B @ A, [out, in]. 3-D (experts E): A [E * r, in] holds each
    expert's A as rows e*r..e*r+r; B [out, r * E] each expert's B as columns e, e+E, ...; the delta is
    [E, in, out], or [E, out, in] where PEFT swapped in and out (`swapped`), as get_delta_weight's einsum.
    """
    if experts == 1:
        return lora_delta(lora_A, lora_B, scaling)
    A = lora_A.float().reshape(experts, -1, lora_A.shape[-1])  # e r i
    B = lora_B.float().reshape(lora_B.shape[0], -1, experts)  # o r e
    return torch.einsum("o r e, e r i -> e o i" if swapped else "o r e, e r i -> e i o", B, A) * scaling
