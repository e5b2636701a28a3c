// opdlm's half of the side-by-side CPU benchmark against ../shared/bench/torch_qwen3_ref.py: the same
// model sizes, batch shapes, FLOP convention and JSON fields, one mode per process, one JSON line on
// stdout (so scripts/clean_run.py can wrap it). bench/cpu_vs_torch.py interleaves it with the
// PyTorch reference (A/B/A/B) and prints the ratios.
//   train      fwd + bwd + AdamW on a causal LM step (B x T tokens), no clipping (as the reference)
//   ar-decode  greedy decoding with the KV cache, batch 8, prompt 32, 128 new tokens
//   bd-decode  block-diffusion decoding, b = 4, 4 steps per block, one most-confident slot per step
//   sgemm      OpenBLAS sgemm GFLOP/s on the reference's shapes: the peak the MFU is measured against
// Run: build/bench/opdlm_bench_vs_torch --mode train --size small --threads 2
#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "opdlm/base/error.hpp"
#include "opdlm/diffusion/sampler.hpp"
#include "opdlm/model/ar_generate.hpp"
#include "opdlm/model/qwen3.hpp"
#include "opdlm/ops/adamw.hpp"
#include "opdlm/ops/cross_entropy.hpp"

extern "C" {
void openblas_set_num_threads(int);
int openblas_get_num_threads(void);
char* openblas_get_corename(void);
}

using namespace opdlm;
using Clock = std::chrono::steady_clock;

