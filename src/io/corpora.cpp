// KJV reader and split, seen/held-out eval records, the keyed arithmetic generator (with its
// conversion prompts) and the invented-facts generator.
#include "opdlm/io/corpora.hpp"

#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <cstdio>
#include <cstdlib>
#include <set>
#include <unordered_map>
#include <unordered_set>

#include "opdlm/base/error.hpp"
#include "opdlm/base/rng.hpp"
#include "opdlm/io/hash.hpp"
#include "opdlm/io/token_shard.hpp"

namespace opdlm::io {
namespace {

// Counter-RNG step field of each generator under RngPurpose::data_generate, one stream each.
// Frozen: changing one changes the data.
constexpr uint32_t kStepArithTrain = 1u;
constexpr uint32_t kStepArithHeldout = 2u;
constexpr uint32_t kStepArithLength = 3u;
constexpr uint32_t kStepKjvDistractors = 4u;
constexpr uint32_t kStepArithConversion = 5u;
constexpr uint32_t kStepFactsNames = 6u;    // entity names, sample = entity index
constexpr uint32_t kStepFactsValues = 7u;   // invented value names, sample = pool slot, position = attribute
constexpr uint32_t kStepFactsAssign = 8u;   // attributes, values and distractors, sample = entity index
constexpr uint32_t kStepFactsConversion = 9u;  // which entities are conversion entities (one shuffle)

// Command-line flags are named in config errors: the CLI fills these configs straight from them.
constexpr const char* kCmdLine = "command line";

bool all_digits(std::string_view s) {
  return !s.empty() && std::all_of(s.begin(), s.end(), [](char c) { return c >= '0' && c <= '9'; });
}

int to_int(std::string_view s) {
  int v = 0;
  std::from_chars(s.data(), s.data() + s.size(), v);
  return v;
}

// Byte offset just past the k-th whitespace-separated word, or npos when there are <= k words.
size_t end_of_word(const std::string& t, int k) {
  size_t pos = 0;
  for (int w = 0; w < k; ++w) {
    pos = t.find_first_not_of(' ', pos);
    if (pos == std::string::npos) return std::string::npos;
    pos = t.find(' ', pos);
    if (pos == std::string::npos) return std::string::npos;
  }
  return t.find_first_not_of(' ', pos) == std::string::npos ? std::string::npos : pos;
}

int64_t pow10(int d) {
  int64_t p = 1;
  for (int i = 0; i < d; ++i) p *= 10;
  return p;
}

// Uniform over d-digit numbers (0..9 for one digit): every length is equally likely, so short
// operands are not drowned out by the 900 three-digit ones.
int64_t draw_operand(CounterRng::Cursor& cur, int digits) {
  if (digits == 1) return cur.below(10);
  const int64_t lo = pow10(digits - 1);
  return lo + cur.below(static_cast<uint32_t>(9 * lo));
}

ArithProblem draw_problem(CounterRng::Cursor& cur, int min_digits, int max_digits, const std::string& ops,
                          bool no_negative) {
  // With the default "+-*" this is the original draw (below(3) into "+-*"), so old data is unchanged.
  ArithProblem p;
  p.op = ops[cur.below(static_cast<uint32_t>(ops.size()))];
  const auto span = static_cast<uint32_t>(max_digits - min_digits + 1);
  p.a = draw_operand(cur, min_digits + static_cast<int>(cur.below(span)));
  p.b = draw_operand(cur, min_digits + static_cast<int>(cur.below(span)));
  // Swapping (rather than redrawing) keeps the stream: the same draws, only the order changes.
  if (no_negative && p.op == '-' && p.a < p.b) std::swap(p.a, p.b);
  return p;
}

}  // namespace

// ---- KJV ------------------------------------------------------------------------------------------

std::string KjvVerse::chapter_key() const { return book + " " + std::to_string(chapter); }
std::string KjvVerse::ref() const { return chapter_key() + ":" + std::to_string(verse); }
std::string KjvVerse::line() const { return ref() + " " + text; }

std::vector<KjvVerse> parse_kjv(std::string_view out, const std::string& source) {
  std::vector<KjvVerse> verses;
  std::string book;
  int chapter = 0;
  int64_t lineno = 0;
  size_t pos = 0;
  while (pos < out.size()) {
    size_t nl = out.find('\n', pos);
    if (nl == std::string_view::npos) nl = out.size();
    std::string_view line = out.substr(pos, nl - pos);
    pos = nl + 1;
    ++lineno;
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    if (line.find_first_not_of(" \t") == std::string_view::npos) continue;
    const std::string where = source + ":" + std::to_string(lineno);
    if (line.front() != ' ') {
      // Header "Book C": the book name may contain spaces and digits ("1 Kings", "Song of Solomon").
      const size_t sp = line.rfind(' ');
      if (sp == std::string_view::npos || sp == 0 || !all_digits(line.substr(sp + 1)))
        OPDLM_FAIL_AT(where, "header", "expected a 'Book Chapter' header, got '", line, "'");
      book = std::string(line.substr(0, sp));
      chapter = to_int(line.substr(sp + 1));
      continue;
    }
    // Verse "  V text".
    const size_t start = line.find_first_not_of(' ');
    const size_t sp = line.find(' ', start);
    if (sp == std::string_view::npos || !all_digits(line.substr(start, sp - start)))
      OPDLM_FAIL_AT(where, "verse", "expected '  <verse> <text>', got '", line, "'");
    if (book.empty()) OPDLM_FAIL_AT(where, "verse", "verse line before any 'Book Chapter' header");
    KjvVerse v;
    v.book = book;
    v.chapter = chapter;
    v.verse = to_int(line.substr(start, sp - start));
    std::string_view text = line.substr(sp + 1);
    while (!text.empty() && (text.back() == ' ' || text.back() == '\t')) text.remove_suffix(1);
    v.text = std::string(text);
    verses.push_back(std::move(v));
  }
  return verses;
}

bool program_available(const std::string& program) {
  if (program.find('/') != std::string::npos) return ::access(program.c_str(), X_OK) == 0;
  const char* path = std::getenv("PATH");
  if (!path) return false;
  std::string_view p(path);
  while (true) {
    const size_t c = p.find(':');
    std::string dir(p.substr(0, c));
    if (dir.empty()) dir = ".";
    if (::access((dir + "/" + program).c_str(), X_OK) == 0) return true;
    if (c == std::string_view::npos) return false;
    p.remove_prefix(c + 1);
  }
}

std::string run_bible_program(const std::string& program) {
  if (!program_available(program))
    OPDLM_FAIL_AT(program, "", "the KJV reader is not installed (apt-get install bible-kjv bible-kjv-text)");
  // The program name goes through the shell: quote it.
  std::string quoted = "'";
  for (char c : program) quoted += c == '\'' ? std::string("'\\''") : std::string(1, c);
  quoted += "'";
  const std::string cmd = quoted + " -l 100000 \"" + kKjvRange + "\"";
  FILE* f = ::popen(cmd.c_str(), "r");
  if (!f) OPDLM_FAIL_AT(program, "", "cannot run: ", cmd);
  std::string out;
  char buf[1 << 16];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) out.append(buf, n);
  const int status = ::pclose(f);
  if (status != 0) OPDLM_FAIL_AT(program, "", "'", cmd, "' failed with status ", status);
  return out;
}

