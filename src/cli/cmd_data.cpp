// `opdlm data`: build the teacher corpus and eval sets (kjv, arithmetic, facts), tokenize text into
// token shards (prepare) and print a shard's header (inspect). Formats: docs/data_formats.md.
#include <boost/program_options.hpp>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "commands.hpp"

#include "opdlm/base/error.hpp"
#include "opdlm/io/corpora.hpp"
#include "opdlm/io/file_util.hpp"
#include "opdlm/io/hash.hpp"
#include "opdlm/io/jsonl_dataset.hpp"
#include "opdlm/io/token_shard.hpp"
#include "opdlm/io/tokenizer.hpp"

namespace po = boost::program_options;
namespace fs = std::filesystem;

namespace {

using opdlm::cli::kExitOk;
using opdlm::cli::kExitUsage;

constexpr const char* kUsage =
    "Usage: opdlm data <action> [options]\n\n"
    "Actions:\n"
    "  prepare     tokenize text/JSONL files into a token shard\n"
    "  inspect     print a token shard's header and counts (validates it)\n"
    "  kjv         KJV teacher text + seen/held-out eval JSONL (needs the `bible` program)\n"
    "  arithmetic  arithmetic teacher text + held-out/length/seen eval JSONL + conversion prompts\n"
    "  facts       invented-entity facts: teacher text + recall/multiple-choice eval JSONL\n\n"
    "Run `opdlm data <action> --help` for its options.\n";

std::string read_file(const std::string& path) { return opdlm::io::read_file_bytes(path); }

void write_text(const std::string& path, const std::vector<std::string>& lines) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) OPDLM_FAIL_AT(path, "", "cannot create file");
    for (const auto& l : lines) out << l << '\n';
    if (!out.flush()) OPDLM_FAIL_AT(path, "", "write failed");
  }
  fs::rename(tmp, path);
}

void write_json(const std::string& path, const nlohmann::json& j) { write_text(path, {j.dump(2)}); }

int data_prepare(const std::vector<std::string>& args) {
  po::options_description desc(
      "opdlm data prepare: tokenize documents into a token shard (docs/data_formats.md)\n"
      "  opdlm data prepare --tokenizer tok.json --input a.txt [b.txt ...] --out shard.bin --append-eos\n"
      "    [--shuffle-seed S] [--pack-rows SEQ_LEN]");
  std::string tok_path, out, format = "lines", field = "text";
  std::vector<std::string> inputs;
  uint32_t shuffle_seed = 0;
  desc.add_options()("help", "show this help")
      ("tokenizer", po::value(&tok_path)->required(), "tokenizer.json")
      ("input", po::value(&inputs)->multitoken()->required(), "input files (documents in file order)")
      ("out", po::value(&out)->required(), "output shard")
      ("format", po::value(&format)->default_value("lines"),
       "lines (one document per non-blank line) | paragraphs (blank-line separated) | text (one per file) | jsonl")
      ("field", po::value(&field)->default_value("text"), "JSONL string field holding the document")
      ("shuffle-seed", po::value(&shuffle_seed), "shuffle documents (counter RNG, data_shuffle, epoch 0)")
      ("append-eos", po::bool_switch(), "append <|endoftext|> to every document")
      ("keep-newlines", po::bool_switch(), "keep each line's trailing newline in the document text")
      ("pack-rows", po::value<int64_t>(),
       "pack documents (after the shuffle) into rows of exactly N tokens padded with <|endoftext|>, so every\n"
       "trainer window (N = data.seq_len) starts with a whole document at position 0");
  po::variables_map vm;
  if (opdlm::cli::parse_or_print_help(args, desc, vm)) return kExitOk;
  const bool append_eos = vm["append-eos"].as<bool>(), keep_nl = vm["keep-newlines"].as<bool>();

  const auto fmt = opdlm::io::parse_doc_format(format);  // before the (slow) tokenizer load
  if (vm.count("pack-rows") && vm["pack-rows"].as<int64_t>() < 2)
    OPDLM_FAIL_AT("command line", "--pack-rows", "--pack-rows must be >= 2, got ", vm["pack-rows"].as<int64_t>());
  const auto tok = opdlm::io::Tokenizer::from_file(tok_path);
  std::optional<int32_t> eos;
  if (append_eos) {
    eos = tok.token_id("<|endoftext|>");
    if (!eos) OPDLM_FAIL_AT(tok_path, "added_tokens", "--append-eos: the tokenizer has no <|endoftext|> token");
  }
  opdlm::io::TokenShard shard(tok.vocab_size(), opdlm::io::sha256_file_digest(tok_path));
  uint64_t n_bytes = 0;
  for (const auto& in : inputs) {
    const auto docs = opdlm::io::split_documents(read_file(in), fmt, field, keep_nl, in);
    for (const auto& d : docs) {
      auto ids = tok.encode(d);
      if (eos) ids.push_back(*eos);
      shard.add_document(ids);
      n_bytes += d.size();
    }
    std::cout << in << ": " << docs.size() << " documents\n";
  }
  if (vm.count("shuffle-seed")) shard = shard.shuffled(shuffle_seed, 0);
  if (vm.count("pack-rows")) {
    const auto pad = tok.token_id("<|endoftext|>");
    if (!pad) OPDLM_FAIL_AT(tok_path, "added_tokens", "--pack-rows: the tokenizer has no <|endoftext|> token to pad with");
    const uint64_t n_docs = shard.num_documents(), n_tok = shard.num_tokens();
    shard = opdlm::io::pack_rows(shard, vm["pack-rows"].as<int64_t>(), *pad);
    std::cout << "packed " << n_docs << " documents (" << n_tok << " tokens) into " << shard.num_documents() - 1
              << " rows of " << vm["pack-rows"].as<int64_t>() << " tokens ("
              << (shard.num_tokens() ? 100.0 * double(shard.num_tokens() - n_tok) / double(shard.num_tokens()) : 0.0)
              << "% padding)\n";
  }
  shard.write(out);
  std::cout << "wrote " << out << ": " << shard.num_documents() << " documents, " << shard.num_tokens()
            << " tokens (" << n_bytes << " text bytes, "
            << (shard.num_tokens() ? static_cast<double>(n_bytes) / shard.num_tokens() : 0.0)
            << " bytes/token), vocab " << shard.vocab_size() << ", "
            << (shard.dtype() == opdlm::io::TokenDType::u16 ? "u16" : "u32") << " tokens\n";
  return kExitOk;
}

