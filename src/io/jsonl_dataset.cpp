// JSONL prompt datasets: strict reader (errors name file:line and field) and atomic writer.
#include "opdlm/io/jsonl_dataset.hpp"

#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <unordered_set>

#include "opdlm/base/error.hpp"

namespace opdlm::io {
namespace {

using nlohmann::json;

std::string optional_string(const json& j, const char* key, const std::string& where, bool& present) {
  present = false;
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return {};
  if (!it->is_string()) OPDLM_FAIL_AT(where, key, "'", key, "' must be a string, got ", it->type_name());
  present = true;
  return it->get<std::string>();
}

}  // namespace

PromptRecord prompt_record_from_json(const json& j, const std::string& where) {
  if (!j.is_object()) OPDLM_FAIL_AT(where, "", "a record must be a JSON object, got ", j.type_name());
  static const std::unordered_set<std::string> kKnown = {"id", "prompt", "response", "gold",
                                                          "distractors", "meta", "split"};
  for (const auto& [k, v] : j.items())
    if (!kKnown.count(k)) OPDLM_FAIL_AT(where, k, "unknown field '", k, "'");

  PromptRecord r;
  auto id = j.find("id");
  if (id == j.end()) OPDLM_FAIL_AT(where, "id", "missing required field 'id'");
  if (id->is_string()) {
    r.id = id->get<std::string>();
  } else if (id->is_number_integer()) {
    r.id = std::to_string(id->get<int64_t>());
    r.id_is_int = true;
  } else {
    OPDLM_FAIL_AT(where, "id", "'id' must be a string or an integer, got ", id->type_name());
  }

  auto prompt = j.find("prompt");
  if (prompt == j.end()) OPDLM_FAIL_AT(where, "prompt", "missing required field 'prompt'");
  if (!prompt->is_string()) OPDLM_FAIL_AT(where, "prompt", "'prompt' must be a string, got ", prompt->type_name());
  r.prompt = prompt->get<std::string>();

  bool present = false;
  std::string s = optional_string(j, "response", where, present);
  if (present) r.response = std::move(s);
  s = optional_string(j, "gold", where, present);
  if (present) r.gold = std::move(s);
  s = optional_string(j, "split", where, present);
  if (present) r.split = std::move(s);

  if (auto d = j.find("distractors"); d != j.end() && !d->is_null()) {
    if (!d->is_array()) OPDLM_FAIL_AT(where, "distractors", "'distractors' must be an array of strings");
    for (size_t i = 0; i < d->size(); ++i) {
      if (!(*d)[i].is_string())
        OPDLM_FAIL_AT(where, "distractors[" + std::to_string(i) + "]", "distractor ", i, " must be a string, got ",
                      (*d)[i].type_name());
      r.distractors.push_back((*d)[i].get<std::string>());
    }
  }
  if (auto m = j.find("meta"); m != j.end() && !m->is_null()) {
    if (!m->is_object()) OPDLM_FAIL_AT(where, "meta", "'meta' must be an object, got ", m->type_name());
    r.meta = *m;
  }
  return r;
}

nlohmann::ordered_json prompt_record_to_json(const PromptRecord& r) {
  // ordered_json keeps insertion order, so files read naturally (id, prompt, gold, ...).
  nlohmann::ordered_json o;
  if (r.id_is_int)
    o["id"] = std::stoll(r.id);
  else
    o["id"] = r.id;
  if (r.split) o["split"] = *r.split;
  o["prompt"] = r.prompt;
  if (r.response) o["response"] = *r.response;
  if (r.gold) o["gold"] = *r.gold;
  if (!r.distractors.empty()) o["distractors"] = r.distractors;
  if (!r.meta.is_null()) o["meta"] = nlohmann::ordered_json::parse(r.meta.dump());
  return o;
}

PromptDataset load_prompt_jsonl(const std::string& path) {
  std::ifstream in(path);
  if (!in) OPDLM_FAIL_AT(path, "", "cannot open JSONL file");
  PromptDataset ds;
  std::unordered_set<std::string> ids;
  std::string line;
  bool first = true;
  for (int64_t lineno = 1; std::getline(in, line); ++lineno) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.find_first_not_of(" \t") == std::string::npos) continue;
    const std::string where = path + ":" + std::to_string(lineno);
    json j;
    try {
      j = json::parse(line);
    } catch (const json::exception& e) {  // parse errors and number overflows alike (fuzz finding)
      OPDLM_FAIL_AT(where, "", "invalid JSON: ", e.what());
    }
    if (j.is_object() && j.contains("_header")) {
      if (!first) OPDLM_FAIL_AT(where, "_header", "a '_header' line is only allowed first");
      if (j.size() != 1 || !j["_header"].is_object())
        OPDLM_FAIL_AT(where, "_header", "the header line must be {\"_header\": {...}} and nothing else");
      ds.header = j["_header"];
      first = false;
      continue;
    }
    first = false;
    PromptRecord r = prompt_record_from_json(j, where);
    if (!ids.insert(r.id).second) OPDLM_FAIL_AT(where, "id", "duplicate id '", r.id, "'");
    ds.records.push_back(std::move(r));
  }
  if (in.bad()) OPDLM_FAIL_AT(path, "", "read error");
  return ds;
}

void write_prompt_jsonl(const std::string& path, const PromptDataset& ds) {
  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) OPDLM_FAIL_AT(path, "", "cannot create temporary file ", tmp);
    if (!ds.header.is_null()) out << json{{"_header", ds.header}}.dump() << '\n';
    for (const auto& r : ds.records) out << prompt_record_to_json(r).dump() << '\n';
    out.flush();
    if (!out) {
      std::remove(tmp.c_str());
      OPDLM_FAIL_AT(path, "", "write failed");
    }
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    OPDLM_FAIL_AT(path, "", "cannot move temporary file into place");
  }
}

}  // namespace opdlm::io
