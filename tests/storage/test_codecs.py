"""Top-k and hidden-state codecs: what is stored, how close the decoded values are, and the KL that costs.

The decoders here are written from storage/README.md with numpy alone, independent of codecs.decode_*,
so the tests check the documented bit layout as well as the round trip.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sad_pipe.storage.codecs import TopKScheme, decode_hidden, decode_topk, encode_hidden, encode_topk


def peaked_logits(seed: int, rows: int, vocab: int, spread: float, peak: float) -> torch.Tensor:
    """Full-vocabulary logits like an LM head's: a noisy background plus one clearly preferred token."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g) * spread
    logits[torch.arange(rows), torch.randint(0, vocab, (rows,), generator=g)] += peak
    return logits


def numpy_decode_topk(stored: dict[str, torch.Tensor], values: str) -> np.ndarray:
    """README decoding, numpy only: logit = topk_max - gap, in the stored (ascending id) order."""
    vmax = stored["topk_max"].numpy().astype(np.float64)[:, None]
    raw = stored["topk_values"].numpy()
    if values == "uint8":
        gap = raw.astype(np.float64) * stored["topk_step"].numpy().astype(np.float64)[:, None]
    elif values == "fp16":
        gap = raw.view(np.float16).astype(np.float64)
    else:  # bf16 bits are the top half of a float32
        gap = (raw.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return vmax - gap


def float32_slack(x: np.ndarray) -> np.ndarray:
    """A few float32 ulps of x: the encoder computes (max - logit) in float32."""
    return 4 * np.spacing(np.abs(x).astype(np.float32)).astype(np.float64)


def top_k(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    vals, ids = logits.topk(k, dim=-1)
    order = ids.argsort(dim=-1)  # the exact logits in the stored (ascending id) order
    return vals, ids, vals.gather(-1, order).numpy().astype(np.float64)


# -- top-k ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("vocab, id_dtype", [(512, np.uint16), (65536, np.uint16), (65537, np.uint32)])
def test_ids_are_stored_ascending_as_gaps_exact_and_as_narrow_as_the_vocab_allows(vocab, id_dtype):
    g = torch.Generator().manual_seed(1)
    ids = torch.stack([torch.randperm(vocab, generator=g)[:16] for _ in range(32)])
    ids[0, 0] = vocab - 1  # the largest id must survive the narrow dtype
    logits = torch.randn(32, 16, generator=g)
    stored = encode_topk(logits, ids, TopKScheme(k=16, vocab_size=vocab))
    assert stored["topk_ids"].numpy().dtype == id_dtype
    np.testing.assert_array_equal(stored["topk_ids"].numpy().astype(np.int64).cumsum(-1), np.sort(ids.numpy(), axis=-1))
    decoded = decode_topk(stored, TopKScheme(k=16, vocab_size=vocab))
    assert decoded.ids.dtype == torch.int64
    np.testing.assert_array_equal(decoded.ids.numpy(), np.sort(ids.numpy(), axis=-1))


def test_encoding_does_not_depend_on_the_order_the_top_k_arrive_in():
    vals, ids, _ = top_k(peaked_logits(2, 16, 1000, 2.0, 8.0), 32)
    perm = torch.randperm(32, generator=torch.Generator().manual_seed(3))
    scheme = TopKScheme(k=32, vocab_size=1000)
    a, b = encode_topk(vals, ids, scheme), encode_topk(vals[:, perm], ids[:, perm], scheme)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)


def test_uint8_values_decode_within_half_a_step():
    vals, ids, exact = top_k(peaked_logits(4, 256, 4096, 3.0, 10.0), 256)
    scheme = TopKScheme(k=256, vocab_size=4096)
    stored = encode_topk(vals, ids, scheme)
    assert stored["topk_values"].dtype == torch.uint8 and stored["topk_step"].dtype == torch.float16
    step = stored["topk_step"].numpy().astype(np.float64)[:, None]
    assert (step >= scheme.min_step).all()
    decoded = numpy_decode_topk(stored, "uint8")
    assert (np.abs(decoded - exact) <= step / 2 + float32_slack(exact)).all()
    # The largest logit is stored exactly (q = 0), so the mode of the distribution never moves.
    np.testing.assert_array_equal(stored["topk_max"].numpy(), vals[:, 0].numpy())
    np.testing.assert_allclose(decode_topk(stored, scheme).logits.numpy(), decoded, rtol=0, atol=1e-5)


def test_uint8_step_adapts_so_a_40_nat_span_does_not_clip():
    # 255 levels of the minimum step cover only 255/16 ~ 16 nats; a peaked teacher's top-k can span 40.
    logits = torch.linspace(0.0, -40.0, 64).repeat(4, 1)
    ids = torch.arange(64).repeat(4, 1)
    scheme = TopKScheme(k=64, vocab_size=100)
    stored = encode_topk(logits, ids, scheme)
    step = float(stored["topk_step"][0])
    # span / 255, rounded to its stored fp16 value (which may round down by a hair)
    assert step > scheme.min_step and abs(255 * step - 40.0) <= step / 2
    decoded = numpy_decode_topk(stored, "uint8")
    assert np.abs(decoded - logits.numpy()).max() <= step / 2 + 1e-5
    assert decoded.min() < -40.0 + step  # the tail is where it was, not cut off at ~-16


@pytest.mark.parametrize("values, mantissa_bits", [("fp16", 10), ("bf16", 7)])
def test_fp16_and_bf16_values_decode_within_half_an_ulp_of_the_gap(values, mantissa_bits):
    vals, ids, exact = top_k(peaked_logits(5, 128, 4096, 3.0, 10.0), 64)
    stored = encode_topk(vals, ids, TopKScheme(k=64, vocab_size=4096, values=values))
    assert stored["topk_values"].dtype == torch.uint16 and "topk_step" not in stored
    decoded = numpy_decode_topk(stored, values)
    gap = stored["topk_max"].numpy().astype(np.float64)[:, None] - exact
    # Round to nearest keeps the relative error within half a unit in the last place: 2^-(mantissa+1).
    bound = gap * 2.0 ** -(mantissa_bits + 1) + float32_slack(exact)
    assert (np.abs(decoded - exact) <= bound).all()


@pytest.mark.parametrize("values", ["uint8", "fp16", "bf16"])
def test_a_smaller_k_keeps_the_largest_decoded_logits(values):
    scheme = TopKScheme(k=64, vocab_size=4096, values=values)
    # Logits a quarter nat apart, so that the teacher's own top 16 are well defined after fp16 rounding.
    g = torch.Generator().manual_seed(6)
    ids = torch.stack([torch.randperm(4096, generator=g)[:64] for _ in range(32)])
    vals = 5.0 - 0.25 * torch.arange(64.0).repeat(32, 1)
    stored = encode_topk(vals, ids, scheme)
    full = decode_topk(stored, scheme)
    small = decode_topk(stored, scheme, k=16)
    assert small.ids.shape == (32, 16)
    # The k' kept values are the k' largest of the full decode, and each keeps its own id.
    np.testing.assert_array_equal(np.sort(small.logits.numpy(), -1), np.sort(full.logits.numpy(), -1)[:, -16:])
    lookup = [dict(zip(i.tolist(), v.tolist())) for i, v in zip(full.ids, full.logits)]
    for row, (i, v) in enumerate(zip(small.ids, small.logits)):
        assert [lookup[row][x] for x in i.tolist()] == v.tolist()
    if values == "fp16":  # precise enough to single out the teacher's own top 16 ids
        np.testing.assert_array_equal(np.sort(small.ids.numpy(), -1), np.sort(ids[:, :16].numpy(), -1))


@pytest.mark.parametrize("spread, peak", [(3.0, 10.0), (8.0, 12.0)])
def test_uint8_kl_at_t2_is_within_the_quantisation_bound(spread, peak):
    """KL(exact || decoded) of the renormalised top-256 at T=2.

    With rounding errors e_i (|e_i| <= step/2, the top entry exact), KL = E_p[e/T] + log E_p[exp(-e/T)]:
    Hoeffding bounds it by step^2/(8 T^2) for every token, and for errors spread uniformly over the
    step its mean is ~Var_p(e)/(2 T^2) <= step^2/(24 T^2). spread 8 gives top-256 spans over 16 nats,
    where the step grows past its 1/16 minimum."""
    t, k = 2.0, 256
    vals, ids, exact = top_k(peaked_logits(7, 512, 8192, spread, peak), k)
    stored = encode_topk(vals, ids, TopKScheme(k=k, vocab_size=8192))
    step = stored["topk_step"].numpy().astype(np.float64)
    decoded = numpy_decode_topk(stored, "uint8")

    def log_softmax(x):
        x = x / t
        return x - np.logaddexp.reduce(x, axis=-1, keepdims=True)

    p, q = log_softmax(exact), log_softmax(decoded)
    kl = (np.exp(p) * (p - q)).sum(-1)
    assert (kl >= -1e-12).all()
    assert (kl <= step ** 2 / (8 * t * t) + 1e-12).all()
    assert kl.mean() <= (step ** 2 / (24 * t * t)).mean()
    if spread == 8.0:
        assert (step > 1 / 16).any()  # the adaptive-step branch is what this case measures


# -- hidden states ---------------------------------------------------------------------------------

def hidden_states(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(64, 48, generator=g) * 3.0
    h[0, :4] = torch.tensor([0.0, 1e-6, -250.0, 4000.0])  # zero, tiny and large entries
    h[1] = 0.0  # an all-zero token (int8 scale must not divide by zero)
    return h


def test_hidden_bf16_is_the_rounded_top_half_of_float32_within_2_pow_minus_8():
    h = hidden_states(8)
    stored = encode_hidden(h, "bf16")
    assert set(stored) == {"values"} and stored["values"].dtype == torch.uint16
    bits = h.numpy().view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)  # round to nearest even
    np.testing.assert_array_equal(stored["values"].numpy(), rounded)
    decoded = decode_hidden(stored["values"], None, "bf16").numpy()
    assert (np.abs(decoded - h.numpy()) <= np.abs(h.numpy()) * 2.0 ** -8).all()


def test_hidden_fp16_within_2_pow_minus_11_relative():
    h = hidden_states(9)
    stored = encode_hidden(h, "fp16")
    assert stored["values"].dtype == torch.float16
    decoded = decode_hidden(stored["values"], None, "fp16").numpy()
    bound = np.maximum(np.abs(h.numpy()) * 2.0 ** -11, 2.0 ** -25)  # 2^-25: half the subnormal spacing
    assert (np.abs(decoded - h.numpy()) <= bound).all()


def test_hidden_int8_within_half_a_step_of_the_per_token_scale():
    h = hidden_states(10)
    stored = encode_hidden(h, "int8")
    assert stored["values"].dtype == torch.int8 and stored["scale"].dtype == torch.float32
    amax = h.abs().amax(-1).numpy()
    nonzero = amax > 0
    np.testing.assert_allclose(stored["scale"].numpy()[nonzero], amax[nonzero] / 127, rtol=1e-6)
    assert np.abs(stored["values"].numpy()).max() <= 127
    decoded = decode_hidden(stored["values"], stored["scale"], "int8").numpy()
    np.testing.assert_allclose(decoded, stored["values"].numpy() * stored["scale"].numpy()[:, None], rtol=1e-6)
    bound = stored["scale"].numpy()[:, None] / 2 * (1 + 1e-5)
    assert (np.abs(decoded - h.numpy()) <= bound).all()
    assert (decoded[1] == 0).all()


def test_sorted_ids_are_stored_as_gaps_and_decode_exactly():
    from sad_pipe.storage.codecs import id_gaps, ids_from_gaps

    torch.manual_seed(0)
    ids = torch.stack([torch.randperm(151_936)[:256].sort().values for _ in range(5)])
    gaps = id_gaps(ids)
    assert (gaps >= 0).all() and gaps[:, 0].equal(ids[:, 0]) and int(gaps[:, 1:].max()) < 151_936
    assert torch.equal(ids_from_gaps(gaps.to(torch.uint32)), ids)


def test_draws_become_distinct_ids_with_counts():
    from sad_pipe.storage.codecs import decode_samples, encode_samples

    draws = torch.tensor([[3, 3, 5, 9, 9, 9, 7000, 7001], [1] * 8, [0, 1, 2, 3, 4, 5, 6, 7]])
    got = encode_samples(draws, "sample", TopKScheme(k=8, vocab_size=8192))
    assert got["sample_ids"].dtype == torch.uint16 and got["sample_counts"].dtype == torch.uint8
    ids, counts = decode_samples(got, "sample")
    assert ids[0].tolist() == [3, 5, 9, 7000, 7001, 7001, 7001, 7001] and counts[0].tolist() == [2, 1, 3, 1, 1, 0, 0, 0]
    assert ids[1].tolist() == [1] * 8 and counts[1].tolist() == [8, 0, 0, 0, 0, 0, 0, 0]
    assert counts[2].tolist() == [1] * 8 and (counts.sum(-1) == 8).all()
