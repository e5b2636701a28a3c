// Block-diffusion rollout sampler: the cached batch decoder, the recompute-everything reference, and
// the per-step reveal rules they share (so the two differ only in how the logits are computed).
#include "opdlm/diffusion/sampler.hpp"

#include <algorithm>
#include <cmath>
#include <exception>
#include <limits>
#include <nlohmann/json.hpp>
#include <numeric>

#include "opdlm/base/error.hpp"
#include "opdlm/parallel/vocab_parallel.hpp"
#include "../ops/cpu/simd_avx2.hpp"

namespace opdlm::diffusion {

const char* strategy_name(Strategy s) {
  switch (s) {
    case Strategy::sequential: return "sequential";
    case Strategy::low_confidence_static: return "low_confidence_static";
    case Strategy::low_confidence_dynamic: return "low_confidence_dynamic";
    case Strategy::entropy_bounded: return "entropy_bounded";
  }
  return "?";
}

Strategy parse_strategy(const std::string& name, const std::string& field) {
  if (name == "sequential") return Strategy::sequential;
  if (name == "low_confidence_static" || name == "static") return Strategy::low_confidence_static;
  if (name == "low_confidence_dynamic" || name == "dynamic") return Strategy::low_confidence_dynamic;
  if (name == "entropy_bounded" || name == "entropy") return Strategy::entropy_bounded;
  OPDLM_FAIL_AT("", field, "unknown strategy '", name,
                "' (expected sequential, low_confidence_static, low_confidence_dynamic or entropy_bounded)");
}

const char* rollout_status_name(RolloutStatus s) {
  switch (s) {
    case RolloutStatus::ok: return "ok";
    case RolloutStatus::empty_prompt: return "empty_prompt";
    case RolloutStatus::prompt_too_long: return "prompt_too_long";
    case RolloutStatus::bad_token_id: return "bad_token_id";
  }
  return "?";
}

int64_t step_quota(int64_t b, int64_t s, int64_t t) {
  OPDLM_CHECK(b >= 1 && s >= 1 && t >= 0 && t < s, "b=", b, " s=", s, " t=", t);
  return b / s + (t < b % s ? 1 : 0);
}

void SamplerOptions::validate(int64_t vocab) const {
  auto in_vocab = [&](int64_t id) { return id >= 0 && id < vocab; };
  if (block_size < 1) OPDLM_FAIL_AT("", "block_size", "must be >= 1, got ", block_size);
  if (steps_per_block < 1) OPDLM_FAIL_AT("", "steps_per_block", "must be >= 1, got ", steps_per_block);
  if (max_new_tokens < 0) OPDLM_FAIL_AT("", "max_new_tokens", "must be >= 0, got ", max_new_tokens);
  if (max_context < 0) OPDLM_FAIL_AT("", "max_context", "must be >= 0 (0 = the model's), got ", max_context);
  if (!std::isfinite(tau)) OPDLM_FAIL_AT("", "tau", "must be finite, got ", tau);
  if (!(entropy_bound >= 0) || !std::isfinite(entropy_bound))
    OPDLM_FAIL_AT("", "entropy_bound", "must be a finite value >= 0, got ", entropy_bound);
  sampling.validate();
  if (!in_vocab(mask_id)) OPDLM_FAIL_AT("", "mask_id", "must be a token id in [0, ", vocab, "), got ", mask_id);
  if (eos_id != -1 && !in_vocab(eos_id))
    OPDLM_FAIL_AT("", "eos_id", "must be -1 or a token id in [0, ", vocab, "), got ", eos_id);
  if (eos_id == mask_id) OPDLM_FAIL_AT("", "eos_id", "equals mask_id ", mask_id);
  if (!in_vocab(pad_id)) OPDLM_FAIL_AT("", "pad_id", "must be a token id in [0, ", vocab, "), got ", pad_id);
  // RNG positions j * s + t must stay distinct in 32 bits.
  const int64_t slots = (max_new_tokens + block_size - 1) / block_size * block_size;
  if (static_cast<double>(slots) * static_cast<double>(steps_per_block) > 4294967295.0)
    OPDLM_FAIL_AT("", "max_new_tokens", "max_new_tokens (rounded to blocks) x steps_per_block = ", slots, " x ",
                  steps_per_block, " exceeds the 32-bit RNG position space");
}

bool SamplerOptions::operator==(const SamplerOptions& x) const {
  return block_size == x.block_size && steps_per_block == x.steps_per_block && max_new_tokens == x.max_new_tokens &&
         max_context == x.max_context && strategy == x.strategy && tau == x.tau && entropy_bound == x.entropy_bound &&
         sampling.temperature == x.sampling.temperature && sampling.top_k == x.sampling.top_k &&
         sampling.top_p == x.sampling.top_p && mask_id == x.mask_id && eos_id == x.eos_id && pad_id == x.pad_id &&
         seed == x.seed && step == x.step;
}

nlohmann::json sampler_options_to_json(const SamplerOptions& o) {
  return nlohmann::json{{"block_size", o.block_size},
                        {"steps_per_block", o.steps_per_block},
                        {"max_new_tokens", o.max_new_tokens},
                        {"max_context", o.max_context},
                        {"strategy", strategy_name(o.strategy)},
                        {"tau", o.tau},
                        {"entropy_bound", o.entropy_bound},
                        {"temperature", o.sampling.temperature},
                        {"top_k", o.sampling.top_k},
                        {"top_p", o.sampling.top_p},
                        {"mask_id", o.mask_id},
                        {"eos_id", o.eos_id},
                        {"pad_id", o.pad_id},
                        {"seed", o.seed},
                        {"step", o.step}};
}

SamplerOptions sampler_options_from_json(const nlohmann::json& j, const std::string& src) {
  if (!j.is_object()) OPDLM_FAIL_AT(src, "", "sampler settings must be a JSON object");
  auto field = [&](const char* key) -> const nlohmann::json& {
    if (!j.contains(key)) OPDLM_FAIL_AT(src, key, "required field is missing");
    return j[key];
  };
  auto integer = [&](const char* key, int64_t lo, int64_t hi) {
    const auto& v = field(key);
    if (!v.is_number_integer() || v.get<int64_t>() < lo || v.get<int64_t>() > hi)
      OPDLM_FAIL_AT(src, key, "expected an integer in [", lo, ", ", hi, "], got ", v.dump());
    return v.get<int64_t>();
  };
  auto number = [&](const char* key) {
    const auto& v = field(key);
    if (!v.is_number()) OPDLM_FAIL_AT(src, key, "expected a number, got ", v.dump());
    return v.get<double>();
  };
  constexpr int64_t i64max = std::numeric_limits<int64_t>::max();
  constexpr int64_t i32max = std::numeric_limits<int32_t>::max(), u32max = std::numeric_limits<uint32_t>::max();
  SamplerOptions o;
  o.block_size = integer("block_size", 1, i64max);
  o.steps_per_block = integer("steps_per_block", 1, i64max);
  o.max_new_tokens = integer("max_new_tokens", 0, i64max);
  o.max_context = integer("max_context", 0, i64max);
  const auto& st = field("strategy");
  if (!st.is_string()) OPDLM_FAIL_AT(src, "strategy", "expected a string, got ", st.dump());
  o.strategy = parse_strategy(st.get<std::string>(), "strategy");
  o.tau = number("tau");
  o.entropy_bound = number("entropy_bound");
  o.sampling.temperature = number("temperature");
  o.sampling.top_k = integer("top_k", 0, i64max);
  o.sampling.top_p = number("top_p");
  o.mask_id = static_cast<int32_t>(integer("mask_id", -1, i32max));
  o.eos_id = static_cast<int32_t>(integer("eos_id", -1, i32max));
  o.pad_id = static_cast<int32_t>(integer("pad_id", -1, i32max));
  o.seed = static_cast<uint32_t>(integer("seed", 0, u32max));
  o.step = static_cast<uint32_t>(integer("step", 0, u32max));
  return o;
}

std::vector<size_t> select_reveals(std::span<const SlotDraw> d, const SamplerOptions& o, int64_t t) {
  const size_t m = d.size();
  const int64_t b = o.block_size, s = o.steps_per_block;
  const size_t quota = std::min<size_t>(static_cast<size_t>(step_quota(b, s, t)), m);
  std::vector<size_t> order(m);
  std::iota(order.begin(), order.end(), size_t{0});
  if (t == s - 1) return order;  // last step: everything still masked takes its latest draw
  size_t n = quota;
  switch (o.strategy) {
    case Strategy::sequential: break;
    case Strategy::low_confidence_static:
    case Strategy::low_confidence_dynamic:
      // stable_sort keeps the lower slot first among equal confidences.
      std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t c) { return d[a].confidence > d[c].confidence; });
      if (o.strategy == Strategy::low_confidence_dynamic) {
        size_t above = 0;
        for (size_t i = 0; i < m; ++i) above += double(d[i].confidence) > o.tau ? 1 : 0;
        n = std::max(above, quota);  // the top `above` are exactly those over tau
      }
      break;
    case Strategy::entropy_bounded: {
      std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t c) { return d[a].entropy < d[c].entropy; });
      double sum = 0;
      size_t k = 0;
      while (k < m && sum + d[order[k]].entropy <= o.entropy_bound) sum += d[order[k++]].entropy;
      n = std::max({k, quota, size_t{1}});
      break;
    }
  }
  order.resize(std::min(n, m));
  std::sort(order.begin(), order.end());
  return order;
}