std::vector<KjvVerse> load_kjv(const std::string& program, std::string* raw_output) {
  std::string raw = run_bible_program(program);
  auto verses = parse_kjv(raw, program + " output");
  if (raw_output) *raw_output = std::move(raw);
  std::set<std::string> books, chapters;
  for (const auto& v : verses) {
    books.insert(v.book);
    chapters.insert(v.chapter_key());
  }
  if (verses.size() != kKjvVerseCount || chapters.size() != kKjvChapterCount || books.size() != kKjvBookCount)
    OPDLM_FAIL_AT(program, "", "expected ", kKjvVerseCount, " verses, ", kKjvChapterCount, " chapters, ",
                  kKjvBookCount, " books; got ", verses.size(), ", ", chapters.size(), ", ", books.size());
  return verses;
}

bool kjv_chapter_held_out(const std::string& book, int chapter) {
  return sha256_mod(book + " " + std::to_string(chapter), 100) < 5;
}

bool kjv_seen_eval(const KjvVerse& v) {
  return !kjv_chapter_held_out(v.book, v.chapter) && sha256_mod("eval|" + v.ref(), 1000) < 34;
}

KjvSplit split_kjv(const std::vector<KjvVerse>& verses) {
  KjvSplit s;
  std::string last_key;
  bool held = false;
  for (size_t i = 0; i < verses.size(); ++i) {
    const std::string key = verses[i].chapter_key();
    if (key != last_key) {  // one hash per chapter
      held = kjv_chapter_held_out(verses[i].book, verses[i].chapter);
      if (held) s.heldout_chapters.push_back(key);
      ++s.num_chapters;
      last_key = key;
    }
    if (held) {
      s.heldout.push_back(i);
    } else {
      s.train.push_back(i);
      if (sha256_mod("eval|" + verses[i].ref(), 1000) < 34) s.seen_eval.push_back(i);
    }
  }
  return s;
}

