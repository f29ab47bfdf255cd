"""Harness for the PyTorch reference model: SwissArmyTransformer (SAT) 0.4.12 ``GLM130B``, on CPU, in fp32.

This module is the project's single place where SAT is imported, patched and driven. The parity tests and the
benchmarks use it; benchmarks put the repository root on ``sys.path`` and ``import tests.sat_reference``.

SAT 0.4.12 does not run on a CPU-only machine as shipped (see shared/reference/peers-on-cpu.md §1).
``_import_sat()`` applies the patches, once per process:

* a stub module for ``sat.model.position_embedding.triton_rotary`` (it imports triton unguarded; GLM130B never
  uses it);
* ``torch.cuda.current_device`` returns ``"cpu"`` (SAT uses it as a device argument). This is a process-wide
  patch of torch;
* ``SelfAttentionWithFP32SoftmaxMixin.attention_fn`` is re-compiled from its own source with the mask made bool
  (0.4.12 casts the mask to the parameter dtype before this method, and ``masked_fill_`` needs bool) and the
  ``.half()`` cast of the probabilities made ``.type_as(value_layer)``;
* ``torch.distributed`` is initialised (gloo, world size 1, file store) if it is not already.

Building a ``GLM130B`` also flips torch's legacy JIT flags (``GLM130B.__init__`` does that; process-wide).

Conventions at this module's boundary (numpy in, numpy out):

* ``tokens``: int ``[b, s]``; ``position_ids``: int ``[b, s]`` (1-D RoPE) or ``[b, 2, s]`` (2-D RoPE);
* ``attention_mask_may_attend``: bool ``[b or 1, 1, s_q, s_k]`` with **True = may attend** (this project's
  convention). It is inverted here, because SAT/GLM-130B use True = masked;
* mems: SAT's stacked key/value cache ``[L, b, mem_len, 2*H]`` (``H = heads * head_dim``); each row of the last
  axis is laid out ``[(k|v), heads, head_dim]``: all K heads (after RoPE) first, then all V heads. This is what
  ``sat.generation.autoregressive_sampling.update_mems`` builds.

Incremental decoding as GLM-130B's ``batch_filling_sequence`` does it::

    logits, mems = sat_forward(model, tok[:, :C], pos[..., :C], may[..., :C, :C])
    for t in range(C, T):
        logits, mems = sat_forward(model, tok[:, t:t+1], pos[..., t:t+1], may[..., t:t+1, :t+1], mems=mems)
"""

from __future__ import annotations

import argparse
import atexit
import inspect
import os
import shutil
import sys
import tempfile
import textwrap
import types
from typing import Any

import numpy as np
import torch

SAT_VERSION = "0.4.12"

# max_memory_length used by GLM-130B's generation code (no truncation in practice).
MAX_MEMORY_LENGTH = 100000

_SAT_MODULES: dict[str, Any] | None = None

_TRITON_STUB_NAME = "sat.model.position_embedding.triton_rotary"

# (old, new) textual edits to SelfAttentionWithFP32SoftmaxMixin.attention_fn; each old must occur exactly once.
_ATTENTION_FN_EDITS = (
    (
        "attention_scores.masked_fill_(attention_mask, -10000.0)",
        "attention_scores.masked_fill_(attention_mask.bool(), -10000.0)",
    ),
    (
        "attention_probs = attention_probs.half()",
        "attention_probs = attention_probs.type_as(value_layer)",
    ),
)


def _cpu_current_device() -> str:
    return "cpu"


def _install_triton_stub() -> None:
    """Registers a stand-in for SAT's triton rotary kernel module (imports triton unguarded)."""
    if _TRITON_STUB_NAME in sys.modules:
        return
    import importlib.util

    if importlib.util.find_spec("triton") is not None:
        return  # the real module can be imported
    stub = types.ModuleType(_TRITON_STUB_NAME)
    stub.__doc__ = "Stub installed by tests/sat_reference.py: triton is not installed; GLM130B does not use it."

    def apply_rotary(*args, **kwargs):
        raise NotImplementedError("triton is not installed; sat's triton rotary kernel is stubbed out")

    stub.apply_rotary = apply_rotary
    sys.modules[_TRITON_STUB_NAME] = stub