namespace {

// Per-sample prompt checks: a bad prompt becomes a status, never an exception.
void check_prompt(Rollout& r, int64_t vocab, int64_t max_context) {
  if (r.prompt.empty()) {
    r.status = RolloutStatus::empty_prompt;
    r.error = "empty prompt (decoding needs at least one token)";
    return;
  }
  if (static_cast<int64_t>(r.prompt.size()) >= max_context) {
    r.status = RolloutStatus::prompt_too_long;
    r.error = detail::concat("prompt has ", r.prompt.size(), " tokens, the context holds ", max_context,
                             " (no room for a response)");
    return;
  }
  for (size_t t = 0; t < r.prompt.size(); ++t)
    if (r.prompt[t] < 0 || r.prompt[t] >= vocab) {
      r.status = RolloutStatus::bad_token_id;
      r.error = detail::concat("prompt token ", t, " is ", r.prompt[t], ", outside the vocabulary [0, ", vocab, ")");
      return;
    }
}

int64_t context_of(const model::Qwen3Model& model, const SamplerOptions& o) {
  return o.max_context > 0 ? o.max_context : model.config().max_position_embeddings;
}

// Common setup of both decoders: checked options, one Rollout per prompt with its status.
std::vector<Rollout> init_rollouts(const model::Qwen3Model& model, const std::vector<std::vector<int32_t>>& prompts,
                                   std::span<const uint32_t> sample_ids, const SamplerOptions& o, const char* who) {
  if (sample_ids.size() != prompts.size())
    OPDLM_FAIL(who, ": ", sample_ids.size(), " sample ids for ", prompts.size(), " prompts");
  o.validate(model.full_config().vocab_size);
  const int64_t ctx = context_of(model, o);
  std::vector<Rollout> out(prompts.size());
  for (size_t i = 0; i < prompts.size(); ++i) {
    out[i].sample_id = sample_ids[i];
    out[i].prompt = prompts[i];
    check_prompt(out[i], model.full_config().vocab_size, ctx);
  }
  return out;
}

// The response length limit of a valid prompt.
int64_t limit_of(const Rollout& r, const SamplerOptions& o, int64_t ctx) {
  return std::min<int64_t>(o.max_new_tokens, ctx - static_cast<int64_t>(r.prompt.size()));
}

// The current block of one sequence.
struct Block {
  std::vector<int32_t> tokens;    // b slots: [MASK] or the revealed token
  std::vector<int32_t> step_of;   // global step that revealed the slot (0 = still masked)
  int64_t masked = 0;