namespace {

// ---- the reference's sizes (torch_qwen3_ref.py SIZES) --------------------------------------------
struct Size {
  int64_t d_model, n_layers, n_heads, n_kv_heads, d_ff, vocab, seq, batch;
};
const std::map<std::string, Size> kSizes = {
    {"tiny", {128, 4, 4, 2, 384, 2048, 256, 8}},
    {"small", {384, 6, 6, 2, 1024, 8192, 256, 8}},
    {"medium", {768, 12, 12, 4, 2048, 16384, 512, 4}},
};

model::Qwen3Config make_config(const Size& s) {
  model::Qwen3Config c;
  c.vocab_size = s.vocab;
  c.hidden_size = s.d_model;
  c.intermediate_size = s.d_ff;
  c.num_hidden_layers = s.n_layers;
  c.num_attention_heads = s.n_heads;
  c.num_key_value_heads = s.n_kv_heads;
  c.head_dim = s.d_model / s.n_heads;
  c.rms_norm_eps = 1e-6;
  c.rope_theta = 1e6;
  c.tie_word_embeddings = true;
  c.max_position_embeddings = 4096;
  c.mask_token_id = s.vocab - 1;  // as the reference: [MASK] = vocab - 1
  c.validate("bench");
  return c;
}

// Matmul weights counted as the reference's param_counts: every Linear incl. the (tied) head.
double n_matmul_params(const Size& s) {
  const double hd = double(s.d_model / s.n_heads);
  const double attn = s.d_model * hd * (2.0 * s.n_heads + 2.0 * s.n_kv_heads);
  const double mlp = 3.0 * s.d_model * s.d_ff;
  return s.n_layers * (attn + mlp) + double(s.vocab) * s.d_model;
}

uint64_t lcg(uint64_t& x) {
  x = x * 6364136223846793005ULL + 1442695040888963407ULL;
  return x >> 33;
}

std::vector<int32_t> random_ids(int64_t n, int64_t vocab_excl, uint64_t seed) {
  std::vector<int32_t> v(static_cast<size_t>(n));
  for (auto& t : v) t = int32_t(lcg(seed) % uint64_t(vocab_excl));
  return v;
}

struct Stats {
  double median, min, max;
};
Stats stats(std::vector<double> xs) {
  std::sort(xs.begin(), xs.end());
  const size_t n = xs.size();
  const double med = n % 2 ? xs[n / 2] : 0.5 * (xs[n / 2 - 1] + xs[n / 2]);
  return {med, xs.front(), xs.back()};
}

std::string utc_now() {
  char buf[32];
  const std::time_t t = std::time(nullptr);
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&t));
  return buf;
}

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// ---- train: the reference's bench_train ------------------------------------------------------------
nlohmann::json bench_train(const Size& s, int runs, int warmup) {
  const model::Qwen3Config cfg = make_config(s);
  model::Qwen3Weights w(cfg);
  w.init_random(0, 0.02);
  model::Qwen3Model m = model::Qwen3Model::student(std::move(w));
  model::Qwen3Weights m1 = m.weights().zeros_like(), m2 = m.weights().zeros_like();
  const int64_t B = s.batch, T = s.seq, n = B * T;
  const std::vector<int32_t> data = random_ids(B * (T + 1), s.vocab - 1, 1);
  std::vector<int32_t> ids(static_cast<size_t>(n)), tgt(ids), pos(ids);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) {
      ids[size_t(b * T + t)] = data[size_t(b * (T + 1) + t)];
      tgt[size_t(b * T + t)] = data[size_t(b * (T + 1) + t + 1)];
      pos[size_t(b * T + t)] = int32_t(t);
    }
  const Tensor ids_t = Tensor::from_vector(ids, {B, T}), pos_t = Tensor::from_vector(pos, {B, T});
  const Tensor tgt_t = Tensor::from_vector(tgt, {n});
  const std::vector<ops::MaskDescriptor> masks = {ops::MaskDescriptor::causal()};
  ops::AdamWConfig adam;
  adam.lr = 1e-3;
  adam.weight_decay = 0.1;  // torch.optim.AdamW(weight_decay=0.1) decays every parameter
  const Tensor dloss = Tensor::full({n}, 1.0 / double(n), DType::f32);
  model::Qwen3Activations acts;
  int64_t step_no = 0;
  auto step = [&]() {
    m.zero_grads();
    Tensor logits = m.forward(ids_t, pos_t, masks, Tensor(), &acts);
    Tensor lse;
    Tensor loss = ops::cross_entropy_forward(logits, tgt_t, Tensor(), &lse);
    Tensor dlogits = ops::cross_entropy_backward(logits, tgt_t, Tensor(), lse, dloss);
    m.backward(acts, dlogits);
    ++step_no;
    auto& p = m.weights().tensors();
    auto& g = m.grads().tensors();
    for (size_t i = 0; i < p.size(); ++i)
      ops::adamw_step(p[i].value, g[i].value, m1.tensors()[i].value, m2.tensors()[i].value, step_no, adam);
    double sum = 0;
    for (int64_t i = 0; i < n; ++i) sum += loss.item(i);
    return sum / double(n);
  };
  for (int i = 0; i < warmup; ++i) step();
  std::vector<double> times, losses;
  for (int i = 0; i < runs; ++i) {
    const auto t0 = Clock::now();
    losses.push_back(step());
    times.push_back(seconds_since(t0));
  }
  const double hd = double(s.d_model / s.n_heads);
  const double flops = double(n) * (6 * n_matmul_params(s) + 12.0 * s.n_layers * s.n_heads * hd * T);
  const Stats st = stats(times);
  return {{"mode", "train"},
          {"mask", "causal"},
          {"tokens_per_step", n},
          {"n_matmul_params", n_matmul_params(s)},
          {"flops_per_step", flops},
          {"step_s_median", st.median},
          {"step_s_min", st.min},
          {"step_s_max", st.max},
          {"tokens_per_s_median", double(n) / st.median},
          {"tokens_per_s_min", double(n) / st.max},
          {"tokens_per_s_max", double(n) / st.min},
          {"gflops_median", flops / st.median / 1e9},
          {"loss_first", losses.front()},
          {"loss_last", losses.back()}};
}

