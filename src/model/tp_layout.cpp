// tp_shard_shapes and the closed-form memory per rank.
#include "opdlm/model/tp_layout.hpp"

#include "opdlm/base/error.hpp"

namespace opdlm::model {

std::vector<std::pair<std::string, Shape>> tp_shard_shapes(const Qwen3Config& c, const parallel::TpPlan& p) {
  const int64_t H = c.hidden_size, hd = c.head_dim;
  const int64_t q = p.heads_per_rank * hd, kv = p.kv_heads_per_rank * hd;
  std::vector<std::pair<std::string, Shape>> s;
  s.push_back({"model.embed_tokens.weight", {p.vocab_per_rank, H}});
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    const std::string n = "model.layers." + std::to_string(i) + ".";
    s.push_back({n + "input_layernorm.weight", {H}});
    s.push_back({n + "self_attn.q_proj.weight", {q, H}});
    s.push_back({n + "self_attn.k_proj.weight", {kv, H}});
    s.push_back({n + "self_attn.v_proj.weight", {kv, H}});
    s.push_back({n + "self_attn.o_proj.weight", {H, q}});
    s.push_back({n + "self_attn.q_norm.weight", {hd}});
    s.push_back({n + "self_attn.k_norm.weight", {hd}});
    s.push_back({n + "post_attention_layernorm.weight", {H}});
    s.push_back({n + "mlp.gate_proj.weight", {p.ffn_per_rank, H}});
    s.push_back({n + "mlp.up_proj.weight", {p.ffn_per_rank, H}});
    s.push_back({n + "mlp.down_proj.weight", {H, p.ffn_per_rank}});
  }
  s.push_back({"model.norm.weight", {H}});
  if (!c.tie_word_embeddings) s.push_back({"lm_head.weight", {p.vocab_per_rank, H}});
  return s;
}

RankMemory memory_per_rank(const Qwen3Config& c, const parallel::TpPlan& p, int dp) {
  OPDLM_CHECK(dp >= 1, "memory_per_rank: dp ", dp);
  const int64_t H = c.hidden_size, hd = c.head_dim, L = c.num_hidden_layers;
  // Per layer: 2 norms of H and 2 of hd (replicated), q and o (H x heads/tp x hd each), k and v
  // (H x kv heads per rank x hd each), gate, up and down (H x F/tp each).
  const int64_t per_layer = 2 * H + 2 * hd + 2 * H * p.heads_per_rank * hd + 2 * H * p.kv_heads_per_rank * hd +
                            3 * H * p.ffn_per_rank;
  RankMemory m;
  m.params = p.vocab_per_rank * H * (c.tie_word_embeddings ? 1 : 2) + L * per_layer + H;
  m.teacher_bytes = 4 * m.params;
  m.student_bytes = 4 * m.params;
  m.grad_bytes = 4 * m.params;
  const int64_t shard = (m.params + dp - 1) / dp;
  m.adam_bytes = 8 * shard;
  m.zero1_step_bytes = 4 * (2 * int64_t{dp} + 2) * shard;
  return m;
}

}  // namespace opdlm::model