def _patch_attention_fn(mixin_cls, module) -> None:
    """Re-creates ``mixin_cls.attention_fn`` from its source with the CPU/fp32 fixes."""
    if getattr(mixin_cls.attention_fn, "_glm_jax_patched", False):
        return
    src = textwrap.dedent(inspect.getsource(mixin_cls.attention_fn))
    for old, new in _ATTENTION_FN_EDITS:
        n = src.count(old)
        if n != 1:
            raise RuntimeError(
                f"SAT attention_fn source changed: expected exactly one occurrence of {old!r}, found {n}. "
                f"This harness was written for SAT {SAT_VERSION}."
            )
        src = src.replace(old, new)
    namespace: dict[str, Any] = {}
    code = compile(src, f"<sat_reference: patched {mixin_cls.__name__}.attention_fn>", "exec")
    exec(code, module.__dict__, namespace)  # globals of glm130B_model: math, torch, F, mpu, ...
    fn = namespace["attention_fn"]
    fn._glm_jax_patched = True
    fn.__qualname__ = f"{mixin_cls.__name__}.attention_fn"
    mixin_cls.attention_fn = fn


def _init_distributed() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        return
    tmpdir = tempfile.mkdtemp(prefix="sat_reference_pg_")
    atexit.register(shutil.rmtree, tmpdir, True)
    dist.init_process_group(
        "gloo", init_method="file://" + os.path.join(tmpdir, "init"), rank=0, world_size=1
    )


def _import_sat() -> dict[str, Any]:
    """Imports and patches SAT for a CPU fp32 run. Idempotent: the result is cached."""
    global _SAT_MODULES
    if _SAT_MODULES is not None:
        return _SAT_MODULES

    _install_triton_stub()
    torch.cuda.current_device = _cpu_current_device

    import sat  # noqa: F401

    if getattr(sat, "__version__", None) != SAT_VERSION:
        raise RuntimeError(f"tests/sat_reference.py needs SAT {SAT_VERSION}, found {getattr(sat, '__version__', '?')}")
    import sat.model.official.glm130B_model as glm_mod
    import sat.quantization.kernels as quantization_kernels
    from sat.generation.autoregressive_sampling import update_mems
    from sat.ops.scaled_mask_softmax import FusedScaleMaskSoftmax
    from sat.transformer_defaults import ARGS_DEFAULT

    _patch_attention_fn(glm_mod.SelfAttentionWithFP32SoftmaxMixin, glm_mod)
    _init_distributed()

    _SAT_MODULES = {
        "sat": sat,
        "glm130B_model": glm_mod,
        "GLM130B": glm_mod.GLM130B,
        "update_mems": update_mems,
        # quantize(model, bits) runs on CPU; its INT4 packer and weight extraction need CUDA (cpm_kernels)
        "quantization": quantization_kernels,
        "ARGS_DEFAULT": ARGS_DEFAULT,
        # None when apex is absent; the models built here never use it either way (see build_sat_glm130b).
        "FusedScaleMaskSoftmax": FusedScaleMaskSoftmax,
    }
    return _SAT_MODULES


def fused_softmax_available() -> bool:
    """Whether SAT found apex's FusedScaleMaskSoftmax (the harness disables it on every model it builds)."""
    return _import_sat()["FusedScaleMaskSoftmax"] is not None


def _make_args(
    *,
    num_layers: int,
    hidden_size: int,
    num_attention_heads: int,
    inner_hidden_size: int,
    vocab_size: int,
    max_sequence_length: int,
    position_encoding_2d: bool,
    layernorm_epsilon: float,
) -> argparse.Namespace:
    return argparse.Namespace(
        # model shape
        num_layers=num_layers,
        hidden_size=hidden_size,
        num_attention_heads=num_attention_heads,
        inner_hidden_size=inner_hidden_size,
        hidden_size_per_attention_head=None,
        vocab_size=vocab_size,
        max_sequence_length=max_sequence_length,
        layernorm_order="post",
        layernorm_epsilon=layernorm_epsilon,
        # GLM130B-specific
        position_encoding_2d=position_encoding_2d,
        no_glu=False,
        fp16=False,
        bf16=False,
        # build mode
        model_parallel_size=1,
        skip_init=True,
        use_gpu_initialization=False,
        # None makes sat's _simple_init skip set_random_seed (which would reseed random/numpy/torch globally)
        seed=None,
        # everything BaseModel reads through transformer_defaults.ARGS_DEFAULT (0.4.12), set explicitly
        hidden_dropout=0.0,
        attention_dropout=0.0,
        drop_path=0.0,
        checkpoint_activations=False,
        checkpoint_num_layers=1,
        checkpoint_skip_layers=0,
        is_decoder=False,
        cross_attn_hidden_size=None,
        cross_hidden_size_per_attention_head=None,
        use_final_layernorm=True,
        use_bias=True,
        use_qkv_bias=False,  # qkv bias exists anyway: SelfAttention uses bias=use_bias or use_qkv_bias
        num_multi_query_heads=0,
        cross_num_multi_query_heads=0,
        row_parallel_linear_final_bias=True,
        is_gated_mlp=False,
        is_rotary_emb=False,
        parallel_output=False,
        num_experts=1,
    )