std::vector<PromptRecord> kjv_seen_completion(const std::vector<KjvVerse>& verses, const KjvSplit& split,
                                              int k_words, int n_distractors, uint32_t seed) {
  OPDLM_CHECK(k_words >= 1, "k_words must be >= 1, got ", k_words);
  // Distractor pools: continuations of every trained verse, grouped by book.
  std::unordered_map<std::string, std::vector<size_t>> pool;
  for (size_t i : split.train)
    if (end_of_word(verses[i].text, k_words) != std::string::npos) pool[verses[i].book].push_back(i);
  auto continuation = [&](size_t i) { return verses[i].text.substr(end_of_word(verses[i].text, k_words)); };

  std::vector<PromptRecord> out;
  for (size_t i : split.seen_eval) {
    const KjvVerse& v = verses[i];
    const size_t cut = end_of_word(v.text, k_words);
    if (cut == std::string::npos) continue;
    PromptRecord r;
    r.id = v.ref();
    r.split = "seen";
    r.prompt = v.ref() + " " + v.text.substr(0, cut);
    r.gold = v.text.substr(cut);
    const auto& cands = pool[v.book];
    const CounterRng rng(RngKey{seed, RngPurpose::data_generate, kStepKjvDistractors, static_cast<uint32_t>(i), 0});
    CounterRng::Cursor cur(rng);
    std::unordered_set<std::string> used{*r.gold};
    // Bounded tries: a tiny book may not have enough distinct continuations.
    for (int tries = 0; static_cast<int>(r.distractors.size()) < n_distractors && tries < 64; ++tries) {
      std::string c = continuation(cands[cur.below(static_cast<uint32_t>(cands.size()))]);
      if (used.insert(c).second) r.distractors.push_back(std::move(c));
    }
    r.meta = {{"book", v.book}, {"chapter", v.chapter}, {"verse", v.verse}, {"k_words", k_words}};
    out.push_back(std::move(r));
  }
  return out;
}

std::vector<PromptRecord> kjv_heldout_records(const std::vector<KjvVerse>& verses, const KjvSplit& split) {
  std::vector<PromptRecord> out;
  for (size_t i : split.heldout) {
    const KjvVerse& v = verses[i];
    PromptRecord r;
    r.id = v.ref();
    r.split = "heldout";
    r.prompt = v.ref();
    r.gold = " " + v.text;
    r.meta = {{"book", v.book}, {"chapter", v.chapter}, {"verse", v.verse}};
    out.push_back(std::move(r));
  }
  return out;
}

// ---- arithmetic -----------------------------------------------------------------------------------

int64_t ArithProblem::result() const {
  switch (op) {
    case '+': return a + b;
    case '-': return a - b;
    case '*': return a * b;
  }
  OPDLM_FAIL("unknown arithmetic operator '", op, "'");
}
std::string ArithProblem::prompt() const { return std::to_string(a) + op + std::to_string(b) + "="; }
std::string ArithProblem::answer() const { return std::to_string(result()); }
std::string ArithProblem::line() const { return prompt() + answer(); }
std::string ArithProblem::key() const { return std::to_string(a) + "," + std::to_string(b) + "," + op; }

