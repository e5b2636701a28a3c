// `opdlm generate --mode ar|diffusion` and `opdlm score`: decoding (AR, or block diffusion with the
// rollout sampler) and per-token log-probabilities with a model file and its tokenizer. (`opdlm eval`
// lives in cmd_eval.cpp.)
#include <boost/program_options.hpp>
#include <fstream>
#include <iostream>
#include <map>
#include <nlohmann/json.hpp>

#include "commands.hpp"
#include "opdlm/base/error.hpp"
#include "opdlm/diffusion/sampler.hpp"
#include "opdlm/io/jsonl_dataset.hpp"
#include "opdlm/io/model_file.hpp"
#include "opdlm/io/tokenizer.hpp"
#include "opdlm/model/ar_generate.hpp"

namespace po = boost::program_options;
using namespace opdlm;

namespace {

struct Loaded {
  model::Qwen3Model model;
  io::Tokenizer tok;
};

// The model file records the tokenizer it was trained with; --tokenizer overrides it.
Loaded load(const std::string& model_path, std::string tok_path) {
  if (tok_path.empty()) {
    auto info = io::read_model_info(model_path);
    if (info.extra.contains("tokenizer") && info.extra["tokenizer"].is_string())
      tok_path = info.extra["tokenizer"].get<std::string>();
    if (tok_path.empty()) OPDLM_FAIL_AT(model_path, "tokenizer", "the model file names no tokenizer: pass --tokenizer");
  }
  return {model::Qwen3Model::teacher(io::load_model(model_path)), io::Tokenizer::from_file(tok_path)};
}

// Records [start, start + size) encoded, with their index in the file as the global sample id
// (so a record decodes the same whatever the batch size). A record the tokenizer refuses (invalid
// UTF-8) is left out of `prompts` and reported in `errors`: one bad prompt does not end the run.
struct PromptBatch {
  std::vector<std::vector<int32_t>> prompts;
  std::vector<uint32_t> sample_ids;
  std::vector<size_t> records;                          // file index of prompts[i]
  std::vector<std::pair<size_t, std::string>> errors;  // (file index, why)
};
PromptBatch encode_batch(const io::Tokenizer& tok, const std::vector<io::PromptRecord>& recs, size_t start, size_t size) {
  PromptBatch b;
  for (size_t i = start; i < std::min(recs.size(), start + size); ++i) {
    try {
      b.prompts.push_back(tok.encode(recs[i].prompt));
    } catch (const std::exception& e) {
      b.errors.emplace_back(i, std::string("cannot tokenize the prompt: ") + e.what());
      std::cerr << "generate: prompt " << recs[i].id << " skipped: " << e.what() << "\n";
      continue;
    }
    b.sample_ids.push_back(static_cast<uint32_t>(i));
    b.records.push_back(i);
  }
  return b;
}

// The JSONL record of a prompt the tokenizer refused (dumped with invalid bytes replaced by U+FFFD).
nlohmann::json invalid_text_record(const io::PromptRecord& r, const std::string& why) {
  return {{"id", r.id}, {"prompt", r.prompt}, {"status", "invalid_text"}, {"error", why}};
}

// --mode diffusion has its own flags: peek at --mode before parsing, so the ar flags stay as they are.
bool mode_is(const std::vector<std::string>& args, const std::string& want) {
  for (size_t i = 0; i < args.size(); ++i) {
    if (args[i] == "--mode=" + want) return true;
    if (args[i] == "--mode" && i + 1 < args.size() && args[i + 1] == want) return true;
  }
  return false;
}

// Block-diffusion decoding (diffusion::bd_generate); one JSONL record per prompt. A prompt the
// sampler rejects (empty, too long, bad ids) gets a record with its status and error, not a failure.
int run_generate_diffusion(const std::vector<std::string>& args) {
  po::options_description d("opdlm generate --mode diffusion");
  std::string mode, model_path, tok_path, prompt, prompts_file, out, strategy;
  int64_t batch = 8;
  int32_t mask_id = -1;
  diffusion::SamplerOptions g;
  d.add_options()("help", "show help")("mode", po::value(&mode)->required(), "diffusion")
      ("model", po::value(&model_path)->required(), "model.h5")("tokenizer", po::value(&tok_path), "tokenizer.json (default: the one the model file names)")
      ("prompt", po::value(&prompt), "one prompt")("prompts", po::value(&prompts_file), "JSONL with a prompt field")
      ("max-new-tokens", po::value(&g.max_new_tokens)->default_value(64), "length limit")("batch-size", po::value(&batch)->default_value(8), "prompts per batch")
      ("block-size", po::value(&g.block_size)->default_value(4), "block size b")
      ("steps", po::value(&g.steps_per_block)->default_value(4), "denoising steps per block s")
      ("strategy", po::value(&strategy)->default_value("low_confidence_static"),
       "sequential | low_confidence_static | low_confidence_dynamic | entropy_bounded")
      ("tau", po::value(&g.tau)->default_value(0.9), "low_confidence_dynamic threshold (strict >)")
      ("entropy-bound", po::value(&g.entropy_bound)->default_value(1.0), "entropy_bounded: summed entropy per step (nats)")
      ("temperature", po::value(&g.sampling.temperature)->default_value(0.0), "0 = greedy")
      ("top-k", po::value(&g.sampling.top_k)->default_value(0), "0 = off")("top-p", po::value(&g.sampling.top_p)->default_value(1.0), "1 = off")
      ("mask-id", po::value(&mask_id)->default_value(-1), "[MASK] id (default: the config's mask_token_id, else the tokenizer's <|MASK|>)")
      ("seed", po::value(&g.seed)->default_value(0), "sampling seed")("out", po::value(&out), "write JSONL here instead of stdout");
  po::variables_map vm;
  if (cli::parse_or_print_help(args, d, vm)) return cli::kExitOk;
  if (prompt.empty() == prompts_file.empty()) OPDLM_FAIL_AT("command line", "prompt", "give exactly one of --prompt and --prompts");
  if (batch < 1) OPDLM_FAIL_AT("command line", "batch-size", "must be >= 1, got ", batch);
  g.strategy = diffusion::parse_strategy(strategy, "strategy");
  Loaded L = load(model_path, tok_path);
  const model::Qwen3Config& c = L.model.config();
  if (mask_id < 0) mask_id = static_cast<int32_t>(c.mask_token_id);
  if (mask_id < 0) mask_id = L.tok.token_id("<|MASK|>").value_or(-1);
  if (mask_id < 0)
    OPDLM_FAIL_AT(model_path, "mask_token_id", "the model has no mask token and the tokenizer no <|MASK|>: pass --mask-id");
  g.mask_id = mask_id;
  g.eos_id = static_cast<int32_t>(c.eos_token_id);
  g.pad_id = static_cast<int32_t>(c.pad_token_id >= 0 ? c.pad_token_id : std::max<int64_t>(c.eos_token_id, 0));
  std::vector<io::PromptRecord> recs;
  if (!prompt.empty()) recs.push_back({"0", false, prompt});
  else recs = io::load_prompt_jsonl(prompts_file).records;
  std::ofstream file;
  if (!out.empty()) file.open(out);
  std::ostream& os = out.empty() ? std::cout : file;
  for (size_t s = 0; s < recs.size(); s += static_cast<size_t>(batch)) {
    const PromptBatch pb = encode_batch(L.tok, recs, s, static_cast<size_t>(batch));
    const auto rs = diffusion::bd_generate(L.model, pb.prompts, pb.sample_ids, g);
    std::map<size_t, std::string> lines;  // file order, refused prompts included
    for (const auto& [k, why] : pb.errors) lines[k] = invalid_text_record(recs[k], why).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
    for (size_t i = 0; i < rs.size(); ++i) {
      const auto& r = rs[i];
      const io::PromptRecord& rec = recs[pb.records[i]];
      nlohmann::json j{{"id", rec.id}, {"prompt", rec.prompt}, {"status", diffusion::rollout_status_name(r.status)}};
      if (!r.ok()) {
        j["error"] = r.error;
        std::cerr << "generate: prompt " << rec.id << " skipped: " << r.error << "\n";
      }
      // Tokens per denoising forward (the commit forwards are reported beside it).
      const double tpf = r.denoise_forwards > 0 ? double(r.response.size()) / double(r.denoise_forwards) : 0.0;
      j.update({{"ids", r.response}, {"text", L.tok.decode(r.response)}, {"eos", r.stopped_at_eos},
                {"step_map", r.step_map}, {"forwards", {{"denoise", r.denoise_forwards}, {"commit", r.commit_forwards}}},
                {"tokens_per_forward", tpf}});
      lines[pb.records[i]] = j.dump();
    }
    for (const auto& [k, line] : lines) os << line << "\n";
  }
  return cli::kExitOk;
}

int run_generate(const std::vector<std::string>& args) {
  if (mode_is(args, "diffusion")) return run_generate_diffusion(args);
  po::options_description d("opdlm generate --mode ar");
  std::string mode, model_path, tok_path, prompt, prompts_file, out;
  int64_t max_new = 64, batch = 8;
  ops::SamplingParams sp;
  uint32_t seed = 0;
  d.add_options()("help", "show help")("mode", po::value(&mode)->required(), "ar (diffusion: see --mode diffusion --help)")
      ("model", po::value(&model_path)->required(), "model.h5")("tokenizer", po::value(&tok_path), "tokenizer.json (default: the one the model file names)")
      ("prompt", po::value(&prompt), "one prompt")("prompts", po::value(&prompts_file), "JSONL with a prompt field")
      ("max-new-tokens", po::value(&max_new)->default_value(64), "length limit")("batch-size", po::value(&batch)->default_value(8), "prompts per batch")
      ("temperature", po::value(&sp.temperature)->default_value(0.0), "0 = greedy")
      ("top-k", po::value(&sp.top_k)->default_value(0), "0 = off")("top-p", po::value(&sp.top_p)->default_value(1.0), "1 = off")
      ("seed", po::value(&seed)->default_value(0), "sampling seed")("out", po::value(&out), "write JSONL here instead of stdout");
  po::variables_map vm;
  if (cli::parse_or_print_help(args, d, vm)) return cli::kExitOk;
  if (mode != "ar") OPDLM_FAIL_AT("command line", "mode", "unknown mode '", mode, "' (available: ar, diffusion)");
  if (prompt.empty() == prompts_file.empty()) OPDLM_FAIL_AT("command line", "prompt", "give exactly one of --prompt and --prompts");
  Loaded L = load(model_path, tok_path);
  std::vector<io::PromptRecord> recs;
  if (!prompt.empty()) recs.push_back({"0", false, prompt});
  else recs = io::load_prompt_jsonl(prompts_file).records;
  model::ArGenerateOptions g;
  g.max_new_tokens = max_new;
  g.sampling = sp;
  g.seed = seed;
  g.eos_id = static_cast<int32_t>(L.model.config().eos_token_id);
  g.pad_id = std::max<int32_t>(g.eos_id, 0);
  std::ofstream file;
  if (!out.empty()) file.open(out);
  std::ostream& os = out.empty() ? std::cout : file;
  for (size_t s = 0; s < recs.size(); s += static_cast<size_t>(batch)) {
    const PromptBatch pb = encode_batch(L.tok, recs, s, static_cast<size_t>(batch));
    auto gens = model::ar_generate(L.model, pb.prompts, pb.sample_ids, g);
    std::map<size_t, std::string> lines;  // file order, refused prompts included
    for (const auto& [k, why] : pb.errors) lines[k] = invalid_text_record(recs[k], why).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
    for (size_t i = 0; i < gens.size(); ++i)
      lines[pb.records[i]] = nlohmann::json{{"id", recs[pb.records[i]].id}, {"prompt", recs[pb.records[i]].prompt},
                                            {"ids", gens[i].tokens}, {"text", L.tok.decode(gens[i].tokens)},
                                            {"eos", gens[i].stopped_at_eos}}.dump();
    for (const auto& [k, line] : lines) os << line << "\n";
  }
  return cli::kExitOk;
}

int run_score(const std::vector<std::string>& args) {
  po::options_description d("opdlm score: per-token log-probabilities of texts (JSONL field) or ids");
  std::string model_path, tok_path, input, field, out;
  d.add_options()("help", "show help")("model", po::value(&model_path)->required(), "model.h5")
      ("tokenizer", po::value(&tok_path), "tokenizer.json (default: the one the model file names)")
      ("input", po::value(&input)->required(), "JSONL: each record has `field` (text) or `ids` (list of ints)")
      ("field", po::value(&field)->default_value("text"), "text field")("out", po::value(&out), "output JSONL (default stdout)");
  po::variables_map vm;
  if (cli::parse_or_print_help(args, d, vm)) return cli::kExitOk;
  Loaded L = load(model_path, tok_path);
  std::ifstream in(input);
  if (!in) OPDLM_FAIL_AT(input, "", "cannot open");
  std::ofstream file;
  if (!out.empty()) file.open(out);
  std::ostream& os = out.empty() ? std::cout : file;
  std::string line;
  for (int64_t lineno = 1; std::getline(in, line); ++lineno) {
    if (line.empty()) continue;
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(line);
    } catch (const std::exception& e) {
      OPDLM_FAIL_AT(input + ":" + std::to_string(lineno), "", "invalid JSON: ", e.what());
    }
    std::vector<int32_t> ids;
    if (j.contains("ids")) {
      if (!j["ids"].is_array()) OPDLM_FAIL_AT(input + ":" + std::to_string(lineno), "ids", "expected a list of ints");
      for (const auto& v : j["ids"]) {
        if (!v.is_number_integer() || v.get<int64_t>() < 0 || v.get<int64_t>() >= L.model.config().vocab_size)
          OPDLM_FAIL_AT(input + ":" + std::to_string(lineno), "ids", "not a token id of this model: ", v.dump());
        ids.push_back(v.get<int32_t>());
      }
    } else if (j.contains(field) && j[field].is_string()) {
      ids = L.tok.encode(j[field].get<std::string>());
    } else {
      OPDLM_FAIL_AT(input + ":" + std::to_string(lineno), field, "record has neither a string '", field, "' nor 'ids'");
    }
    auto lp = model::token_logprobs(L.model, ids);
    double sum = 0;
    for (double x : lp) sum += x;
    nlohmann::json o = {{"ids", ids}, {"logprobs", lp}, {"sum_logprob", sum}, {"tokens_scored", lp.size()}};
    if (j.contains("id")) o["id"] = j["id"];
    os << o.dump() << "\n";
  }
  return cli::kExitOk;
}

}  // namespace

OPDLM_SUBCOMMAND("generate", "decode continuations of prompts (--mode ar | diffusion)", run_generate);
OPDLM_SUBCOMMAND("score", "per-token log-probabilities of texts or ids under a model", run_score);
