// Byte-level BPE training (the classic pair-count algorithm with incremental count updates and a
// lazy max-heap), producing a Qwen-style tokenizer.json: NFC, Qwen2 pre-split regex, ByteLevel,
// the 256 byte tokens first, merged tokens next, the reserved special tokens last.
#include "opdlm/io/bpe_trainer.hpp"

#include <algorithm>
#include <array>
#include <fstream>
#include <nlohmann/json.hpp>
#include <queue>
#include <sstream>
#include <unordered_set>

#include "opdlm/base/error.hpp"

namespace opdlm::io {
namespace {

using json = nlohmann::json;

inline uint64_t pack(int32_t a, int32_t b) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
}
inline int32_t first_of(uint64_t k) { return static_cast<int32_t>(k >> 32); }
inline int32_t second_of(uint64_t k) { return static_cast<int32_t>(k & 0xFFFFFFFFu); }

// The byte-level alphabet in code-point order: ids 0..255 as in GPT-2 and Qwen vocabularies.
std::vector<uint8_t> bytes_in_id_order() {
  std::vector<uint8_t> order(256);
  for (int b = 0; b < 256; ++b) order[b] = static_cast<uint8_t>(b);
  auto cp = [](uint8_t b) {
    const std::string& s = byte_level_char(b);  // 1 or 2 bytes: code points below 0x800
    const auto c0 = static_cast<unsigned char>(s[0]);
    return s.size() == 1 ? uint32_t{c0} : ((c0 & 0x1Fu) << 6) | (static_cast<unsigned char>(s[1]) & 0x3Fu);
  };
  std::sort(order.begin(), order.end(), [&](uint8_t a, uint8_t b) { return cp(a) < cp(b); });
  return order;
}

json byte_level_step() {
  return {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", false}, {"use_regex", false}};
}

// tokenizer.json with the given vocabulary and merges (ids: vocab order; specials appended).
json make_json(const std::vector<std::string>& tokens, const std::vector<std::pair<int32_t, int32_t>>& merges,
               const std::vector<std::string>& specials) {
  json j;
  j["version"] = "1.0";
  j["truncation"] = nullptr;
  j["padding"] = nullptr;
  j["added_tokens"] = json::array();
  for (size_t i = 0; i < specials.size(); ++i)
    j["added_tokens"].push_back({{"id", tokens.size() + i}, {"content", specials[i]}, {"single_word", false},
                                 {"lstrip", false}, {"rstrip", false}, {"normalized", false}, {"special", true}});
  j["normalizer"] = {{"type", "NFC"}};
  j["pre_tokenizer"] = {
      {"type", "Sequence"},
      {"pretokenizers",
       {{{"type", "Split"},
         {"pattern", {{"Regex", std::string(kQwen2PreSplitRegex)}}},
         {"behavior", "Isolated"},
         {"invert", false}},
        byte_level_step()}}};
  j["post_processor"] = byte_level_step();
  j["decoder"] = byte_level_step();
  json vocab = json::object();
  for (size_t i = 0; i < tokens.size(); ++i) vocab[tokens[i]] = i;
  json m = json::array();
  for (const auto& [a, b] : merges) m.push_back({tokens[a], tokens[b]});
  j["model"] = {{"type", "BPE"},
                {"dropout", nullptr},
                {"unk_token", nullptr},
                {"continuing_subword_prefix", ""},
                {"end_of_word_suffix", ""},
                {"fuse_unk", false},
                {"byte_fallback", false},
                {"ignore_merges", false},
                {"vocab", std::move(vocab)},
                {"merges", std::move(m)}};
  return j;
}

std::vector<std::string> byte_tokens() {
  std::vector<std::string> t;
  for (uint8_t b : bytes_in_id_order()) t.push_back(byte_level_char(b));
  return t;
}

}  // namespace

BpeTrainer::BpeTrainer(BpeTrainerOptions options)
    : options_(std::move(options)),
      splitter_(Tokenizer::from_json_string(make_json(byte_tokens(), {}, options_.special_tokens).dump(),
                                            "<bpe trainer pre-split>")) {
  const int64_t floor = 256 + static_cast<int64_t>(options_.special_tokens.size());
  if (options_.vocab_size < floor)
    OPDLM_FAIL("bpe trainer: vocab_size ", options_.vocab_size, " is below ", floor,
               " (256 byte tokens + ", options_.special_tokens.size(), " special tokens)");
  if (options_.min_frequency < 1) OPDLM_FAIL("bpe trainer: min_frequency must be >= 1, got ", options_.min_frequency);
}

void BpeTrainer::add_text(std::string_view text) {
  bytes_ += static_cast<int64_t>(text.size());
  splitter_.for_each_pretoken(text, [&](std::string_view w) {
    ++words_[std::string(w)];
    ++pre_tokens_;
  });
}

void BpeTrainer::add_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) OPDLM_FAIL_AT(path, "", "bpe trainer: cannot open input file");
  std::ostringstream ss;
  ss << f.rdbuf();
  try {
    add_text(ss.str());
  } catch (const Error& e) {
    OPDLM_FAIL_AT(path, "", "bpe trainer: ", e.message());
  }
}