int data_inspect(const std::vector<std::string>& args) {
  po::options_description desc("opdlm data inspect: validate a token shard and print its header");
  std::string path;
  desc.add_options()("help", "show this help")("shard", po::value(&path)->required(), "token shard");
  po::positional_options_description pos;
  pos.add("shard", 1);
  po::variables_map vm;
  if (opdlm::cli::parse_or_print_help(args, desc, vm, &pos)) return kExitOk;
  const auto s = opdlm::io::TokenShard::read(path);
  uint64_t longest = 0;
  for (uint64_t d = 0; d < s.num_documents(); ++d) longest = std::max<uint64_t>(longest, s.document(d).size());
  nlohmann::ordered_json j;
  j["file"] = path;
  j["version"] = opdlm::io::kTokenShardVersion;
  j["dtype"] = s.dtype() == opdlm::io::TokenDType::u16 ? "u16" : "u32";
  j["n_tokens"] = s.num_tokens();
  j["n_docs"] = s.num_documents();
  j["longest_doc"] = longest;
  j["vocab_size"] = s.vocab_size();
  j["tokenizer_sha256"] = opdlm::io::to_hex(s.tokenizer_sha256());
  std::cout << j.dump(2) << "\n";
  return kExitOk;
}

nlohmann::json dataset_header(const std::string& task, const nlohmann::json& source) {
  return {{"task", task}, {"generator", "opdlm data"}, {"source", source}};
}

