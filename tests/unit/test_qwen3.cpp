// Qwen3Model unit tests: finite-difference gradients (f64), gradient accumulation, logit rows, frozen
// teacher, KV-cache decoding (causal and block diffusion) against the full forward, errors, FLOPs.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <vector>

#include "opdlm/model/qwen3.hpp"
#include "test_util.hpp"

using namespace opdlm;
using namespace opdlm::model;
using ops::MaskDescriptor;

namespace {

// GQA ratio 3 and head_dim (4) != hidden / heads, so shape mix-ups show.
Qwen3Config tiny_config(bool tied) {
  Qwen3Config c;
  c.vocab_size = 13;
  c.hidden_size = 8;
  c.intermediate_size = 12;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 3;
  c.num_key_value_heads = 1;
  c.head_dim = 4;
  c.rope_theta = 1e4;
  c.tie_word_embeddings = tied;
  return c;
}

// Matrices uniform in [-0.5, 0.5), norm gains in [0.8, 1.2): non-trivial gains so their gradients matter.
Qwen3Weights random_weights(const Qwen3Config& c, DType dt, uint32_t seed) {
  Qwen3Weights w(c, dt);
  uint32_t s = seed;
  for (auto& [name, t] : w.tensors()) {
    const bool norm = t.ndim() == 1;
    t = test::random_tensor(t.shape(), s++, norm ? 0.8 : -0.5, norm ? 1.2 : 0.5, dt);
  }
  return w;
}

Tensor ids_tensor(const std::vector<int32_t>& v, int64_t B, int64_t T) { return Tensor::from_vector(v, {B, T}); }

// Left pads -> position 1 (never attended), then 0, 1, ...
std::vector<int32_t> padded_positions(int64_t T, int64_t pad_left) {
  std::vector<int32_t> p;
  for (int64_t t = 0; t < T; ++t) p.push_back(t < pad_left ? 1 : static_cast<int32_t>(t - pad_left));
  return p;
}

void report(const char* what, double err) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.3e", err);
  ::testing::Test::RecordProperty(what, buf);
  std::printf("[qwen3] %s %s\n", what, buf);
}

// Columns [t0, t1) of an i32 [B, T] tensor.
Tensor columns(const Tensor& x, int64_t t0, int64_t t1) {
  const int64_t B = x.size(0), T = x.size(1);
  std::vector<int32_t> v;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = t0; t < t1; ++t) v.push_back(x.data<int32_t>()[b * T + t]);
  return ids_tensor(v, B, t1 - t0);
}

// Rows [r0, r1) of a [n, V] tensor, as a copy.
Tensor rows_of(const Tensor& x, int64_t r0, int64_t r1) { return x.slice(r0, r1).clone(); }

}  // namespace

// ---- training forward / backward ---------------------------------------------------------------

TEST(Qwen3Model, GradientsMatchFiniteDifferences) {
  // OPD layout (pad_left 1, P 3 % b != 0) next to a causal row, logits only at a few rows.
  double worst = 0;
  for (bool tied : {true, false}) {
    const Qwen3Config c = tiny_config(tied);
    Qwen3Model model = Qwen3Model::student(random_weights(c, DType::f64, 100));
    const int64_t T = 1 + 3 + 2 * 4;
    const std::vector<MaskDescriptor> masks{MaskDescriptor::training(2, 3, 4, 1), MaskDescriptor::causal(2)};
    const Tensor ids = test::random_ids({2, T}, 7, int32_t(c.vocab_size));
    std::vector<int32_t> pos{1, 0, 1, 2, 3, 4, 5, 6, 3, 4, 5, 6};
    for (int32_t p : padded_positions(T, 2)) pos.push_back(p);
    const Tensor positions = ids_tensor(pos, 2, T);
    const Tensor rows = Tensor::from_vector(std::vector<int32_t>{8, 9, 10, 11, 13, 20, 23, 23}, {8});
    const Tensor R = test::random_tensor({8, c.vocab_size}, 8);
    auto loss = [&] { return test::dot(model.forward(ids, positions, masks, rows), R); };

    Qwen3Activations acts;
    model.forward(ids, positions, masks, rows, &acts);
    model.backward(acts, R);
    // Three entries of every tensor by central differences.
    for (size_t ti = 0; ti < model.weights().tensors().size(); ++ti) {
      Tensor& p = model.weights().tensors()[ti].value;
      const Tensor& g = model.grads().tensors()[ti].value;
      double gmax = 1e-12;
      for (int64_t i = 0; i < g.numel(); ++i) gmax = std::max(gmax, std::fabs(g.item(i)));
      for (int64_t k = 0; k < 3; ++k) {
        const int64_t i = (k * 7919 + int64_t(ti) * 13) % p.numel();
        double* x = p.data<double>() + i;
        const double v = *x, h = 1e-6;
        *x = v + h;
        const double fp = loss();
        *x = v - h;
        const double fm = loss();
        *x = v;
        const double fd = (fp - fm) / (2 * h);
        worst = std::max(worst, std::fabs(fd - g.item(i)) / gmax);
        EXPECT_LE(std::fabs(fd - g.item(i)) / gmax, 1e-6)
            << (tied ? "tied " : "untied ") << model.weights().tensors()[ti].name << " element " << i << ": fd " << fd
            << " analytic " << g.item(i);
      }
    }
  }
  report("finite differences f64 max rel err", worst);
}