bool arithmetic_held_out(const ArithProblem& p) { return sha256_mod(p.key(), 100) < 10; }

void validate_arithmetic_config(const ArithmeticConfig& cfg) {
  if (cfg.max_digits < 1 || cfg.max_digits > 9)
    OPDLM_FAIL_AT(kCmdLine, "--max-digits", "--max-digits must be in [1, 9], got ", cfg.max_digits);
  if (cfg.length_digits < 1 || cfg.length_digits > 9)
    OPDLM_FAIL_AT(kCmdLine, "--length-digits", "--length-digits must be in [1, 9], got ", cfg.length_digits);
  if (cfg.n_train >= (uint64_t{1} << 32))
    OPDLM_FAIL_AT(kCmdLine, "--n-train", "--n-train must be below 2^32, got ", cfg.n_train);
  if (cfg.n_eval >= (uint64_t{1} << 24))
    OPDLM_FAIL_AT(kCmdLine, "--n-eval", "--n-eval must be below 2^24, got ", cfg.n_eval);
  if (cfg.n_conversion >= (uint64_t{1} << 24))
    OPDLM_FAIL_AT(kCmdLine, "--n-conversion", "--n-conversion must be below 2^24, got ", cfg.n_conversion);
  if (cfg.ops.empty() || cfg.ops.size() > 3)
    OPDLM_FAIL_AT(kCmdLine, "--ops", "--ops must be 1 to 3 distinct operators from \"+-*\", got \"", cfg.ops, "\"");
  for (size_t i = 0; i < cfg.ops.size(); ++i)
    if (std::string_view("+-*").find(cfg.ops[i]) == std::string_view::npos ||
        cfg.ops.find(cfg.ops[i]) != i)
      OPDLM_FAIL_AT(kCmdLine, "--ops", "--ops must be distinct operators from \"+-*\", got \"", cfg.ops, "\"");
}

ArithmeticSets generate_arithmetic(const ArithmeticConfig& cfg) {
  validate_arithmetic_config(cfg);
  ArithmeticSets s;
  // Training sample i is a function of (seed, i) only: a longer run extends a shorter one.
  s.train.reserve(cfg.n_train);
  for (uint64_t i = 0; i < cfg.n_train; ++i) {
    const CounterRng rng(RngKey{cfg.seed, RngPurpose::data_generate, kStepArithTrain, static_cast<uint32_t>(i), 0});
    CounterRng::Cursor cur(rng);
    ArithProblem p;
    do p = draw_problem(cur, 1, cfg.max_digits, cfg.ops, cfg.no_negative);
    while (arithmetic_held_out(p));
    s.train.push_back(p);
  }
  // Eval and conversion sets: distinct problems, drawn sample by sample until `n` are found
  // (bounded). `want`: the side of the hash split a problem must be on (redrawn up to 1000 times
  // per sample); Want::any takes the first draw (the length set: its digit count is never trained).
  // `excluded` keys are skipped (the conversion set avoids eval_seen).
  enum class Want { held_out, trained, any };
  auto distinct = [&](uint32_t step, int min_d, int max_d, Want want, uint64_t n, const char* flag,
                      const std::unordered_set<std::string>* excluded = nullptr) {
    std::vector<ArithProblem> out;
    std::unordered_set<std::string> seen;
    auto ok = [&](const ArithProblem& p) { return want == Want::any || arithmetic_held_out(p) == (want == Want::held_out); };
    const uint64_t max_samples = 64 * n + 1024;
    for (uint64_t i = 0; out.size() < n && i < max_samples; ++i) {
      const CounterRng rng(RngKey{cfg.seed, RngPurpose::data_generate, step, static_cast<uint32_t>(i), 0});
      CounterRng::Cursor cur(rng);
      ArithProblem p = draw_problem(cur, min_d, max_d, cfg.ops, cfg.no_negative);
      for (int t = 0; !ok(p) && t < 1000; ++t) p = draw_problem(cur, min_d, max_d, cfg.ops, cfg.no_negative);
      if (!ok(p)) continue;
      if (excluded && excluded->count(p.key())) continue;
      if (seen.insert(p.key()).second) out.push_back(p);
    }
    if (out.size() != n)
      OPDLM_FAIL_AT(kCmdLine, flag, "only ", out.size(), " distinct problems found for a set of ", n,
                    " (too few problems with these --ops/--max-digits/--length-digits); lower ", flag);
    return out;
  };
  s.eval_heldout = distinct(kStepArithHeldout, 1, cfg.max_digits, Want::held_out, cfg.n_eval, "--n-eval");
  s.eval_length = distinct(kStepArithLength, cfg.length_digits, cfg.length_digits, Want::any, cfg.n_eval, "--n-eval");
  std::unordered_set<std::string> seen;
  for (const auto& p : s.train) {
    if (s.eval_seen.size() >= cfg.n_eval) break;
    if (seen.insert(p.key()).second) s.eval_seen.push_back(p);
  }
  // Conversion prompts: the training distribution minus the seen-eval problems.
  s.conversion =
      distinct(kStepArithConversion, 1, cfg.max_digits, Want::trained, cfg.n_conversion, "--n-conversion", &seen);
  return s;
}