// ---- decoding: the reference's bench_decode ----------------------------------------------------------
nlohmann::json bench_decode(const Size& s, const std::string& mode, int runs, int warmup, int64_t batch,
                            int64_t prompt_len, int64_t new_tokens) {
  const model::Qwen3Config cfg = make_config(s);
  model::Qwen3Weights w(cfg);
  w.init_random(0, 0.02);
  const model::Qwen3Model m = model::Qwen3Model::teacher(std::move(w));
  std::vector<std::vector<int32_t>> prompts;
  std::vector<uint32_t> ids;
  for (int64_t b = 0; b < batch; ++b) {
    prompts.push_back(random_ids(prompt_len, s.vocab - 1, 100 + uint64_t(b)));
    ids.push_back(uint32_t(b));
  }
  int64_t generated = 0, forwards = 0;
  auto once = [&]() {
    generated = 0;
    forwards = 0;
    if (mode == "ar-decode") {
      model::ArGenerateOptions o;
      o.max_new_tokens = new_tokens;
      o.sampling.temperature = 0;  // greedy
      for (const auto& g : model::ar_generate(m, prompts, ids, o)) {
        generated += int64_t(g.tokens.size());
        forwards = std::max(forwards, g.forwards);
      }
    } else {
      diffusion::SamplerOptions o;
      o.block_size = 4;
      o.steps_per_block = 4;
      o.max_new_tokens = new_tokens;
      o.strategy = diffusion::Strategy::low_confidence_static;  // the reference's top-1 per step
      o.sampling.temperature = 0;
      o.mask_id = int32_t(cfg.mask_token_id);
      for (const auto& r : diffusion::bd_generate(m, prompts, ids, o)) {
        OPDLM_CHECK(r.ok(), "bd_generate failed: " + r.error);
        generated += int64_t(r.response.size());
        forwards = std::max(forwards, r.denoise_forwards + r.commit_forwards);
      }
    }
  };
  for (int i = 0; i < warmup; ++i) once();
  std::vector<double> times;
  for (int i = 0; i < runs; ++i) {
    const auto t0 = Clock::now();
    once();
    times.push_back(seconds_since(t0));
  }
  OPDLM_CHECK(generated == batch * new_tokens, "decoding produced " + std::to_string(generated) + " tokens, expected " +
                                                   std::to_string(batch * new_tokens));
  const Stats st = stats(times);
  nlohmann::json j = {{"mode", mode},
                      {"decode_batch", batch},
                      {"prompt_len", prompt_len},
                      {"new_tokens", new_tokens},
                      {"n_matmul_params", n_matmul_params(s)},
                      {"forwards", forwards},
                      // Timed from the first prefill to the last token: the prefill is included here
                      // (the reference excludes it), which can only lower our figure.
                      {"prefill_included", true},
                      {"decode_s_median", st.median},
                      {"decode_s_min", st.min},
                      {"decode_s_max", st.max},
                      {"tokens_per_s_median", double(generated) / st.median},
                      {"tokens_per_s_min", double(generated) / st.max},
                      {"tokens_per_s_max", double(generated) / st.min}};
  if (mode == "bd-decode") {
    j["block"] = 4;
    j["steps_per_block"] = 4;
    j["bd_commit"] = "extra (1 logit row)";
  }
  return j;
}

// ---- sgemm: the peak MFU is measured against ------------------------------------------------------------
// The best median over the reference's BASELINES shapes (square 2048, the 2048x2048x512 projection and the
// 2048x8192x512 head), each NN and NT, row-major.
nlohmann::json bench_sgemm(int runs) {
  struct Shape3 {
    int m, n, k;
    bool tb;
  };
  const Shape3 shapes[] = {{2048, 2048, 2048, false}, {2048, 2048, 512, false}, {2048, 2048, 512, true},
                           {2048, 8192, 512, false}, {2048, 8192, 512, true},  {2048, 512, 2048, false}};
  nlohmann::json rows = nlohmann::json::array();
  double best = 0;
  for (const auto& sh : shapes) {
    std::vector<float> a(size_t(sh.m) * sh.k), b(size_t(sh.k) * sh.n), c(size_t(sh.m) * sh.n);
    uint64_t x = 7;
    for (auto& v : a) v = float(lcg(x) % 1000) * 1e-3f - 0.5f;
    for (auto& v : b) v = float(lcg(x) % 1000) * 1e-3f - 0.5f;
    auto run = [&]() {
      cblas_sgemm(CblasRowMajor, CblasNoTrans, sh.tb ? CblasTrans : CblasNoTrans, sh.m, sh.n, sh.k, 1.f, a.data(),
                  sh.k, b.data(), sh.tb ? sh.k : sh.n, 0.f, c.data(), sh.n);
    };
    run();
    std::vector<double> t;
    for (int i = 0; i < runs; ++i) {
      const auto t0 = Clock::now();
      run();
      t.push_back(seconds_since(t0));
    }
    const double gf = 2.0 * sh.m * sh.n * sh.k / stats(t).median / 1e9;
    best = std::max(best, gf);
    rows.push_back({{"m", sh.m}, {"n", sh.n}, {"k", sh.k}, {"op", sh.tb ? "NT" : "NN"}, {"gflops_median", gf}});
  }
  return {{"mode", "sgemm"}, {"shapes", rows}, {"gflops_best_median", best}};
}

