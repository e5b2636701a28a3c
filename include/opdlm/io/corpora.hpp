// Teacher corpora and eval sets from ../shared/docs/data.md section 6: the KJV Bible (decoded by the
// Debian `bible` program) with its hash-keyed chapter split, and the synthetic arithmetic generator.
// Every split is a hash of a stable key and every sample a pure function of (seed, index), so any
// machine regenerates the same files.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "opdlm/io/jsonl_dataset.hpp"
#include "opdlm/io/token_shard.hpp"

namespace opdlm::io {

// ---- KJV ------------------------------------------------------------------------------------------

inline constexpr size_t kKjvVerseCount = 31102;
inline constexpr size_t kKjvChapterCount = 1189;
inline constexpr size_t kKjvBookCount = 66;
// The whole Bible, one verse per line: `bible -l 100000 "Gen1:1-Rev22:21"` (the line width is
// large so no verse wraps).
inline constexpr const char* kKjvRange = "Gen1:1-Rev22:21";

struct KjvVerse {
  std::string book;  // written out: "1 Kings", "Song of Solomon", "Psalms"
  int chapter = 0;
  int verse = 0;
  std::string text;  // as printed, trailing blanks removed (Mark 10:19 has one)

  std::string chapter_key() const;  // "John 11": the split key
  std::string ref() const;          // "John 11:35"
  std::string line() const;         // "John 11:35 Jesus wept." (the teacher's training line)
  bool operator==(const KjvVerse&) const = default;
};

// Parses the `bible` output: "Book C" header lines, then "  V text" lines; blank lines are skipped.
// Errors name `source`:line. Does not check the total (parse_kjv of a slice is fine).
std::vector<KjvVerse> parse_kjv(std::string_view bible_output, const std::string& source = "bible output");
// True when `program` is an executable path or found on PATH.
bool program_available(const std::string& program);
// Runs `<program> -l 100000 "Gen1:1-Rev22:21"` and returns its output; throws when it fails.
std::string run_bible_program(const std::string& program = "bible");
// run_bible_program + parse_kjv + a check that all 31,102 verses, 1,189 chapters and 66 books came.
// `raw_output`, when given, receives the program's output (to hash it as the source).
std::vector<KjvVerse> load_kjv(const std::string& program = "bible", std::string* raw_output = nullptr);

// Held-out chapter (never trained on): sha256("Book C") % 100 < 5.
bool kjv_chapter_held_out(const std::string& book, int chapter);
// Seen-eval verse: in a trained chapter and sha256("eval|Book C:V") % 1000 < 34 (~1,000 verses).
bool kjv_seen_eval(const KjvVerse& v);

struct KjvSplit {
  std::vector<size_t> train;      // indices into the verse list, canonical order
  std::vector<size_t> heldout;    // verses of held-out chapters
  std::vector<size_t> seen_eval;  // subset of train
  std::vector<std::string> heldout_chapters;  // "Book C", canonical order
  size_t num_chapters = 0;
};
KjvSplit split_kjv(const std::vector<KjvVerse>& verses);

// Seen-verse completion (data.md 6.1 task 1): prompt = "Book C:V" + the first `k_words` words, gold =
// the rest of the verse with its leading space (prompt + gold is the training line). Verses with at
// most k_words words are skipped. Up to `n_distractors` distractors: continuations (after k_words
// words) of other trained verses of the same book, picked by the counter RNG keyed by `seed`.
std::vector<PromptRecord> kjv_seen_completion(const std::vector<KjvVerse>& verses, const KjvSplit& split,
                                              int k_words = 3, int n_distractors = 3, uint32_t seed = 0);
// Held-out chapters for perplexity: prompt = "Book C:V", gold = " text".
std::vector<PromptRecord> kjv_heldout_records(const std::vector<KjvVerse>& verses, const KjvSplit& split);

// ---- Synthetic arithmetic (data.md 6.5) ------------------------------------------------------------

struct ArithProblem {
  int64_t a = 0, b = 0;
  char op = '+';  // '+', '-', '*'

