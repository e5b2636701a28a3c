// OPD training rows (algorithm.md A 1-3, B 1.5, B 4-7): which states of a rollout become training
// rows (one state per block, all rounds, random-mask), the [prompt | x0 | xt] student row, the
// teacher's clean-prefix targets, and the row losses (KL family, 1/t-weighted cross-entropy) with
// their gradients. One row is one sequence: no batch-global padding, so a row's loss does not depend
// on which other rows share its update.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "opdlm/base/rng.hpp"
#include "opdlm/model/qwen3.hpp"
#include "opdlm/ops/kl.hpp"
#include "opdlm/tensor/tensor.hpp"

namespace opdlm::train {

// ---- state selection -----------------------------------------------------------------------------
// A state is a mask over the response: masked[j] = 1 means xt[j] = [MASK]. Response blocks are
// [kb, kb + b) from the first response token (A 1); the last may be partial.

// The rounds of block k (B 4.2): v_1 < ... < v_m its distinct step values; round r masks the slots
// with step_map >= v_r (round 1 = fully masked; the fully revealed block is never a state).
// One state per block (B 4.3): r uniform over block k's own rounds, drawn with
// CounterRng({key.seed, state_select, key.step, key.sample_id, position = k}).below(m).
std::vector<uint8_t> select_state_per_block(std::span<const int32_t> step_map, int64_t b, const RngKey& key);
// All rounds (one_state_per_block = false): row r = round r + 1 of EVERY block in lock-step; a block
// with fewer rounds is fully revealed in that row. Round 1 first.
std::vector<std::vector<uint8_t>> all_rounds(std::span<const int32_t> step_map, int64_t b);

// Random-mask states (B 7, rm-kl / rm-ce): per block k, t_k = uniform draw 0 of
// CounterRng({seed, random_mask, step, sample_id, position = k}); slot i of the block is masked iff
// draw 1 + i < t_k; a block left without a mask gets one at slot below(len) (cursor after those
// draws). t is in [0, 1).
struct RandomState {
  std::vector<uint8_t> masked;
  std::vector<double> t;  // per block
};
RandomState random_states(int64_t response_len, int64_t b, const RngKey& key);

// A 3 / B 6.2: responses positions that may get loss: j < e (exclude_eos) or j <= e, e = the first
// EOS in x0[0, R) (R if none); never j >= R (x0[R:] is right padding). eos_id < 0: no EOS.
std::vector<uint8_t> loss_domain(std::span<const int32_t> x0, int64_t real_len, int32_t eos_id, bool exclude_eos);

// ---- rows ----------------------------------------------------------------------------------------
// S = [pad^pad_left | prompt (P) | x0 (L1) | xt (L1)]; position ids: pads 1, prompt 0..P-1, x0[j]
// and xt[j] both P + j; mask MaskDescriptor::training(b, P, L1, pad_left).
struct TrainingRow {
  uint32_t sample_id = 0;
  std::vector<int32_t> prompt;  // P >= 1 (the target of token 0 is read at the last prompt token)
  std::vector<int32_t> x0;      // L1 >= 1: the clean response; x0[real_len:] is right padding
  int64_t real_len = -1;        // R; -1: x0.size()
  int64_t pad_left = 0;         // only to reproduce batch-padded layouts (opd_ref cases)
  std::vector<uint8_t> masked;  // [L1] the state
  std::vector<double> t_block;  // rm-ce: per-block t of random_states
  int64_t R() const { return real_len < 0 ? static_cast<int64_t>(x0.size()) : real_len; }
  int64_t L0() const { return pad_left + static_cast<int64_t>(prompt.size()); }
  int64_t L1() const { return static_cast<int64_t>(x0.size()); }
  int64_t N() const { return L0() + 2 * L1(); }
};

struct RowInputs {
  Tensor ids, positions;  // i32 [1, N]
  ops::MaskDescriptor mask;
};
// Error (naming the row's sample id) for an empty prompt/response or sizes that disagree.
RowInputs build_row_inputs(const TrainingRow& row, int64_t b, int32_t mask_id, int32_t pad_id);

// ---- losses --------------------------------------------------------------------------------------
enum class RowObjective : uint8_t {
  teacher_kl,  // a member of the KL family against the teacher (opd, rm-kl)
  masked_ce,   // rm-ce: w_k * CE(x0_j) on the masked domain positions, divided by |domain|
};
enum class CeWeighting : uint8_t {
  inverse_t,  // w_k = 1 / max(t_k, t_min) (MDLM / BD3LM NELBO weight)
  marginal,   // w_k = 1 / (t_k + (1 - t_k)^n_k / n_k): the exact mask probability of random_states
};
struct RowLossSpec {
  RowObjective objective = RowObjective::teacher_kl;
  ops::DivergenceSpec divergence;  // teacher_kl
  CeWeighting ce_weighting = CeWeighting::inverse_t;
  double ce_t_min = 1e-3;
  int64_t block_size = 4;
  int32_t mask_id = -1;
  int32_t eos_id = -1;
  int32_t pad_id = 0;
  bool exclude_eos = true;
};

// Loss positions of a row: every masked position inside loss_domain (B 6.2: all still-masked slots
// of the state, never revealed ones, never past EOS or R).
std::vector<int64_t> loss_positions(const TrainingRow& row, const RowLossSpec& spec);

// Teacher targets (B 5.2, clean_fill): ONE causal teacher pass over prompt ⊕ x0 (positions
// 0..P+L1-1, no pads); the log-probs for response token j are read at position P + j - 1, i.e.
// q_T(. | prompt ⊕ x0[0:j]). Returns log-probs [js.size(), V] (teacher dtype), rows in js order.
// A tensor-parallel teacher returns its vocabulary columns, normalised over the whole vocabulary.
Tensor teacher_logprobs(const model::Qwen3Model& teacher, std::span<const int32_t> prompt,
                        std::span<const int32_t> x0, std::span<const int64_t> js);

struct RowLoss {
  double loss = 0;              // the row's token mean (0 when it has no loss position)
  int64_t loss_positions = 0;   // |masked ∩ domain|
  int64_t domain = 0;           // |domain|
  int64_t tokens = 0;           // N: student row length
  double student_forward_flops = 0, student_backward_flops = 0, teacher_forward_flops = 0;
};

// The row loss (B 6.1-6.3): teacher_kl = sum_j D_j / max(|L|, 1) over loss positions L;
// masked_ce = sum_{j in L} w_k(j) CE_j / max(|domain|, 1). `teacher_logp` [|L|, V] for teacher_kl
// (rows in loss_positions order; see teacher_logprobs), unused for masked_ce.
// grad_scale != 0: ACCUMULATES grad_scale * d loss / d params into the student's gradients (one
// forward + backward); grad_scale = 0: forward only (evaluation), `student` may be frozen.
// `acts` is scratch reused across calls. A tensor-parallel student takes its columns of the teacher
// log-probs and computes the loss vocab-parallel (parallel/vocab_parallel.hpp); FLOPs are always
// those of the whole model.
RowLoss row_loss(model::Qwen3Model& student, const Tensor& teacher_logp, const TrainingRow& row,
                 const RowLossSpec& spec, double grad_scale, model::Qwen3Activations& acts);
// Forward-only convenience for a const model (evaluation).
RowLoss row_loss_eval(const model::Qwen3Model& student, const Tensor& teacher_logp, const TrainingRow& row,
                      const RowLossSpec& spec);

// Student log-probs [|js|, V] at the noisy rows L0 + L1 + j (no shift), for tests and diagnostics.
Tensor student_logprobs(const model::Qwen3Model& student, const TrainingRow& row, const RowLossSpec& spec,
                        std::span<const int64_t> js);

// ---- state-KL evaluation (C3: train/inference mismatch) -------------------------------------------
// Mean over rows of the per-row forward-KL token mean (full vocabulary), for rows built from the
// given rollouts: `own` = one state per block from the rollout's step map (states the student's
// sampler visits), `random` = random_states with the same seed. The EOS position counts (whatever
// spec.exclude_eos says): premature stopping must cost KL, not remove the positions that measure
// it. Rollouts without loss positions are skipped (counted in `skipped`); rows = 0 means "no data",
// not KL 0.
struct StateKl {
  double own = 0, random = 0;
  int64_t rows = 0, skipped = 0, own_positions = 0, random_positions = 0;
};
struct RolloutView {
  uint32_t sample_id;
  std::span<const int32_t> prompt, response, step_map;
};
StateKl state_kl(const model::Qwen3Model& teacher, const model::Qwen3Model& student,
                 std::span<const RolloutView> rollouts, const RowLossSpec& spec, uint32_t seed, uint32_t step);

}  // namespace opdlm::train
