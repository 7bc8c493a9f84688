import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from bsqcodec.config import PriorConfig
from bsqcodec.format import entropy
from bsqcodec.model import intprior, intstep
from bsqcodec.model.intprior import IntPrior, export, int_layernorm
from bsqcodec.model.prior import Prior


def make(seed: int, groups: int = 2, bits: int = 12, rows: int = 4, cols: int = 5):
    torch.manual_seed(seed)
    cfg = PriorConfig(bits=bits, groups=groups, dim=32, layers=2, heads=2, tile_rows=rows, tile_cols=cols)
    p = Prior(cfg)
    with torch.no_grad():
        for prm in p.parameters():
            prm.add_(torch.randn_like(prm) * 0.1)
    calib = torch.randint(0, 2**bits, (8, rows, cols))
    return p, IntPrior(cfg, export(p, calib))


def kv_tables(ip: IntPrior, sym: torch.Tensor, rows: int, cols: int) -> list[torch.Tensor]:
    """Token-by-token tables through the KV cache, as the decoder computes them."""
    B, T, G = sym.shape
    cache = ip.new_cache(B, T)
    out = [torch.zeros(B, T, 2**ip.cfg.group_bits, dtype=torch.int64) for _ in range(G)]
    for t in range(T):
        r, c = torch.full((B, 1), t // cols), torch.full((B, 1), t % cols)
        x = ip.embed(None if t == 0 else sym[:, t - 1 : t], r, c)
        h = ip.hidden(x.expand(B, 1, -1) if t == 0 else x, cache, t)[:, 0]
        for j in range(G):
            out[j][:, t] = ip.group_table(h, j, sym[:, t, :j] if j else None)
    return out


def grids_differing_at(seed: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two random (1, 4, 5) token grids that differ only in token t (raster order)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, 2**12, (1, 4, 5), generator=g)
    b = a.clone()
    b.view(-1)[t] = (b.view(-1)[t] + 1 + seed) % 2**12
    return a, b


class TestCausality:
    @given(st.integers(0, 1000), st.integers(0, 19))
    def test_float_prefix_unchanged(self, seed, t):
        p, _ = make(seed % 7)
        a, b = grids_differing_at(seed, t)
        with torch.no_grad():
            la, lb = p(a), p(b)
        # the input at position t+1 is token t: outputs at positions <= t must not change
        # (group 0 at position t does not see token t; later groups see its earlier groups)
        assert torch.allclose(la[0][:, : t + 1], lb[0][:, : t + 1], atol=1e-5)
        assert torch.allclose(la[1][:, :t], lb[1][:, :t], atol=1e-5)
        assert t == 19 or not all(torch.allclose(x, y) for x, y in zip(la, lb))

    @given(st.integers(0, 1000), st.integers(0, 19))
    def test_integer_prefix_unchanged(self, seed, t):
        p, ip = make(seed % 7)
        a, b = grids_differing_at(seed, t)
        ta = ip.tables(p.symbols(a), 4, 5)
        tb = ip.tables(p.symbols(b), 4, 5)
        assert torch.equal(ta[0][:, : t + 1], tb[0][:, : t + 1])  # group 0 at position t does not see token t
        assert torch.equal(ta[0][:, :t], tb[0][:, :t]) and torch.equal(ta[1][:, :t], tb[1][:, :t])


class TestIntegerExactness:
    @given(st.integers(0, 10**6), st.sampled_from([(12, 2), (10, 1), (15, 3)]), st.integers(1, 4), st.integers(1, 5),
           st.sampled_from([1000, 3, 7]))
    def test_onepass_equals_kv_equals_batched(self, seed, bg, rows, cols, query_block):
        bits, groups = bg
        p, ip = make(seed % 5, groups=groups, bits=bits)
        g = torch.Generator().manual_seed(seed)
        toks = torch.randint(0, 2**bits, (3, rows, cols), generator=g)
        sym = p.symbols(toks)
        results = []
        saved = intprior.QUERY_BLOCK
        intprior.QUERY_BLOCK = query_block  # teacher forcing in blocks of query positions (or all at once)
        try:
            for threads in (1, 2):
                torch.set_num_threads(threads)
                one = ip.tables(sym, rows, cols)
                single = [ip.tables(sym[i : i + 1], rows, cols) for i in range(3)]
                kv = kv_tables(ip, sym, rows, cols)
                for j in range(groups):
                    assert torch.equal(one[j], kv[j])
                    assert torch.equal(one[j], torch.cat([s[j] for s in single]))
                results.append(one)
        finally:
            intprior.QUERY_BLOCK = saved
        for a, b in zip(*results):
            assert torch.equal(a, b)

    @given(st.integers(0, 10**6), st.sampled_from([(12, 2), (10, 1), (15, 3)]), st.integers(1, 4), st.integers(1, 5),
           st.sampled_from(intprior.PATHS), st.sampled_from(intprior.PATHS))
    def test_numpy_and_torch_steps_equal_teacher_forcing(self, seed, bg, rows, cols, path, step_path):
        """The decoder's step (NumPy on the CPU, torch elsewhere) gives teacher forcing's tables, whichever
        path of products each of them takes."""
        bits, groups = bg
        p, ip = make(seed % 5, groups=groups, bits=bits)
        if path == "int8" and not intprior._INT_MM or step_path == "int8" and not intprior._INT_MM:
            return  # a torch without int8 products
        lins = [*(L[k] for L in ip.layers for k in ("qkv", "proj", "fc1", "fc2")), *ip.heads]
        for lin in lins:
            lin.use(path)
        g = torch.Generator().manual_seed(seed)
        sym = p.symbols(torch.randint(0, 2**bits, (3, rows, cols), generator=g))
        want = ip.tables(sym, rows, cols)
        for lin in lins:
            lin.use(step_path)
        intstep._PARAMS.pop(ip, None)  # NumpyStep reads the layers' paths when it first meets a prior
        B, T, G = sym.shape
        for step in (intstep.NumpyStep(ip, B, T), intstep.TorchStep(ip, B, T)):
            s = sym.numpy()
            for t in range(T):
                tt = np.full(B, t)
                h = step.hidden(step.embed(None if t == 0 else s[:, t - 1], tt // cols, tt % cols), t)
                for j in range(G):
                    tab = step.table(h, j, s[:, t, :j])
                    assert tab.dtype == np.float64 and np.array_equal(tab, want[j][:, t].numpy()), (type(step), t, j)

    @given(st.integers(0, 10**6), st.sampled_from([(3, 4), (6, 7)]))
    def test_float64_and_float32_caches_give_the_same_tables(self, seed, shape):
        """The CPU's float64 cache and products, and the float32 cache with digit products that other
        devices use, give the same tables, teacher-forced and token by token."""
        rows, cols = shape
        p, ip = make(seed % 5, rows=rows, cols=cols)
        sym = p.symbols(torch.randint(0, 4096, (2, rows, cols), generator=torch.Generator().manual_seed(seed)))
        assert ip.kv_dtype == torch.float64
        cpu_tables = ip.tables(sym, rows, cols), kv_tables(ip, sym, rows, cols)
        ip.kv_dtype = torch.float32
        for a, b in zip(cpu_tables, (ip.tables(sym, rows, cols), kv_tables(ip, sym, rows, cols))):
            for x, y in zip(a, b):
                assert torch.equal(x, y)

    @pytest.mark.parametrize("att_scale", [1e-6, 1e-9])
    def test_masked_keys_get_no_weight_at_any_attention_scale(self, att_scale):
        # a barely trained prior has a tiny attention scale; teacher forcing must still ignore later keys
        p, ip = make(3)
        for L in ip.layers:
            L["att_scale"] = att_scale
        sym = p.symbols(torch.randint(0, 4096, (2, 4, 5), generator=torch.Generator().manual_seed(1)))
        for a, b in zip(ip.tables(sym, 4, 5), kv_tables(ip, sym, 4, 5)):
            assert torch.equal(a, b)

    def test_tables_are_positive_integers(self):
        p, ip = make(0)
        tabs = ip.tables(p.symbols(torch.randint(0, 4096, (2, 4, 5))), 4, 5)
        for t in tabs:
            assert t.dtype == torch.int64 and t.min() >= 1 and t.max() <= 2**20

    def test_export_close_to_float(self):
        p, ip = make(3)
        toks = torch.randint(0, 4096, (16, 4, 5), generator=torch.Generator().manual_seed(1))
        fb = p.bits(toks)
        sym = p.symbols(toks)
        tabs = torch.stack(ip.tables(sym, 4, 5), 2)  # (B, T, G, n)
        ib = entropy.bits(sym.reshape(-1).numpy(), tabs.reshape(-1, tabs.shape[-1]).numpy())
        assert abs(ib - fb) / fb < 0.01

    @given(st.lists(st.integers(-(2**20), 2**20), min_size=4, max_size=16))
    def test_layernorm_matches_float(self, xs):
        x = torch.tensor([xs], dtype=torch.float64)
        if x.std() < 64:  # well above the integer epsilon (10 squared units)
            return
        n = int_layernorm(x) / 256
        ref = torch.nn.functional.layer_norm(x / 1024, (x.shape[-1],)).clamp(-2047 / 256, 2047 / 256)
        # the integer mean is floored (off by under one unit: 1/sigma after normalizing) and the
        # output rounded to 1/256; beyond that the two agree
        sigma = float(x.std(unbiased=False))
        assert (n - ref).abs().max() < 1 / sigma + 1 / 256 + 1e-3


@given(st.integers(0, 2**31 - 1), st.sampled_from([1, 7, 192, 2080, 4096]), st.booleans(), st.sampled_from(["int8", "float32"]))
def test_digit_products_equal_float64_ones(seed, width, extreme, path):
    """IntLinear's int8 and float32 paths (base-64 digits) compute exactly the float64 path's integers,
    extremes included, up to the widest input each path takes."""
    from bsqcodec.model.intprior import F32_MAX_IN, QMAX, IntLinear

    g = torch.Generator().manual_seed(seed)
    if extreme:  # every product large and of one sign, at random: partial sums that a looser bound would round
        w = torch.randint(100, 128, (5, width), generator=g, dtype=torch.int8) * (-1 if seed % 2 else 1)
        x = (QMAX - torch.randint(0, 14, (3, width), generator=g)).double()  # low digits 50-63 (QMAX = 64 * 31 + 63)
        x = -x if seed % 3 == 0 else x
    else:
        w = torch.randint(-127, 128, (5, width), generator=g, dtype=torch.int8)
        x = torch.randint(-QMAX, QMAX + 1, (3, width), generator=g).double()
    # scales from 1/2 to 1: an error of one unit in a product shows in the output
    t = {"l.w": w, "l.m": torch.randint(2**22, 2**23, (5,), generator=g), "l.s": torch.tensor(23), "l.b": torch.randint(-99, 99, (5,))}
    lin = IntLinear(t, "l", "cpu")
    ref = torch.floor(torch.matmul(x, lin.wt) * lin.scale + lin.offset)
    if path == "int8" and not intprior._INT_MM or path == "float32" and width > F32_MAX_IN:
        with pytest.raises(ValueError):
            lin.use(path)
        return
    lin.use(path)
    assert torch.equal(lin(x), ref)
    assert torch.equal(lin(x[None]), ref[None])
    step = intstep._Linear(lin)  # the decoder's NumPy step, by the same path
    assert np.array_equal(step(x.numpy()), ref.numpy())


@given(st.integers(0, 2**31 - 1), st.sampled_from([7, 192, 768]))
def test_one_float32_product_only_where_it_is_exact(seed, width):
    """The float32 path (IntLinear's and the step's) multiplies x itself, in one product, only when its bound proves every
    partial sum exact; large inputs take the digits, and there one product would round."""
    from bsqcodec.model.intprior import QMAX, IntLinear

    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-127, 128, (6, width), generator=g, dtype=torch.int8)
    w[:, 0] = 127  # max|w| = 127 in every layer
    t = {"l.w": w, "l.m": torch.randint(2**22, 2**23, (6,), generator=g), "l.s": torch.tensor(23), "l.b": torch.randint(-99, 99, (6,))}
    lin = IntLinear(t, "l", "cpu")
    lin.use("float32")
    step = intstep._Linear(lin)
    small = torch.randint(-2**24 // (127 * width), 2**24 // (127 * width) + 1, (4, width), generator=g).double()
    assert step.one_product(small.numpy())
    ref = torch.floor(torch.matmul(small, lin.wt) * lin.scale + lin.offset)
    assert np.array_equal(step(small.numpy()), ref.numpy())
    assert torch.equal(lin(small), ref)  # IntLinear takes the same one product
    if width < 192:
        return
    # products of one sign whose sums pass 2^24, odd: a float32 sum of them rounds
    big = (QMAX - 2 * torch.randint(0, 8, (4, width), generator=g)).double()
    wb = torch.full((6, width), 127, dtype=torch.int8)
    lin = IntLinear({**t, "l.w": wb}, "l", "cpu")
    lin.use("float32")
    step = intstep._Linear(lin)
    ref = torch.floor(torch.matmul(big, lin.wt) * lin.scale + lin.offset).numpy()
    assert not step.one_product(big.numpy())
    assert np.array_equal(step(big.numpy()), ref)
    assert np.array_equal(lin(big).numpy(), ref)
    # what one product may give: float32 sums in one order (a BLAS picks its own; some happen not to round here)
    terms = big.numpy().astype(np.float32)[:, :, None] * step.w32[None]  # (4, width, 6), each term exact
    in_order = np.add.accumulate(terms, axis=1, dtype=np.float32)[:, -1]
    rounded = np.floor(in_order.astype(np.float64) * step.scale + step.offset)
    assert not np.array_equal(rounded, ref)


def test_product_path_follows_the_cpu_and_the_switch(monkeypatch):
    """int8 only where the CPU has int8 dot products, float32 digits where exact, float64 otherwise;
    BSQ_PRODUCTS forces a path where it applies."""
    from bsqcodec import cpu

    monkeypatch.delenv(intprior.PRODUCTS_ENV, raising=False)
    monkeypatch.setattr(cpu, "flags", lambda: frozenset({"avx2", "fma"}))
    assert intprior.product_path(192, "cpu") == "float32"
    assert intprior.product_path(intprior.F32_MAX_IN + 1, "cpu") == "float64"
    assert intprior.product_path(192, "meta") == "float64"
    monkeypatch.setattr(cpu, "flags", lambda: frozenset({"avx2", "avx512_vnni"}))
    assert intprior.product_path(192, "cpu") == ("int8" if intprior._INT_MM else "float32")
    for forced in intprior.PATHS:
        monkeypatch.setenv(intprior.PRODUCTS_ENV, forced)
        assert intprior.product_path(192, "cpu") == (forced if forced != "int8" or intprior._INT_MM else "float32")
    monkeypatch.setenv(intprior.PRODUCTS_ENV, "float16")
    with pytest.raises(ValueError):
        intprior.product_path(192, "cpu")


@given(st.integers(0, 2**31 - 1), st.sampled_from([2, 37, 512]), st.sampled_from([1, 16, 128]), st.booleans(),
       st.sampled_from([1e-6, 0.3, 3.0, 1e3]))
def test_numpy_attention_equals_torch_attention(seed, keys, hs, extreme, spread):
    """Attention by float64 products (the CPU's: IntPrior's and the decoder's NumPy step) computes exactly
    the float32 digits' integers, extremes included."""
    from bsqcodec.model.intprior import MAX_KEYS, QMAX

    _, ip = make(0)
    g = torch.Generator().manual_seed(seed)
    B, nh = 3, 2
    # gaps of random dots are about QMAX^2 sqrt(hs): spread = 1 puts them a third of the way along the
    # exp table, where the weights and their roundings matter
    att_scale = spread * 1000 / (QMAX**2 * hs**0.5)
    if extreme:  # the largest magnitudes the exactness bounds allow: every dot and weighted sum at its limit
        sign = -1.0 if seed % 2 else 1.0
        q = torch.full((B, nh, 1, hs), sign * QMAX)
        K = torch.full((B, nh, keys, hs), float(QMAX))
        K[..., ::2, :] *= -1  # gaps as large as they get
        V = torch.full((B, nh, keys, hs), -sign * QMAX)
    else:
        q = torch.randint(-QMAX, QMAX + 1, (B, nh, 1, hs), generator=g).float()
        K = torch.randint(-QMAX, QMAX + 1, (B, nh, keys, hs), generator=g).float()
        V = torch.randint(-QMAX, QMAX + 1, (B, nh, keys, hs), generator=g).float()
    assert keys <= MAX_KEYS
    V = torch.cat([V, torch.ones(B, nh, keys, 1)], -1)  # the cache's column of ones
    want = ip._attend_one_torch(q, K, V, att_scale)  # float32 digits, as on devices other than the CPU
    L = {"att_scale": att_scale}
    got = ip._attend(q.double(), K.double(), V.double(), L, keys - 1)  # the CPU's float64 cache
    assert got.dtype == want.dtype and torch.equal(got, want)
    # the decoder's step: float64 products, keys transposed, read from a larger cache
    kt, v = np.zeros((B, nh, hs, MAX_KEYS)), np.ones((B, nh, MAX_KEYS, hs + 1))
    kt[..., :keys], v[..., :keys, :] = K.transpose(-1, -2).numpy(), V.numpy()
    att_w = intstep._Params(ip).att_w
    got = intstep._attend(q.double().numpy(), kt[..., :keys], v[..., :keys, :], att_w, att_scale)
    assert got.dtype == np.float64 and np.array_equal(got, want.numpy())
