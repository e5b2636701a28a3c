// AR decoding over a KV cache and per-token scoring.
#include "opdlm/model/ar_generate.hpp"

#include <algorithm>
#include <cmath>
#include <exception>
#include <vector>

#include "opdlm/base/error.hpp"
#include "opdlm/ops/softmax.hpp"

namespace opdlm::model {

std::vector<ArGeneration> ar_generate(const Qwen3Model& model, const std::vector<std::vector<int32_t>>& prompts,
                                      std::span<const uint32_t> sample_ids, const ArGenerateOptions& o) {
  const int64_t B = static_cast<int64_t>(prompts.size());
  if (B == 0) return {};
  if (static_cast<int64_t>(sample_ids.size()) != B)
    OPDLM_FAIL("ar_generate: ", sample_ids.size(), " sample ids for ", B, " prompts");
  if (o.max_new_tokens < 0) OPDLM_FAIL_AT("", "max_new_tokens", "must be >= 0");
  o.sampling.validate();
  const int64_t V = model.config().vocab_size;
  int64_t P = 0;
  for (const auto& p : prompts) {
    if (p.empty()) OPDLM_FAIL("ar_generate: an empty prompt (decoding needs at least one token)");
    P = std::max<int64_t>(P, static_cast<int64_t>(p.size()));
  }
  std::vector<ArGeneration> out(static_cast<size_t>(B));
  if (o.max_new_tokens == 0) return out;
  KVCache cache(model.config(), B, P + o.max_new_tokens, model.dtype());

  // Prefill: rows left-padded to P; real token t of row b sits at slot pad_b + t with position t.
  std::vector<int64_t> pad(static_cast<size_t>(B));
  Tensor ids = Tensor::full({B, P}, o.pad_id, DType::i32), pos = Tensor::zeros({B, P}, DType::i32);
  std::vector<ops::MaskDescriptor> masks;
  for (int64_t b = 0; b < B; ++b) {
    const auto& p = prompts[static_cast<size_t>(b)];
    pad[static_cast<size_t>(b)] = P - static_cast<int64_t>(p.size());
    for (size_t t = 0; t < p.size(); ++t) {
      ids.data<int32_t>()[b * P + pad[b] + static_cast<int64_t>(t)] = p[t];
      pos.data<int32_t>()[b * P + pad[b] + static_cast<int64_t>(t)] = static_cast<int32_t>(t);
    }
    masks.push_back(ops::MaskDescriptor::causal(pad[static_cast<size_t>(b)], 0));
  }
  // Sampling works on f32 rows whatever the model's precision.
  auto as_f32 = [](Tensor t) { return t.dtype() == DType::f32 ? t : t.to(DType::f32); };
  Tensor logits = as_f32(model.forward_cached(ids, pos, masks, cache, /*commit=*/true, Qwen3Model::last_rows(B, P)));

  std::vector<bool> done(static_cast<size_t>(B), false);
  std::vector<int32_t> drawn(static_cast<size_t>(B));
  Tensor next = Tensor::empty({B, 1}, DType::i32), next_pos = Tensor::empty({B, 1}, DType::i32);
  for (int64_t k = 0; k < o.max_new_tokens; ++k) {
    // Rows draw independently (each draw has its own RNG key), so threads take them.
    std::exception_ptr failure;
#pragma omp parallel if (B > 1 && B * V >= (int64_t{1} << 14))
    {
      static thread_local std::vector<float> scratch;
      scratch.resize(static_cast<size_t>(V));
#pragma omp for schedule(static)
      for (int64_t b = 0; b < B; ++b) {
        if (done[static_cast<size_t>(b)]) continue;
        try {
          const int64_t position = static_cast<int64_t>(prompts[static_cast<size_t>(b)].size()) + k;
          CounterRng rng({o.seed, RngPurpose::rollout_token, o.step, sample_ids[static_cast<size_t>(b)],
                          static_cast<uint32_t>(position)});
          drawn[static_cast<size_t>(b)] = ops::draw_token(logits.data<float>() + b * V, V, o.sampling, rng, scratch.data());
        } catch (...) {
#pragma omp critical(opdlm_ar_draw)
          if (!failure) failure = std::current_exception();
        }
      }
    }
    if (failure) std::rethrow_exception(failure);
    bool all_done = true;
    for (int64_t b = 0; b < B; ++b) {
      auto& g = out[static_cast<size_t>(b)];
      const int64_t position = static_cast<int64_t>(prompts[static_cast<size_t>(b)].size()) + k;
      int32_t tok = o.pad_id;
      if (!done[static_cast<size_t>(b)]) {
        tok = drawn[static_cast<size_t>(b)];
        g.tokens.push_back(tok);
        ++g.forwards;
        if (o.eos_id >= 0 && tok == o.eos_id) {
          g.stopped_at_eos = true;
          done[static_cast<size_t>(b)] = true;
        }
      }
      all_done = all_done && done[static_cast<size_t>(b)];
      next.data<int32_t>()[b] = tok;
      next_pos.data<int32_t>()[b] = static_cast<int32_t>(position);
    }
    if (all_done || k + 1 == o.max_new_tokens) break;
    for (int64_t b = 0; b < B; ++b) masks[static_cast<size_t>(b)] = ops::MaskDescriptor::causal(pad[b], cache.length());
    logits = as_f32(model.forward_cached(next, next_pos, masks, cache, /*commit=*/true));
  }
  return out;
}

std::vector<double> token_logprobs(const Qwen3Model& model, std::span<const int32_t> ids) {
  const int64_t n = static_cast<int64_t>(ids.size());
  if (n < 2) return {};
  Tensor t = Tensor::from_vector(std::vector<int32_t>(ids.begin(), ids.end()), {1, n});
  Tensor pos = Tensor::empty({1, n}, DType::i32);
  for (int64_t i = 0; i < n; ++i) pos.data<int32_t>()[i] = static_cast<int32_t>(i);
  const ops::MaskDescriptor causal = ops::MaskDescriptor::causal();
  Tensor rows = Tensor::empty({n - 1}, DType::i32);
  for (int64_t i = 0; i + 1 < n; ++i) rows.data<int32_t>()[i] = static_cast<int32_t>(i);
  Tensor logits = model.forward(t, pos, std::span<const ops::MaskDescriptor>(&causal, 1), rows);
  Tensor lp = ops::log_softmax_forward(logits);
  const int64_t V = logits.size(1);
  std::vector<double> out(static_cast<size_t>(n - 1));
  for (int64_t i = 0; i + 1 < n; ++i) out[static_cast<size_t>(i)] = lp.item(i * V + ids[static_cast<size_t>(i + 1)]);
  return out;
}

}  // namespace opdlm::model
