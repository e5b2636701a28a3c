// `opdlm eval --mode ar|diffusion`: the evaluation harness (eval/harness.hpp, docs/eval.md) on JSONL
// tasks: exact match, token accuracy, multiple choice, TPF, tokens/s, gen-PPL under the teacher and
// the state KL, written as one result JSON plus a short table on stdout.
#include <boost/program_options.hpp>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>

#include "commands.hpp"
#include "opdlm/base/error.hpp"
#include "opdlm/eval/harness.hpp"
#include "opdlm/io/file_util.hpp"
#include "opdlm/io/model_file.hpp"
#include "opdlm/io/tokenizer.hpp"

namespace po = boost::program_options;
using namespace opdlm;

namespace {

constexpr const char* kWhere = "command line";
// A prompt with invalid UTF-8 is reported, not fatal: its text is written with U+FFFD replacements.
constexpr auto kReplace = nlohmann::json::error_handler_t::replace;

// The model file records the tokenizer it was trained with; --tokenizer overrides it.
std::string tokenizer_of(const std::string& model_path, std::string tok_path) {
  if (!tok_path.empty()) return tok_path;
  auto info = io::read_model_info(model_path);
  if (info.extra.contains("tokenizer") && info.extra["tokenizer"].is_string())
    tok_path = info.extra["tokenizer"].get<std::string>();
  if (tok_path.empty()) OPDLM_FAIL_AT(model_path, "tokenizer", "the model file names no tokenizer: pass --tokenizer");
  return tok_path;
}

void require_file(const std::string& path, const std::string& flag) {
  if (!std::filesystem::is_regular_file(path)) OPDLM_FAIL_AT(kWhere, flag, "--", flag, ": no such file '", path, "'");
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

int run_eval(const std::vector<std::string>& args) {
  po::options_description d(
      "opdlm eval --mode ar|diffusion: exact match, token accuracy, multiple choice, tokens per forward, gen-PPL "
      "and state KL on JSONL tasks (docs/eval.md)");
  std::string mode_s, model_path, teacher_path, tok_path, gen_ppl_path, out, items, strategy;
  std::vector<std::string> tasks;
  int64_t seed = 0;
  int32_t mask_id = -1;
  eval::EvalOptions o;
  diffusion::SamplerOptions& g = o.decode;
  d.add_options()("help", "show help")("mode", po::value(&mode_s)->required(), "ar | diffusion")
      ("model", po::value(&model_path)->required(), "model.h5 (the evaluated model)")
      ("teacher", po::value(&teacher_path), "teacher model.h5: gen-PPL scorer and state-KL target")
      ("tokenizer", po::value(&tok_path), "tokenizer.json (default: the one the model file names)")
      ("tasks", po::value(&tasks)->multitoken(), "task JSONL files (id, prompt, gold, optional distractors)")
      ("gen-ppl-tasks", po::value(&gen_ppl_path), "JSONL of prompts for generative perplexity")
      ("limit", po::value(&o.limit)->default_value(0), "records per task file (0 = all)")
      ("batch-size", po::value(&o.batch_size)->default_value(16), "prompts per batch")
      ("max-new-tokens", po::value(&g.max_new_tokens)->default_value(64), "response length limit")
      ("block-size", po::value(&g.block_size)->default_value(4), "diffusion: block size b")
      ("steps-per-block", po::value(&g.steps_per_block)->default_value(4), "diffusion: denoising steps per block s")
      ("strategy", po::value(&strategy)->default_value("low_confidence_static"),
       "diffusion: sequential | low_confidence_static | low_confidence_dynamic | entropy_bounded")
      ("tau", po::value(&g.tau)->default_value(0.9), "diffusion: low_confidence_dynamic threshold (strict >)")
      ("entropy-bound", po::value(&g.entropy_bound)->default_value(1.0), "diffusion: entropy_bounded gamma (nats)")
      ("temperature", po::value(&g.sampling.temperature)->default_value(0.0), "0 = greedy")
      ("top-k", po::value(&g.sampling.top_k)->default_value(0), "0 = off")
      ("top-p", po::value(&g.sampling.top_p)->default_value(1.0), "1 = off")
      ("seed", po::value(&seed)->default_value(0), "sampling seed (also keys the ELBO masks and the state-KL states)")
      ("mask-id", po::value(&mask_id)->default_value(-1), "diffusion: [MASK] id (default: the config's mask_token_id, else the tokenizer's <|MASK|>)")
      ("mc-samples", po::value(&o.mc_samples)->default_value(8), "diffusion: ELBO mask samples per multiple-choice candidate")
      ("gen-ppl-temperature", po::value(&o.gen_ppl_sampling.temperature)->default_value(1.0), "gen-PPL sampling temperature")
      ("out", po::value(&out), "result JSON (one object). A .jsonl name without --items keeps the old meaning: per-item JSONL")
      ("items", po::value(&items), "per-item results as JSONL");
  po::variables_map vm;
  if (cli::parse_or_print_help(args, d, vm)) return cli::kExitOk;

  o.mode = eval::parse_eval_mode(mode_s, "mode");
  if (o.mode == eval::EvalMode::ar)
    for (const char* f : {"block-size", "steps-per-block", "strategy", "tau", "entropy-bound", "mask-id", "mc-samples"})
      if (vm.count(f) && !vm[f].defaulted()) OPDLM_FAIL_AT(kWhere, f, "--", f, " applies to --mode diffusion only");
  if (tasks.empty() && gen_ppl_path.empty()) OPDLM_FAIL_AT(kWhere, "tasks", "give --tasks and/or --gen-ppl-tasks");
  if (o.limit < 0) OPDLM_FAIL_AT(kWhere, "limit", "--limit must be >= 0, got ", o.limit);
  if (o.batch_size < 1) OPDLM_FAIL_AT(kWhere, "batch-size", "--batch-size must be >= 1, got ", o.batch_size);
  if (g.max_new_tokens < 0) OPDLM_FAIL_AT(kWhere, "max-new-tokens", "--max-new-tokens must be >= 0, got ", g.max_new_tokens);
  if (g.block_size < 1) OPDLM_FAIL_AT(kWhere, "block-size", "--block-size must be >= 1, got ", g.block_size);
  if (g.steps_per_block < 1) OPDLM_FAIL_AT(kWhere, "steps-per-block", "--steps-per-block must be >= 1, got ", g.steps_per_block);
  if (!(g.tau >= 0 && g.tau <= 1)) OPDLM_FAIL_AT(kWhere, "tau", "--tau must be in [0, 1], got ", g.tau);
  if (!(g.sampling.temperature >= 0)) OPDLM_FAIL_AT(kWhere, "temperature", "--temperature must be >= 0, got ", g.sampling.temperature);
  if (g.sampling.top_k < 0) OPDLM_FAIL_AT(kWhere, "top-k", "--top-k must be >= 0, got ", g.sampling.top_k);
  if (!(g.sampling.top_p > 0 && g.sampling.top_p <= 1)) OPDLM_FAIL_AT(kWhere, "top-p", "--top-p must be in (0, 1], got ", g.sampling.top_p);
  if (seed < 0 || seed > 0xFFFFFFFFll) OPDLM_FAIL_AT(kWhere, "seed", "--seed must be in [0, 2^32), got ", seed);
  if (o.mc_samples < 1) OPDLM_FAIL_AT(kWhere, "mc-samples", "--mc-samples must be >= 1, got ", o.mc_samples);
  if (!(o.gen_ppl_sampling.temperature >= 0))
    OPDLM_FAIL_AT(kWhere, "gen-ppl-temperature", "--gen-ppl-temperature must be >= 0, got ", o.gen_ppl_sampling.temperature);
  g.seed = static_cast<uint32_t>(seed);
  g.strategy = diffusion::parse_strategy(strategy, "strategy");
  // Before this harness, --out was the per-item JSONL (jobs/teacher.sh, tests/cli/ar_pipeline.sh).
  if (!out.empty() && ends_with(out, ".jsonl")) {
    if (!items.empty()) OPDLM_FAIL_AT(kWhere, "out", "--out is the result JSON (one object): '", out, "' looks like JSONL");
    std::cerr << "eval: --out " << out << " ends in .jsonl: writing per-item JSONL there (use --items for that, "
              << "--out result.json for the result)\n";
    items = out;
    out.clear();
  }
  require_file(model_path, "model");
  if (!teacher_path.empty()) require_file(teacher_path, "teacher");
  for (const auto& t : tasks) require_file(t, "tasks");
  if (!gen_ppl_path.empty()) require_file(gen_ppl_path, "gen-ppl-tasks");

  tok_path = tokenizer_of(model_path, tok_path);
  const io::Tokenizer tok = io::Tokenizer::from_file(tok_path);
  const model::Qwen3Model model = model::Qwen3Model::teacher(io::load_model(model_path));
  std::optional<model::Qwen3Model> teacher;
  if (!teacher_path.empty()) teacher.emplace(model::Qwen3Model::teacher(io::load_model(teacher_path)));
  const model::Qwen3Config& c = model.config();
  g.mask_id = mask_id;
  eval::fill_model_ids(o, c);
  if (o.mode == eval::EvalMode::diffusion) {
    // As generate --mode diffusion: --mask-id, else the config's mask_token_id, else <|MASK|>.
    if (g.mask_id < 0) g.mask_id = tok.token_id("<|MASK|>").value_or(-1);
    if (g.mask_id < 0)
      OPDLM_FAIL_AT(model_path, "mask_token_id", "the model has no mask token and the tokenizer no <|MASK|>: pass --mask-id");
  }
  if (teacher && teacher->config().vocab_size < c.vocab_size && o.mode == eval::EvalMode::ar)
    OPDLM_FAIL_AT(teacher_path, "vocab_size", "the teacher's vocabulary (", teacher->config().vocab_size,
                  ") is smaller than the model's (", c.vocab_size, ")");

  eval::EvalInputs in;
  in.model = &model;
  in.model_path = model_path;
  in.teacher = teacher ? &*teacher : nullptr;
  in.teacher_path = teacher_path;
  in.tok = &tok;
  in.tokenizer_path = tok_path;
  in.task_paths = tasks;
  in.gen_ppl_path = gen_ppl_path;
  const eval::EvalReport rep = eval::evaluate(in, o);

  // stdout: the AR harness's table and per-task JSON line (scripts grep them), then the new metrics.
  std::cout << std::left << std::setw(40) << "task" << std::setw(8) << "n" << std::setw(10) << "EM" << "token_acc\n";
  for (const auto& t : rep.tasks) {
    std::cout << std::left << std::setw(40) << t.task << std::setw(8) << t.n << std::setw(10) << std::setprecision(4)
              << t.exact_match << t.token_accuracy << "\n";
    std::cout << nlohmann::json{{"task", t.task}, {"n", t.n}, {"exact_match", t.exact_match},
                                {"token_accuracy", t.token_accuracy}}.dump() << "\n";
  }
  std::cout << std::left << std::setw(40) << "task" << std::setw(10) << "MC" << std::setw(8) << "TPF" << std::setw(10)
            << "forwards" << std::setw(10) << "tok/s" << "skipped\n";
  for (const auto& t : rep.tasks) {
    std::ostringstream mc;
    if (t.mc_n) mc << std::setprecision(4) << t.mc_accuracy;
    else mc << "-";
    std::cout << std::left << std::setw(40) << t.task << std::setw(10) << mc.str() << std::setw(8) << std::setprecision(3)
              << t.tokens_per_forward << std::setw(10) << t.forwards << std::setw(10) << std::setprecision(4)
              << t.tokens_per_s << t.skipped << "\n";
  }
  if (rep.gen_ppl)
    std::cout << "gen-PPL " << std::setprecision(5) << rep.gen_ppl->gen_ppl << "  unigram entropy "
              << rep.gen_ppl->unigram_entropy << " nats  (" << rep.gen_ppl->n << " samples, " << rep.gen_ppl->tokens
              << " tokens; " << rep.gen_ppl_note << ")\n";
  else
    std::cout << "gen-PPL " << rep.gen_ppl_note << "\n";
  if (rep.state_kl)
    std::cout << "state KL(T||S): own " << std::setprecision(5) << (*rep.state_kl)["own"].get<double>() << "  random "
              << (*rep.state_kl)["random"].get<double>() << "  (" << (*rep.state_kl)["rows"].get<int64_t>() << " rows)\n";
  else
    std::cout << "state KL " << rep.state_kl_note << "\n";
  std::cout << "wall " << std::setprecision(4) << rep.wall_seconds << " s\n";

  for (const auto& t : rep.tasks)
    for (const auto& it : t.items)
      if (!it.ok()) std::cerr << "eval: " << t.task << ": record " << it.id << " skipped (" << eval::item_status_name(it.status)
                              << "): " << it.error << "\n";
  if (!items.empty()) {
    std::string text;
    for (const auto& t : rep.tasks)
      for (const auto& it : t.items) text += eval::item_to_json(t.task, it).dump(-1, ' ', false, kReplace) + "\n";
    io::atomic_write_bytes(items, text);
  }
  if (!out.empty()) io::atomic_write_bytes(out, eval::report_to_json(rep).dump(2, ' ', false, kReplace) + "\n");
  return cli::kExitOk;
}

}  // namespace

OPDLM_SUBCOMMAND("eval", "evaluate a model on JSONL tasks: EM, multiple choice, TPF, gen-PPL, state KL (--mode ar | diffusion)",
                 run_eval);
