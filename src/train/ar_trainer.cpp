// The autoregressive training loop: batches, loss, backward, clipping, AdamW, eval, metrics, saves.
#include "opdlm/train/ar_trainer.hpp"

#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "opdlm/base/error.hpp"
#include "opdlm/base/log.hpp"
#include "opdlm/io/jsonl_dataset.hpp"
#include "opdlm/io/model_file.hpp"
#include "opdlm/io/tokenizer.hpp"
#include "opdlm/ops/cross_entropy.hpp"
#include "opdlm/ops/grad_norm.hpp"
#include "opdlm/train/train_common.hpp"

namespace po = boost::program_options;

namespace opdlm::train {

po::options_description ArTrainOptions::schema() {
  po::options_description d("opdlm train --mode ar");
  d.add_options()
      ("model.init", po::value<std::string>()->default_value(""), "model.h5 to continue from (empty: fresh)")
      ("model.config", po::value<std::string>()->default_value(""), "config.json of a fresh model")
      ("model.tokenizer", po::value<std::string>()->default_value(""), "tokenizer.json")
      ("data.train", po::value<std::string>()->default_value(""), "token shard for pretraining")
      ("data.sft", po::value<std::string>()->default_value(""), "prompt/response JSONL for SFT")
      ("data.eval", po::value<std::string>()->default_value(""), "held-out token shard")
      ("data.seq_len", po::value<int64_t>()->default_value(128), "tokens per training row")
      ("data.batch_size", po::value<int64_t>()->default_value(16), "rows per optimizer step")
      ("run.out_dir", po::value<std::string>()->default_value(""), "output directory")
      ("run.seed", po::value<uint32_t>()->default_value(1234), "seed (init and data order)")
      ("run.log_every", po::value<int64_t>()->default_value(10), "steps between metric lines")
      ("run.eval_every", po::value<int64_t>()->default_value(0), "steps between evaluations (0: end only)")
      ("run.eval_windows", po::value<int64_t>()->default_value(64), "eval windows per evaluation")
      ("run.save_every", po::value<int64_t>()->default_value(0), "steps between model saves (0: end only)");
  add_optim_options(d, 1e-3, 100, 1000, 0.0, "optimizer steps (cosine horizon)");
  return d;
}

ArTrainOptions ArTrainOptions::from_config(const ResolvedConfig& c) {
  ArTrainOptions o;
  auto where = [&](const char* key) { return c.origin.count(key) ? c.origin.at(key) : std::string("config"); };
  o.model_init = c.get<std::string>("model.init");
  o.model_config = c.get<std::string>("model.config");
  o.tokenizer = c.get<std::string>("model.tokenizer");
  o.train_shard = c.get<std::string>("data.train");
  o.sft_jsonl = c.get<std::string>("data.sft");
  o.eval_shard = c.get<std::string>("data.eval");
  o.seq_len = c.get<int64_t>("data.seq_len");
  o.batch_size = c.get<int64_t>("data.batch_size");
  const OptimOptions opt = read_optim_options(c);
  o.schedule = opt.schedule;
  o.adam = opt.adam;
  o.grad_clip = opt.grad_clip;
  o.out_dir = c.get<std::string>("run.out_dir");
  o.seed = c.get<uint32_t>("run.seed");
  o.log_every = c.get<int64_t>("run.log_every");
  o.eval_every = c.get<int64_t>("run.eval_every");
  o.eval_windows = c.get<int64_t>("run.eval_windows");
  o.save_every = c.get<int64_t>("run.save_every");
  if (o.out_dir.empty()) OPDLM_FAIL_AT(where("run.out_dir"), "run.out_dir", "an output directory is required");
  if (o.train_shard.empty() == o.sft_jsonl.empty())
    OPDLM_FAIL_AT(where("data.train"), "data.train", "set exactly one of data.train (pretraining) and data.sft (SFT)");
  if (o.model_init.empty() && o.model_config.empty())
    OPDLM_FAIL_AT(where("model.config"), "model.config", "set model.config (fresh model) or model.init (continue)");
  if (!o.sft_jsonl.empty() && o.tokenizer.empty())
    OPDLM_FAIL_AT(where("model.tokenizer"), "model.tokenizer", "SFT needs the tokenizer to encode the JSONL");
  if (o.batch_size < 1) OPDLM_FAIL_AT(where("data.batch_size"), "data.batch_size", "must be >= 1");
  if (o.log_every < 1) OPDLM_FAIL_AT(where("run.log_every"), "run.log_every", "must be >= 1");
  if (o.eval_every < 0 || o.save_every < 0 || o.eval_windows < 1)
    OPDLM_FAIL_AT(where("run.eval_every"), "run.eval_every", "eval_every/save_every must be >= 0, eval_windows >= 1");
  o.schedule.validate();
  return o;
}

namespace {

// Mean token cross-entropy of a batch; fills dlogits (for mean loss) when `grad` is non-null.
double batch_loss(const model::Qwen3Model& m, const LmBatch& b, model::Qwen3Activations* acts, Tensor* dlogits) {
  Tensor logits = m.forward(b.ids, b.positions, b.masks, Tensor(), acts);
  Tensor lse;
  Tensor loss = ops::cross_entropy_forward(logits, b.targets, Tensor(), &lse);
  double sum = 0;
  for (int64_t i = 0; i < loss.numel(); ++i) sum += loss.item(i);
  const double n = static_cast<double>(std::max<int64_t>(b.num_targets, 1));
  if (dlogits) {
    Tensor dloss = Tensor::full({loss.numel()}, 1.0 / n, logits.dtype());
    *dlogits = ops::cross_entropy_backward(logits, b.targets, Tensor(), lse, dloss);
  }
  return sum / n;
}


}  // namespace

double mean_nll(const model::Qwen3Model& model, const ShardWindows& eval, int64_t windows, int64_t batch_size) {
  windows = std::min(windows, eval.num_windows());
  double total = 0;
  int64_t count = 0;
  for (int64_t w = 0; w < windows; w += batch_size) {
    const int64_t bs = std::min(batch_size, windows - w);
    LmBatch b = eval.batch(static_cast<uint64_t>(w), bs, 0, /*shuffle=*/false);
    total += batch_loss(model, b, nullptr, nullptr) * static_cast<double>(b.num_targets);
    count += b.num_targets;
  }
  return total / static_cast<double>(std::max<int64_t>(count, 1));
}

double unigram_perplexity(const io::TokenShard& train, const ShardWindows& eval, int64_t windows, int64_t vocab) {
  std::vector<double> counts(static_cast<size_t>(vocab), 1.0);  // add-one smoothing
  for (int32_t t : train.tokens()) counts[static_cast<size_t>(t)] += 1;
  const double total = static_cast<double>(train.num_tokens() + static_cast<uint64_t>(vocab));
  windows = std::min(windows, eval.num_windows());
  double nll = 0;
  int64_t n = 0;
  for (int64_t w = 0; w < windows; ++w) {
    const int32_t* win = eval.window(w);
    for (int64_t t = 1; t <= eval.seq_len(); ++t, ++n) nll -= std::log(counts[static_cast<size_t>(win[t])] / total);
  }
  return std::exp(nll / static_cast<double>(std::max<int64_t>(n, 1)));
}

ArTrainSummary run_ar_training(const ArTrainOptions& o, const std::string& resolved_table) {
  namespace fs = std::filesystem;
  fs::create_directories(o.out_dir);
  const std::string model_path = o.out_dir + "/model.h5";
  MetricsLog metrics(o.out_dir + "/metrics.jsonl");

  // ---- model ----
  model::Qwen3Weights weights;
  if (!o.model_init.empty()) {
    weights = io::load_model(o.model_init);
  } else {
    weights = model::Qwen3Weights(model::Qwen3Config::load(o.model_config));
    weights.init_random(o.seed);
  }
  model::Qwen3Model student = model::Qwen3Model::student(std::move(weights));
  const model::Qwen3Config& cfg = student.config();

  // ---- data ----
  io::TokenShard train_shard(1, {});
  std::unique_ptr<ShardWindows> train_windows;
  std::vector<SftExample> sft;
  int32_t pad_id = static_cast<int32_t>(cfg.pad_token_id >= 0 ? cfg.pad_token_id : std::max<int64_t>(cfg.eos_token_id, 0));
  if (!o.train_shard.empty()) {
    train_shard = io::TokenShard::read(o.train_shard);
    if (train_shard.vocab_size() > cfg.vocab_size)
      OPDLM_FAIL_AT(o.train_shard, "vocab_size", "shard vocabulary ", train_shard.vocab_size(),
                    " exceeds the model's vocab_size ", cfg.vocab_size);
    train_windows = std::make_unique<ShardWindows>(train_shard, o.seq_len);
  } else {
    io::Tokenizer tok = io::Tokenizer::from_file(o.tokenizer);
    if (tok.vocab_size() > cfg.vocab_size)
      OPDLM_FAIL_AT(o.tokenizer, "vocab_size", "tokenizer has ", tok.vocab_size(), " ids, the model ", cfg.vocab_size);
    io::PromptDataset ds = io::load_prompt_jsonl(o.sft_jsonl);
    for (const auto& r : ds.records) {
      if (!r.response) OPDLM_FAIL_AT(o.sft_jsonl, "response", "record '", r.id, "' has no response (SFT needs one)");
      SftExample e{tok.encode(r.prompt), tok.encode(*r.response)};
      if (cfg.eos_token_id >= 0) e.response.push_back(static_cast<int32_t>(cfg.eos_token_id));
      sft.push_back(std::move(e));
    }
    if (sft.empty()) OPDLM_FAIL_AT(o.sft_jsonl, "", "no records");
  }
  io::TokenShard eval_shard(1, {});
  std::unique_ptr<ShardWindows> eval_windows;
  if (!o.eval_shard.empty()) {
    eval_shard = io::TokenShard::read(o.eval_shard);
    eval_windows = std::make_unique<ShardWindows>(eval_shard, o.seq_len);
  }

  OPDLM_LOG(info) << "opdlm train --mode ar: " << cfg.num_params() << " parameters, "
                  << (train_windows ? std::to_string(train_shard.num_tokens()) + " training tokens"
                                    : std::to_string(sft.size()) + " SFT examples")
                  << "\n" << resolved_table;
  metrics.write({{"event", "start"}, {"mode", "ar"}, {"params", cfg.num_params()}, {"config", resolved_table}});

  // ---- optimizer state ----
  model::Qwen3Weights m1 = student.weights().zeros_like(), m2 = student.weights().zeros_like();
  std::vector<Tensor*> grads;
  for (auto& t : student.grads().tensors()) grads.push_back(&t.value);
  model::Qwen3Activations acts;
  ArTrainSummary s;
  s.params = cfg.num_params();
  s.model_path = model_path;
  const auto t0 = std::chrono::steady_clock::now();
  auto elapsed = [&] { return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(); };
  auto evaluate = [&](int64_t step) {
    if (!eval_windows) return;
    s.eval_loss = mean_nll(student, *eval_windows, o.eval_windows, o.batch_size);
    s.eval_ppl = std::exp(s.eval_loss);
    metrics.write({{"event", "eval"}, {"step", step}, {"eval_loss", s.eval_loss}, {"eval_ppl", s.eval_ppl}});
    OPDLM_LOG(info) << "step " << step << " eval loss " << s.eval_loss << " ppl " << s.eval_ppl;
  };
  auto save = [&](int64_t step) {
    io::save_model(model_path, student.weights(), {{"step", step}, {"tokenizer", o.tokenizer}, {"mode", "ar"}});
    metrics.write({{"event", "save"}, {"step", step}, {"path", model_path}});
  };

  double window_loss = 0;
  int64_t window_steps = 0;
  std::vector<uint64_t> sft_perm;
  uint64_t sft_perm_epoch = UINT64_MAX;
  for (int64_t step = 0; step < o.schedule.total_steps; ++step) {
    set_error_step(step);
    LmBatch b;
    if (train_windows) {
      b = train_windows->batch(static_cast<uint64_t>(step * o.batch_size), o.batch_size, o.seed);
    } else {
      std::vector<const SftExample*> rows;
      for (int64_t r = 0; r < o.batch_size; ++r) {
        const uint64_t g = static_cast<uint64_t>(step * o.batch_size + r);
        const uint64_t epoch = g / sft.size();
        if (epoch != sft_perm_epoch) {
          sft_perm = io::shuffle_permutation(sft.size(), o.seed, static_cast<uint32_t>(epoch));
          sft_perm_epoch = epoch;
        }
        rows.push_back(&sft[sft_perm[g % sft.size()]]);
      }
      b = sft_batch(rows, pad_id, o.seq_len);
    }
    Tensor dlogits;
    const double loss = batch_loss(student, b, &acts, &dlogits);
    student.zero_grads();
    student.backward(acts, dlogits);
    const double norm = o.grad_clip > 0 ? ops::clip_grad_norm(grads, o.grad_clip)
                                        : ops::global_grad_norm(std::vector<const Tensor*>(grads.begin(), grads.end()));
    if (!std::isfinite(loss) || !std::isfinite(norm))
      OPDLM_FAIL("non-finite loss ", loss, " or gradient norm ", norm, " at step ", step,
                 " (lower optim.lr or raise optim.warmup_steps)");
    ops::AdamWConfig adam = o.adam;
    adam.lr = o.schedule.at(step);
    adamw_update(student, m1, m2, step + 1, adam);
    s.tokens += b.num_targets;
    s.steps = step + 1;
    s.final_train_loss = loss;
    window_loss += loss;
    ++window_steps;
    if ((step + 1) % o.log_every == 0 || step + 1 == o.schedule.total_steps) {
      const double secs = elapsed();
      metrics.write({{"event", "step"}, {"step", step + 1}, {"loss", window_loss / window_steps}, {"lr", adam.lr},
                     {"grad_norm", norm}, {"tokens", s.tokens}, {"elapsed_s", secs},
                     {"tokens_per_s", static_cast<double>(s.tokens) / secs}});
      OPDLM_LOG(info) << "step " << step + 1 << "/" << o.schedule.total_steps << " loss " << window_loss / window_steps
                      << " lr " << adam.lr << " |g| " << norm << " " << static_cast<int64_t>(s.tokens / secs)
                      << " tok/s";
      window_loss = 0;
      window_steps = 0;
    }
    if (o.eval_every > 0 && (step + 1) % o.eval_every == 0 && step + 1 < o.schedule.total_steps) evaluate(step + 1);
    if (o.save_every > 0 && (step + 1) % o.save_every == 0 && step + 1 < o.schedule.total_steps) save(step + 1);
  }
  s.wall_s = elapsed();
  s.tokens_per_s = static_cast<double>(s.tokens) / s.wall_s;
  evaluate(s.steps);
  if (eval_windows && train_windows)
    s.unigram_ppl = unigram_perplexity(train_shard, *eval_windows, o.eval_windows, cfg.vocab_size);
  save(s.steps);
  set_error_step(-1);
  metrics.write({{"event", "end"}, {"steps", s.steps}, {"tokens", s.tokens}, {"wall_s", s.wall_s},
                 {"tokens_per_s", s.tokens_per_s}, {"final_train_loss", s.final_train_loss},
                 {"eval_loss", s.eval_loss}, {"eval_ppl", s.eval_ppl}, {"unigram_ppl", s.unigram_ppl}});
  return s;
}

}  // namespace opdlm::train