[[noreturn]] void usage(const std::string& why) {
  std::fprintf(stderr,
               "opdlm_bench_vs_torch: %s\n"
               "usage: opdlm_bench_vs_torch --mode train|ar-decode|bd-decode|sgemm [--size tiny|small|medium]\n"
               "       [--threads N] [--runs N] [--warmup N] [--decode-batch N] [--prompt-len N] [--new-tokens N]\n",
               why.c_str());
  std::exit(2);
}

}  // namespace

int main(int argc, char** argv) {
  std::string mode = "train", size = "tiny";
  int threads = 2, runs = -1, warmup = 2;
  int64_t decode_batch = 8, prompt_len = 32, new_tokens = 128;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (i + 1 >= argc) usage("flag " + a + " needs a value");
    const std::string v = argv[++i];
    try {
      if (a == "--mode") mode = v;
      else if (a == "--size") size = v;
      else if (a == "--threads") threads = std::stoi(v);
      else if (a == "--runs") runs = std::stoi(v);
      else if (a == "--warmup") warmup = std::stoi(v);
      else if (a == "--decode-batch") decode_batch = std::stoll(v);
      else if (a == "--prompt-len") prompt_len = std::stoll(v);
      else if (a == "--new-tokens") new_tokens = std::stoll(v);
      else usage("unknown flag " + a);
    } catch (const std::logic_error&) {
      usage("flag " + a + ": not a number: " + v);
    }
  }
  if (mode != "train" && mode != "ar-decode" && mode != "bd-decode" && mode != "sgemm") usage("unknown --mode " + mode);
  if (!kSizes.count(size)) usage("unknown --size " + size);
  if (threads < 1 || warmup < 0 || decode_batch < 1 || prompt_len < 4 || prompt_len % 4 || new_tokens < 4 ||
      new_tokens % 4)
    usage("--threads >= 1, --warmup >= 0, --decode-batch >= 1, --prompt-len and --new-tokens multiples of 4");
  if (runs < 0) runs = size == "medium" ? 5 : 7;
  if (runs < 1) usage("--runs must be >= 1");
  omp_set_num_threads(threads);
  openblas_set_num_threads(threads);
  const Size& s = kSizes.at(size);
  try {
    nlohmann::json r = mode == "train"   ? bench_train(s, runs, warmup)
                       : mode == "sgemm" ? bench_sgemm(runs)
                                         : bench_decode(s, mode, runs, warmup, decode_batch, prompt_len, new_tokens);
    nlohmann::json base = {{"bench", "opdlm"},  {"size", size},
                           {"threads", threads}, {"runs", runs},
                           {"warmup", warmup},   {"omp_threads", omp_get_max_threads()},
                           {"openblas_threads", openblas_get_num_threads()},
                           {"openblas_corename", openblas_get_corename()},
                           {"d_model", s.d_model}, {"n_layers", s.n_layers},
                           {"seq", s.seq},       {"batch", s.batch},
                           {"vocab", s.vocab},   {"date", utc_now()}};
    base.update(r);
    std::printf("%s\n", base.dump().c_str());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "opdlm_bench_vs_torch: %s\n", e.what());
    return 1;
  }
  return 0;
}