  void reset(int64_t b, int32_t mask_id) {
    tokens.assign(static_cast<size_t>(b), mask_id);
    step_of.assign(static_cast<size_t>(b), 0);
    masked = b;
  }
  std::vector<int64_t> masked_slots() const {
    std::vector<int64_t> m;
    for (size_t o = 0; o < step_of.size(); ++o)
      if (step_of[o] == 0) m.push_back(static_cast<int64_t>(o));
    return m;
  }
};

// Softmax facts of one unfiltered logits row (temperature 1), stably in double.
struct RowStats {
  double max, log_z, entropy;  // log_z: log sum exp(x - max); entropy in nats
};

#ifdef OPDLM_SIMD_X86
// row_stats' sums, 4 lanes of double at a time: libm's exp in double over the whole vocabulary for
// every masked slot was ~15 % of a block-diffusion decode. Only the summation order (4 partial sums)
// and exp's last bits differ from the scalar loop.
// False (nothing written) when the row holds a NaN: the scalar loop then propagates it.
OPDLM_AVX2 bool row_sums_avx2(const float* x, int64_t V, double mx, bool with_entropy, double* z, double* s) {
  const __m256d vmx = _mm256_set1_pd(mx);
  __m256d vz = _mm256_setzero_pd(), vs = _mm256_setzero_pd(), nan = _mm256_setzero_pd();
  int64_t v = 0;
  for (; v + 4 <= V; v += 4) {
    const __m256d d = _mm256_sub_pd(_mm256_cvtps_pd(_mm_loadu_ps(x + v)), vmx);
    nan = _mm256_or_pd(nan, _mm256_cmp_pd(d, d, _CMP_UNORD_Q));
    const __m256d e = ops::simd::exp256d_nonpos(d);
    vz = _mm256_add_pd(vz, e);
    if (with_entropy) vs = _mm256_fmadd_pd(e, d, vs);
  }
  if (_mm256_movemask_pd(nan)) return false;
  double zl[4], sl[4];
  _mm256_storeu_pd(zl, vz);
  _mm256_storeu_pd(sl, vs);
  *z = (zl[0] + zl[1]) + (zl[2] + zl[3]);
  *s = (sl[0] + sl[1]) + (sl[2] + sl[3]);
  for (; v < V; ++v) {
    const double e = std::exp(double(x[v]) - mx);
    *z += e;
    if (with_entropy) *s += e * (double(x[v]) - mx);
  }
  return true;
}
#endif

RowStats row_stats(const float* x, int64_t V, bool with_entropy) {
  double mx = -std::numeric_limits<double>::infinity();
  for (int64_t v = 0; v < V; ++v) mx = std::max(mx, double(x[v]));
  double z = 0, s = 0;
#ifdef OPDLM_SIMD_X86
  if (std::isfinite(mx) && ops::simd::cpu_has_avx2_fma() && row_sums_avx2(x, V, mx, with_entropy, &z, &s))
    return {mx, std::log(z), with_entropy ? std::log(z) - s / z : 0.0};
#endif
  for (int64_t v = 0; v < V; ++v) {
    const double e = std::exp(double(x[v]) - mx);
    z += e;
    if (with_entropy) s += e * (double(x[v]) - mx);
  }
  return {mx, std::log(z), with_entropy ? std::log(z) - s / z : 0.0};
}

// Reveals the slots of blk that the strategy picks from the draws d (one per masked slot, slot order).
void reveal(Block& blk, std::span<const SlotDraw> d, int64_t t, int32_t global_step, const SamplerOptions& o) {
  const std::vector<int64_t> ms = blk.masked_slots();
  OPDLM_CHECK(ms.size() == d.size(), ms.size(), " masked slots, ", d.size(), " draws");
  for (size_t i : select_reveals(d, o, t)) {
    const size_t slot = static_cast<size_t>(ms[i]);
    blk.tokens[slot] = d[i].token;
    blk.step_of[slot] = global_step;
    --blk.masked;
  }
}

// The draws of one step on vocab-parallel logits [rows, V_r] (every stepping sequence's masked slots
// at once, keys[i] the slot's key): vp_sample_tokens with the [MASK] column removed, and confidence
// and entropy from the unfiltered softmax over the whole vocabulary (vp_row_stats), as denoise_step.
std::vector<SlotDraw> vocab_parallel_draws(const Tensor& logits, const std::vector<CounterRng>& keys,
                                           const model::Qwen3Model& model, const SamplerOptions& o) {
  parallel::Communicator& tp = *model.tensor_parallel().comm;
  const int64_t n = logits.size(0), V = logits.size(1), begin = model.tensor_parallel().vocab_begin;
  Tensor no_mask = logits.clone();
  if (o.mask_id >= begin && o.mask_id < begin + V)
    for (int64_t i = 0; i < n; ++i) no_mask.data<float>()[i * V + (o.mask_id - begin)] = -std::numeric_limits<float>::infinity();
  const parallel::VocabSlice slice = model.vocab_slice();
  const auto draws = parallel::vp_sample_tokens(no_mask, keys, o.sampling, tp, slice);
  const auto st = parallel::vp_row_stats(logits, tp, o.strategy == Strategy::entropy_bounded, slice);
  std::vector<double> pick(static_cast<size_t>(n), 0.0);  // the drawn token's logit, from its rank
  for (int64_t i = 0; i < n; ++i) {
    const int64_t c = draws[size_t(i)].token - begin;
    if (c >= 0 && c < V) pick[size_t(i)] = logits.data<float>()[i * V + c];
  }
  tp.all_reduce_tree(std::span<double>(pick));
  std::vector<SlotDraw> d(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i)
    d[size_t(i)] = {draws[size_t(i)].token, static_cast<float>(std::exp(pick[size_t(i)] - st.max[size_t(i)] - st.log_z[size_t(i)])),
                    st.entropy[size_t(i)]};
  return d;
}

// One denoising step of one sequence's block k at step t: `logits[i]` is the f32 row of the i-th
// masked slot (slot order). Draws every masked slot, reveals by the strategy. The [MASK] id itself
// is never drawn (a revealed slot must hold a real token); confidence and entropy still use the
// unfiltered softmax over the whole vocabulary.
void denoise_step(Block& blk, const std::vector<const float*>& logits, int64_t V, int64_t k, int64_t t,
                  int32_t global_step, uint32_t sample_id, const SamplerOptions& o, std::vector<float>& row,
                  std::vector<float>& scratch) {
  const std::vector<int64_t> ms = blk.masked_slots();
  OPDLM_CHECK(ms.size() == logits.size(), ms.size(), " masked slots, ", logits.size(), " logit rows");
  const int64_t b = o.block_size, s = o.steps_per_block;
  std::vector<SlotDraw> d(ms.size());
  for (size_t i = 0; i < ms.size(); ++i) {
    const int64_t j = k * b + ms[i];  // response position of the slot
    CounterRng rng({o.seed, RngPurpose::rollout_token, o.step, sample_id, static_cast<uint32_t>(j * s + t)});
    std::copy(logits[i], logits[i] + V, row.begin());
    row[size_t(o.mask_id)] = -std::numeric_limits<float>::infinity();
    const int32_t tok = ops::draw_token(row.data(), V, o.sampling, rng, scratch.data());
    const RowStats st = row_stats(logits[i], V, o.strategy == Strategy::entropy_bounded);
    d[i] = {tok, static_cast<float>(std::exp(double(logits[i][tok]) - st.max - st.log_z)), st.entropy};
  }
  reveal(blk, d, t, global_step, o);
}

// Appends a finished block to the response (stopping after EOS or at the limit); returns whether
// the sequence continues with another block.
bool finish_block(const Block& blk, Rollout& r, int64_t limit, const SamplerOptions& o) {
  for (size_t slot = 0; slot < blk.tokens.size(); ++slot) {
    if (static_cast<int64_t>(r.response.size()) >= limit) return false;
    r.response.push_back(blk.tokens[slot]);
    r.step_map.push_back(blk.step_of[slot]);
    if (o.eos_id >= 0 && blk.tokens[slot] == o.eos_id) {
      r.stopped_at_eos = true;
      return false;
    }
  }
  return static_cast<int64_t>(r.response.size()) < limit;
}

// Prefill and commit forwards only write K/V: ask for a single logit row (the LM head is not free).
Tensor one_row() { return Tensor::from_vector(std::vector<int32_t>{0}, {1}); }

// Sampling reads f32 rows whatever the model's precision.
Tensor as_f32(Tensor t) { return t.dtype() == DType::f32 ? t : t.to(DType::f32); }

}  // namespace

