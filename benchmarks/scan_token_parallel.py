"""GPU experiment: is a token-parallel Triton scan (mamba-ssm's layout) faster than ours? The forward only.

Our Triton scan (`triton_scan.py`) lays a block of 16 channels across a warp's lanes and walks the tokens two at a
time; its loads take 2 tokens of each channel at a channel stride of L (4 of every 32 bytes fetched), and long
sequences need segments (SUMMARY passes) to fill the GPU. mamba-ssm's kernel instead gives one channel to a
block of threads, the tokens of a chunk across the threads (contiguous, vector loads), and walks the states one
after the other, scanning the chunk across the threads for each. `_token_parallel_forward` is that layout in
Triton: one program per (batch, channel), CHUNK tokens across its warps, for each state n

    a_t = exp(delta_t A_n),  b_t = delta_t u_t B_t[n],  h_t[n] = H_t + P_t h_start[n]  (one associative scan)
    y_t += C_t[n] h_t[n],

the state after each chunk passed on through `starts` (batch, dim, chunks + 1, N), the checkpoints a backward
would read. One channel per program fills an H100 at every stage of our plans (batch x dim >= 1536 programs), so
there are no segments. If this forward is not clearly faster than ours, the layout is not worth a backward.

    python3 benchmarks/scan_token_parallel.py     (GPU machine: forward ms per stage, ours / this / mamba-ssm)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from nnunet_segmamba.mamba.triton_scan_tiles import _compose, _softplus

CHUNK = 1024
NUM_WARPS = 4
SETTINGS = [(1024, 4), (512, 4), (2048, 8), (1024, 8)]
"""(CHUNK, NUM_WARPS) measured by `main`: sm_90 compiles them to 56-80 registers, 12 lane shuffles and 8 vector loads
(`scan_static.describe`), against 125 registers and 58 shared-memory accesses for our forward's final pass."""


@triton.jit
def _token_parallel_forward(u, delta, A, B, C, D, bias, out, starts, dim, groups, length, d_state, n_chunks,
                            CHUNK: tl.constexpr):
    """One channel of one batch element: u, delta, out (batch, dim, L) and B, C (batch, groups, N, L), tokens
    contiguous; starts (batch, dim, n_chunks + 1, N) fp32, zero at chunk 0 (written here for the others)."""
    row = tl.program_id(0)
    b, d = row // dim, row % dim
    g = d // (dim // groups)
    x_row = row.to(tl.int64) * length
    bc_row = (b * groups + g).to(tl.int64) * d_state * length
    state_row = row.to(tl.int64) * (n_chunks + 1) * d_state
    D_d, bias_d = tl.load(D + d), tl.load(bias + d)
    offsets = tl.arange(0, CHUNK)
    for c in range(n_chunks):
        tokens = c * CHUNK + offsets
        valid = tokens < length
        u_c = tl.load(u + x_row + tokens, mask=valid, other=0.0).to(tl.float32)
        dt = _softplus(tl.load(delta + x_row + tokens, mask=valid, other=0.0).to(tl.float32) + bias_d)
        dt = tl.where(valid, dt, 0.0)  # identity steps past L: the last row is the state after the chunk
        drive = dt * u_c
        y = D_d * u_c
        for n in range(d_state):
            a = tl.exp(dt * tl.load(A + d * d_state + n))
            b_t = drive * tl.load(B + bc_row + n * length + tokens, mask=valid, other=0.0).to(tl.float32)
            decay, local = tl.associative_scan((a, b_t), 0, _compose)
            h = local + decay * tl.load(starts + state_row + c * d_state + n)
            y += tl.load(C + bc_row + n * length + tokens, mask=valid, other=0.0).to(tl.float32) * h
            tl.store(starts + state_row + (c + 1) * d_state + n + 0 * offsets, h, mask=offsets == CHUNK - 1)
        tl.store(out + x_row + tokens, y, mask=valid)
        tl.debug_barrier()  # the chunk's end states, stored by its last thread, are read by all in the next


def token_parallel_forward(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor,
                           delta_bias: Tensor, chunk: int = CHUNK, num_warps: int = NUM_WARPS) -> Tensor:
    """`scan.selective_scan(u, delta, A, B, C, D, delta_bias=delta_bias, delta_softplus=True)` (no z) forward only:
    u, delta (batch, dim, L) and B, C (batch, groups, N, L), tokens contiguous; out in u's dtype."""
    batch, dim, length = u.shape
    groups, d_state = B.shape[1], A.shape[1]
    n_chunks = triton.cdiv(length, chunk)
    out = torch.empty_like(u)
    starts = torch.zeros(batch, dim, n_chunks + 1, d_state, dtype=torch.float32, device=u.device)
    _token_parallel_forward[(batch * dim,)](u.contiguous(), delta.contiguous(), A.float().contiguous(),
                                            B.contiguous(), C.contiguous(), D.float(), delta_bias.float(), out,
                                            starts, dim, groups, length, d_state, n_chunks, CHUNK=chunk,
                                            num_warps=num_warps)
    return out


def main() -> None:
    from nnunet_segmamba.mamba.triton_scan import triton_selective_scan
    from nnunet_segmamba.tools.scan_benchmark import STAGES, _median_ms, _relative, gpu_scans, scan_inputs

    device = torch.device("cuda")
    cuda_scan = gpu_scans(device).get("cuda")
    print(f"Selective scan forward only (no z), batch 2, {torch.cuda.get_device_name(device)}: ms of ours, of "
          f"mamba-ssm's kernel and of the token-parallel layout per (CHUNK, NUM_WARPS); error: its output vs ours")
    labels = [f"tp {chunk}/{warps}" for chunk, warps in SETTINGS]
    print(f"{'d_model':>7} {'tokens':>8} {'dtype':>8} | {'ours':>7} {'mamba-ssm':>9} | "
          + " ".join(f"{label:>11}" for label in labels) + f" | {'best/ours':>9} {'best/mamba':>10} | {'error':>7}")
    with torch.no_grad():
        for d_model, grid in STAGES:
            for dtype in (torch.float32, torch.bfloat16):
                (u, delta, A, B, C, D, _, bias, _), _ = scan_inputs(d_model, grid, 2, dtype, device)
                reference = triton_selective_scan(u, delta, A, B, C, D, None, bias, True)
                ours = _median_ms(lambda: triton_selective_scan(u, delta, A, B, C, D, None, bias, True), device, 3, 10)
                cuda_ms = (_median_ms(lambda: cuda_scan(u, delta, A, B, C, D, None, bias, True), device, 3, 10)
                           if cuda_scan is not None else float("nan"))
                times, error = [], 0.0
                for chunk, warps in SETTINGS:
                    def step(chunk=chunk, warps=warps):
                        return token_parallel_forward(u, delta, A, B, C, D, bias, chunk, warps)
                    error = max(error, _relative(step().float(), reference.float()))
                    times.append(_median_ms(step, device, 3, 10))
                print(f"{d_model:>7} {'x'.join(map(str, grid)):>8} {str(dtype)[6:]:>8} | {ours:7.3f} {cuda_ms:9.3f} | "
                      + " ".join(f"{ms:11.3f}" for ms in times)
                      + f" | {min(times) / ours:9.2f} {min(times) / cuda_ms:10.2f} | {error:7.1e}", flush=True)


if __name__ == "__main__":
    main()