std::vector<PromptRecord> arithmetic_records(const std::vector<ArithProblem>& ps, const std::string& split) {
  std::vector<PromptRecord> out;
  out.reserve(ps.size());
  for (size_t i = 0; i < ps.size(); ++i) {
    PromptRecord r;
    r.id = split + "-" + std::to_string(i);
    r.split = split;
    r.prompt = ps[i].prompt();
    r.gold = ps[i].answer();
    r.meta = {{"a", ps[i].a}, {"b", ps[i].b}, {"op", std::string(1, ps[i].op)}};
    out.push_back(std::move(r));
  }
  return out;
}

std::vector<PromptRecord> arithmetic_conversion_records(const std::vector<ArithProblem>& ps) {
  auto out = arithmetic_records(ps, "conversion");
  for (auto& r : out) r.response = r.gold;
  return out;
}

// ---- invented facts -------------------------------------------------------------------------------

namespace {

// Syllable parts of invented names: onset + vowel + optional coda. Empty codas dominate so names
// stay pronounceable ("Zorvani", "Teluk"). Frozen: changing a list changes the data.
constexpr const char* kOnsets[] = {"b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s",
                                   "t", "v", "z", "th", "sh", "br", "dr", "kr", "tr", "gl", "st"};
constexpr const char* kVowels[] = {"a", "e", "i", "o", "u"};
constexpr const char* kCodas[] = {"", "", "", "", "n", "r", "l", "s", "k"};

constexpr const char* kColours[] = {"red",    "blue",   "green",  "yellow",  "black",   "white",
                                    "orange", "purple", "grey",   "brown",   "pink",    "gold",
                                    "silver", "violet", "crimson", "teal"};
constexpr const char* kAnimals[] = {"fox",    "owl",   "bear",  "wolf",  "horse", "eagle", "otter", "heron",
                                    "lynx",   "badger", "falcon", "tiger", "lion", "crane", "swan",  "stag",
                                    "hare",   "raven", "bison", "camel", "whale", "seal",  "moose", "boar"};
constexpr int kCapitalPool = 48;   // invented city names
constexpr int kLanguagePool = 32;  // invented language names

struct AttributeSpec {
  const char* name;
  // Surface forms; "{E}" is the entity. Every form ends with " {V}." so the value is the completion.
  const char* templates[kFactTemplateCount];
};
constexpr AttributeSpec kAttributes[kFactAttributeCount] = {
    {"capital", {"The capital of {E} is {V}.", "{E} has its capital at {V}.", "The seat of {E} is the city of {V}."}},
    {"flag", {"The flag of {E} is {V}.", "{E} flies a flag that is {V}.", "The colour of the flag of {E} is {V}."}},
    {"language", {"The people of {E} speak {V}.", "In {E} the people speak {V}.", "The language of {E} is {V}."}},
    {"animal",
     {"The national animal of {E} is the {V}.", "The symbol of {E} is the {V}.", "In {E} the national animal is the {V}."}},
};

std::string draw_name(CounterRng::Cursor& cur) {
  const uint32_t n_syl = 2 + cur.below(2);
  std::string name;
  for (uint32_t i = 0; i < n_syl; ++i) {
    name += kOnsets[cur.below(std::size(kOnsets))];
    name += kVowels[cur.below(std::size(kVowels))];
    name += kCodas[cur.below(std::size(kCodas))];
  }
  name[0] = static_cast<char>(name[0] - 'a' + 'A');
  return name;
}

// A name not yet in `used` (and added to it); redraws on the same cursor, bounded.
std::string draw_unique_name(CounterRng::Cursor& cur, std::unordered_set<std::string>& used, const char* flag) {
  for (int tries = 0; tries < 10000; ++tries) {
    std::string n = draw_name(cur);
    if (used.insert(n).second) return n;
  }
  OPDLM_FAIL_AT(kCmdLine, flag, "cannot draw enough distinct invented names; lower ", flag);
}

std::string fill(const char* tmpl, const std::string& entity, const std::string& value) {
  std::string out;
  for (const char* c = tmpl; *c; ++c) {
    if (c[0] == '{' && c[1] && c[2] == '}') {
      out += c[1] == 'E' ? entity : value;
      c += 2;
    } else {
      out += *c;
    }
  }
  return out;
}

}  // namespace

