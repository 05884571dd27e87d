"""natkit quickstart: 2-D neighborhood attention forward + backward on every available backend,
checked against the reference, then a NeighborhoodAttention2D module."""

import time

import torch

import natkit

torch.manual_seed(0)
device = "cuda" if torch.cuda.is_available() else "cpu"
q, k, v = (torch.randn(2, 28, 28, 4, 32, device=device, requires_grad=True) for _ in range(3))
rpb = torch.randn(4, 13, 13, device=device) * 0.1

reference = natkit.na2d(q, k, v, kernel_size=7, dilation=2, rpb=rpb, backend="reference")
for backend in natkit.available_backends()[:-1]:
    try:
        start = time.perf_counter()
        out = natkit.na2d(q, k, v, kernel_size=7, dilation=2, rpb=rpb, backend=backend)
        out.sum().backward()
        ms = (time.perf_counter() - start) * 1e3
    except ValueError as err:  # this backend cannot run these inputs here
        print(f"{backend:>8}: skipped ({err})")
        continue
    error = (out - reference).abs().max().item()
    print(f"{backend:>8}: out {tuple(out.shape)}, max |out - reference| = {error:.2e}, "
          f"fwd+bwd {ms:.1f} ms (first call)")

attn = natkit.NeighborhoodAttention2D(dim=64, num_heads=2, kernel_size=7, rel_pos_bias=True)
x = torch.randn(1, 5, 9, 64)  # smaller than the kernel: padded, masked and cropped
print("NeighborhoodAttention2D:", tuple(attn(x).shape), "| backends:", natkit.available_backends())
