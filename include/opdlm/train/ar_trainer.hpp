// Autoregressive training (`opdlm train --mode ar`): pretraining on token shards or SFT on JSONL
// (loss on the response only), AdamW with warm-up + cosine, clipping, periodic held-out loss and
// perplexity, JSONL metrics, and an HDF5 model file at the end (and at every save_every steps).
#pragma once

#include <boost/program_options/options_description.hpp>
#include <cstdint>
#include <string>

#include "opdlm/base/config.hpp"
#include "opdlm/model/qwen3.hpp"
#include "opdlm/ops/adamw.hpp"
#include "opdlm/train/lm_batch.hpp"
#include "opdlm/train/lr_schedule.hpp"

namespace opdlm::train {

struct ArTrainOptions {
  // [model]
  std::string model_init;    // model.h5 to continue from; empty: random init from model_config
  std::string model_config;  // config.json of a fresh model
  std::string tokenizer;     // tokenizer.json (SFT data; recorded with the model)
  // [data]
  std::string train_shard;   // token shard for pretraining ...
  std::string sft_jsonl;     // ... or prompt/response JSONL for SFT (exactly one of the two)
  std::string eval_shard;    // held-out token shard for loss / perplexity (optional)
  int64_t seq_len = 128;
  int64_t batch_size = 16;
  // [optim]
  LrSchedule schedule;
  ops::AdamWConfig adam;
  double grad_clip = 1.0;
  // [run]
  std::string out_dir;
  uint32_t seed = 1234;
  int64_t log_every = 10;
  int64_t eval_every = 0;    // 0: only at the end
  int64_t eval_windows = 64; // windows of the eval shard per evaluation
  int64_t save_every = 0;    // 0: only at the end

  static boost::program_options::options_description schema();
  static ArTrainOptions from_config(const ResolvedConfig& cfg);
};

struct ArTrainSummary {
  int64_t params = 0, steps = 0, tokens = 0;
  double wall_s = 0, tokens_per_s = 0, final_train_loss = 0;
  double eval_loss = 0, eval_ppl = 0, unigram_ppl = 0;  // eval figures are 0 without an eval shard
  std::string model_path;
};

ArTrainSummary run_ar_training(const ArTrainOptions& opts, const std::string& resolved_table);

// Mean next-token NLL (nats) of `model` over the first `windows` windows of `eval`, in order.
double mean_nll(const model::Qwen3Model& model, const ShardWindows& eval, int64_t windows, int64_t batch_size);
// Perplexity of the add-one-smoothed unigram distribution of `train` on the same eval targets.
double unigram_perplexity(const io::TokenShard& train, const ShardWindows& eval, int64_t windows, int64_t vocab);

}  // namespace opdlm::train
