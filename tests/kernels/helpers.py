"""Shared test inputs and tolerances for the kernel tests."""

import torch

FP32_TOL = dict(atol=1e-4, rtol=1e-4)


def random_routing(T: int, K: int, E: int, *, empty=(), seed: int = 0, device="cpu") -> torch.Tensor:
    """Distinct experts per token drawn at random, never choosing the experts in ``empty``."""
    g = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([e for e in range(E) if e not in empty])
    scores = torch.rand(T, allowed.numel(), generator=g)
    return allowed[scores.topk(K, dim=1).indices].to(device)


def assert_close(actual, expected, dtype):
    """fp32: elementwise, reassociation only. bf16: against the fp32 reference of the same bf16
    inputs, by error relative to the tensor's scale: bf16 keeps 8 significant bits, so a value
    that comes from cancelling sums (a gate gradient, say) can be far off elementwise while the
    tensor as a whole is right to about 2^-8."""
    actual, expected = actual.float(), expected.float()
    if dtype == torch.float32:
        torch.testing.assert_close(actual, expected, **FP32_TOL)
        return
    assert actual.shape == expected.shape
    if expected.numel() == 0 or not expected.any():
        torch.testing.assert_close(actual, expected, atol=1e-6, rtol=0)
        return
    scale = expected.abs().max().clamp_min(1e-6)
    rel_norm = (actual - expected).norm() / expected.norm().clamp_min(1e-6)
    max_err = (actual - expected).abs().max() / scale
    assert rel_norm < 2e-2 and max_err < 5e-2, f"bf16 mismatch: relative norm {rel_norm:.3g}, max {max_err:.3g}"
