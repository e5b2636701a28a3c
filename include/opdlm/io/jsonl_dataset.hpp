// Prompt datasets as JSONL: one record per line, {id, prompt, response?, gold?, distractors?, meta?,
// split?}, optionally preceded by one {"_header": {...}} line that records where the data came from
// (source sha256, generator, seed; ../shared/docs/data.md section 6.6). Loading is strict: a bad line
// fails with an error naming file:line and the field.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

namespace opdlm::io {

struct PromptRecord {
  std::string id;          // ids may be strings or integers in the file; kept as text
  bool id_is_int = false;  // written back as a JSON integer when true
  std::string prompt;      // required (may be empty)
  std::optional<std::string> response;
  std::optional<std::string> gold;
  std::vector<std::string> distractors;  // multiple-choice alternatives to `gold`
  nlohmann::json meta;                   // an object, or null when absent
  std::optional<std::string> split;

  bool operator==(const PromptRecord&) const = default;
};

struct PromptDataset {
  nlohmann::json header;  // the "_header" object, or null when the file has none
  std::vector<PromptRecord> records;
};

// Reads a JSONL prompt file. Blank lines are skipped; unknown keys, wrong types, a missing prompt,
// and duplicate ids are errors "<path>:<line>: ..." with the field named.
PromptDataset load_prompt_jsonl(const std::string& path);
// Parses one record (the loader's core); `where` is "<path>:<line>" for error messages.
PromptRecord prompt_record_from_json(const nlohmann::json& j, const std::string& where);
// Keys in a fixed order: id, split, prompt, response, gold, distractors, meta.
nlohmann::ordered_json prompt_record_to_json(const PromptRecord& r);
// Writes the header line (when not null) then one line per record, atomically (temp + rename).
void write_prompt_jsonl(const std::string& path, const PromptDataset& ds);

}  // namespace opdlm::io
