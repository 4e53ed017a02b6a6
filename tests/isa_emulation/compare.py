"""Checks an emulated run of isa_check (AVX-512, AVX512-BF16, AMX) against a native one (AVX2)
and against torch. Exits 1 if anything fails.

- Every kernel with an AVX2 build must give the same bits in its AVX-512 build: both come from
  one source (`kernels/csrc/simd.h`) with the same operations in the same order.
- The AVX-512-only kernels are checked against torch on the inputs the run printed, with the
  tolerances of the project's own tests (tests/test_linear_bf16.py, test_attention_cpu.py,
  test_packed_attention.py) or tighter.

Usage: python compare.py NATIVE_AVX2.txt EMULATED.txt
"""

from __future__ import annotations

import re
import sys

import numpy as np
import torch
import torch.nn.functional as F

RECORD = re.compile(r"R (\S+) (\d+) ([0-9a-f]+)")


def text_of(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read()


def records(path: str) -> dict[str, bytes]:
    """The run's records; a line that a console message cut into is left out (and then
    reported missing)."""
    found = {}
    for line in text_of(path).splitlines():
        m = RECORD.search(line)
        if m and len(m.group(3)) == 2 * int(m.group(2)):
            found[m.group(1)] = bytes.fromhex(m.group(3))
    return found


def floats(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.float32)


def bf16(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.bfloat16).float()


class Check:
    def __init__(self) -> None:
        self.failed: list[str] = []

    def __call__(self, name: str, ok: bool, detail: str) -> None:
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}")
        if not ok:
            self.failed.append(name)


def same_bits(native: dict[str, bytes], emulated: dict[str, bytes], check: Check) -> None:
    for name, data in sorted(native.items()):
        if name not in emulated:
            check(name, False, "missing from the emulated run")
        elif data != emulated[name]:
            a = np.frombuffer(data, np.float32 if len(data) % 4 == 0 else np.uint16)
            b = np.frombuffer(emulated[name], a.dtype)
            check(name, False, f"{int((a != b).sum())} of {a.size} values differ")
        else:
            check(name, True, f"same {len(data)} bytes as the AVX2 build")


def bf16_linear(emulated: dict[str, bytes], check: Check) -> None:
    """y = x @ W^T + b with W bf16, x rounded to bf16, fp32 sums: against fp64 on the same
    rounded operands, the fp32 accumulation bound K * 2^-23 * max(|x| @ |W|^T)."""
    for name, data in sorted(emulated.items()):
        m = re.fullmatch(r"bf16_linear/(\w+)/(\d+)x(\d+)x(\d+)/xbf16_(\d)", name)
        if not m:
            continue
        M, N, K = map(int, m.group(2, 3, 4))
        inputs = f"bf16_in/{M}x{N}x{K}"
        w = bf16(emulated[f"{inputs}/w"]).view(N, K).double()
        x = floats(emulated[f"{inputs}/x"]).view(M, K + 4)[:, :K].bfloat16().double()
        want = x @ w.T + floats(emulated[f"{inputs}/bias"]).double()
        y = floats(data).view(M, N + 2)[:, :N].double()
        err = (y - want).abs().max().item()
        bound = K * 2**-23 * (x.abs() @ w.abs().T).max().item()
        check(name, err <= bound, f"max |y - fp64| {err:.3g}, bound {bound:.3g}")


def prefill_attention(emulated: dict[str, bytes], check: Check) -> None:
    """AMX prefill chunks round q and the probabilities to bf16: against the fp32 kernel on the
    bf16-rounded q (itself bit-checked above), within 2^-7 of max |v| (|v| < 1 here), as in
    tests/test_attention_cpu.py. Decode rows are left to the fp32 kernel."""
    for name, data in sorted(emulated.items()):
        if not name.startswith("prefill_amx/"):
            continue
        out = floats(data)
        written = out != -7.0
        if "/decode" in name:
            check(name, not written.any(), "decode rows left to attention_cpu.cpp")
            continue
        reference = re.sub(r"/t\d+$", "", name.replace("prefill_amx/", "prefill_amx_ref/"))
        ref = floats(emulated[reference])
        err = (out[written] - ref[written]).abs().max().item()
        detail = f"{int(written.sum())} of {out.numel()} values written, max |d| {err:.3g}"
        check(name, err <= 2**-7 and written.any(), detail + f", bound {2**-7:.3g}")


def silu_mul(emulated: dict[str, bytes], check: Check) -> None:
    """The gate_up linear with silu(gate) * up, rounded to bf16 once: within 2^-8 relative
    (with 1e-3 absolute for values near 0) of fp64 on the same bf16 operands."""
    if "silu_mul_amx" not in emulated:
        return
    gate = bf16(emulated["silu_mul_in/gate"]).view(96, 576).double()
    up = bf16(emulated["silu_mul_in/up"]).view(96, 576).double()
    x = floats(emulated["silu_mul_in/x"]).view(5, 576).bfloat16().double()
    want = F.silu(x @ gate.T) * (x @ up.T)
    out = bf16(emulated["silu_mul_amx"]).view(5, 96).double()
    err = ((out - want).abs() / (want.abs() + 1e-3)).max().item()
    check("silu_mul_amx", err <= 2**-8, f"max relative error {err:.3g}, bound {2**-8:.3g}")
    same = emulated["silu_mul_amx"] == emulated["silu_mul_unfused"]
    check("silu_mul_amx/unfused", same, "bits of the plain linear, silu_and_mul, bf16")


def packed_attention(emulated: dict[str, bytes], check: Check) -> None:
    """Bidirectional attention per packed sequence: against fp32 SDPA within the tolerance of
    tests/test_packed_attention.py (atol 2e-2, rtol 1e-2)."""
    if "packed_attention_amx" not in emulated:
        return
    heads, kv_heads, dim = 8, 2, 64
    fused = bf16(emulated["packed_in/fused"]).view(-1, (heads + 2 * kv_heads) * dim)
    cu = np.frombuffer(emulated["packed_in/cu"], np.int32)
    out = bf16(emulated["packed_attention_amx"]).view(-1, heads, dim)
    q = fused[:, : heads * dim].view(-1, heads, dim)
    k = fused[:, heads * dim : (heads + kv_heads) * dim].view(-1, kv_heads, dim)
    v = fused[:, (heads + kv_heads) * dim :].view(-1, kv_heads, dim)
    group = heads // kv_heads
    ok, worst = True, 0.0
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        qs = q[start:end].transpose(0, 1)
        ks = k[start:end].repeat_interleave(group, 1).transpose(0, 1)
        vs = v[start:end].repeat_interleave(group, 1).transpose(0, 1)
        want = F.scaled_dot_product_attention(qs, ks, vs, scale=dim**-0.5)
        got = out[start:end].transpose(0, 1)
        ok &= torch.allclose(got, want, atol=2e-2, rtol=1e-2)
        worst = max(worst, (got - want).abs().max().item())
    check("packed_attention_amx", ok, f"max |d| {worst:.3g} (atol 2e-2, rtol 1e-2)")


def main(native_path: str, emulated_path: str) -> int:
    native, emulated = records(native_path), records(emulated_path)
    text = text_of(emulated_path)
    check = Check()
    check("run", "ISA_CHECK_DONE" in text, f"{len(emulated)} records")
    same_bits(native, emulated, check)
    bf16_linear(emulated, check)
    prefill_attention(emulated, check)
    silu_mul(emulated, check)
    packed_attention(emulated, check)
    print(f"{len(check.failed)} failed" + (f": {', '.join(check.failed)}" if check.failed else ""))
    return 1 if check.failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
