// `opdlm tokenizer`: encode text or JSONL to ids, decode ids to text, and train a byte-level BPE
// tokenizer.json (io/bpe_trainer.hpp). One output line per input line, so the tools pipe together.
#include <boost/program_options.hpp>
#include <chrono>
#include <iostream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "commands.hpp"

#include "opdlm/base/error.hpp"
#include "opdlm/io/bpe_trainer.hpp"
#include "opdlm/io/tokenizer.hpp"

namespace po = boost::program_options;

namespace {

using opdlm::cli::kExitOk;
using opdlm::cli::kExitUsage;

constexpr const char* kUsage =
    "Usage: opdlm tokenizer <action> [options]\n\n"
    "Actions:\n"
    "  encode   text lines (or JSONL with --jsonl FIELD) on stdin -> space-separated ids, one line each\n"
    "  decode   id lines on stdin (spaces/commas, optional [ ]) -> text, one line each (--json: JSON strings)\n"
    "  train    learn a byte-level BPE tokenizer.json from text files\n\n"
    "Run `opdlm tokenizer <action> --help` for its options.\n";

int tok_encode(const std::vector<std::string>& args) {
  po::options_description desc(
      "opdlm tokenizer encode: one line of ids per input line (no BOS/EOS added)\n"
      "  opdlm tokenizer encode --tokenizer tokenizer.json [--jsonl text] < in > ids");
  std::string tok_path, field;
  desc.add_options()("help", "show this help")
      ("tokenizer", po::value(&tok_path)->required(), "tokenizer.json (HF format)")
      ("jsonl", po::value(&field), "input is JSONL; encode this string field of each object");
  po::variables_map vm;
  if (opdlm::cli::parse_or_print_help(args, desc, vm)) return kExitOk;
  const auto tok = opdlm::io::Tokenizer::from_file(tok_path);
  std::ios::sync_with_stdio(false);
  std::string line, out;
  for (int64_t n = 1; std::getline(std::cin, line); ++n) {
    std::string_view text = line;
    std::string value;
    if (!field.empty()) {
      nlohmann::json j;
      try {
        j = nlohmann::json::parse(line);
      } catch (const nlohmann::json::exception& e) {
        OPDLM_FAIL_AT("<stdin>", "line " + std::to_string(n), "not valid JSON: ", e.what());
      }
      if (!j.is_object() || !j.contains(field) || !j[field].is_string())
        OPDLM_FAIL_AT("<stdin>", "line " + std::to_string(n), "no string field '", field, "'");
      value = j[field].get<std::string>();
      text = value;
    }
    std::vector<int32_t> ids;
    try {
      ids = tok.encode(text);
    } catch (const opdlm::Error& e) {
      OPDLM_FAIL_AT("<stdin>", "line " + std::to_string(n), e.message());
    }
    out.clear();
    for (size_t i = 0; i < ids.size(); ++i) {
      if (i) out += ' ';
      out += std::to_string(ids[i]);
    }
    out += '\n';
    std::cout << out;
  }
  std::cout.flush();
  return kExitOk;
}

int tok_decode(const std::vector<std::string>& args) {
  po::options_description desc(
      "opdlm tokenizer decode: one text per line of ids (special tokens kept as text)\n"
      "  opdlm tokenizer decode --tokenizer tokenizer.json [--json] < ids > text");
  std::string tok_path;
  bool as_json = false;
  desc.add_options()("help", "show this help")
      ("tokenizer", po::value(&tok_path)->required(), "tokenizer.json (HF format)")
      ("json", po::bool_switch(&as_json), "print each text as a JSON string (texts may hold newlines)");
  po::variables_map vm;
  if (opdlm::cli::parse_or_print_help(args, desc, vm)) return kExitOk;
  const auto tok = opdlm::io::Tokenizer::from_file(tok_path);
  std::ios::sync_with_stdio(false);
  std::string line;
  std::vector<int32_t> ids;
  for (int64_t n = 1; std::getline(std::cin, line); ++n) {
    ids.clear();
    size_t i = 0;
    while (i < line.size()) {
      const char c = line[i];
      if (c == ' ' || c == ',' || c == '\t' || c == '[' || c == ']' || c == '\r') {
        ++i;
        continue;
      }
      size_t end = i;
      if (line[end] == '-') ++end;
      while (end < line.size() && line[end] >= '0' && line[end] <= '9') ++end;
      if (end == i || (end == i + 1 && c == '-') || end - i > 11)
        OPDLM_FAIL_AT("<stdin>", "line " + std::to_string(n), "not a token id at column ", i + 1, ": '",
                      line.substr(i, 20), "'");
      const long long v = std::stoll(line.substr(i, end - i));
      if (v < 0 || v >= tok.vocab_size())
        OPDLM_FAIL_AT("<stdin>", "line " + std::to_string(n), "token id ", v, " outside [0, ", tok.vocab_size(), ")");
      ids.push_back(static_cast<int32_t>(v));
      i = end;
    }
    const std::string text = tok.decode(ids);
    if (as_json) std::cout << nlohmann::json(text).dump() << '\n';
    else std::cout << text << '\n';
  }
  std::cout.flush();
  return kExitOk;
}

int tok_train(const std::vector<std::string>& args) {
  po::options_description desc(
      "opdlm tokenizer train: byte-level BPE (Qwen2 pre-split, NFC) reserving <|endoftext|>, <|im_start|>,\n"
      "<|im_end|> and <|MASK|> as special tokens. Ties between equally frequent pairs go to the pair of\n"
      "older tokens (smaller left id, then smaller right id), so the output is deterministic.\n"
      "  opdlm tokenizer train --input a.txt [b.txt ...] --vocab-size 8192 --out tokenizer.json");
  std::vector<std::string> inputs;
  std::string out;
  int32_t vocab_size = 0;
  int64_t min_frequency = 2;
  desc.add_options()("help", "show this help")
      ("input", po::value(&inputs)->multitoken()->required(), "UTF-8 text files; each file is one document")
      ("vocab-size", po::value(&vocab_size)->required(), "vocabulary size incl. 256 bytes and 4 special tokens")
      ("out", po::value(&out)->required(), "tokenizer.json to write")
      ("min-frequency", po::value(&min_frequency)->default_value(2), "stop when the best pair is rarer than this");
  po::variables_map vm;
  if (opdlm::cli::parse_or_print_help(args, desc, vm)) return kExitOk;
  const auto t0 = std::chrono::steady_clock::now();
  opdlm::io::BpeTrainerOptions o;
  o.vocab_size = vocab_size;
  o.min_frequency = min_frequency;
  opdlm::io::BpeTrainer trainer(o);
  for (const auto& f : inputs) trainer.add_file(f);
  opdlm::io::BpeTrainStats st;
  trainer.train(&st).save(out);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::cerr << "opdlm tokenizer train: " << inputs.size() << " files, " << st.bytes << " bytes, " << st.pre_tokens
            << " pre-tokens (" << st.unique_words << " distinct), " << st.merges << " merges, vocab " << st.vocab_size
            << (st.vocab_size < vocab_size ? " (fewer than asked: no pair left at --min-frequency)" : "") << ", "
            << secs << " s -> " << out << "\n";
  return kExitOk;
}

int run_tokenizer(const std::vector<std::string>& args) {
  if (args.empty()) {
    std::cerr << kUsage;
    return kExitUsage;
  }
  const std::string& action = args[0];
  const std::vector<std::string> rest(args.begin() + 1, args.end());
  if (action == "--help" || action == "-h" || action == "help") {
    std::cout << kUsage;
    return kExitOk;
  }
  if (action == "encode") return tok_encode(rest);
  if (action == "decode") return tok_decode(rest);
  if (action == "train") return tok_train(rest);
  std::cerr << "opdlm tokenizer: unknown action '" << action << "'\n\n" << kUsage;
  return kExitUsage;
}

}  // namespace

OPDLM_SUBCOMMAND("tokenizer", "encode / decode with a tokenizer.json, train a byte-level BPE", run_tokenizer);
