// tp_shard_shapes and the closed-form memory per rank.
#include "opdlm/model/tp_layout.hpp"

#include <algorithm>
#include <cstring>

#include "opdlm/base/error.hpp"

namespace opdlm::model {

parallel::TpPlan tp_plan(const Qwen3Config& c, int tp, int64_t deterministic_shards) {
  parallel::PreflightInput in;
  in.shape = {tp, tp};
  in.num_heads = c.num_attention_heads;
  in.num_kv_heads = c.num_key_value_heads;
  in.intermediate_size = c.intermediate_size;
  in.vocab_size = c.vocab_size;
  in.check_slurm_ntasks = false;
  in.deterministic_shards = deterministic_shards;
  return parallel::preflight(in);
}

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

// ---- sharding -------------------------------------------------------------------------------------

VocabRange vocab_range(const Qwen3Config& c, const parallel::TpPlan& p, int rank) {
  OPDLM_CHECK(rank >= 0 && rank < p.tp, "vocab_range: rank ", rank, " of tp ", p.tp);
  const int64_t begin = int64_t{rank} * p.vocab_per_rank;
  return {begin, std::clamp<int64_t>(c.vocab_size - begin, 0, p.vocab_per_rank)};
}

Qwen3Config shard_config(const Qwen3Config& c, const parallel::TpPlan& p) {
  Qwen3Config s = c;
  s.num_attention_heads = p.heads_per_rank;
  s.num_key_value_heads = p.kv_heads_per_rank;
  s.intermediate_size = p.ffn_per_rank;
  s.vocab_size = p.vocab_per_rank;
  s.bos_token_id = s.eos_token_id = s.pad_token_id = s.mask_token_id = -1;
  return s;
}

namespace {

enum class Cut { rows, cols, none };

// How tensor `name` is cut over TP, and the full extent of the cut dimension per rank.
Cut cut_of(const std::string& name) {
  auto ends = [&](const char* s) { return name.size() >= std::strlen(s) && name.compare(name.size() - std::strlen(s), std::string::npos, s) == 0; };
  if (ends("embed_tokens.weight") || ends("lm_head.weight") || ends("q_proj.weight") || ends("k_proj.weight") ||
      ends("v_proj.weight") || ends("gate_proj.weight") || ends("up_proj.weight"))
    return Cut::rows;
  if (ends("o_proj.weight") || ends("down_proj.weight")) return Cut::cols;
  return Cut::none;
}

bool is_vocab(const std::string& name) {
  return name == "model.embed_tokens.weight" || name == "lm_head.weight";
}

// Copies rows [r0, r0 + nr) of src (2-D) into rows [d0, d0 + nr) of dst, or columns likewise.
void copy_block(const Tensor& src, Tensor& dst, Cut cut, int64_t s0, int64_t d0, int64_t n) {
  const int64_t es = static_cast<int64_t>(dtype_size(src.dtype()));
  const auto* s = static_cast<const char*>(src.raw_data());
  auto* d = static_cast<char*>(dst.raw_data());
  if (cut == Cut::rows) {
    const int64_t row = src.size(1) * es;
    std::memcpy(d + d0 * row, s + s0 * row, size_t(n * row));
  } else {
    for (int64_t i = 0; i < src.size(0); ++i)
      std::memcpy(d + (i * dst.size(1) + d0) * es, s + (i * src.size(1) + s0) * es, size_t(n * es));
  }
}

void refuse_kv_replication(const parallel::TpPlan& p) {
  if (p.kv_replication > 1)
    OPDLM_FAIL("tensor parallel: tp = ", p.tp, " exceeds num_key_value_heads (KV heads replicated on ",
               p.kv_replication, " ranks), which the TP model does not support yet; use tp <= num_key_value_heads");
}

}  // namespace

Qwen3Weights shard_weights(const Qwen3Weights& full, const parallel::TpPlan& p, int rank) {
  refuse_kv_replication(p);
  const Qwen3Config& c = full.config();
  Qwen3Weights out(shard_config(c, p), full.dtype());
  const VocabRange vr = vocab_range(c, p, rank);
  for (size_t i = 0; i < out.tensors().size(); ++i) {
    auto& dst = out.tensors()[i];
    const Tensor& src = full.get(dst.name);
    dst.value.zero();
    const Cut cut = cut_of(dst.name);
    if (cut == Cut::none) {
      std::memcpy(dst.value.raw_data(), src.raw_data(), size_t(src.nbytes()));
    } else if (is_vocab(dst.name)) {
      copy_block(src, dst.value, Cut::rows, vr.begin, 0, vr.real);
    } else {
      const int64_t n = cut == Cut::rows ? dst.value.size(0) : dst.value.size(1);
      copy_block(src, dst.value, cut, int64_t{rank} * n, 0, n);
    }
  }
  return out;
}

ShardBlock shard_block(const std::string& name, const Qwen3Config& c, const parallel::TpPlan& p, int rank) {
  const Cut cut = cut_of(name);
  if (cut == Cut::none) return {};
  if (is_vocab(name)) {
    const VocabRange vr = vocab_range(c, p, rank);
    return {0, vr.begin, vr.real};
  }
  for (const auto& [n, shape] : tp_shard_shapes(c, p))
    if (n == name) {
      const int dim = cut == Cut::rows ? 0 : 1;
      return {dim, int64_t{rank} * shape[size_t(dim)], shape[size_t(dim)]};
    }
  OPDLM_FAIL("shard_block: no tensor '", name, "' in the model");
}

Qwen3Weights unshard_weights(const std::vector<const Qwen3Weights*>& shards, const Qwen3Config& c,
                             const parallel::TpPlan& p) {
  refuse_kv_replication(p);
  OPDLM_CHECK(static_cast<int>(shards.size()) == p.tp, "unshard_weights: ", shards.size(), " shards for tp ", p.tp);
  Qwen3Weights out(c, shards[0]->dtype());
  for (auto& dst : out.tensors()) {
    const Cut cut = cut_of(dst.name);
    for (int r = 0; r < p.tp; ++r) {
      const Tensor& src = shards[size_t(r)]->get(dst.name);
      if (cut == Cut::none) {
        if (r == 0) std::memcpy(dst.value.raw_data(), src.raw_data(), size_t(src.nbytes()));
      } else if (is_vocab(dst.name)) {
        const VocabRange vr = vocab_range(c, p, r);
        copy_block(src, dst.value, Cut::rows, 0, vr.begin, vr.real);
      } else {
        const int64_t n = cut == Cut::rows ? src.size(0) : src.size(1);
        copy_block(src, dst.value, cut, 0, int64_t{r} * n, n);  // out of the shard, into rank r's block
      }
    }
  }
  return out;
}

}  // namespace opdlm::model
