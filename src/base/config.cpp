// INI + command-line configuration through Boost.Program_options, with errors that name file and key.
#include "opdlm/base/config.hpp"

#include <boost/any.hpp>
#include <fstream>
#include <sstream>

#include "opdlm/base/error.hpp"

namespace po = boost::program_options;

namespace opdlm {
namespace {

std::string any_to_text(const boost::any& v) {
  std::ostringstream os;
  if (auto p = boost::any_cast<std::string>(&v)) os << *p;
  else if (auto p = boost::any_cast<int>(&v)) os << *p;
  else if (auto p = boost::any_cast<int64_t>(&v)) os << *p;
  else if (auto p = boost::any_cast<uint32_t>(&v)) os << *p;
  else if (auto p = boost::any_cast<uint64_t>(&v)) os << *p;
  else if (auto p = boost::any_cast<double>(&v)) os << *p;
  else if (auto p = boost::any_cast<float>(&v)) os << *p;
  else if (auto p = boost::any_cast<bool>(&v)) os << (*p ? "true" : "false");
  else os << "<value>";
  return os.str();
}

[[noreturn]] void rethrow_po(const po::error& e, const std::string& where) {
  std::string key;
  if (auto* n = dynamic_cast<const po::error_with_option_name*>(&e)) key = n->get_option_name();
  while (!key.empty() && key[0] == '-') key.erase(0, 1);
  OPDLM_FAIL_AT(where, key, e.what());
}

// Boost.Program_options builds its error messages by replacing placeholders such as %value% with the
// offending text, again and again while the placeholder is found: a value that itself contains the
// placeholder never terminates (a hang found by fuzz_config_ini). Such text is refused before Boost
// sees it.
void refuse_placeholders(const std::string& text, const std::string& where, const std::string& what) {
  for (const char* p : {"%option%", "%original_token%", "%value%", "%invalid_line%", "%canonical_option%",
                        "%prefix%", "%example%"})
    if (text.find(p) != std::string::npos)
      OPDLM_FAIL_AT(where, what, "the text '", p, "' is reserved by the config parser; remove it");
}

}  // namespace

ResolvedConfig load_config(const po::options_description& desc, const std::string& ini_path,
                           const std::vector<std::string>& overrides) {
  ResolvedConfig cfg;
  cfg.file = ini_path;
  // "--section.key=" means the empty value (Boost rejects an empty "=value"; a separate "" works),
  // so a string key set in the file can be cleared from the command line.
  std::vector<std::string> args;
  for (const auto& a : overrides) refuse_placeholders(a, "command line", a.substr(0, a.find('=')));
  for (const auto& a : overrides) {
    if (a.size() > 3 && a.rfind("--", 0) == 0 && a.back() == '=' && a.find('=') == a.size() - 1) {
      args.push_back(a.substr(0, a.size() - 1));
      args.emplace_back();
    } else {
      args.push_back(a);
    }
  }
  // The command line is stored first: Boost keeps the first value stored for a key.
  try {
    po::store(po::command_line_parser(args).options(desc).style(po::command_line_style::default_style &
                                                                     ~po::command_line_style::allow_guessing)
                  .run(),
              cfg.values);
  } catch (const po::error& e) {
    rethrow_po(e, "command line");
  }
  std::map<std::string, bool> from_cli;
  for (const auto& kv : cfg.values)
    if (!kv.second.defaulted()) from_cli[kv.first] = true;
  if (!ini_path.empty()) {
    std::ifstream file(ini_path);
    if (!file) OPDLM_FAIL_AT(ini_path, "", "cannot open config file");
    std::stringstream in;
    in << file.rdbuf();
    {
      std::istringstream lines(in.str());
      std::string line;
      for (int64_t n = 1; std::getline(lines, line); ++n) refuse_placeholders(line, ini_path + ":" + std::to_string(n), "");
    }
    try {
      po::store(po::parse_config_file(in, desc, /*allow_unregistered=*/false), cfg.values);
    } catch (const po::error& e) {
      rethrow_po(e, ini_path);
    }
  }
  try {
    po::notify(cfg.values);
  } catch (const po::error& e) {
    rethrow_po(e, ini_path.empty() ? "command line" : ini_path);
  }
  for (const auto& kv : cfg.values) {
    cfg.as_text[kv.first] = any_to_text(kv.second.value());
    cfg.origin[kv.first] = kv.second.defaulted() ? "default" : from_cli.count(kv.first) ? "command line" : ini_path;
  }
  return cfg;
}

std::string ResolvedConfig::table() const {
  size_t kw = 3, vw = 5;
  for (const auto& [k, v] : as_text) {
    kw = std::max(kw, k.size());
    vw = std::max(vw, v.size());
  }
  std::ostringstream os;
  for (const auto& [k, v] : as_text) {
    os << k << std::string(kw - k.size() + 2, ' ') << v << std::string(vw - v.size() + 2, ' ') << "("
       << origin.at(k) << ")\n";
  }
  return os.str();
}

void require_range(const ResolvedConfig& cfg, const std::string& key, double lo, double hi) {
  if (!cfg.has(key)) return;
  const std::string& text = cfg.as_text.at(key);
  double v = 0;
  try {
    v = std::stod(text);
  } catch (...) {
    OPDLM_FAIL_AT(cfg.origin.at(key), key, "value '", text, "' is not a number");
  }
  if (!(v >= lo && v <= hi))
    OPDLM_FAIL_AT(cfg.origin.at(key), key, "value ", text, " is outside [", lo, ", ", hi, "]");
}

}  // namespace opdlm