TEST(Qwen3Model, GradientsAccumulateAndZero) {
  const Qwen3Config c = tiny_config(true);
  Qwen3Model model = Qwen3Model::student(random_weights(c, DType::f64, 200));
  const Tensor ids = test::random_ids({1, 6}, 3, int32_t(c.vocab_size));
  const Tensor positions = ids_tensor({0, 1, 2, 3, 4, 5}, 1, 6);
  const std::vector<MaskDescriptor> masks{MaskDescriptor::block_causal(2, 0)};
  const Tensor R = test::random_tensor({6, c.vocab_size}, 4);
  Qwen3Activations acts;
  model.forward(ids, positions, masks, Tensor(), &acts);
  model.backward(acts, R);
  const Qwen3Weights once = model.grads().clone();
  model.backward(acts, R);
  for (size_t i = 0; i < once.tensors().size(); ++i) {
    const Tensor twice = model.grads().tensors()[i].value;
    Tensor expect = once.tensors()[i].value.clone();
    for (int64_t k = 0; k < expect.numel(); ++k) expect.data<double>()[k] *= 2;
    EXPECT_LE(test::max_rel_err(twice, expect), 1e-14) << once.tensors()[i].name;
  }
  model.zero_grads();
  for (const auto& t : model.grads().tensors()) EXPECT_EQ(test::max_abs_err(t.value, Tensor(t.value.shape(), DType::f64)), 0);
}

TEST(Qwen3Model, LogitRowsSelectAndBackpropagateLikeFullLogits) {
  const Qwen3Config c = tiny_config(false);
  Qwen3Model a = Qwen3Model::student(random_weights(c, DType::f64, 300));
  Qwen3Model b = Qwen3Model::student(a.weights().clone());
  const int64_t T = 2 + 3 + 2 * 3;
  const Tensor ids = test::random_ids({1, T}, 5, int32_t(c.vocab_size));
  const Tensor positions = ids_tensor({1, 1, 0, 1, 2, 3, 4, 5, 3, 4, 5}, 1, T);
  const std::vector<MaskDescriptor> masks{MaskDescriptor::training(2, 3, 3, 2)};
  const Tensor rows = Tensor::from_vector(std::vector<int32_t>{8, 9, 10}, {3});
  Qwen3Activations acts_a, acts_b;
  const Tensor sub = a.forward(ids, positions, masks, rows, &acts_a);
  const Tensor full = b.forward(ids, positions, masks, Tensor(), &acts_b);
  EXPECT_EQ(test::max_abs_err(sub, rows_of(full, 8, 11)), 0);
  // dlogits zero outside the rows gives the same gradients.
  const Tensor R = test::random_tensor({3, c.vocab_size}, 6);
  Tensor Rfull({T, c.vocab_size}, DType::f64);
  std::copy(R.data<double>(), R.data<double>() + R.numel(), Rfull.data<double>() + 8 * c.vocab_size);
  a.backward(acts_a, R);
  b.backward(acts_b, Rfull);
  for (size_t i = 0; i < a.grads().tensors().size(); ++i)
    EXPECT_LE(test::max_rel_err(a.grads().tensors()[i].value, b.grads().tensors()[i].value), 1e-13)
        << a.grads().tensors()[i].name;
}

