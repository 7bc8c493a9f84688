"""formats/bsq.md section 11 (the second token stage), written from its text alone, in Python integers:
the budget map, the bit prior's context and integer arithmetic, the order of the streams' symbols and the
second-stage token CRC. The streams are decoded by spec_ref.py (section 4). tests/test_vectors_21.py
checks that it decodes every 2.1 vector to its recorded tokens, with switches that each follow one wrong
reading and must fail a vector.

Switches (`wrong`):
- "rows_first_pass": pass 0 is the tokens with odd y + x;
- "neighbours_all": pass-1 contexts also see neighbour bits that are not kept (their sign, not 0);
- "budget_fraction": the budget entry is k / L2 rounded, not k;
- "swapped_tables": bit i's table is (T1, T0);
- "band_edges": a pass-1 context reads neighbours outside the token's band as 0;
- "bands_128": bands of 128 rows, not 64;
- "quad_passes_swapped" (quad3x3): (even, odd) tokens in pass 3 and (odd, even) in pass 2;
- "quad_window_major" (quad3x3): the 3 x 3 codes at entry 9·... read as (window position)·L + c;
- "quad_all_neighbours" (quad3x3): neighbours of later passes are seen too (as their bits stand so far).
"""

from __future__ import annotations

import zlib

import spec_ref

QMAX, OUT_LEN = 2047, 6144


def _lin(t: dict, name: str, x: list[int], wrong) -> list[int]:
    W, m, s, b = t[name + ".w"], t[name + ".m"], t[name + ".s"], t[name + ".b"]
    out = []
    for o in range(len(W)):
        acc = sum(wi * xi for wi, xi in zip(W[o], x) if xi)
        out.append((2 * acc * m[o] + 2**s) // 2 ** (s + 1) + b[o])  # floor(acc·m / 2^s + 1/2) + b
    return out


def tables_of(t: dict, ctx: list[int], wrong=frozenset()) -> list[list[int]]:
    """The (T0, T1) table of each bit of a token whose context is ctx (section 11, "The bit prior")."""
    h = ctx
    for lin, g in (("bits.fc1", "bits.gelu1_table"), ("bits.fc2", "bits.gelu2_table")):
        h = [t[g][min(max(v, -QMAX), QMAX) + QMAX] for v in _lin(t, lin, h, wrong)]
    out = []
    for z in _lin(t, "bits.fc3", h, wrong):
        z = min(max(z, -OUT_LEN), OUT_LEN)
        pair = [max(1, t["bits.out_exp_table"][max(0, z)]), max(1, t["bits.out_exp_table"][max(0, -z)])]
        out.append(pair[::-1] if "swapped_tables" in wrong else pair)
    return out


def decode(header, base_tokens: list[list[int]], t: dict, cfg: dict, wrong=frozenset()):
    """(the second-grid tokens as bit lists (kept bits only), their bit counts), or None for an invalid stage."""
    s = header.second
    P, L1, P2, L2 = header.patch, header.bits, s.patch, s.bits
    r = P // P2
    rows, cols = len(base_tokens), len(base_tokens[0])
    H, W = rows * r, cols * r
    band = 128 if "bands_128" in wrong else 64
    nb = -(-H // band)
    quad = cfg.get("context", "checker") == "quad3x3"
    Q = 4 if quad else 2
    if len(s.streams) != 1 + Q * nb:
        return None
    rc = spec_ref.decode(s.streams[0], [s.table] * (rows * cols), 2)
    if rc is None or not spec_ref.stream_ok(s.streams[0], rc, [s.table] * (rows * cols), 2):
        return None
    k = [[cfg["choices"][rc[(y // r) * cols + x // r]] for x in range(W)] for y in range(H)]
    bits = [[[0] * L2 for _ in range(W)] for _ in range(H)]
    first_parity = 1 if "rows_first_pass" in wrong else 0

    def pass_of(y, x):
        if not quad:
            return int((y + x) % 2 != first_parity)
        table = [[0, 3], [2, 1]] if "quad_passes_swapped" in wrong else [[0, 2], [3, 1]]
        return table[y % 2][x % 2]

    def code(ty, tx):  # a first-stage token's code entries, 0 outside the first grid
        if not (0 <= ty < rows and 0 <= tx < cols):
            return [0] * L1
        return [1 if base_tokens[ty][tx] >> (L1 - 1 - i) & 1 else -1 for i in range(L1)]

    for p in range(Q):
        for b in range(nb):
            order, tabs = [], []
            for y in range(b * band, min(H, b * band + band)):
                for x in range(W):
                    if pass_of(y, x) != p or k[y][x] == 0:
                        continue
                    if quad:
                        window = [code(y // r + dy, x // r + dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
                        if "quad_window_major" in wrong:
                            ctx = [e for c in window for e in c]
                        else:
                            ctx = [window[j][c] for c in range(L1) for j in range(9)]
                    else:
                        ctx = code(y // r, x // r)
                    ctx += [1 if j == (y % r) * r + x % r else 0 for j in range(r * r)]
                    if quad:
                        ctx += [1 if j == p else 0 for j in range(4)]
                        near = [(y + dy, x + dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
                    else:
                        ctx.append(p)
                        near = [(y, x - 1), (y, x + 1), (y - 1, x), (y + 1, x)]
                    for ny, nx in near:
                        inside = 0 <= ny < H and 0 <= nx < W
                        earlier = inside and (pass_of(ny, nx) < p or "quad_all_neighbours" in wrong)
                        for i in range(L2):
                            ok = earlier and (i < k[ny][nx] or "neighbours_all" in wrong)
                            ok = ok and not ("band_edges" in wrong and ny // band != b)
                            ctx.append((1 if bits[ny][nx][i] else -1) if ok else 0)
                    if cfg["budget"]:
                        ctx.append(round(k[y][x] / L2) if "budget_fraction" in wrong else k[y][x])
                    tt = tables_of(t, ctx, wrong)
                    order += [(y, x, i) for i in range(k[y][x])]
                    tabs += tt[: k[y][x]]
            data = s.streams[1 + p * nb + b]
            sym = spec_ref.decode(data, tabs, 2)
            if sym is None or not spec_ref.stream_ok(data, sym, tabs, 2):
                return None
            for (y, x, i), v in zip(order, sym):
                bits[y][x][i] = v
    crc = zlib.crc32(b"".join((k[y][x] * 2**32 + sum(bits[y][x][i] << (L2 - 1 - i) for i in range(k[y][x])))
                              .to_bytes(8, "little") for y in range(H) for x in range(W)))
    if crc != s.token_crc:
        return None
    return bits, k