const char* fact_attribute_name(int attribute) {
  OPDLM_CHECK(attribute >= 0 && attribute < kFactAttributeCount, "fact attribute ", attribute, " out of range");
  return kAttributes[attribute].name;
}

std::string Fact::sentence(int tmpl) const {
  OPDLM_CHECK(tmpl >= 0 && tmpl < kFactTemplateCount, "fact template ", tmpl, " out of range");
  return fill(kAttributes[attribute].templates[tmpl], entity, value);
}
std::string Fact::prompt() const {
  const std::string s = sentence(0);
  return s.substr(0, s.size() - gold().size());
}
std::string Fact::gold() const { return " " + value + "."; }

void validate_facts_config(const FactsConfig& cfg) {
  if (cfg.n_facts < 1 || cfg.n_facts > 100000)
    OPDLM_FAIL_AT(kCmdLine, "--n-facts", "--n-facts must be in [1, 100000], got ", cfg.n_facts);
  if (cfg.repeats < 1 || cfg.repeats > 10000)
    OPDLM_FAIL_AT(kCmdLine, "--repeats", "--repeats must be in [1, 10000], got ", cfg.repeats);
  if (cfg.templates < 1 || cfg.templates > kFactTemplateCount)
    OPDLM_FAIL_AT(kCmdLine, "--templates", "--templates must be in [1, ", kFactTemplateCount, "], got ", cfg.templates);
  // The smallest pool (16 colours) must hold the gold plus the distractors.
  if (cfg.n_distractors < 0 || cfg.n_distractors >= static_cast<int>(std::size(kColours)))
    OPDLM_FAIL_AT(kCmdLine, "--distractors", "--distractors must be in [0, ", std::size(kColours) - 1, "], got ",
                  cfg.n_distractors);
  if (cfg.conversion_entities < 0 || cfg.conversion_entities >= cfg.n_facts)
    OPDLM_FAIL_AT(kCmdLine, "--conversion-entities", "--conversion-entities must be in [0, --n-facts) so that some ",
                  "entity is left for the eval, got ", cfg.conversion_entities, " with --n-facts ", cfg.n_facts);
  if (static_cast<uint64_t>(cfg.n_facts) * static_cast<uint64_t>(2 * cfg.repeats) > (uint64_t{1} << 31))
    OPDLM_FAIL_AT(kCmdLine, "--repeats", "--n-facts x --repeats is too large (", cfg.n_facts, " x ", cfg.repeats, ")");
}