TEST(Qwen3Model, FrozenTeacherHasNoGradientBuffers) {
  const Qwen3Config c = tiny_config(true);
  Qwen3Model student = Qwen3Model::student(random_weights(c, DType::f32, 400));
  Qwen3Model teacher = Qwen3Model::teacher(student.weights().clone());
  ASSERT_FALSE(teacher.trainable());
  EXPECT_ERROR_HAS(teacher.grads(), "frozen", "no gradients");
  EXPECT_ERROR_HAS(teacher.zero_grads(), "frozen");
  const Tensor ids = test::random_ids({1, 5}, 9, int32_t(c.vocab_size));
  const Tensor positions = ids_tensor({0, 1, 2, 3, 4}, 1, 5);
  const std::vector<MaskDescriptor> masks{MaskDescriptor::causal()};
  Qwen3Activations acts;
  const Tensor lt = teacher.forward(ids, positions, masks, Tensor(), &acts);
  EXPECT_ERROR_HAS(teacher.backward(acts, lt), "frozen", "backward");
  // Same weights: same logits as the student; the student's buffers exist and start at zero.
  EXPECT_EQ(test::max_abs_err(lt, student.forward(ids, positions, masks)), 0);
  EXPECT_EQ(student.grads().numel(), student.weights().numel());
}

// ---- KV cache ----------------------------------------------------------------------------------

// Two left-padded rows of different prompt lengths (pad 2 + 3, pad 0 + 5), then 6 tokens appended
// one, then three, then one at a time; every step's logits == the full causal forward's rows.
TEST(KVCache, CausalIncrementalMatchesFullForward) {
  const Qwen3Config c = tiny_config(false);
  const Qwen3Model model = Qwen3Model::teacher(random_weights(c, DType::f32, 500));
  const int64_t L0 = 5, T = L0 + 6, pads[2] = {2, 0};
  const Tensor all_ids = test::random_ids({2, T}, 11, int32_t(c.vocab_size));
  std::vector<int32_t> pos = padded_positions(T, pads[0]), p1 = padded_positions(T, pads[1]);
  pos.insert(pos.end(), p1.begin(), p1.end());
  const Tensor all_pos = ids_tensor(pos, 2, T);
  const std::vector<MaskDescriptor> full_masks{MaskDescriptor::causal(pads[0]), MaskDescriptor::causal(pads[1])};
  const Tensor full = model.forward(all_ids, all_pos, full_masks);  // [2T, V]

  KVCache cache(c, 2, T);
  double worst = 0;
  for (auto [t0, t1] : std::vector<std::pair<int64_t, int64_t>>{{0, L0}, {L0, L0 + 1}, {L0 + 1, L0 + 4},
                                                                 {L0 + 4, L0 + 5}, {L0 + 5, T}}) {
    const std::vector<MaskDescriptor> m{MaskDescriptor::causal(pads[0], t0), MaskDescriptor::causal(pads[1], t0)};
    const Tensor got = model.forward_cached(columns(all_ids, t0, t1), columns(all_pos, t0, t1), m, cache, true);
    ASSERT_EQ(cache.length(), t1);
    for (int64_t b = 0; b < 2; ++b) {
      const Tensor ref = rows_of(full, b * T + t0, b * T + t1);
      worst = std::max(worst, test::max_rel_err(rows_of(got, b * (t1 - t0), (b + 1) * (t1 - t0)), ref));
    }
  }
  EXPECT_LE(worst, 1e-5);
  report("causal cache vs full f32 max rel err", worst);
  // last_rows: one row per sequence.
  cache.truncate(L0 + 5);
  const std::vector<MaskDescriptor> m{MaskDescriptor::causal(pads[0], L0 + 5), MaskDescriptor::causal(pads[1], L0 + 5)};
  const Tensor last = model.forward_cached(columns(all_ids, L0 + 5, T), columns(all_pos, L0 + 5, T), m, cache, false,
                                           Qwen3Model::last_rows(2, 1));
  EXPECT_EQ(last.size(0), 2);
  EXPECT_LE(test::max_rel_err(rows_of(last, 1, 2), rows_of(full, 2 * T - 1, 2 * T)), 1e-5);
  EXPECT_EQ(cache.length(), L0 + 5);
}

