// ZeRO-1 sharded AdamW: shard layout (pure), deterministic reduce-scatter, chunked global norm,
// clipping and AdamW on the shard, all-gather of the parameters.
#include "opdlm/parallel/zero1.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "opdlm/base/error.hpp"
#include "opdlm/ops/grad_norm.hpp"

namespace opdlm::parallel {

std::vector<ParamUnit> param_units(const std::vector<int64_t>& tensor_numels, int64_t chunk) {
  OPDLM_CHECK(chunk >= 1, "param_units: chunk ", chunk);
  std::vector<ParamUnit> out;
  for (size_t t = 0; t < tensor_numels.size(); ++t) {
    OPDLM_CHECK(tensor_numels[t] >= 0, "param_units: tensor ", t, " has ", tensor_numels[t], " elements");
    for (int64_t b = 0; b < tensor_numels[t]; b += chunk)
      out.push_back({static_cast<int>(t), b, std::min(tensor_numels[t], b + chunk)});
  }
  return out;
}

std::vector<size_t> shard_units(const std::vector<ParamUnit>& units, int dp) {
  OPDLM_CHECK(dp >= 1, "shard_units: dp ", dp);
  int64_t total = 0;
  for (const auto& u : units) total += u.size();
  std::vector<size_t> first(size_t(dp) + 1, units.size());
  first[0] = 0;
  size_t u = 0;
  int64_t done = 0;
  for (int d = 0; d + 1 < dp; ++d) {
    // Rank d's run ends at the first unit boundary at or past (d + 1) / dp of the elements.
    const int64_t target = (total * (d + 1) + dp - 1) / dp;
    while (u < units.size() && done < target) done += units[u++].size();
    first[size_t(d) + 1] = u;
  }
  return first;
}

ShardedAdamW::ShardedAdamW(std::vector<Tensor*> params, std::vector<bool> no_decay, Communicator& dp)
    : params_(std::move(params)), no_decay_(std::move(no_decay)), dp_(&dp) {
  OPDLM_CHECK(no_decay_.size() == params_.size(), "ShardedAdamW: ", no_decay_.size(), " decay flags for ",
              params_.size(), " tensors");
  std::vector<int64_t> numels;
  for (size_t i = 0; i < params_.size(); ++i) {
    OPDLM_CHECK(params_[i] && params_[i]->dtype() == DType::f32 && params_[i]->device() == Device::cpu,
                "ShardedAdamW: parameter ", i, " must be an f32 CPU tensor");
    numels.push_back(params_[i]->numel());
  }
  units_ = param_units(numels, ops::kGradNormChunk);
  first_ = shard_units(units_, dp.size());
  for (int r = 0; r < dp.size(); ++r) {
    int64_t n = 0;
    for (size_t u = first_[size_t(r)]; u < first_[size_t(r) + 1]; ++u) n += units_[u].size();
    padded_ = std::max(padded_, n);
    if (r == dp.rank()) shard_elems_ = n;
  }
  m_.assign(size_t(shard_elems_), 0.0f);
  v_.assign(size_t(shard_elems_), 0.0f);
}

void ShardedAdamW::set_tensor_parallel(Communicator* tp, std::vector<bool> replicated) {
  OPDLM_CHECK(!tp || replicated.size() == params_.size(), "ShardedAdamW: ", replicated.size(),
              " replication flags for ", params_.size(), " tensors");
  tp_ = tp && tp->size() > 1 ? tp : nullptr;
  replicated_ = std::move(replicated);
}

int64_t ShardedAdamW::state_bytes() const { return 2 * shard_elems_ * int64_t(sizeof(float)); }

double ShardedAdamW::step(const std::vector<const Tensor*>& grads, int64_t step, const ops::AdamWConfig& cfg,
                          double clip, const std::function<bool(double)>& accept) {
  OPDLM_CHECK(grads.size() == params_.size(), "ShardedAdamW::step: ", grads.size(), " grads for ", params_.size(),
              " parameters");
  for (size_t i = 0; i < grads.size(); ++i)
    OPDLM_CHECK(grads[i] && grads[i]->dtype() == DType::f32 && grads[i]->numel() == params_[i]->numel(),
                "ShardedAdamW::step: grad ", i, " does not match its parameter");
  const int dp = dp_->size(), me = dp_->rank();
  const size_t P = size_t(padded_);

  // ---- sum the parts over DP into this rank's shard (rank r's units packed at r * P) ----
  std::vector<float>& send = send_;
  std::vector<float>& shard = shard_;
  send.assign(size_t(dp) * P, 0.0f);
  shard.resize(P);
  for (int r = 0; r < dp; ++r) {
    size_t off = size_t(r) * P;
    for (size_t u = first_[size_t(r)]; u < first_[size_t(r) + 1]; ++u) {
      const ParamUnit& x = units_[u];
      std::memcpy(send.data() + off, grads[size_t(x.tensor)]->data<float>() + x.begin, size_t(x.size()) * sizeof(float));
      off += size_t(x.size());
    }
  }
  dp_->reduce_scatter(std::span<const float>(send), std::span<float>(shard));

  const double norm = exact_norm_ ? exact_norm(shard) : chunked_norm(shard);
  if (!std::isfinite(norm)) return norm;
  if (accept && !accept(norm)) return norm;

  // ---- clip and update the shard ----
  const double c = clip > 0 ? ops::clip_coefficient(norm, clip) : 1.0;
  if (c < 1.0)
    for (float& g : shard) g = static_cast<float>(static_cast<double>(g) * c);  // ops::scale_grads' rounding
  {
    size_t off = 0;
    for (size_t u = first_[size_t(me)]; u < first_[size_t(me) + 1]; ++u) {
      const ParamUnit& x = units_[u];
      ops::AdamWConfig a = cfg;
      if (no_decay_[size_t(x.tensor)]) a.weight_decay = 0;
      ops::adamw_step_range(params_[size_t(x.tensor)]->data<float>() + x.begin, shard.data() + off, m_.data() + off,
                            v_.data() + off, x.size(), step, a);
      off += size_t(x.size());
    }
  }
  all_gather_params();
  return norm;
}

double ShardedAdamW::exact_norm(const std::vector<float>& shard) const {
  ops::ExactSquareSum acc;
  const bool skip_replicated = tp_ && tp_->rank() != 0;  // replicated tensors: TP rank 0's copy only
  size_t off = 0;
  for (size_t u = first_[size_t(dp_->rank())]; u < first_[size_t(dp_->rank()) + 1]; ++u) {
    const ParamUnit& x = units_[u];
    const std::span<const float> part(shard.data() + off, size_t(x.size()));
    if (!(skip_replicated && !replicated_.empty() && replicated_[size_t(x.tensor)])) {
      acc.add(part);
    } else {  // counted once (TP rank 0), but a NaN or inf in this rank's copy must still reach every rank
      for (float g : part)
        if (!std::isfinite(g)) acc.add(g);
    }
    off += size_t(x.size());
  }
  auto lanes = acc.lanes();
  dp_->all_reduce(std::span<int64_t>(lanes));
  if (tp_) tp_->all_reduce(std::span<int64_t>(lanes));
  return std::sqrt(ops::ExactSquareSum::value(lanes));
}

double ShardedAdamW::chunked_norm(const std::vector<float>& shard) const {
  const int dp = dp_->size(), me = dp_->rank();
  // ---- the global norm in ops::grad_sq_sum's order: chunk sums per tensor, then tensor sums ----
  size_t max_units = 0;
  for (int r = 0; r < dp; ++r) max_units = std::max(max_units, first_[size_t(r) + 1] - first_[size_t(r)]);
  std::vector<double> mine(max_units, 0.0), all(max_units * size_t(dp));
  {
    size_t off = 0;
    for (size_t u = first_[size_t(me)]; u < first_[size_t(me) + 1]; ++u) {
      mine[u - first_[size_t(me)]] = ops::chunk_sq_sum(shard.data() + off, units_[u].size());
      off += size_t(units_[u].size());
    }
  }
  dp_->all_gather(std::span<const double>(mine), std::span<double>(all));
  // Tensor sums in tensor order; under TP the sharded and the replicated tensors are two totals.
  double total = 0.0, replicated_total = 0.0, tensor_sum = 0.0;
  int current = units_.empty() ? 0 : units_[0].tensor;
  auto close_tensor = [&] {
    if (tp_ && !replicated_.empty() && replicated_[size_t(current)]) replicated_total += tensor_sum;
    else total += tensor_sum;
  };
  for (int r = 0; r < dp; ++r)
    for (size_t u = first_[size_t(r)]; u < first_[size_t(r) + 1]; ++u) {
      if (units_[u].tensor != current) {  // an empty tensor has no unit: its +0 sum changes nothing
        close_tensor();
        tensor_sum = 0.0;
        current = units_[u].tensor;
      }
      tensor_sum += all[size_t(r) * max_units + (u - first_[size_t(r)])];
    }
  close_tensor();
  if (tp_) {  // every TP rank's shard, then the replicated tensors once (a non-finite copy on any rank counts)
    double both[2] = {total, std::isfinite(replicated_total) ? 0.0 : 1.0};
    tp_->all_reduce_tree(std::span<double>(both));
    total = both[1] > 0 ? std::numeric_limits<double>::quiet_NaN() : both[0] + replicated_total;
  }
  return std::sqrt(total);
}

void ShardedAdamW::all_gather_params() {
  const int dp = dp_->size(), me = dp_->rank();
  const size_t P = size_t(padded_);
  // ---- every rank gets every updated parameter ----
  std::vector<float>& own = own_;
  std::vector<float>& gathered = gathered_;
  own.assign(P, 0.0f);
  gathered.resize(size_t(dp) * P);
  {
    size_t off = 0;
    for (size_t u = first_[size_t(me)]; u < first_[size_t(me) + 1]; ++u) {
      const ParamUnit& x = units_[u];
      std::memcpy(own.data() + off, params_[size_t(x.tensor)]->data<float>() + x.begin, size_t(x.size()) * sizeof(float));
      off += size_t(x.size());
    }
  }
  dp_->all_gather(std::span<const float>(own), std::span<float>(gathered));
  for (int r = 0; r < dp; ++r) {
    if (r == me) continue;
    size_t off = size_t(r) * P;
    for (size_t u = first_[size_t(r)]; u < first_[size_t(r) + 1]; ++u) {
      const ParamUnit& x = units_[u];
      std::memcpy(params_[size_t(x.tensor)]->data<float>() + x.begin, gathered.data() + off, size_t(x.size()) * sizeof(float));
      off += size_t(x.size());
    }
  }
}

void ShardedAdamW::gather_moments(std::vector<std::vector<float>>& m, std::vector<std::vector<float>>& v) {
  const int dp = dp_->size();
  const size_t P = size_t(padded_);
  m.assign(params_.size(), {});
  v.assign(params_.size(), {});
  for (size_t i = 0; i < params_.size(); ++i) m[i].assign(size_t(params_[i]->numel()), 0.0f), v[i] = m[i];
  for (auto [mine, whole] : {std::pair{&m_, &m}, std::pair{&v_, &v}}) {
    std::vector<float> own(P, 0.0f), all(size_t(dp) * P);
    std::copy(mine->begin(), mine->end(), own.begin());
    dp_->all_gather(std::span<const float>(own), std::span<float>(all));
    for (int r = 0; r < dp; ++r) {
      size_t off = size_t(r) * P;
      for (size_t u = first_[size_t(r)]; u < first_[size_t(r) + 1]; ++u) {
        const ParamUnit& x = units_[u];
        std::copy_n(all.data() + off, x.size(), (*whole)[size_t(x.tensor)].data() + x.begin);
        off += size_t(x.size());
      }
    }
  }
}

void ShardedAdamW::set_moments(const std::vector<std::vector<float>>& m, const std::vector<std::vector<float>>& v) {
  OPDLM_CHECK(m.size() == params_.size() && v.size() == params_.size(), "ShardedAdamW::set_moments: ", m.size(),
              " tensors for ", params_.size(), " parameters");
  for (size_t i = 0; i < params_.size(); ++i)
    OPDLM_CHECK(int64_t(m[i].size()) == params_[i]->numel() && int64_t(v[i].size()) == params_[i]->numel(),
                "ShardedAdamW::set_moments: tensor ", i, " has ", m[i].size(), " moments for ", params_[i]->numel(),
                " parameters");
  size_t off = 0;
  for (size_t u = first_[size_t(dp_->rank())]; u < first_[size_t(dp_->rank()) + 1]; ++u) {
    const ParamUnit& x = units_[u];
    std::copy_n(m[size_t(x.tensor)].data() + x.begin, x.size(), m_.data() + off);
    std::copy_n(v[size_t(x.tensor)].data() + x.begin, x.size(), v_.data() + off);
    off += size_t(x.size());
  }
}

}  // namespace opdlm::parallel