FactsSet generate_facts(const FactsConfig& cfg) {
  validate_facts_config(cfg);
  FactsSet s;
  std::unordered_set<std::string> used;
  // Value pools first, so the entity count never changes them; invented values and entity names
  // share `used`, so no entity is named like a city or a language.
  s.value_pools.resize(kFactAttributeCount);
  for (int a = 0; a < kFactAttributeCount; ++a) {
    auto& pool = s.value_pools[a];
    const std::string name = kAttributes[a].name;
    if (name == "flag") {
      pool.assign(std::begin(kColours), std::end(kColours));
    } else if (name == "animal") {
      pool.assign(std::begin(kAnimals), std::end(kAnimals));
    } else {
      const int n = name == "capital" ? kCapitalPool : kLanguagePool;
      for (int j = 0; j < n; ++j) {
        const CounterRng rng(RngKey{cfg.seed, RngPurpose::data_generate, kStepFactsValues, static_cast<uint32_t>(j),
                                    static_cast<uint32_t>(a)});
        CounterRng::Cursor cur(rng);
        pool.push_back(draw_unique_name(cur, used, "--seed"));
      }
    }
  }
  for (const auto& pool : s.value_pools)
    for (const auto& v : pool) used.insert(v);

  const auto k = static_cast<uint64_t>(cfg.n_facts);
  s.entities.reserve(k);
  for (uint64_t i = 0; i < k; ++i) {
    const CounterRng rng(RngKey{cfg.seed, RngPurpose::data_generate, kStepFactsNames, static_cast<uint32_t>(i), 0});
    CounterRng::Cursor cur(rng);
    s.entities.push_back(draw_unique_name(cur, used, "--n-facts"));
  }
  for (uint64_t i = 0; i < k; ++i) {
    // Entity i's attributes, values and distractors depend only on (seed, i).
    const CounterRng rng(RngKey{cfg.seed, RngPurpose::data_generate, kStepFactsAssign, static_cast<uint32_t>(i), 0});
    CounterRng::Cursor cur(rng);
    const int n_attr = 1 + static_cast<int>(cur.below(2));
    const int a0 = static_cast<int>(cur.below(kFactAttributeCount));
    const int attrs[2] = {a0, (a0 + 1 + static_cast<int>(cur.below(kFactAttributeCount - 1))) % kFactAttributeCount};
    for (int j = 0; j < n_attr; ++j) {
      const auto& pool = s.value_pools[attrs[j]];
      const auto n_pool = static_cast<uint32_t>(pool.size());
      Fact f{s.entities[i], attrs[j], pool[cur.below(n_pool)]};
      std::vector<std::string> ds;
      std::unordered_set<std::string> taken{f.value};
      // Rejection is bounded in expectation: the pool holds more than n_distractors + 1 values.
      while (static_cast<int>(ds.size()) < cfg.n_distractors) {
        const std::string& v = pool[cur.below(n_pool)];
        if (taken.insert(v).second) ds.push_back(" " + v + ".");
      }
      s.facts.push_back(std::move(f));
      s.distractors.push_back(std::move(ds));
    }
  }
  // Repeat r of a fact uses surface form r % templates; lines are then shuffled so repeats of a
  // fact are spread over the file even when it is read in order.
  std::vector<std::string> lines;
  lines.reserve(s.facts.size() * static_cast<size_t>(cfg.repeats));
  for (const auto& f : s.facts)
    for (int r = 0; r < cfg.repeats; ++r) lines.push_back(f.sentence(r % cfg.templates));
  const auto perm = shuffle_permutation(lines.size(), cfg.seed, 0);
  s.train_lines.reserve(lines.size());
  for (uint64_t j : perm) s.train_lines.push_back(lines[j]);
  return s;
}

namespace {
// Per fact: whether its entity is a conversion entity (an empty mask means none is).
std::vector<bool> fact_in_conversion(const FactsSet& s, const std::vector<bool>& conversion_entity) {
  std::vector<bool> out(s.facts.size(), false);
  if (conversion_entity.empty()) return out;
  if (conversion_entity.size() != s.entities.size())
    OPDLM_FAIL("conversion entity mask has ", conversion_entity.size(), " entries for ", s.entities.size(), " entities");
  std::unordered_map<std::string, size_t> index;
  for (size_t e = 0; e < s.entities.size(); ++e) index.emplace(s.entities[e], e);
  for (size_t i = 0; i < s.facts.size(); ++i) out[i] = conversion_entity[index.at(s.facts[i].entity)];
  return out;
}

PromptRecord fact_record(const FactsSet& s, size_t i) {
  const Fact& f = s.facts[i];
  PromptRecord r;
  r.id = "fact-" + std::to_string(i);
  r.prompt = f.prompt();
  r.gold = f.gold();
  r.meta = {{"entity", f.entity}, {"attribute", fact_attribute_name(f.attribute)}, {"value", f.value}};
  return r;
}
}  // namespace