// Block diffusion with b = 4: left-padded prompts (pad 1 + P 5, pad 0 + P 6) prefilled under the
// block-causal mask, then per block a non-committing denoising step with [MASK]s, then the
// committing step with the final tokens; both equal the full block-causal forward's block rows.
// The last block uses the fused form: previous block + new block in one call (2b query tokens).
TEST(KVCache, BlockDiffusionIncrementalMatchesFullForward) {
  const Qwen3Config c = tiny_config(true);
  const Qwen3Model model = Qwen3Model::teacher(random_weights(c, DType::f32, 600));
  const int64_t b = 4, L0 = 6, n_blocks = 3, T = L0 + n_blocks * b, pads[2] = {1, 0}, P[2] = {5, 6};
  const int32_t kMask = int32_t(c.vocab_size - 1);
  const Tensor final_ids = test::random_ids({2, T}, 12, kMask);
  std::vector<int32_t> pos = padded_positions(T, pads[0]), p1 = padded_positions(T, pads[1]);
  pos.insert(pos.end(), p1.begin(), p1.end());
  const Tensor all_pos = ids_tensor(pos, 2, T);
  auto masks_at = [&](int64_t q_offset) {
    return std::vector<MaskDescriptor>{MaskDescriptor::block_causal(b, P[0], pads[0], q_offset),
                                       MaskDescriptor::block_causal(b, P[1], pads[1], q_offset)};
  };
  // Query rows [from, to) of both sequences from logits [2*tq, V].
  auto pick = [&](const Tensor& logits, int64_t tq, int64_t from, int64_t to) {
    Tensor out({2 * (to - from), c.vocab_size}, DType::f32);
    for (int64_t r = 0; r < 2; ++r) {
      const Tensor part = logits.slice(r * tq + from, r * tq + to);
      std::copy(part.data<float>(), part.data<float>() + part.numel(), out.data<float>() + r * part.numel());
    }
    return out;
  };
  double worst = 0;
  KVCache cache(c, 2, T);
  model.forward_cached(columns(final_ids, 0, L0), columns(all_pos, 0, L0), masks_at(0), cache, true);
  for (int64_t k = 0; k < n_blocks; ++k) {
    const int64_t s = L0 + k * b, e = s + b;
    // A noisy state of block k: some slots [MASK] (differs per row).
    Tensor noisy = final_ids.clone();
    for (int64_t r = 0; r < 2; ++r)
      for (int64_t t = s; t < e; ++t)
        if ((t + r) % 3 != 0) noisy.data<int32_t>()[r * T + t] = kMask;
    for (const Tensor* seq : std::initializer_list<const Tensor*>{&noisy, &final_ids}) {
      const bool commit = seq == &final_ids;
      // Later blocks cannot influence block k under the block-causal mask: the full forward over
      // the whole sequence (later blocks still final tokens) is the reference.
      const Tensor want = pick(model.forward(*seq, all_pos, masks_at(0)), T, s, e);
      Tensor got;
      if (k == n_blocks - 1 && commit) {
        // Fused: rewind block k-1 and commit it again together with block k (2b query tokens).
        cache.truncate(s - b);
        got = pick(model.forward_cached(columns(*seq, s - b, e), columns(all_pos, s - b, e), masks_at(s - b), cache, true),
                   2 * b, b, 2 * b);
      } else {
        got = model.forward_cached(columns(*seq, s, e), columns(all_pos, s, e), masks_at(s), cache, commit);
      }
      ASSERT_EQ(cache.length(), commit ? e : s);
      worst = std::max(worst, test::max_rel_err(got, want));
    }
  }
  EXPECT_LE(worst, 1e-5);
  report("block cache vs full f32 max rel err", worst);
}

// ---- errors ------------------------------------------------------------------------------------