std::vector<Rollout> bd_generate(const model::Qwen3Model& model, const std::vector<std::vector<int32_t>>& prompts,
                                 std::span<const uint32_t> sample_ids, const SamplerOptions& o) {
  std::vector<Rollout> out = init_rollouts(model, prompts, sample_ids, o, "bd_generate");
  const int64_t ctx = context_of(model, o);
  // Logit columns: the whole vocabulary, or this rank's slice under tensor parallelism.
  const int64_t V = model.logit_columns(), b = o.block_size, s = o.steps_per_block;
  // Only valid prompts enter the batch: row r decodes out[idx[r]].
  std::vector<size_t> idx;
  for (size_t i = 0; i < out.size(); ++i)
    if (out[i].ok()) idx.push_back(i);
  if (idx.empty() || o.max_new_tokens == 0) return out;
  const int64_t B = static_cast<int64_t>(idx.size());
  int64_t P = 0, blocks = 0;
  std::vector<int64_t> plen(static_cast<size_t>(B)), limit(static_cast<size_t>(B));
  for (int64_t r = 0; r < B; ++r) {
    const Rollout& ro = out[idx[size_t(r)]];
    plen[size_t(r)] = static_cast<int64_t>(ro.prompt.size());
    limit[size_t(r)] = limit_of(ro, o, ctx);
    P = std::max(P, plen[size_t(r)]);
    blocks = std::max(blocks, (limit[size_t(r)] + b - 1) / b);
  }
  model::KVCache cache(model.config(), B, P + blocks * b, model.dtype());

  // Prefill: rows left-padded to P, real token t of row r at slot pad_r + t with position t; the
  // block-causal mask right-aligns the prompt blocks to the shared response start P.
  auto pad = [&](int64_t r) { return P - plen[size_t(r)]; };
  {
    Tensor ids = Tensor::full({B, P}, o.pad_id, DType::i32), pos = Tensor::zeros({B, P}, DType::i32);
    std::vector<ops::MaskDescriptor> masks;
    for (int64_t r = 0; r < B; ++r) {
      const auto& p = out[idx[size_t(r)]].prompt;
      for (int64_t t = 0; t < plen[size_t(r)]; ++t) {
        ids.data<int32_t>()[r * P + pad(r) + t] = p[size_t(t)];
        pos.data<int32_t>()[r * P + pad(r) + t] = static_cast<int32_t>(t);
      }
      masks.push_back(ops::MaskDescriptor::block_causal(b, plen[size_t(r)], pad(r), 0));
    }
    model.forward_cached(ids, pos, masks, cache, /*commit=*/true, one_row());
  }

  std::vector<bool> alive(static_cast<size_t>(B), true);
  std::vector<int32_t> steps(static_cast<size_t>(B), 0);  // global step counter per sequence
  std::vector<Block> blk(static_cast<size_t>(B));
  Tensor ids = Tensor::empty({B, b}, DType::i32), pos = Tensor::empty({B, b}, DType::i32);
  std::vector<ops::MaskDescriptor> masks(static_cast<size_t>(B));
  // Block inputs: finished rows feed [MASK]s whose outputs nobody reads.
  auto fill_inputs = [&](int64_t k) {
    for (int64_t r = 0; r < B; ++r) {
      for (int64_t q = 0; q < b; ++q) {
        ids.data<int32_t>()[r * b + q] = alive[size_t(r)] ? blk[size_t(r)].tokens[size_t(q)] : o.mask_id;
        pos.data<int32_t>()[r * b + q] = static_cast<int32_t>(plen[size_t(r)] + k * b + q);
      }
      masks[size_t(r)] = ops::MaskDescriptor::block_causal(b, plen[size_t(r)], pad(r), cache.length());
    }
  };

  for (int64_t k = 0; k < blocks; ++k) {
    for (int64_t r = 0; r < B; ++r)
      if (alive[size_t(r)]) blk[size_t(r)].reset(b, o.mask_id);
    for (int64_t t = 0; t < s; ++t) {
      // Logits only for the masked slots of rows that still denoise this block.
      std::vector<int32_t> rows;
      std::vector<int64_t> stepping;
      for (int64_t r = 0; r < B; ++r) {
        if (!alive[size_t(r)] || blk[size_t(r)].masked == 0) continue;
        stepping.push_back(r);
        for (int64_t slot : blk[size_t(r)].masked_slots()) rows.push_back(static_cast<int32_t>(r * b + slot));
      }
      if (stepping.empty()) break;
      fill_inputs(k);
      const Tensor logits = as_f32(model.forward_cached(
          ids, pos, masks, cache, /*commit=*/false, Tensor::from_vector(rows, {static_cast<int64_t>(rows.size())})));
      size_t row = 0;
      if (model.tensor_parallel().comm) {  // one batch of vocab-parallel draws for every stepping row
        std::vector<CounterRng> keys;
        for (int64_t r : stepping)
          for (int64_t slot : blk[size_t(r)].masked_slots())
            keys.emplace_back(RngKey{o.seed, RngPurpose::rollout_token, o.step, out[idx[size_t(r)]].sample_id,
                                     static_cast<uint32_t>((k * b + slot) * s + t)});
        const std::vector<SlotDraw> d = vocab_parallel_draws(logits, keys, model, o);
        for (int64_t r : stepping) {
          const size_t m = static_cast<size_t>(blk[size_t(r)].masked);
          ++out[idx[size_t(r)]].denoise_forwards;
          reveal(blk[size_t(r)], std::span(d).subspan(row, m), t, ++steps[size_t(r)], o);
          row += m;
        }
        continue;
      }
      // Sequences draw independently (every draw has its own RNG key), so threads take them; each
      // touches only its own block, rollout and step count.
      std::vector<size_t> first(stepping.size() + 1, 0);
      for (size_t i = 0; i < stepping.size(); ++i)
        first[i + 1] = first[i] + static_cast<size_t>(blk[size_t(stepping[i])].masked);
      std::exception_ptr failure;
#pragma omp parallel if (stepping.size() > 1 && first.back() * size_t(V) >= (size_t{1} << 14))
      {
        // Per-thread buffers kept across steps (V floats each; 0.6 MB for Qwen3's vocabulary).
        static thread_local std::vector<float> row_buf, scratch_buf;
        row_buf.resize(static_cast<size_t>(V));
        scratch_buf.resize(static_cast<size_t>(V));
#pragma omp for schedule(static)
        for (size_t i = 0; i < stepping.size(); ++i) {
          const int64_t r = stepping[i];
          try {
            Rollout& ro = out[idx[size_t(r)]];
            std::vector<const float*> lr;
            for (size_t m = first[i]; m < first[i + 1]; ++m) lr.push_back(logits.data<float>() + int64_t(m) * V);
            ++ro.denoise_forwards;
            denoise_step(blk[size_t(r)], lr, V, k, t, ++steps[size_t(r)], ro.sample_id, o, row_buf, scratch_buf);
          } catch (...) {
#pragma omp critical(opdlm_bd_denoise)
            if (!failure) failure = std::current_exception();
          }
        }
      }
      if (failure) std::rethrow_exception(failure);
    }
    bool any = false;
    for (int64_t r = 0; r < B; ++r) {
      if (!alive[size_t(r)]) continue;
      alive[size_t(r)] = finish_block(blk[size_t(r)], out[idx[size_t(r)]], limit[size_t(r)], o);
      any = any || alive[size_t(r)];
    }
    if (!any) break;
    // Commit: the final block tokens' K/V, exact, for the sequences that go on.
    fill_inputs(k);
    model.forward_cached(ids, pos, masks, cache, /*commit=*/true, one_row());
    for (int64_t r = 0; r < B; ++r)
      if (alive[size_t(r)]) ++out[idx[size_t(r)]].commit_forwards;
  }
  return out;
}