std::string BpeTrainer::train_json(BpeTrainStats* stats) const {
  const std::vector<uint8_t> order = bytes_in_id_order();
  std::array<int32_t, 256> id_of_byte{};
  for (int32_t i = 0; i < 256; ++i) id_of_byte[order[i]] = i;
  std::vector<std::string> tokens = byte_tokens();
  std::unordered_map<std::string, int32_t> token_ids;
  for (int32_t i = 0; i < 256; ++i) token_ids[tokens[i]] = i;
  const std::unordered_set<std::string> specials(options_.special_tokens.begin(), options_.special_tokens.end());

  // Words in sorted order: the work order is then fixed too (the result would not change anyway).
  std::vector<const std::pair<const std::string, int64_t>*> sorted;
  sorted.reserve(words_.size());
  for (const auto& kv : words_) sorted.push_back(&kv);
  std::sort(sorted.begin(), sorted.end(), [](auto* a, auto* b) { return a->first < b->first; });
  std::vector<std::vector<int32_t>> words(sorted.size());
  std::vector<int64_t> freq(sorted.size());
  std::unordered_map<uint64_t, int64_t> count;                 // pair -> weighted count
  std::unordered_map<uint64_t, std::vector<int32_t>> where;    // pair -> words holding it (may repeat)
  for (size_t w = 0; w < sorted.size(); ++w) {
    freq[w] = sorted[w]->second;
    for (unsigned char b : sorted[w]->first) words[w].push_back(id_of_byte[b]);
    for (size_t i = 0; i + 1 < words[w].size(); ++i) {
      const uint64_t k = pack(words[w][i], words[w][i + 1]);
      count[k] += freq[w];
      where[k].push_back(static_cast<int32_t>(w));
    }
  }

  // Max-heap on (count, then the smaller pair); entries go stale and are checked when popped.
  struct Entry { int64_t count; uint64_t pair; };
  auto less = [](const Entry& x, const Entry& y) { return x.count != y.count ? x.count < y.count : x.pair > y.pair; };
  std::priority_queue<Entry, std::vector<Entry>, decltype(less)> heap(less);
  for (const auto& [k, c] : count) heap.push({c, k});

  const int32_t target = options_.vocab_size - static_cast<int32_t>(options_.special_tokens.size());
  std::vector<std::pair<int32_t, int32_t>> merges;
  std::unordered_set<uint64_t> banned;  // pairs whose string is a reserved special token
  std::vector<int32_t> stamp(words.size(), -1);
  while (static_cast<int32_t>(tokens.size()) < target && !heap.empty()) {
    const Entry top = heap.top();
    heap.pop();
    auto cit = count.find(top.pair);
    const int64_t cur = cit == count.end() ? 0 : cit->second;
    if (cur != top.count) {
      if (cur > 0) heap.push({cur, top.pair});
      continue;
    }
    if (cur < options_.min_frequency) break;
    const int32_t a = first_of(top.pair), b = second_of(top.pair);
    std::string merged = tokens[a] + tokens[b];
    if (specials.count(merged)) {  // never learn a reserved token's string as a model token
      banned.insert(top.pair);
      count.erase(cit);
      continue;
    }
    int32_t c;
    if (auto it = token_ids.find(merged); it != token_ids.end()) {
      c = it->second;  // the same string from another pair: reuse the id (HF does the same)
    } else {
      c = static_cast<int32_t>(tokens.size());
      token_ids.emplace(merged, c);
      tokens.push_back(std::move(merged));
    }
    merges.emplace_back(a, b);

    std::vector<int32_t> holders = std::move(where[top.pair]);
    where.erase(top.pair);
    std::unordered_map<uint64_t, int64_t> delta;
    const auto merge_id = static_cast<int32_t>(merges.size());
    for (int32_t w : holders) {
      if (stamp[w] == merge_id) continue;  // listed twice
      stamp[w] = merge_id;
      const std::vector<int32_t>& old = words[w];
      const int64_t f = freq[w];
      std::vector<int32_t> nw;
      nw.reserve(old.size());
      // Left to right, non-overlapping, the counts of neighbouring pairs moved as we go.
      for (size_t i = 0; i < old.size();) {
        if (i + 1 < old.size() && old[i] == a && old[i + 1] == b) {
          if (!nw.empty()) {
            delta[pack(nw.back(), a)] -= f;
            delta[pack(nw.back(), c)] += f;
            where[pack(nw.back(), c)].push_back(w);
          }
          delta[top.pair] -= f;
          if (i + 2 < old.size()) {
            delta[pack(b, old[i + 2])] -= f;
            delta[pack(c, old[i + 2])] += f;
            where[pack(c, old[i + 2])].push_back(w);
          }
          nw.push_back(c);
          i += 2;
        } else {
          nw.push_back(old[i]);
          ++i;
        }
      }
      words[w] = std::move(nw);
    }
    for (const auto& [k, d] : delta) {
      if (d == 0) continue;
      int64_t& v = count[k];
      v += d;
      if (v <= 0) count.erase(k);
      else if (d > 0 && !banned.count(k)) heap.push({v, k});
    }
  }

  if (stats) {
    stats->bytes = bytes_;
    stats->pre_tokens = pre_tokens_;
    stats->unique_words = static_cast<int64_t>(words_.size());
    stats->merges = static_cast<int32_t>(merges.size());
    stats->vocab_size = static_cast<int32_t>(tokens.size() + options_.special_tokens.size());
  }
  return make_json(tokens, merges, options_.special_tokens).dump();
}

Tokenizer BpeTrainer::train(BpeTrainStats* stats) const {
  return Tokenizer::from_json_string(train_json(stats), "<trained tokenizer>");
}

}  // namespace opdlm::io