def _fill_parameters(model: torch.nn.Module, seed: int, init_std: float) -> None:
    """Overwrites every parameter with values drawn from a generator seeded by ``seed``.

    Matrices and embeddings ~ N(0, init_std); 1-D ``weight`` (LayerNorm scales) ~ 1 + 0.1 N(0, 1);
    1-D ``bias`` (LayerNorm and linear biases) ~ 0.02 N(0, 1).
    """
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if p.ndim >= 2:
                val = noise * init_std
            elif name.endswith("weight"):
                val = 1.0 + 0.1 * noise
            elif name.endswith("bias"):
                val = 0.02 * noise
            else:
                raise RuntimeError(f"unexpected parameter {name} with shape {tuple(p.shape)}")
            p.copy_(val)


def build_sat_glm130b(
    *,
    num_layers: int,
    hidden_size: int,
    num_attention_heads: int,
    inner_hidden_size: int,
    vocab_size: int,
    max_sequence_length: int,
    position_encoding_2d: bool = False,
    layernorm_epsilon: float = 1e-5,
    seed: int = 0,
    init_std: float = 0.02,
) -> torch.nn.Module:
    """Builds SAT's GLM130B on CPU in fp32 with every parameter randomised from ``seed``; returns it in eval mode.

    The global torch RNG is left as it was (SAT's own init draws happen under ``fork_rng``).
    """
    mods = _import_sat()
    args = _make_args(
        num_layers=num_layers,
        hidden_size=hidden_size,
        num_attention_heads=num_attention_heads,
        inner_hidden_size=inner_hidden_size,
        vocab_size=vocab_size,
        max_sequence_length=max_sequence_length,
        position_encoding_2d=position_encoding_2d,
        layernorm_epsilon=layernorm_epsilon,
    )
    missing = sorted({v[0] for v in mods["ARGS_DEFAULT"].values()} - set(vars(args)))
    if missing:
        raise RuntimeError(f"SAT's ARGS_DEFAULT reads args this harness does not set: {missing}")

    with torch.random.fork_rng(devices=[]):
        model = mods["GLM130B"](args)
    # reinit() rebuilt dense_h_to_4h in fp16, uninitialised: bring everything to fp32 before filling.
    model = model.float()

    softmax_mixin = model.get_mixin("fp32-softmax")
    # Force SAT's non-apex softmax path (the one patched above) even where apex is installed.
    softmax_mixin.scale_mask_softmax = None

    _fill_parameters(model, seed, init_std)
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32, (name, p.dtype)
    model.eval()
    return model


def sat_module(name: str):
    """One of SAT's modules as _import_sat patched and imported them (e.g. 'quantization')."""
    return _import_sat()[name]


def set_rope_inv_freq(model: torch.nn.Module, inv_freq: np.ndarray) -> None:
    """Replaces SAT's rotary ``inv_freq`` buffer by the given float32 values and drops its cached cos/sin table, so
    that the next forward rebuilds the table from them.

    SAT computes ``inv_freq`` with torch's float32 ``pow``, whose last bits depend on the SIMD code torch picks for
    this CPU; at position 2047 one ulp of ``inv_freq`` moves an angle by ~1e-4 rad. A logit comparison at long
    positions gives SAT the table under test this way, so that it checks the model rather than two ``pow``s (the
    tables themselves are compared in tests/test_rope.py).
    """
    rotary = model.get_mixin("rotary-embedding").rotary_emb
    if tuple(rotary.inv_freq.shape) != np.shape(inv_freq):
        raise ValueError(f"inv_freq must have shape {tuple(rotary.inv_freq.shape)}, got {np.shape(inv_freq)}")
    # float32 even after model.half(): SAT builds the table in fp32 and casts it to the activations' dtype
    rotary.inv_freq = torch.from_numpy(np.array(inv_freq, np.float32))
    rotary.max_seq_len_cached = rotary.cos_cached = rotary.sin_cached = None


def model_uses_2d_positions(model: torch.nn.Module) -> bool:
    return bool(model.get_mixin("rotary-embedding").position_encoding_2d)