int data_kjv(const std::vector<std::string>& args) {
  po::options_description desc(
      "opdlm data kjv: KJV teacher text and eval sets (../shared/docs/data.md 6.1)\n"
      "  writes train.txt, heldout.txt, kjv.tsv, heldout_chapters.txt, eval_seen.jsonl, eval_heldout.jsonl,\n"
      "  manifest.json");
  std::string out_dir, program = "bible";
  int k_words = 3, n_distractors = 3;
  uint32_t seed = 0;
  desc.add_options()("help", "show this help")
      ("out-dir", po::value(&out_dir)->required(), "output folder (created)")
      ("bible", po::value(&program)->default_value("bible"), "the KJV reader program (Debian bible-kjv)")
      ("k-words", po::value(&k_words)->default_value(3), "words of the verse given in the completion prompt")
      ("distractors", po::value(&n_distractors)->default_value(3), "distractors per seen-eval item")
      ("seed", po::value(&seed)->default_value(0), "seed of the distractor choice");
  po::variables_map vm;
  if (opdlm::cli::parse_or_print_help(args, desc, vm)) return kExitOk;
  namespace io = opdlm::io;
  fs::create_directories(out_dir);
  std::string raw;
  const auto verses = io::load_kjv(program, &raw);
  const std::string raw_sha = io::sha256_hex(raw);
  const auto split = io::split_kjv(verses);

  std::vector<std::string> train, heldout, tsv;
  for (size_t i : split.train) train.push_back(verses[i].line());
  for (size_t i : split.heldout) heldout.push_back(verses[i].line());
  for (const auto& v : verses)
    tsv.push_back(v.book + "\t" + std::to_string(v.chapter) + "\t" + std::to_string(v.verse) + "\t" + v.text);
  const fs::path d(out_dir);
  write_text((d / "train.txt").string(), train);
  write_text((d / "heldout.txt").string(), heldout);
  write_text((d / "kjv.tsv").string(), tsv);
  write_text((d / "heldout_chapters.txt").string(), split.heldout_chapters);

  nlohmann::json source = {{"command", program + " -l 100000 \"" + std::string(io::kKjvRange) + "\""},
                           {"output_sha256", raw_sha}};
  if (fs::exists("/usr/lib/bible.data")) source["bible_data_sha256"] = io::sha256_file_hex("/usr/lib/bible.data");
  io::PromptDataset seen{dataset_header("kjv_seen_completion", source),
                         io::kjv_seen_completion(verses, split, k_words, n_distractors, seed)};
  seen.header["k_words"] = k_words;
  seen.header["seed"] = seed;
  seen.header["rule"] = "trained chapter and sha256(\"eval|Book C:V\") % 1000 < 34";
  io::PromptDataset held{dataset_header("kjv_heldout_chapters", source), io::kjv_heldout_records(verses, split)};
  held.header["rule"] = "sha256(\"Book C\") % 100 < 5";
  io::write_prompt_jsonl((d / "eval_seen.jsonl").string(), seen);
  io::write_prompt_jsonl((d / "eval_heldout.jsonl").string(), held);

  nlohmann::ordered_json m;
  m["source"] = source;
  m["verses"] = verses.size();
  m["chapters"] = split.num_chapters;
  m["heldout_chapters"] = split.heldout_chapters.size();
  m["train_verses"] = split.train.size();
  m["heldout_verses"] = split.heldout.size();
  m["seen_eval_verses"] = split.seen_eval.size();
  m["seen_eval_items"] = seen.records.size();
  m["train_txt_sha256"] = io::sha256_file_hex((d / "train.txt").string());
  write_json((d / "manifest.json").string(), nlohmann::json::parse(m.dump()));
  std::cout << "kjv: " << verses.size() << " verses, " << split.num_chapters << " chapters; held out "
            << split.heldout_chapters.size() << " chapters (" << split.heldout.size() << " verses); train "
            << split.train.size() << " verses; seen eval " << seen.records.size() << " items; source sha256 "
            << raw_sha << "\n";
  return kExitOk;
}

// --seed is parsed signed, so "-1" is an error naming the flag rather than a wrap-around.
uint32_t seed_flag(int64_t seed) {
  if (seed < 0 || seed > int64_t{0xFFFFFFFF})
    OPDLM_FAIL_AT("command line", "--seed", "--seed must be in [0, 2^32), got ", seed);
  return static_cast<uint32_t>(seed);
}