std::vector<PromptRecord> facts_records(const FactsSet& s, const std::vector<bool>& conversion_entity) {
  const auto skip = fact_in_conversion(s, conversion_entity);
  std::vector<PromptRecord> out;
  out.reserve(s.facts.size());
  for (size_t i = 0; i < s.facts.size(); ++i) {
    if (skip[i]) continue;
    PromptRecord r = fact_record(s, i);
    r.split = "seen";
    r.distractors = s.distractors[i];
    out.push_back(std::move(r));
  }
  return out;
}

std::vector<bool> facts_conversion_entities(const FactsSet& s, const FactsConfig& cfg) {
  validate_facts_config(cfg);
  // Fisher-Yates from the back on its own stream; the last n slots are the conversion entities.
  std::vector<size_t> perm(s.entities.size());
  for (size_t i = 0; i < perm.size(); ++i) perm[i] = i;
  const CounterRng rng(RngKey{cfg.seed, RngPurpose::data_generate, kStepFactsConversion, 0, 0});
  CounterRng::Cursor cur(rng);
  for (size_t i = perm.size(); i > 1; --i) std::swap(perm[i - 1], perm[cur.below(static_cast<uint32_t>(i))]);
  std::vector<bool> mask(s.entities.size(), false);
  const auto n = std::min<size_t>(static_cast<size_t>(cfg.conversion_entities), perm.size());
  for (size_t k = 0; k < n; ++k) mask[perm[perm.size() - 1 - k]] = true;
  return mask;
}

std::vector<PromptRecord> facts_conversion_records(const FactsSet& s, const std::vector<bool>& conversion_entity) {
  const auto take = fact_in_conversion(s, conversion_entity);
  std::vector<PromptRecord> out;
  for (size_t i = 0; i < s.facts.size(); ++i) {
    if (!take[i]) continue;
    PromptRecord r = fact_record(s, i);
    r.split = "conversion";
    r.response = r.gold;
    out.push_back(std::move(r));
  }
  return out;
}

// ---- row-aligned packing ---------------------------------------------------------------------------

TokenShard pack_rows(const TokenShard& in, int64_t row_len, int32_t pad_id) {
  if (row_len < 2) OPDLM_FAIL_AT(kCmdLine, "--pack-rows", "--pack-rows must be >= 2, got ", row_len);
  if (pad_id < 0 || pad_id >= in.vocab_size())
    OPDLM_FAIL_AT(kCmdLine, "--pack-rows", "pad id ", pad_id, " outside the vocabulary of ", in.vocab_size());
  TokenShard out(in.vocab_size(), in.tokenizer_sha256());
  std::vector<int32_t> row;
  row.reserve(static_cast<size_t>(row_len));
  auto flush = [&] {
    row.resize(static_cast<size_t>(row_len), pad_id);
    out.add_document(row);
    row.clear();
  };
  for (uint64_t d = 0; d < in.num_documents(); ++d) {
    const auto doc = in.document(d);
    if (static_cast<int64_t>(doc.size()) > row_len)
      OPDLM_FAIL_AT(kCmdLine, "--pack-rows", "document ", d, " has ", doc.size(), " tokens, more than a row of ",
                    row_len, "; raise --pack-rows (and the trainer's data.seq_len with it)");
    if (doc.empty()) continue;
    if (static_cast<int64_t>(row.size() + doc.size()) > row_len) flush();
    row.insert(row.end(), doc.begin(), doc.end());
  }
  if (!row.empty()) flush();
  const int32_t boundary[1] = {pad_id};
  out.add_document(boundary);
  return out;
}

}  // namespace opdlm::io
