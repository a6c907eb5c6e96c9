"""GPU experiment: is a token-parallel Triton scan (mamba-ssm's layout) faster than ours?

Our Triton scan (`triton_scan.py`) lays a block of 16 channels across a warp's lanes and walks the tokens two at a
time; its loads take 2 tokens of each channel at a channel stride of L (4 of every 32 bytes fetched), and long
sequences need segments (SUMMARY passes) to fill the GPU. mamba-ssm's kernel instead gives one channel to a
block of threads, the tokens of a chunk across the threads (contiguous, vector loads), and walks the states one
after the other, scanning the chunk across the threads for each. `_token_parallel_forward` is that layout in
Triton: one program per (batch, CHANNELS channels of a group), CHUNK tokens across its warps, for each state n

    a_t = exp(delta_t A_n),  b_t = delta_t u_t B_t[n],  h_t[n] = H_t + P_t h_start[n]  (one associative scan)
    y_t += C_t[n] h_t[n],

the state after each chunk passed on through `starts` (batch, dim, chunks + 1, N), the checkpoints the backward
reads. A few channels per program fill an H100 at every stage of our plans (batch x dim >= 1536 channels), so
there are no segments. The backward (`_token_parallel_backward`) walks the chunks last first: per state the chunk's
states again from the saved start, the adjoint dh_t = a_{t+1} dh_{t+1} + C_t[n] dout_t as a reverse scan, and dB,
dC summed over the program's channels, then added atomically (with one channel per program: as mamba-ssm's kernel
does). Without z (our layer gates after the scan).

    python3 benchmarks/scan_token_parallel.py            (GPU machine: ms per stage and pass, ours / mamba-ssm / this)
    python3 benchmarks/scan_token_parallel.py --static   (any machine: both kernels compiled for sm_90 per setting,
                                                         as `scan_static.py` reports ours)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from nnunet_segmamba.mamba.triton_scan_tiles import _compose, _softplus

CHUNK, NUM_WARPS, CHANNELS = 1024, 4, 1
SETTINGS = [(1024, 4, 1), (512, 4, 1), (1024, 8, 1), (128, 4, 4), (256, 8, 4), (128, 4, 2)]
"""(CHUNK, NUM_WARPS, CHANNELS) measured by `main`; `--static` prints what sm_90 makes of each (BENCHMARKS.md, "A
token-parallel layout")."""


@triton.jit
def _channels(D, bias, dim, groups, length, d_state, n_chunks, CHANNELS: tl.constexpr):
    """This program's CHANNELS channels d (of one group) of batch element b: their rows b * dim + d, offsets of
    their (batch, dim, L) rows, of the group's B and C rows and of their chunk states; D and delta_bias."""
    blocks = dim // CHANNELS
    b, first = tl.program_id(0) // blocks, (tl.program_id(0) % blocks) * CHANNELS
    d = first + tl.arange(0, CHANNELS)
    rows = (b * dim + d).to(tl.int64)
    bc_row = (b * groups + first // (dim // groups)).to(tl.int64) * d_state * length
    return d, rows, rows * length, bc_row, rows * (n_chunks + 1) * d_state, tl.load(D + d), tl.load(bias + d)


@triton.jit
def _token_parallel_forward(u, delta, A, B, C, D, bias, out, starts, dim, groups, length, d_state, n_chunks,
                            CHUNK: tl.constexpr, CHANNELS: tl.constexpr):
    """CHANNELS channels of one group of one batch element: u, delta, out (batch, dim, L) and B, C (batch, groups,
    N, L), tokens contiguous; starts (batch, dim, n_chunks + 1, N) fp32, zero at chunk 0 (written here for the
    others). Tiles (CHANNELS, CHUNK), scanned along the tokens."""
    d, rows, x_rows, bc_row, state_rows, D_d, bias_d = _channels(D, bias, dim, groups, length, d_state, n_chunks,
                                                                 CHANNELS)
    offsets = tl.arange(0, CHUNK)
    last = (offsets == CHUNK - 1)[None, :] & (rows >= 0)[:, None]
    for c in range(n_chunks):
        tokens = c * CHUNK + offsets
        valid = tokens < length
        x = x_rows[:, None] + tokens[None, :]
        mask = valid[None, :] & (rows >= 0)[:, None]
        u_c = tl.load(u + x, mask=mask, other=0.0).to(tl.float32)
        dt = _softplus(tl.load(delta + x, mask=mask, other=0.0).to(tl.float32) + bias_d[:, None])
        dt = tl.where(mask, dt, 0.0)  # identity steps past L: the last column is the state after the chunk
        drive = dt * u_c
        y = D_d[:, None] * u_c
        for n in range(d_state):
            a = tl.exp(dt * tl.load(A + d * d_state + n)[:, None])
            b_t = drive * tl.load(B + bc_row + n * length + tokens, mask=valid, other=0.0).to(tl.float32)[None, :]
            decay, local = tl.associative_scan((a, b_t), 1, _compose)
            h = local + decay * tl.load(starts + state_rows + c * d_state + n)[:, None]
            y += tl.load(C + bc_row + n * length + tokens, mask=valid, other=0.0).to(tl.float32)[None, :] * h
            tl.store(starts + state_rows[:, None] + (c + 1) * d_state + n + 0 * offsets[None, :], h, mask=last)
        tl.store(out + x, y, mask=mask)
        tl.debug_barrier()  # the chunk's end states, stored by their last threads, are read by all in the next


@triton.jit
def _token_parallel_backward(u, delta, A, B, C, D, bias, dout, starts, carry, du, ddelta, dA_part, dB, dC, dD_part,
                             dbias_part, dim, groups, length, d_state, n_chunks, CHUNK: tl.constexpr,
                             CHANNELS: tl.constexpr, BLOCK_N: tl.constexpr):
    """CHANNELS channels of one group of one batch element, their chunks last first. From the forward's chunk start
    states (`starts`) each state's h_t, and the adjoint dh_t = a_{t+1} dh_{t+1} + C_t[n] dout_t as a reverse scan
    over the chunk, dh at each chunk's first token passed on through `carry` (batch, dim, n_chunks + 1, N), zeros
    (one row per chunk: the next chunk's row is read while this one's is written). du, ddelta in u's layout;
    dA (batch, dim, N), dD and d(delta_bias) (batch, dim) per channel; dB, dC fp32 (batch, groups, N, L): each
    program sums its channels, then adds atomically (one channel per program: as mamba-ssm's kernel does)."""
    d, rows, x_rows, bc_row, state_rows, D_d, bias_d = _channels(D, bias, dim, groups, length, d_state, n_chunks,
                                                                 CHANNELS)
    offsets = tl.arange(0, CHUNK)
    first = (offsets == 0)[None, :] & (rows >= 0)[:, None]
    states = tl.arange(0, BLOCK_N)
    dA_acc = tl.zeros((CHANNELS, BLOCK_N), tl.float32)
    dD_acc = tl.zeros((CHANNELS,), tl.float32)
    dbias_acc = tl.zeros((CHANNELS,), tl.float32)
    for i in range(n_chunks):
        c = n_chunks - 1 - i
        tokens = c * CHUNK + offsets
        valid = tokens < length
        x = x_rows[:, None] + tokens[None, :]
        mask = valid[None, :] & (rows >= 0)[:, None]
        mask_next = (tokens + 1 < length)[None, :] & (rows >= 0)[:, None]
        u_c = tl.load(u + x, mask=mask, other=0.0).to(tl.float32)
        raw = tl.load(delta + x, mask=mask, other=0.0).to(tl.float32) + bias_d[:, None]
        dt = tl.where(mask, _softplus(raw), 0.0)
        dt_next = _softplus(tl.load(delta + x + 1, mask=mask_next, other=0.0).to(tl.float32) + bias_d[:, None])
        dt_next = tl.where(mask_next, dt_next, 0.0)  # a_{t+1} = 1 past L, where dh is 0
        dy = tl.load(dout + x, mask=mask, other=0.0).to(tl.float32)
        drive = dt * u_c
        dh_B = tl.zeros((CHANNELS, CHUNK), tl.float32)  # sum_n dh_t B_t[n]
        d_exponent_A = tl.zeros((CHANNELS, CHUNK), tl.float32)  # sum_n dh_t a_t h_{t-1} A_n
        for n in range(d_state):
            A_n = tl.load(A + d * d_state + n)[:, None]
            B_n = tl.load(B + bc_row + n * length + tokens, mask=valid, other=0.0).to(tl.float32)[None, :]
            C_n = tl.load(C + bc_row + n * length + tokens, mask=valid, other=0.0).to(tl.float32)[None, :]
            b_t = drive * B_n
            decay, local = tl.associative_scan((tl.exp(dt * A_n), b_t), 1, _compose)
            h = local + decay * tl.load(starts + state_rows + c * d_state + n)[:, None]
            suffix_decay, suffix = tl.associative_scan((tl.exp(dt_next * A_n), C_n * dy), 1, _compose, reverse=True)
            dh = suffix + suffix_decay * tl.load(carry + state_rows + (c + 1) * d_state + n)[:, None]
            tl.store(carry + state_rows[:, None] + c * d_state + n + 0 * offsets[None, :], dh, mask=first)
            g_t = dh * (h - b_t)  # dh_t exp(delta_t A_n) h_{t-1}
            dA_acc += tl.where(states[None, :] == n, tl.sum(g_t * dt, axis=1)[:, None], 0.0)
            d_exponent_A += g_t * A_n
            dh_B += dh * B_n
            tl.atomic_add(dB + bc_row + n * length + tokens, tl.sum(dh * drive, axis=0), mask=valid, sem="relaxed")
            tl.atomic_add(dC + bc_row + n * length + tokens, tl.sum(h * dy, axis=0), mask=valid, sem="relaxed")
        d_dt = (d_exponent_A + dh_B * u_c) * tl.sigmoid(raw)
        tl.store(du + x, dh_B * dt + D_d[:, None] * dy, mask=mask)
        tl.store(ddelta + x, d_dt, mask=mask)
        dD_acc += tl.sum(dy * u_c, axis=1)
        dbias_acc += tl.sum(tl.where(mask, d_dt, 0.0), axis=1)
        tl.debug_barrier()  # the chunk's first dh, stored by its first threads, is read by all in the next
    tl.store(dA_part + rows[:, None] * d_state + states[None, :], dA_acc, mask=(states < d_state)[None, :])
    tl.store(dD_part + rows, dD_acc)
    tl.store(dbias_part + rows, dbias_acc)


class TokenParallelScan(torch.autograd.Function):
    """`scan.selective_scan(u, delta, A, B, C, D, delta_bias=delta_bias, delta_softplus=True)` (no z) in the
    token-parallel layout: u, delta (batch, dim, L), B, C (batch, groups, N, L), tokens contiguous; `setting`:
    (CHUNK, NUM_WARPS, CHANNELS), CHANNELS dividing the channels of a group."""

    @staticmethod
    def forward(ctx, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, delta_bias: Tensor,
                setting: tuple[int, int, int]) -> Tensor:
        u, delta, B, C = (t.contiguous() for t in (u, delta, B, C))
        out, starts = _forward(u, delta, A, B, C, D, delta_bias, setting)
        ctx.save_for_backward(u, delta, A, B, C, D, delta_bias, starts)
        ctx.setting = setting
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):
        u, delta, A, B, C, D, delta_bias, starts = ctx.saved_tensors
        chunk, num_warps, channels = ctx.setting
        batch, dim, length = u.shape
        groups, d_state = B.shape[1], A.shape[1]
        f32 = dict(dtype=torch.float32, device=u.device)
        du, ddelta = torch.empty_like(u), torch.empty_like(delta)
        dB, dC = torch.zeros(B.shape, **f32), torch.zeros(C.shape, **f32)
        dA_part = torch.empty(batch, dim, d_state, **f32)
        dD_part, dbias_part = torch.empty(batch, dim, **f32), torch.empty(batch, dim, **f32)
        _token_parallel_backward[(batch * dim // channels,)](
            u, delta, A.float().contiguous(), B, C, D.float(), delta_bias.float(), dout.contiguous(), starts,
            torch.zeros_like(starts), du, ddelta, dA_part, dB, dC, dD_part, dbias_part, dim, groups,
            length, d_state, starts.shape[2] - 1, CHUNK=chunk, CHANNELS=channels,
            BLOCK_N=triton.next_power_of_2(d_state), num_warps=num_warps)
        return (du, ddelta, dA_part.sum(0).to(A.dtype), dB.to(B.dtype), dC.to(C.dtype), dD_part.sum(0).to(D.dtype),
                dbias_part.sum(0).to(delta_bias.dtype), None)


def token_parallel_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, delta_bias: Tensor,
                        setting: tuple[int, int, int] = (CHUNK, NUM_WARPS, CHANNELS)) -> Tensor:
    """The selective scan (no z, softplus on) forward and backward in the token-parallel layout."""
    return TokenParallelScan.apply(u, delta, A, B, C, D, delta_bias, setting)


def _forward(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, delta_bias: Tensor,
             setting: tuple[int, int, int]) -> tuple[Tensor, Tensor]:
    """`_token_parallel_forward` on contiguous inputs: out and the chunk start states."""
    chunk, num_warps, channels = setting
    batch, dim, length = u.shape
    groups, d_state = B.shape[1], A.shape[1]
    if (dim // groups) % channels:
        raise ValueError(f"CHANNELS {channels} must divide the {dim // groups} channels of a group")
    n_chunks = triton.cdiv(length, chunk)
    out = torch.empty_like(u)
    starts = torch.zeros(batch, dim, n_chunks + 1, d_state, dtype=torch.float32, device=u.device)
    _token_parallel_forward[(batch * dim // channels,)](
        u, delta, A.float().contiguous(), B, C, D.float(), delta_bias.float(), out, starts, dim, groups, length,
        d_state, n_chunks, CHUNK=chunk, CHANNELS=channels, num_warps=num_warps)
    return out, starts


def token_parallel_forward(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor,
                           delta_bias: Tensor, setting: tuple[int, int, int] = (CHUNK, NUM_WARPS, CHANNELS)) -> Tensor:
    """The forward alone (no autograd): out in u's dtype."""
    return _forward(*(t.contiguous() for t in (u, delta, A, B, C)), D, delta_bias, setting)[0]


def main() -> None:
    from nnunet_segmamba.mamba.triton_scan import triton_selective_scan
    from nnunet_segmamba.tools.scan_benchmark import STAGES, _median_ms, _relative, gpu_scans, scan_inputs, scan_step

    device = torch.device("cuda")
    scans = {"ours": triton_selective_scan, **{"mamba-ssm": scan for scan in gpu_scans(device).values()
                                                 if scan is not triton_selective_scan}}
    for setting in SETTINGS:
        scans["tp " + "/".join(map(str, setting))] = (
            lambda u, delta, A, B, C, D, z, bias, softplus, setting=setting:
            token_parallel_scan(u, delta, A, B, C, D, bias, setting))
    print(f"Selective scan (no z, softplus), batch 2, {torch.cuda.get_device_name(device)}: ms of the forward alone "
          f"and of forward + backward; tp CHUNK/NUM_WARPS/CHANNELS: the token-parallel layout; error: largest "
          f"relative error of its output and gradients against ours")
    print(f"{'d_model':>7} {'tokens':>8} {'dtype':>8} {'pass':>8} | " + " ".join(f"{name:>11}" for name in scans)
          + f" | {'best tp/ours':>12} {'/mamba-ssm':>10} | {'error':>7}")
    for d_model, grid in STAGES:
        for dtype in (torch.float32, torch.bfloat16):
            (u, delta, A, B, C, D, _, bias, _), grad = scan_inputs(d_model, grid, 2, dtype, device)
            arguments = (u, delta, A, B, C, D, None, bias, True)
            leaves = [u, delta, A, B, C, D, bias]
            results = {}
            for name, scan in scans.items():
                out = scan(*arguments)
                results[name] = [out, *torch.autograd.grad(out, leaves, grad)]
            error = max(_relative(a.float(), b.float()) for name in scans if name.startswith("tp")
                        for a, b in zip(results[name], results["ours"]))
            for label in ("forward", "fwd+bwd"):
                ms = {}
                for name, scan in scans.items():
                    if label == "forward":
                        with torch.no_grad():
                            ms[name] = _median_ms(lambda: scan(*arguments), device, 3, 10)
                    else:
                        ms[name] = _median_ms(lambda: scan_step(scan, arguments, grad), device, 3, 10)
                best = min(value for name, value in ms.items() if name.startswith("tp"))
                print(f"{d_model:>7} {'x'.join(map(str, grid)):>8} {str(dtype)[6:]:>8} {label:>8} | "
                      + " ".join(f"{value:11.3f}" for value in ms.values())
                      + f" | {best / ms['ours']:12.2f} {best / ms.get('mamba-ssm', float('nan')):10.2f} | {error:7.1e}",
                      flush=True)


def static() -> None:
    """Each kernel compiled for sm_90 (bf16 inputs, d_state 16) per SETTINGS: `scan_static.describe`'s row."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("scan_static", Path(__file__).with_name("scan_static.py"))
    scan_static = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scan_static)
    rows = {}
    for kernel, extra in ((_token_parallel_forward, {}), (_token_parallel_backward, {"BLOCK_N": 16})):
        for chunk, warps, channels in SETTINGS:
            compiled = scan_static.compile_for(kernel, {"CHUNK": chunk, "CHANNELS": channels, **extra}, 90, "bf16",
                                               num_warps=warps)
            name = f"{kernel.fn.__name__.removeprefix('_token_parallel_')} {chunk}/{warps}/{channels}"
            rows[name] = scan_static.describe(compiled)
    columns = list(next(iter(rows.values())))
    print("Token-parallel kernels for sm_90, bf16 inputs, d_state 16 (static counts)")
    print(f"{'kernel':<18}" + "".join(f"{column:>10}" for column in columns))
    for name, row in rows.items():
        print(f"{name:<18}" + "".join(f"{row[column]:>10}" for column in columns))


if __name__ == "__main__":
    import sys

    static() if "--static" in sys.argv[1:] else main()
