"""Self-test of tests/sat_reference.py: SAT 0.4.12 GLM130B on CPU in fp32."""

import numpy as np
import pytest
import torch

from tests import sat_reference as R

torch.set_num_threads(1)

TINY = dict(
    num_layers=2,
    hidden_size=64,
    num_attention_heads=4,
    inner_hidden_size=170,
    vocab_size=128,
    max_sequence_length=64,
    # 0.02 (the default) leaves a hidden-64 model's attention almost uniform: RoPE and the mask then barely
    # move the logits (~1e-4). 0.1 makes attention position-sensitive.
    init_std=0.1,
)


@pytest.fixture(scope="session")
def model():
    return R.build_sat_glm130b(**TINY, seed=0)


@pytest.fixture(scope="session")
def model_2d():
    return R.build_sat_glm130b(**TINY, position_encoding_2d=True, seed=1)


def generation_mask(context_len: int, total_len: int) -> np.ndarray:
    """[1, 1, T, T] bool, True = may attend: context bidirectional, everything after it causal."""
    may = np.tril(np.ones((total_len, total_len), dtype=bool))
    may[:, :context_len] = True
    return may[None, None]


def _inputs(batch=2, context_len=7, total_len=12, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, TINY["vocab_size"], size=(batch, total_len))
    # [MASK]-style positions: the context counts up, <sop> and generated tokens repeat the mask's position.
    pos = np.arange(total_len)
    pos[context_len - 1:] = context_len - 3
    pos = np.broadcast_to(pos, (batch, total_len)).copy()
    return tokens, pos, generation_mask(context_len, total_len)


def _decode_incrementally(model, tokens, pos, may, context_len):
    T = tokens.shape[1]
    logits, mems = R.sat_forward(
        model, tokens[:, :context_len], pos[..., :context_len], may[..., :context_len, :context_len]
    )
    rows = [logits[:, -1]]
    for t in range(context_len, T):
        logits, mems = R.sat_forward(
            model, tokens[:, t:t + 1], pos[..., t:t + 1], may[..., t:t + 1, :t + 1], mems=mems
        )
        assert logits.shape[1] == 1
        rows.append(logits[:, 0])
    return np.stack(rows, axis=1), mems


def test_model_is_fp32_nontrivial_and_uses_plain_softmax(model):
    assert model.get_mixin("fp32-softmax").scale_mask_softmax is None
    sd = R.state_dict_numpy(model)
    assert all(v.dtype == np.float32 for v in sd.values())
    ln = sd["transformer.layers.0.input_layernorm.weight"]
    assert np.abs(ln - 1).max() > 0.05
    assert np.abs(sd["transformer.layers.1.mlp.dense_h_to_4h.bias"]).max() > 0.01


def test_incremental_decoding_matches_full_forward(model):
    C = 7
    tokens, pos, may = _inputs(context_len=C)
    full, full_mems = R.sat_forward(model, tokens, pos, may)
    assert full.shape == (2, tokens.shape[1], TINY["vocab_size"]) and full.dtype == np.float32
    L, H = TINY["num_layers"], TINY["hidden_size"]
    assert full_mems.shape == (L, 2, tokens.shape[1], 2 * H)

    inc, inc_mems = _decode_incrementally(model, tokens, pos, may, C)
    # torch's products (kernels chosen by the CPU's features) over other row counts: fp32 rounding of the largest value
    np.testing.assert_allclose(inc, full[:, C - 1:], rtol=0, atol=1e-5 * np.abs(full).max())
    np.testing.assert_allclose(inc_mems, full_mems, rtol=0, atol=1e-5 * np.abs(full_mems).max())


def test_mask_convention_true_means_may_attend(model):
    C = 7
    tokens, pos, may = _inputs(context_len=C)
    base, _ = R.sat_forward(model, tokens, pos, may)
    changed = tokens.copy()
    changed[:, C:] = (changed[:, C:] + 1) % TINY["vocab_size"]
    out, _ = R.sat_forward(model, changed, pos, may)
    # Context rows only see the context; rows after it see the changed tokens.
    np.testing.assert_array_equal(out[:, :C], base[:, :C])
    assert np.abs(out[:, C:] - base[:, C:]).max() > 1e-4


def test_2d_positions(model_2d):
    C, T, b = 5, 9, 2
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, TINY["vocab_size"], size=(b, T))
    pos = np.zeros((b, 2, T), dtype=np.int64)
    pos[:, 0] = np.minimum(np.arange(T), C - 2)  # generated tokens at the mask's position
    pos[:, 1, C - 1:] = np.arange(1, T - C + 2)  # block positions count up in the generated span
    may = generation_mask(C, T)
    full, _ = R.sat_forward(model_2d, tokens, pos, may)
    assert full.shape == (b, T, TINY["vocab_size"]) and np.isfinite(full).all()

    inc, _ = _decode_incrementally(model_2d, tokens, pos, may, C)
    np.testing.assert_allclose(inc, full[:, C - 1:], rtol=0, atol=2e-5)

    # The block-position row is used.
    pos2 = pos.copy()
    pos2[:, 1, C - 1:] += 3
    other, _ = R.sat_forward(model_2d, tokens, pos2, may)
    assert np.abs(other[:, C - 1:] - full[:, C - 1:]).max() > 1e-4

    with pytest.raises(ValueError):
        R.sat_forward(model_2d, tokens, pos[:, 0], may)


def test_state_dict_roundtrip(model):
    sd = R.state_dict_numpy(model)
    assert not any("inv_freq" in k for k in sd)
    assert len(sd) == 3 + 12 * TINY["num_layers"]
    assert sd["transformer.layers.0.attention.query_key_value.weight"].shape == (3 * 64, 64)
    assert sd["transformer.layers.0.mlp.dense_h_to_4h.weight"].shape == (2 * 170, 64)

    other = R.build_sat_glm130b(**TINY, seed=123)
    tokens, pos, may = _inputs()
    before, _ = R.sat_forward(other, tokens, pos, may)
    ref, _ = R.sat_forward(model, tokens, pos, may)
    assert np.abs(before - ref).max() > 1e-3

    R.load_state_dict_numpy(other, sd)
    after, _ = R.sat_forward(other, tokens, pos, may)
    np.testing.assert_array_equal(after, ref)
    sd2 = R.state_dict_numpy(other)
    assert sd2.keys() == sd.keys()
    assert all(np.array_equal(sd2[k], sd[k]) for k in sd)

    missing = dict(sd)
    del missing["transformer.final_layernorm.bias"]
    with pytest.raises(ValueError, match="missing"):
        R.load_state_dict_numpy(other, missing)
    extra = dict(sd, **{"transformer.bogus.weight": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="unexpected"):
        R.load_state_dict_numpy(other, extra)
    bad_shape = dict(sd, **{"transformer.final_layernorm.bias": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="shape"):
        R.load_state_dict_numpy(other, bad_shape)


def test_build_is_deterministic_and_leaves_global_rng(model):
    state = torch.random.get_rng_state()
    again = R.build_sat_glm130b(**TINY, seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)
    a, b = R.state_dict_numpy(model), R.state_dict_numpy(again)
    assert all(np.array_equal(a[k], b[k]) for k in a)
