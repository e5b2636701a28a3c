"""gen_model.py -- PyTorch goldens for model::Qwen3Model (forward logits and every parameter gradient).

The reference is torch_qwen3_ref.Qwen3, unmodified, in float64 with weights from opd_ref.init_weights
(float32-representable values, so the f32 C++ model holds exactly the same weights; norm gains
1 + 0.2 noise, so norm gradients matter), run through opd_ref.forward_pos (explicit position ids,
RoPE angles in float64) one sequence at a time with the boolean mask of each row's descriptor
(gen_attention._mask: build_training_mask, or build_mask plus the B 1.5 pad rule). Loss =
sum(logits[rows] * R) for a fixed random R, so the gradients are those of dlogits = R.

Per case "<name>.": config_i (i32 [vocab, hidden, intermediate, layers, heads, kv_heads, head_dim,
tied]), config_f (f64 [rms_norm_eps, rope_theta]), ids / positions (i32 [B, T]), masks (i32 [n, 6]
as in gen_attention), rows (i32 [n_rows] into B*T), dlogits (f64 [n_rows, V]), logits (f64
[n_rows, V]), w.<HF name> (f64 weights), g.<HF name> (f64 gradients; the tied head's in the embedding's).
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gen_attention import BLOCK, CAUSAL, TRAINING, _import_refs, _mask  # noqa: E402

# torch_qwen3_ref cfg keys. A: GQA ratio 3, head_dim 10 != hidden/heads = 4, untied head, theta 1e4.
# B: tied head, head_dim 6 != 16/4, default theta 1e6. C: one kv head (ratio 3), head_dim = hidden/heads.
CONFIGS = {
    "A": (dict(vocab=37, d_model=24, n_layers=2, n_heads=6, n_kv_heads=2, head_dim=10, d_ff=40, eps=1e-6,
               rope_theta=1e4), False),
    "B": (dict(vocab=29, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=6, d_ff=24, eps=1e-6,
               rope_theta=1e6), True),
    "C": (dict(vocab=31, d_model=24, n_layers=1, n_heads=3, n_kv_heads=1, head_dim=8, d_ff=20, eps=1e-5,
               rope_theta=1e4), True),
}


def _hf_name(k):
    return k if k == "lm_head.weight" else "model." + k


def _causal_pos(T, pad_left):
    """Left pads -> 1 (never attended, as opd_ref.position_ids), real tokens 0.. ."""
    return torch.tensor([1] * pad_left + list(range(T - pad_left)), dtype=torch.long)


def _case(w, refs, name, cfg_key, seed, rows_spec, rows):
    """rows_spec: one (descriptor params, position ids [T]) per batch row; rows: logit rows or None."""
    opd_ref, tq_ref = refs
    cfg, tied = CONFIGS[cfg_key]
    model = opd_ref.init_weights(tq_ref.Qwen3(cfg, tied=tied, max_len=64), seed).double()
    gen = torch.Generator().manual_seed(seed)
    params = [p for p, _ in rows_spec]
    B, T = len(rows_spec), len(rows_spec[0][1])
    ids = torch.randint(0, cfg["vocab"], (B, T), generator=gen)
    positions = torch.stack([pos for _, pos in rows_spec])
    logits = torch.cat([opd_ref.forward_pos(model, ids[b], positions[b], _mask(refs, p, T, T))
                        for b, p in enumerate(params)])  # [B*T, V], row b*T + t
    rows = torch.arange(B * T) if rows is None else rows
    sel = logits[rows]
    R = (torch.rand(sel.shape, generator=gen) * 2 - 1).float().double()  # f32-representable
    (sel * R).sum().backward()

    w.add(f"{name}.config_i", torch.tensor([cfg["vocab"], cfg["d_model"], cfg["d_ff"], cfg["n_layers"], cfg["n_heads"],
                                            cfg["n_kv_heads"], cfg["head_dim"], int(tied)], dtype=torch.int32))
    w.add(f"{name}.config_f", torch.tensor([cfg["eps"], cfg["rope_theta"]], dtype=torch.float64))
    w.add(f"{name}.ids", ids)
    w.add(f"{name}.positions", positions)
    w.add(f"{name}.masks", torch.tensor(params, dtype=torch.int32))
    w.add(f"{name}.rows", rows)
    w.add(f"{name}.dlogits", R)
    w.add(f"{name}.logits", sel.detach())
    for k, p in model.named_parameters():  # the tied head is the embedding (named once)
        w.add(f"{name}.w.{_hf_name(k)}", p.detach())
        w.add(f"{name}.g.{_hf_name(k)}", p.grad)


def build(w):
    refs = _import_refs()
    opd_ref, tq_ref = refs
    # The block-diffusion mask of torch_qwen3_ref ('block', grid from position 0) is our
    # block_causal with prompt_len 0: check the two agree before using the descriptor's form.
    ar = torch.arange(11)
    assert torch.equal(tq_ref.build_mask("block", ar, ar, 4), _mask(refs, (BLOCK, 4, 0, 0, 0, 0), 11, 11))

    # (name, config, seed, [(descriptor params, position ids)], rows (None = all))
    P, L1, b, pl = 5, 6, 4, 2            # P % b != 0, partial last block, left pads
    P2, L12, b2, pl2 = 4, 5, 3, 1        # second training row: T = 1 + 4 + 10 = 15
    N1, N2 = pl + P + 2 * L1, pl2 + P2 + 2 * L12
    cases = [
        ("causal", "A", 11, [((CAUSAL, 1, 0, 0, 0, 0), torch.arange(9))], None),
        ("block", "B", 12, [((BLOCK, 4, 0, 0, 0, 0), torch.arange(11))], None),
        # OPD layout: logits only at the noisy-copy rows.
        ("training", "A", 13, [((TRAINING, b, pl, P, L1, 0), opd_ref.position_ids(P, L1, pl))],
         torch.arange(pl + P + L1, N1)),
        ("training_tied_all_rows", "C", 14, [((TRAINING, 2, 2, 3, 4, 0), opd_ref.position_ids(3, 4, 2))], None),
        # Two rows, different descriptors (a training row and a left-padded causal row); logit rows
        # from both, one repeated (its gradient counts twice).
        ("batch2", "B", 15, [((TRAINING, b2, pl2, P2, L12, 0), opd_ref.position_ids(P2, L12, pl2)),
                             ((CAUSAL, 1, 3, 0, 0, 0), _causal_pos(N2, 3))],
         torch.tensor(list(range(pl2 + P2 + L12, N2)) + [N2 + 3, N2 + 7, N2 + 14, N2 + 14])),
        ("block_batch2", "A", 16, [((BLOCK, 3, 2, 5, 0, 0), _causal_pos(12, 2)),
                                   ((BLOCK, 4, 0, 6, 0, 0), torch.arange(12))], None),
    ]
    for name, cfg_key, seed, rows_spec, rows in cases:
        _case(w, refs, name, cfg_key, seed, rows_spec, rows)
    w.add("num_cases", torch.tensor([len(cases)], dtype=torch.int32))
