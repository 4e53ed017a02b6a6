import torch


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm with an optional fused residual add.

    Returns (normed, new_residual) where new_residual = x + residual (or x when there is no
    residual): the value the next residual connection starts from. The statistics are taken in
    fp32 and the result cast back before the weight multiply, as transformers does.
    """
    if residual is not None:
        x = residual + x
    x32 = x.float()
    variance = x32.pow(2).mean(-1, keepdim=True)
    normed = (x32 * torch.rsqrt(variance + eps)).to(x.dtype)
    return weight * normed, x
