// Configs: INI files (`[section] key = value`) read by Boost.Program_options, overridden on the
// command line as `--section.key=value`; every error names the file (or "command line") and the key.
#pragma once

#include <boost/program_options.hpp>
#include <map>
#include <string>
#include <vector>

namespace opdlm {

struct ResolvedConfig {
  boost::program_options::variables_map values;
  std::string file;                              // the INI file ("" when none)
  std::map<std::string, std::string> origin;     // key -> "default" | file path | "command line"
  std::map<std::string, std::string> as_text;    // key -> value as written / defaulted

  bool has(const std::string& key) const { return values.count(key) > 0; }
  template <class T> const T& get(const std::string& key) const { return values[key].as<T>(); }
  // Aligned "key  value  (origin)" table, printed once at startup and stored with checkpoints.
  std::string table() const;
};

// Parses `ini_path` (may be empty) then `overrides` ("--section.key=value" or "--section.key value").
// Options in `desc` must be named "section.key". Unknown keys, malformed values and duplicates are
// errors naming the file and the key. Command-line values win over the file.
ResolvedConfig load_config(const boost::program_options::options_description& desc, const std::string& ini_path,
                           const std::vector<std::string>& overrides);

// Rejects a value outside [lo, hi] with an error naming the key and where it came from.
void require_range(const ResolvedConfig& cfg, const std::string& key, double lo, double hi);

}  // namespace opdlm