def _as_tensor(x, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.to(dtype)
    return torch.from_numpy(np.ascontiguousarray(x)).to(dtype)


def sat_update_mems(per_layer_mem_kv, mems):
    """SAT's own ``update_mems``: stacks the per-layer ``[b, s, 2H]`` caches and appends them to ``mems``.

    ``per_layer_mem_kv``: list (one per layer) of ``[b, s, 2H]`` arrays/tensors, or the per-layer output dicts
    (``{"mem_kv": ...}``) that SAT's forward returns. ``mems``: ``None`` or ``[L, b, mem_len, 2H]``.
    Returns numpy float32 ``[L, b, mem_len + s, 2H]``.
    """
    update_mems = _import_sat()["update_mems"]
    hiddens = [
        _as_tensor(h["mem_kv"] if isinstance(h, dict) else h, torch.float32) for h in per_layer_mem_kv
    ]
    mems_t = None if mems is None else _as_tensor(mems, torch.float32)
    with torch.no_grad():
        out = update_mems(hiddens, mems_t, MAX_MEMORY_LENGTH)
    return out.contiguous().numpy()


def sat_forward_raw(model, tokens, position_ids, attention_mask_may_attend, mems=None):
    """One SAT forward. Returns ``(logits [b, s, V] float32 numpy, list of per-layer mem_kv [b, s, 2H] numpy)``.

    The per-layer mem_kv are only this call's new tokens (what SAT's forward returns), not the full cache.
    """
    _import_sat()
    tok = _as_tensor(tokens, torch.long)
    pos = _as_tensor(position_ids, torch.long)
    may = np.asarray(attention_mask_may_attend) if not isinstance(attention_mask_may_attend, torch.Tensor) \
        else attention_mask_may_attend.numpy()
    if may.dtype != np.bool_:
        raise TypeError(f"attention_mask_may_attend must be bool (True = may attend), got {may.dtype}")
    if tok.ndim != 2:
        raise ValueError(f"tokens must be [b, s], got {tuple(tok.shape)}")
    b, s = tok.shape
    want_pos = (b, 2, s) if model_uses_2d_positions(model) else (b, s)
    if tuple(pos.shape) != want_pos:
        raise ValueError(f"position_ids must be {want_pos} for this model, got {tuple(pos.shape)}")
    mem_len = 0
    mems_t = None
    if mems is not None:
        mems_t = _as_tensor(mems, torch.float32)
        if mems_t.ndim != 4:
            raise ValueError(f"mems must be [L, b, mem_len, 2H], got {tuple(mems_t.shape)}")
        mem_len = mems_t.shape[2]
    if may.ndim != 4 or may.shape[1] != 1 or may.shape[0] not in (1, b) or may.shape[2:] != (s, mem_len + s):
        raise ValueError(
            f"attention_mask_may_attend must be [b or 1, 1, {s}, {mem_len + s}], got {tuple(may.shape)}"
        )
    sat_mask = torch.from_numpy(np.ascontiguousarray(~may))  # SAT: True = masked

    with torch.no_grad():
        logits, *per_layer = model(tok, pos, sat_mask, mems=mems_t)
    logits_np = logits.float().contiguous().numpy()
    mem_kv = [d["mem_kv"].float().contiguous().numpy() for d in per_layer]
    return logits_np, mem_kv


def sat_forward(model, tokens, position_ids, attention_mask_may_attend, mems=None):
    """One SAT forward (full, or an incremental step when ``mems`` is given), under ``torch.no_grad()``.

    Returns ``(logits, new_mems)``: logits float32 numpy ``[b, s, V]``; new_mems float32 numpy
    ``[L, b, mem_len + s, 2H]`` (the old cache with this call's keys/values appended, via SAT's update_mems).
    With ``mems``, the mask must cover ``s`` query rows and ``mem_len + s`` key columns.
    """
    logits, mem_kv = sat_forward_raw(model, tokens, position_ids, attention_mask_may_attend, mems=mems)
    return logits, sat_update_mems(mem_kv, mems)


def state_dict_numpy(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """fp32 numpy copies of the model's parameters, keyed as in its state dict (buffers such as the rotary
    ``inv_freq`` are left out)."""
    params = dict(model.named_parameters())
    out = {}
    for k, v in model.state_dict().items():
        if k in params:
            out[k] = v.detach().float().numpy().copy()
    missing = set(params) - set(out)
    if missing:
        raise RuntimeError(f"parameters absent from state_dict: {sorted(missing)}")
    return out


def load_state_dict_numpy(model: torch.nn.Module, sd: dict[str, np.ndarray]) -> None:
    """Loads numpy parameters into ``model``; raises ValueError on any missing/unexpected key or shape mismatch."""
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(sd))
    unexpected = sorted(set(sd) - set(params))
    if missing or unexpected:
        raise ValueError(f"state dict mismatch: missing={missing} unexpected={unexpected}")
    bad = [
        (k, tuple(np.shape(sd[k])), tuple(p.shape)) for k, p in params.items() if tuple(np.shape(sd[k])) != tuple(p.shape)
    ]
    if bad:
        raise ValueError(f"state dict shape mismatch (key, given, expected): {bad}")
    full = {k: v for k, v in model.state_dict().items() if k not in params}  # keep buffers as they are
    full.update({k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in sd.items()})
    result = model.load_state_dict(full, strict=True)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"load_state_dict: missing={result.missing_keys} unexpected={result.unexpected_keys}")