std::vector<Rollout> bd_generate_reference(const model::Qwen3Model& model,
                                           const std::vector<std::vector<int32_t>>& prompts,
                                           std::span<const uint32_t> sample_ids, const SamplerOptions& o) {
  if (model.tensor_parallel().comm) OPDLM_FAIL("bd_generate_reference: one process only (no tensor parallelism)");
  std::vector<Rollout> out = init_rollouts(model, prompts, sample_ids, o, "bd_generate_reference");
  const int64_t ctx = context_of(model, o);
  const int64_t V = model.config().vocab_size, b = o.block_size, s = o.steps_per_block;
  std::vector<float> masked_row(static_cast<size_t>(V)), scratch(static_cast<size_t>(V));
  for (Rollout& ro : out) {
    if (!ro.ok() || o.max_new_tokens == 0) continue;
    const int64_t P = static_cast<int64_t>(ro.prompt.size()), limit = limit_of(ro, o, ctx);
    const ops::MaskDescriptor mask = ops::MaskDescriptor::block_causal(b, P);
    std::vector<int32_t> committed;  // every token of the committed blocks
    int32_t steps = 0;
    Block blk;
    for (int64_t k = 0;; ++k) {
      blk.reset(b, o.mask_id);
      for (int64_t t = 0; t < s && blk.masked > 0; ++t) {
        // The whole sequence: prompt, committed blocks, current block; positions 0.. without pads.
        std::vector<int32_t> seq = ro.prompt;
        seq.insert(seq.end(), committed.begin(), committed.end());
        seq.insert(seq.end(), blk.tokens.begin(), blk.tokens.end());
        const int64_t N = static_cast<int64_t>(seq.size());
        std::vector<int32_t> positions(static_cast<size_t>(N)), rows;
        std::iota(positions.begin(), positions.end(), 0);
        for (int64_t slot : blk.masked_slots()) rows.push_back(static_cast<int32_t>(N - b + slot));
        const Tensor logits = as_f32(model.forward(Tensor::from_vector(seq, {1, N}), Tensor::from_vector(positions, {1, N}),
                                                   std::span<const ops::MaskDescriptor>(&mask, 1),
                                                   Tensor::from_vector(rows, {static_cast<int64_t>(rows.size())})));
        std::vector<const float*> lr;
        for (size_t i = 0; i < rows.size(); ++i) lr.push_back(logits.data<float>() + int64_t(i) * V);
        ++ro.denoise_forwards;
        denoise_step(blk, lr, V, k, t, ++steps, ro.sample_id, o, masked_row, scratch);
      }
      if (!finish_block(blk, ro, limit, o)) break;
      committed.insert(committed.end(), blk.tokens.begin(), blk.tokens.end());
      ++ro.commit_forwards;  // what the cached decoder spends on this block
    }
  }
  return out;
}

}  // namespace opdlm::diffusion