  int64_t result() const;
  std::string prompt() const;  // "12+345="
  std::string answer() const;  // "357" (negative differences keep their sign: "-333")
  std::string line() const;    // "12+345=357"
  std::string key() const;     // "12,345,+": the split key
  bool operator==(const ArithProblem&) const = default;
};

// Held out of training: sha256("{a},{b},{op}") % 100 < 10.
bool arithmetic_held_out(const ArithProblem& p);

struct ArithmeticConfig {
  uint64_t n_train = 100000;  // training lines (may repeat a problem)
  uint64_t n_eval = 1000;     // size of each eval set (distinct problems)
  uint32_t seed = 0;
  int max_digits = 3;         // training and held-out operands have 1..max_digits digits
  int length_digits = 4;      // the length-generalisation set: both operands this many digits
  std::string ops = "+-*";    // operators drawn uniformly (distinct chars of "+-*"); "+-" = no products
  uint64_t n_conversion = 0;  // conversion prompts (OPD / RM-CE), distinct, never held out; 0: none
  bool no_negative = false;   // a-b with a < b is drawn as b-a: no negative results (easier)
};

// Throws an Error naming the command-line flag (--max-digits, --ops, ...) of the first bad field.
void validate_arithmetic_config(const ArithmeticConfig& cfg);

struct ArithmeticSets {
  std::vector<ArithProblem> train;         // never held out; sample i depends only on (seed, i)
  std::vector<ArithProblem> eval_heldout;  // held-out pairs, 1..max_digits digits, distinct
  std::vector<ArithProblem> eval_length;   // length_digits-digit operands, distinct
  std::vector<ArithProblem> eval_seen;     // distinct problems from `train`, first occurrences
  // Distinct problems for student conversion: never held out (so disjoint from eval_heldout and,
  // by digit count, from eval_length) and never in eval_seen, so RM-CE on their gold responses
  // cannot inflate any eval score.
  std::vector<ArithProblem> conversion;
};
ArithmeticSets generate_arithmetic(const ArithmeticConfig& cfg);
// Records: prompt "a+b=", gold "c", split as given, id "<split>-<i>".
std::vector<PromptRecord> arithmetic_records(const std::vector<ArithProblem>& ps, const std::string& split);
// Conversion records: prompt "a+b=", response = gold = "c" (the ground truth RM-CE trains on; OPD
// reads only the prompt), split "conversion", id "conversion-<i>".
std::vector<PromptRecord> arithmetic_conversion_records(const std::vector<ArithProblem>& ps);

// ---- Invented facts (knowledge probe, ../shared/docs/study.md 5.3 FACTS) ---------------------------
// K invented entities with pronounceable syllable names, each with 1 or 2 attributes (capital,
// flag colour, language, national animal) whose values come from a fixed pool per attribute. The
// teacher pretrains on every fact `repeats` times; the facts never enter conversion data, so their
// recall after conversion measures knowledge retention.

inline constexpr int kFactAttributeCount = 4;
inline constexpr int kFactTemplateCount = 3;  // surface forms per attribute; template 0 is the eval form

struct Fact {
  std::string entity;  // "Zorvani"
  int attribute = 0;   // index into the attribute table, [0, kFactAttributeCount)
  std::string value;   // "Teluk"

  // The sentence in surface form `tmpl` (0..kFactTemplateCount-1), always ending in " {value}.":
  // "The capital of Zorvani is Teluk."
  std::string sentence(int tmpl = 0) const;
  std::string prompt() const;  // template 0 up to the value: "The capital of Zorvani is"
  std::string gold() const;    // " Teluk." (prompt + gold == sentence(0))
  bool operator==(const Fact&) const = default;
};

// "capital", "flag", "language", "animal".
const char* fact_attribute_name(int attribute);

struct FactsConfig {
  int64_t n_facts = 1000;   // entities K; each has 1 or 2 attributes, so K..2K facts
  int repeats = 30;         // training lines per fact
  int templates = 1;        // surface forms used in training, 1..3 (repeat r uses form r % templates)
  int n_distractors = 3;    // other values of the same attribute per eval item
  uint32_t seed = 0;
  // Entities whose facts become conversion prompts instead of eval items (the teacher learns all
  // K). Conversion data then shows the answer format on facts the eval never asks about.
  int64_t conversion_entities = 0;
};

// Throws an Error naming the command-line flag (--n-facts, --repeats, ...) of the first bad field.
void validate_facts_config(const FactsConfig& cfg);

struct FactsSet {
  std::vector<std::string> entities;                 // K distinct names
  std::vector<std::vector<std::string>> value_pools;  // per attribute; invented names disjoint from entities
  std::vector<Fact> facts;                           // entity-major, attributes in drawn order
  std::vector<std::vector<std::string>> distractors;  // per fact: distinct pool values != its value
  std::vector<std::string> train_lines;              // facts.size() * repeats sentences, shuffled by seed
};
// A pure function of the config: the same seed gives the same names, facts and line order.
FactsSet generate_facts(const FactsConfig& cfg);
// One eval record per fact: prompt, gold, distractors, split "seen", id "fact-<i>",
// meta {entity, attribute, value}. Facts of the conversion entities (below) are left out.
std::vector<PromptRecord> facts_records(const FactsSet& s, const std::vector<bool>& conversion_entity = {});
// Which entities (index into s.entities) are conversion entities: cfg.conversion_entities of them,
// drawn by a seeded shuffle on their own stream (data_generate, step 9).
std::vector<bool> facts_conversion_entities(const FactsSet& s, const FactsConfig& cfg);
// One conversion record per fact of a conversion entity: prompt, response = gold = " value.",
// split "conversion", id "fact-<i>" (the same fact index as facts_records), meta as there.
std::vector<PromptRecord> facts_conversion_records(const FactsSet& s, const std::vector<bool>& conversion_entity);


// ---- Row-aligned packing (opdlm data prepare --pack-rows) -----------------------------------------
// The AR trainer cuts the shard's token stream into windows starting at multiples of data.seq_len.
// Packing the documents (in order) into rows of exactly `row_len` tokens, each row padded at its end
// with `pad_id`, makes every window start with a whole document at position 0, with no token before
// it: the condition of an eval prompt. Without it a short prompt at position 0 is a state the teacher
// almost never trained on. Each row becomes one document; a final one-token pad document gives the
// last row the boundary token its window needs. A document longer than a row is an error naming
// `--pack-rows`.
TokenShard pack_rows(const TokenShard& in, int64_t row_len, int32_t pad_id);
}  // namespace opdlm::io