int data_arithmetic(const std::vector<std::string>& args) {
  po::options_description desc(
      "opdlm data arithmetic: synthetic arithmetic text and eval sets (../shared/docs/data.md 6.5)\n"
      "  writes train.txt, eval_heldout.jsonl, eval_length.jsonl, eval_seen.jsonl, conversion.jsonl,\n"
      "  manifest.json");
  std::string out_dir;
  opdlm::io::ArithmeticConfig cfg;
  int64_t n_conversion = static_cast<int64_t>(cfg.n_conversion), seed = 0;
  desc.add_options()("help", "show this help")
      ("out-dir", po::value(&out_dir)->required(), "output folder (created)")
      ("n-train", po::value(&cfg.n_train)->default_value(cfg.n_train), "training lines")
      ("n-eval", po::value(&cfg.n_eval)->default_value(cfg.n_eval), "items per eval set")
      ("seed", po::value(&seed)->default_value(0), "generator seed, [0, 2^32)")
      ("max-digits", po::value(&cfg.max_digits)->default_value(cfg.max_digits), "training operand digits 1..N")
      ("length-digits", po::value(&cfg.length_digits)->default_value(cfg.length_digits),
       "operand digits of the length-generalisation set")
      ("ops", po::value(&cfg.ops)->default_value(cfg.ops), "operators to draw from, e.g. \"+-\" (no products)")
      ("no-negative", po::bool_switch(&cfg.no_negative), "draw a-b with a < b as b-a (no negative results)")
      ("n-conversion", po::value(&n_conversion)->default_value(n_conversion),
       "conversion prompts with gold responses (never held out, never in eval_seen; 0: none, an empty conversion.jsonl)");
  po::variables_map vm;
  if (opdlm::cli::parse_or_print_help(args, desc, vm)) return kExitOk;
  namespace io = opdlm::io;
  // Parsed signed so that "-1" is an error naming the flag rather than a huge unsigned count.
  if (n_conversion < 0) OPDLM_FAIL_AT("command line", "--n-conversion", "--n-conversion must be >= 0, got ", n_conversion);
  cfg.n_conversion = static_cast<uint64_t>(n_conversion);
  cfg.seed = seed_flag(seed);
  io::validate_arithmetic_config(cfg);  // before creating the folder
  fs::create_directories(out_dir);
  const auto sets = io::generate_arithmetic(cfg);
  std::vector<std::string> train;
  train.reserve(sets.train.size());
  for (const auto& p : sets.train) train.push_back(p.line());
  const fs::path d(out_dir);
  write_text((d / "train.txt").string(), train);
  const nlohmann::json source = {{"generator", "opdlm::io::generate_arithmetic"},
                                 {"seed", cfg.seed},
                                 {"n_train", cfg.n_train},
                                 {"max_digits", cfg.max_digits},
                                 {"length_digits", cfg.length_digits},
                                 {"ops", cfg.ops},
                                 {"no_negative", cfg.no_negative},
                                 {"train_txt_sha256", io::sha256_file_hex((d / "train.txt").string())}};
  auto write_set = [&](const char* file, const char* task, const std::vector<io::ArithProblem>& ps, const char* split,
                       const char* rule) {
    io::PromptDataset ds{dataset_header(task, source), io::arithmetic_records(ps, split)};
    ds.header["rule"] = rule;
    io::write_prompt_jsonl((d / file).string(), ds);
  };
  write_set("eval_heldout.jsonl", "arithmetic_heldout", sets.eval_heldout, "heldout",
            "sha256(\"{a},{b},{op}\") % 100 < 10, operands 1..max_digits digits");
  write_set("eval_length.jsonl", "arithmetic_length", sets.eval_length, "length",
            "both operands length_digits digits (never trained)");
  write_set("eval_seen.jsonl", "arithmetic_seen", sets.eval_seen, "seen", "first distinct training problems");
  io::PromptDataset conv{dataset_header("arithmetic_conversion", source), io::arithmetic_conversion_records(sets.conversion)};
  conv.header["rule"] = "not held out (sha256 % 100 >= 10), not in eval_seen, distinct; response = gold answer";
  io::write_prompt_jsonl((d / "conversion.jsonl").string(), conv);
  write_json((d / "manifest.json").string(),
             {{"source", source},
              {"train_lines", sets.train.size()},
              {"eval_heldout", sets.eval_heldout.size()},
              {"eval_length", sets.eval_length.size()},
              {"eval_seen", sets.eval_seen.size()},
              {"conversion", sets.conversion.size()}});
  std::cout << "arithmetic: " << sets.train.size() << " train lines, " << sets.eval_heldout.size() << " held-out, "
            << sets.eval_length.size() << " length-" << cfg.length_digits << ", " << sets.eval_seen.size()
            << " seen eval items, " << sets.conversion.size() << " conversion prompts; train.txt sha256 "
            << source["train_txt_sha256"].get<std::string>() << "\n";
  return kExitOk;
}