TEST(Qwen3Model, BadInputsNameTensorAndDimension) {
  const Qwen3Config c = tiny_config(false);
  Qwen3Model model = Qwen3Model::student(random_weights(c, DType::f32, 700));
  const Tensor ids = test::random_ids({2, 4}, 13, int32_t(c.vocab_size));
  const Tensor pos = ids_tensor({0, 1, 2, 3, 0, 1, 2, 3}, 2, 4);
  const std::vector<MaskDescriptor> one{MaskDescriptor::causal()};

  Tensor bad = ids.clone();
  bad.data<int32_t>()[5] = int32_t(c.vocab_size);
  EXPECT_ERROR_HAS(model.forward(bad, pos, one), "'ids'", "[1, 1]", "13", "outside the vocabulary");
  EXPECT_ERROR_HAS(model.forward(ids, ids_tensor({0, 1, 2, 0, 1, 2}, 2, 3), one), "'positions'", "dimension 1",
                   "is 3, expected 4");
  EXPECT_ERROR_HAS(model.forward(ids, pos.view({8}), one), "'positions'");
  const std::vector<MaskDescriptor> three(3, MaskDescriptor::causal());
  EXPECT_ERROR_HAS(model.forward(ids, pos, three), "masks", "got 3", "expected 1 or 2");
  const std::vector<MaskDescriptor> wrong{MaskDescriptor::training(2, 1, 2, 0)};
  EXPECT_ERROR_HAS(model.forward(ids, pos, wrong), "masks[0]", "response_len");
  EXPECT_ERROR_HAS(model.forward(ids, pos, one, Tensor::from_vector(std::vector<int32_t>{0, 8}, {2})), "'rows'",
                   "element 1", "[0, 8)");

  Qwen3Activations acts;
  model.forward(ids, pos, one, Tensor(), &acts);
  EXPECT_ERROR_HAS(model.backward(acts, Tensor({7, c.vocab_size})), "'dlogits'", "dimension 0", "is 7, expected 8");
  EXPECT_ERROR_HAS(model.backward(Qwen3Activations(), Tensor({8, c.vocab_size})), "activations");

  KVCache cache(c, 2, 6);
  model.forward_cached(ids, pos, one, cache, true);
  const std::vector<MaskDescriptor> at4{MaskDescriptor::causal(0, 4)};
  EXPECT_ERROR_HAS(model.forward_cached(ids, pos, at4, cache, true), "'ids'", "dimension 1", "max_len 6");
  EXPECT_ERROR_HAS(model.forward_cached(ids.slice(0, 1), pos.slice(0, 1), at4, cache, false), "'ids'",
                   "dimension 0", "batch");
  const Tensor one_tok = ids_tensor({1, 2}, 2, 1), one_pos = ids_tensor({4, 4}, 2, 1);
  EXPECT_ERROR_HAS(model.forward_cached(one_tok, one_pos, one, cache, false), "masks[0]", "q_offset", "committed length 4");
  EXPECT_NO_THROW(model.forward_cached(one_tok, one_pos, at4, cache, false));
  EXPECT_ERROR_HAS(cache.truncate(5), "truncate", "[0, 4]");
}

// ---- FLOPs -------------------------------------------------------------------------------------

TEST(Qwen3Model, FlopCountFollowsTheDocumentedFormula) {
  Qwen3Config c = tiny_config(true);
  const double H = 8, I = 12, L = 2, V = 13, q = 12, kv = 4;
  const double n_mm = L * (2 * H * q + 2 * H * kv + 3 * H * I) + V * H;
  EXPECT_DOUBLE_EQ(forward_flops_per_token(c, 10), 2 * n_mm + 4 * L * 3 * 4 * 10);
  EXPECT_DOUBLE_EQ(forward_flops_per_token(c, 10, false), 2 * (n_mm - V * H) + 4 * L * 3 * 4 * 10);
  EXPECT_DOUBLE_EQ(training_flops_per_token(c, 10), 3 * forward_flops_per_token(c, 10));
  // A causal call of T tokens: T(T+1)/2 pairs, i.e. the mean context (T+1)/2 per token.
  const int64_t T = 9;
  const std::vector<MaskDescriptor> causal{MaskDescriptor::causal()};
  EXPECT_DOUBLE_EQ(forward_flops(c, causal, 1, T, T, T), T * forward_flops_per_token(c, (T + 1) / 2.0));
  // One block covering everything: full attention; logits on 2 rows of 2 sequences.
  const std::vector<MaskDescriptor> full{MaskDescriptor::block_causal(T, 0)};
  EXPECT_DOUBLE_EQ(forward_flops(c, full, 2, T, T, 2),
                   2 * T * forward_flops_per_token(c, T, false) + 2 * 2 * V * H);
}
