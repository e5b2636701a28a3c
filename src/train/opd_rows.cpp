// OPD training rows: state selection, the [prompt | x0 | xt] layout, teacher targets, row losses.
#include "opdlm/train/opd_rows.hpp"

#include <algorithm>
#include <cmath>
#include <set>

#include "opdlm/base/error.hpp"
#include "opdlm/ops/cross_entropy.hpp"
#include "opdlm/ops/softmax.hpp"
#include "opdlm/parallel/vocab_parallel.hpp"

namespace opdlm::train {

namespace {

struct Block {
  int64_t begin, end;
};
std::vector<Block> blocks_of(int64_t len, int64_t b) {
  OPDLM_CHECK(b >= 1, "block size must be >= 1, got ", b);
  std::vector<Block> out;
  for (int64_t s = 0; s < len; s += b) out.push_back({s, std::min(s + b, len)});
  return out;
}

// Distinct step values of a block, ascending.
std::vector<int32_t> rounds_of(std::span<const int32_t> step_map, const Block& blk) {
  std::set<int32_t> v(step_map.begin() + blk.begin, step_map.begin() + blk.end);
  return {v.begin(), v.end()};
}

}  // namespace

// ---- state selection -----------------------------------------------------------------------------

std::vector<uint8_t> select_state_per_block(std::span<const int32_t> step_map, int64_t b, const RngKey& key) {
  std::vector<uint8_t> masked(step_map.size(), 0);
  const auto blocks = blocks_of(static_cast<int64_t>(step_map.size()), b);
  for (size_t k = 0; k < blocks.size(); ++k) {
    const auto v = rounds_of(step_map, blocks[k]);
    CounterRng rng({key.seed, RngPurpose::state_select, key.step, key.sample_id, static_cast<uint32_t>(k)});
    CounterRng::Cursor cur(rng);
    const int32_t vr = v[cur.below(static_cast<uint32_t>(v.size()))];
    for (int64_t j = blocks[k].begin; j < blocks[k].end; ++j) masked[size_t(j)] = step_map[size_t(j)] >= vr;
  }
  return masked;
}

std::vector<std::vector<uint8_t>> all_rounds(std::span<const int32_t> step_map, int64_t b) {
  const auto blocks = blocks_of(static_cast<int64_t>(step_map.size()), b);
  std::vector<std::vector<int32_t>> rounds;
  size_t most = 0;
  for (const auto& blk : blocks) {
    rounds.push_back(rounds_of(step_map, blk));
    most = std::max(most, rounds.back().size());
  }
  std::vector<std::vector<uint8_t>> out(most, std::vector<uint8_t>(step_map.size(), 0));
  for (size_t k = 0; k < blocks.size(); ++k)
    for (size_t r = 0; r < rounds[k].size(); ++r)
      for (int64_t j = blocks[k].begin; j < blocks[k].end; ++j)
        out[r][size_t(j)] = step_map[size_t(j)] >= rounds[k][r];
  return out;
}

RandomState random_states(int64_t response_len, int64_t b, const RngKey& key) {
  RandomState s;
  s.masked.assign(size_t(std::max<int64_t>(response_len, 0)), 0);
  const auto blocks = blocks_of(response_len, b);
  for (size_t k = 0; k < blocks.size(); ++k) {
    CounterRng rng({key.seed, RngPurpose::random_mask, key.step, key.sample_id, static_cast<uint32_t>(k)});
    CounterRng::Cursor cur(rng);
    const double t = cur.uniform();
    s.t.push_back(t);
    bool any = false;
    for (int64_t j = blocks[k].begin; j < blocks[k].end; ++j) {
      const bool m = cur.uniform() < t;
      s.masked[size_t(j)] = m;
      any |= m;
    }
    if (!any) s.masked[size_t(blocks[k].begin + cur.below(static_cast<uint32_t>(blocks[k].end - blocks[k].begin)))] = 1;
  }
  return s;
}

std::vector<uint8_t> loss_domain(std::span<const int32_t> x0, int64_t real_len, int32_t eos_id, bool exclude_eos) {
  const int64_t L1 = static_cast<int64_t>(x0.size());
  const int64_t R = real_len < 0 ? L1 : std::min(real_len, L1);
  int64_t e = R;
  if (eos_id >= 0)
    for (int64_t j = 0; j < R; ++j)
      if (x0[size_t(j)] == eos_id) {
        e = j;
        break;
      }
  const int64_t end = exclude_eos ? e : std::min(e + 1, R);
  std::vector<uint8_t> d(size_t(L1), 0);
  for (int64_t j = 0; j < end; ++j) d[size_t(j)] = 1;
  return d;
}

// ---- rows ----------------------------------------------------------------------------------------

RowInputs build_row_inputs(const TrainingRow& row, int64_t b, int32_t mask_id, int32_t pad_id) {
  const std::string who = "training row of sample " + std::to_string(row.sample_id);
  if (row.prompt.empty()) OPDLM_FAIL_AT(who, "prompt", "empty prompt (token 0's target needs a prompt token)");
  if (row.x0.empty()) OPDLM_FAIL_AT(who, "x0", "empty response");
  if (row.masked.size() != row.x0.size())
    OPDLM_FAIL_AT(who, "masked", "state has ", row.masked.size(), " entries, the response ", row.x0.size());
  if (row.R() > row.L1()) OPDLM_FAIL_AT(who, "real_len", row.R(), " exceeds the response length ", row.L1());
  if (row.pad_left < 0) OPDLM_FAIL_AT(who, "pad_left", "must be >= 0");
  if (mask_id < 0) OPDLM_FAIL_AT(who, "mask_id", "the [MASK] id is required");
  const int64_t P = static_cast<int64_t>(row.prompt.size()), L0 = row.L0(), L1 = row.L1(), N = row.N();
  RowInputs in;
  in.ids = Tensor::empty({1, N}, DType::i32);
  in.positions = Tensor::empty({1, N}, DType::i32);
  int32_t* ids = in.ids.data<int32_t>();
  int32_t* pos = in.positions.data<int32_t>();
  for (int64_t i = 0; i < row.pad_left; ++i) ids[i] = pad_id, pos[i] = 1;
  for (int64_t i = 0; i < P; ++i) ids[row.pad_left + i] = row.prompt[size_t(i)], pos[row.pad_left + i] = int32_t(i);
  for (int64_t j = 0; j < L1; ++j) {
    ids[L0 + j] = row.x0[size_t(j)];
    ids[L0 + L1 + j] = row.masked[size_t(j)] ? mask_id : row.x0[size_t(j)];
    pos[L0 + j] = pos[L0 + L1 + j] = int32_t(P + j);
  }
  in.mask = ops::MaskDescriptor::training(b, P, L1, row.pad_left);
  return in;
}

std::vector<int64_t> loss_positions(const TrainingRow& row, const RowLossSpec& spec) {
  const auto dom = loss_domain(row.x0, row.R(), spec.eos_id, spec.exclude_eos);
  std::vector<int64_t> js;
  for (size_t j = 0; j < dom.size() && j < row.masked.size(); ++j)
    if (dom[j] && row.masked[j]) js.push_back(static_cast<int64_t>(j));
  return js;
}

Tensor teacher_logprobs(const model::Qwen3Model& teacher, std::span<const int32_t> prompt,
                        std::span<const int32_t> x0, std::span<const int64_t> js) {
  OPDLM_CHECK(!prompt.empty(), "teacher_logprobs: the prompt must not be empty");
  const int64_t P = static_cast<int64_t>(prompt.size()), L1 = static_cast<int64_t>(x0.size());
  // Only positions up to the last requested target are needed: token j's target sits at P + j - 1.
  int64_t last = 0;
  for (int64_t j : js) {
    OPDLM_CHECK(j >= 0 && j < L1, "teacher_logprobs: position ", j, " outside the response [0, ", L1, ")");
    last = std::max(last, j);
  }
  const int64_t T = P + last;  // tokens prompt ⊕ x0[0:last]
  Tensor ids = Tensor::empty({1, T}, DType::i32), pos = Tensor::empty({1, T}, DType::i32);
  for (int64_t i = 0; i < T; ++i) {
    ids.data<int32_t>()[i] = i < P ? prompt[size_t(i)] : x0[size_t(i - P)];
    pos.data<int32_t>()[i] = int32_t(i);
  }
  Tensor rows = Tensor::empty({static_cast<int64_t>(js.size())}, DType::i32);
  for (size_t i = 0; i < js.size(); ++i) rows.data<int32_t>()[i] = int32_t(P + js[i] - 1);
  const ops::MaskDescriptor causal = ops::MaskDescriptor::causal();
  if (js.empty()) return Tensor::empty({0, teacher.logit_columns()}, teacher.dtype());
  const Tensor logits = teacher.forward(ids, pos, std::span(&causal, 1), rows);
  // Tensor parallel: the rank's vocabulary columns, normalised over the whole vocabulary.
  if (auto* tp = teacher.tensor_parallel().comm) return parallel::vp_log_softmax(logits, *tp, teacher.vocab_slice());
  return ops::log_softmax_forward(logits);
}

namespace {

Tensor noisy_rows(const TrainingRow& row, std::span<const int64_t> js) {
  Tensor rows = Tensor::empty({static_cast<int64_t>(js.size())}, DType::i32);
  for (size_t i = 0; i < js.size(); ++i) rows.data<int32_t>()[i] = int32_t(row.L0() + row.L1() + js[i]);
  return rows;
}

// Per-position 1/t weights of masked_ce for the loss positions js.
Tensor ce_weights(const TrainingRow& row, const RowLossSpec& spec, std::span<const int64_t> js, DType dt) {
  const int64_t b = spec.block_size, L1 = row.L1();
  const int64_t nblocks = (L1 + b - 1) / b;
  if (static_cast<int64_t>(row.t_block.size()) != nblocks)
    OPDLM_FAIL_AT("training row of sample " + std::to_string(row.sample_id), "t_block", "rm-ce needs one t per block (",
                  nblocks, "), got ", row.t_block.size());
  Tensor w = Tensor::empty({static_cast<int64_t>(js.size())}, dt);
  for (size_t i = 0; i < js.size(); ++i) {
    const int64_t k = js[i] / b;
    const double t = row.t_block[size_t(k)];
    double wk;
    if (spec.ce_weighting == CeWeighting::inverse_t) {
      wk = 1.0 / std::max(t, spec.ce_t_min);
    } else {
      const double n = static_cast<double>(std::min(b, L1 - k * b));
      wk = 1.0 / (t + std::pow(1.0 - t, n) / n);
    }
    if (dt == DType::f64) w.data<double>()[i] = wk;
    else w.data<float>()[i] = static_cast<float>(wk);
  }
  return w;
}

RowLoss row_loss_impl(const model::Qwen3Model& student, model::Qwen3Model* trainable, const Tensor& teacher_logp,
                      const TrainingRow& row, const RowLossSpec& spec, double grad_scale,
                      model::Qwen3Activations* acts) {
  RowLoss out;
  const RowInputs in = build_row_inputs(row, spec.block_size, spec.mask_id, spec.pad_id);
  const auto js = loss_positions(row, spec);
  const auto dom = loss_domain(row.x0, row.R(), spec.eos_id, spec.exclude_eos);
  out.domain = std::count(dom.begin(), dom.end(), uint8_t(1));
  out.loss_positions = static_cast<int64_t>(js.size());
  out.tokens = row.N();
  if (js.empty()) return out;  // nothing to learn from this row: no forward at all
  // FLOPs of the whole model (a budget counter must not depend on the layout).
  out.student_forward_flops = model::forward_flops(student.full_config(), std::span(&in.mask, 1), 1, row.N(), row.N(),
                                                   static_cast<int64_t>(js.size()));
  parallel::Communicator* tp = student.tensor_parallel().comm;
  const parallel::VocabSlice slice = student.vocab_slice();
  if (grad_scale != 0) out.student_backward_flops = 2 * out.student_forward_flops;

  const Tensor rows = noisy_rows(row, js);
  Tensor logits = student.forward(in.ids, in.positions, std::span(&in.mask, 1), rows, grad_scale != 0 ? acts : nullptr);
  const int64_t n = static_cast<int64_t>(js.size());
  Tensor dlogits;
  if (spec.objective == RowObjective::teacher_kl) {
    expect_shape(teacher_logp, "teacher_logp", {n, student.logit_columns()});
    Tensor lse;
    Tensor D = tp ? parallel::vp_divergence_forward(teacher_logp, logits, spec.divergence, &lse, *tp, slice)
                  : ops::divergence_forward(teacher_logp, logits, spec.divergence, &lse);
    double sum = 0;
    for (int64_t i = 0; i < n; ++i) sum += D.item(i);
    out.loss = sum / static_cast<double>(n);
    if (grad_scale != 0) {
      Tensor dloss = Tensor::full({n}, grad_scale / static_cast<double>(n), logits.dtype());
      dlogits = tp ? parallel::vp_divergence_backward(teacher_logp, logits, lse, dloss, spec.divergence, *tp, slice)
                   : ops::divergence_backward(teacher_logp, logits, lse, dloss, spec.divergence);
    }
  } else {
    Tensor targets = Tensor::empty({n}, DType::i32);
    for (int64_t i = 0; i < n; ++i) targets.data<int32_t>()[i] = row.x0[size_t(js[size_t(i)])];
    const Tensor w = ce_weights(row, spec, js, logits.dtype());
    Tensor lse;
    Tensor ce = tp ? parallel::vp_cross_entropy_forward(logits, targets, w, &lse, *tp, slice)
                   : ops::cross_entropy_forward(logits, targets, w, &lse);
    double sum = 0;
    for (int64_t i = 0; i < n; ++i) sum += ce.item(i);
    const double denom = static_cast<double>(std::max<int64_t>(out.domain, 1));
    out.loss = sum / denom;
    if (grad_scale != 0) {
      Tensor dloss = Tensor::full({n}, grad_scale / denom, logits.dtype());
      dlogits = tp ? parallel::vp_cross_entropy_backward(logits, targets, w, lse, dloss, *tp, slice)
                   : ops::cross_entropy_backward(logits, targets, w, lse, dloss);
    }
  }
  if (grad_scale != 0) trainable->backward(*acts, dlogits);
  return out;
}

}  // namespace

RowLoss row_loss(model::Qwen3Model& student, const Tensor& teacher_logp, const TrainingRow& row,
                 const RowLossSpec& spec, double grad_scale, model::Qwen3Activations& acts) {
  return row_loss_impl(student, &student, teacher_logp, row, spec, grad_scale, &acts);
}

RowLoss row_loss_eval(const model::Qwen3Model& student, const Tensor& teacher_logp, const TrainingRow& row,
                      const RowLossSpec& spec) {
  return row_loss_impl(student, nullptr, teacher_logp, row, spec, 0.0, nullptr);
}

Tensor student_logprobs(const model::Qwen3Model& student, const TrainingRow& row, const RowLossSpec& spec,
                        std::span<const int64_t> js) {
  const RowInputs in = build_row_inputs(row, spec.block_size, spec.mask_id, spec.pad_id);
  const Tensor logits = student.forward(in.ids, in.positions, std::span(&in.mask, 1), noisy_rows(row, js));
  if (auto* tp = student.tensor_parallel().comm) return parallel::vp_log_softmax(logits, *tp, student.vocab_slice());
  return ops::log_softmax_forward(logits);
}

// ---- state-KL evaluation -------------------------------------------------------------------------

StateKl state_kl(const model::Qwen3Model& teacher, const model::Qwen3Model& student,
                 std::span<const RolloutView> rollouts, const RowLossSpec& spec_in, uint32_t seed, uint32_t step) {
  RowLossSpec spec = spec_in;
  spec.objective = RowObjective::teacher_kl;
  spec.divergence = ops::DivergenceSpec{};  // forward KL, full vocabulary
  // The EOS position is scored: with it excluded, a student that stops at once would have no
  // loss position at all and read as KL 0.
  spec.exclude_eos = false;
  StateKl s;
  double own = 0, rnd = 0;
  for (const RolloutView& r : rollouts) {
    if (r.prompt.empty() || r.response.empty()) {
      ++s.skipped;
      continue;
    }
    TrainingRow own_row;
    own_row.sample_id = r.sample_id;
    own_row.prompt.assign(r.prompt.begin(), r.prompt.end());
    own_row.x0.assign(r.response.begin(), r.response.end());
    TrainingRow rnd_row = own_row;
    own_row.masked = select_state_per_block(r.step_map, spec.block_size, {seed, RngPurpose::state_select, step, r.sample_id, 0});
    rnd_row.masked = random_states(own_row.L1(), spec.block_size, {seed, RngPurpose::random_mask, step, r.sample_id, 0}).masked;
    const auto js_own = loss_positions(own_row, spec), js_rnd = loss_positions(rnd_row, spec);
    if (js_own.empty() || js_rnd.empty()) {
      ++s.skipped;
      continue;
    }
    own += row_loss_eval(student, teacher_logprobs(teacher, r.prompt, r.response, js_own), own_row, spec).loss;
    rnd += row_loss_eval(student, teacher_logprobs(teacher, r.prompt, r.response, js_rnd), rnd_row, spec).loss;
    s.own_positions += static_cast<int64_t>(js_own.size());
    s.random_positions += static_cast<int64_t>(js_rnd.size());
    ++s.rows;
  }
  if (s.rows > 0) {
    s.own = own / static_cast<double>(s.rows);
    s.random = rnd / static_cast<double>(s.rows);
  }
  return s;
}

}  // namespace opdlm::train