int data_facts(const std::vector<std::string>& args) {
  po::options_description desc(
      "opdlm data facts: invented-entity facts, the knowledge-retention probe (../shared/docs/study.md 5.3)\n"
      "  writes train.txt (every fact --repeats times), eval.jsonl (one completion + multiple-choice item per\n"
      "  fact), conversion.jsonl (the facts of --conversion-entities entities, left out of eval.jsonl),\n"
      "  manifest.json");
  std::string out_dir;
  opdlm::io::FactsConfig cfg;
  int64_t seed = 0;  // signed, so a negative seed is an error naming --seed rather than a wrap-around
  desc.add_options()("help", "show this help")
      ("out-dir", po::value(&out_dir)->required(), "output folder (created)")
      ("n-facts", po::value(&cfg.n_facts)->default_value(cfg.n_facts), "entities K (1 or 2 attributes each)")
      ("repeats", po::value(&cfg.repeats)->default_value(cfg.repeats), "training lines per fact")
      ("templates", po::value(&cfg.templates)->default_value(cfg.templates),
       "surface forms per attribute used in training, 1..3 (eval uses form 0)")
      ("distractors", po::value(&cfg.n_distractors)->default_value(cfg.n_distractors),
       "multiple-choice distractors per item (other values of the same attribute)")
      ("conversion-entities", po::value(&cfg.conversion_entities)->default_value(cfg.conversion_entities),
       "entities whose facts go to conversion.jsonl (prompt + gold response) instead of eval.jsonl; the "
       "teacher still learns them (0: none, an empty conversion.jsonl)")
      ("seed", po::value(&seed)->default_value(0), "generator seed, [0, 2^32)");
  po::variables_map vm;
  if (opdlm::cli::parse_or_print_help(args, desc, vm)) return kExitOk;
  namespace io = opdlm::io;
  cfg.seed = seed_flag(seed);
  io::validate_facts_config(cfg);  // before creating the folder
  fs::create_directories(out_dir);
  const auto set = io::generate_facts(cfg);
  const fs::path d(out_dir);
  write_text((d / "train.txt").string(), set.train_lines);
  const nlohmann::json source = {{"generator", "opdlm::io::generate_facts"},
                                 {"seed", cfg.seed},
                                 {"n_facts", cfg.n_facts},
                                 {"repeats", cfg.repeats},
                                 {"templates", cfg.templates},
                                 {"train_txt_sha256", io::sha256_file_hex((d / "train.txt").string())}};
  const auto conversion_entity = io::facts_conversion_entities(set, cfg);
  io::PromptDataset ds{dataset_header("facts_recall", source), io::facts_records(set, conversion_entity)};
  ds.header["rule"] = "every fact once, surface form 0: prompt = sentence up to the value, gold = \" value.\"; "
                      "no fact of a conversion entity";
  ds.header["distractors"] = cfg.n_distractors;
  ds.header["conversion_entities"] = cfg.conversion_entities;
  io::write_prompt_jsonl((d / "eval.jsonl").string(), ds);
  io::PromptDataset conv{dataset_header("facts_conversion", source), io::facts_conversion_records(set, conversion_entity)};
  conv.header["rule"] = "the facts of conversion_entities entities (a seeded shuffle, data_generate step 9), "
                        "eval form; response = gold; never in eval.jsonl";
  conv.header["conversion_entities"] = cfg.conversion_entities;
  io::write_prompt_jsonl((d / "conversion.jsonl").string(), conv);
  nlohmann::json per_attr = nlohmann::json::object(), pools = nlohmann::json::object();
  for (const auto& f : set.facts) {
    const std::string a = io::fact_attribute_name(f.attribute);
    per_attr[a] = per_attr.value(a, 0) + 1;
  }
  for (int a = 0; a < io::kFactAttributeCount; ++a) pools[io::fact_attribute_name(a)] = set.value_pools[a].size();
  write_json((d / "manifest.json").string(), {{"source", source},
                                              {"entities", set.entities.size()},
                                              {"facts", set.facts.size()},
                                              {"facts_per_attribute", per_attr},
                                              {"value_pool_sizes", pools},
                                              {"train_lines", set.train_lines.size()},
                                              {"eval_items", ds.records.size()},
                                              {"conversion_entities", cfg.conversion_entities},
                                              {"conversion_items", conv.records.size()}});
  std::cout << "facts: " << set.entities.size() << " entities, " << set.facts.size() << " facts, "
            << set.train_lines.size() << " train lines (" << cfg.repeats << " repeats, " << cfg.templates
            << " surface forms), " << ds.records.size() << " eval items, " << conv.records.size()
            << " conversion items; train.txt sha256 "
            << source["train_txt_sha256"].get<std::string>() << "\n";
  return kExitOk;
}

int cmd_data(const std::vector<std::string>& args) {
  if (args.empty()) {
    std::cerr << kUsage;
    return kExitUsage;
  }
  const std::string& a = args[0];
  const std::vector<std::string> rest(args.begin() + 1, args.end());
  if (a == "--help" || a == "-h" || a == "help") {
    std::cout << kUsage;
    return kExitOk;
  }
  if (a == "prepare") return data_prepare(rest);
  if (a == "inspect") return data_inspect(rest);
  if (a == "kjv") return data_kjv(rest);
  if (a == "arithmetic") return data_arithmetic(rest);
  if (a == "facts") return data_facts(rest);
  std::cerr << "opdlm data: unknown action '" << a << "'\n\n" << kUsage;
  return kExitUsage;
}

}  // namespace

OPDLM_SUBCOMMAND("data", "build corpora and eval sets (kjv, arithmetic, facts), tokenize into shards (prepare)", cmd_data);
