// KJV reader and split, seen/held-out eval records, and the keyed arithmetic generator.
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

namespace opdlm::io {
namespace {

// Counter-RNG step field of each generator under RngPurpose::data_generate, one stream each.
// Frozen: changing one changes the data.
constexpr uint32_t kStepArithTrain = 1u;
constexpr uint32_t kStepArithHeldout = 2u;
constexpr uint32_t kStepArithLength = 3u;
constexpr uint32_t kStepKjvDistractors = 4u;

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

ArithProblem draw_problem(CounterRng::Cursor& cur, int min_digits, int max_digits) {
  static constexpr char kOps[3] = {'+', '-', '*'};
  ArithProblem p;
  p.op = kOps[cur.below(3)];
  const auto span = static_cast<uint32_t>(max_digits - min_digits + 1);
  p.a = draw_operand(cur, min_digits + static_cast<int>(cur.below(span)));
  p.b = draw_operand(cur, min_digits + static_cast<int>(cur.below(span)));
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

ArithmeticSets generate_arithmetic(const ArithmeticConfig& cfg) {
  OPDLM_CHECK(cfg.max_digits >= 1 && cfg.max_digits <= 9, "max_digits ", cfg.max_digits, " outside [1, 9]");
  OPDLM_CHECK(cfg.length_digits >= 1 && cfg.length_digits <= 9, "length_digits outside [1, 9]");
  OPDLM_CHECK(cfg.n_train < (uint64_t{1} << 32) && cfg.n_eval < (uint64_t{1} << 24), "arithmetic set too large");
  ArithmeticSets s;
  // Training sample i is a function of (seed, i) only: a longer run extends a shorter one.
  s.train.reserve(cfg.n_train);
  for (uint64_t i = 0; i < cfg.n_train; ++i) {
    const CounterRng rng(RngKey{cfg.seed, RngPurpose::data_generate, kStepArithTrain, static_cast<uint32_t>(i), 0});
    CounterRng::Cursor cur(rng);
    ArithProblem p;
    do p = draw_problem(cur, 1, cfg.max_digits);
    while (arithmetic_held_out(p));
    s.train.push_back(p);
  }
  // Eval sets: distinct problems, drawn sample by sample until n_eval are found (bounded).
  auto distinct = [&](uint32_t step, int min_d, int max_d, bool want_held_out) {
    std::vector<ArithProblem> out;
    std::unordered_set<std::string> seen;
    const uint64_t max_samples = 64 * cfg.n_eval + 1024;
    for (uint64_t i = 0; out.size() < cfg.n_eval && i < max_samples; ++i) {
      const CounterRng rng(RngKey{cfg.seed, RngPurpose::data_generate, step, static_cast<uint32_t>(i), 0});
      CounterRng::Cursor cur(rng);
      ArithProblem p = draw_problem(cur, min_d, max_d);
      for (int t = 0; want_held_out && !arithmetic_held_out(p) && t < 1000; ++t) p = draw_problem(cur, min_d, max_d);
      if (want_held_out && !arithmetic_held_out(p)) continue;
      if (seen.insert(p.key()).second) out.push_back(p);
    }
    OPDLM_CHECK(out.size() == cfg.n_eval, "only ", out.size(), " distinct problems for an eval set of ", cfg.n_eval);
    return out;
  };
  s.eval_heldout = distinct(kStepArithHeldout, 1, cfg.max_digits, true);
  s.eval_length = distinct(kStepArithLength, cfg.length_digits, cfg.length_digits, false);
  std::unordered_set<std::string> seen;
  for (const auto& p : s.train) {
    if (s.eval_seen.size() >= cfg.n_eval) break;
    if (seen.insert(p.key()).second) s.eval_seen.push_back(p);
  }
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

}  // namespace opdlm::io
