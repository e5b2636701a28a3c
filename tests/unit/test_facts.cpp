// Invented-facts generator (knowledge probe) and the arithmetic conversion prompts: determinism,
// distinct names, eval items that are training sentences, distractors, disjoint conversion data,
// and config errors that name the command-line flag.
#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <set>
#include <string>
#include <unordered_set>

#include "opdlm/base/error.hpp"
#include "opdlm/io/corpora.hpp"

namespace {

using namespace opdlm::io;

FactsConfig small_facts(uint32_t seed = 3) {
  FactsConfig cfg;
  cfg.n_facts = 200;
  cfg.repeats = 6;
  cfg.templates = 3;
  cfg.seed = seed;
  return cfg;
}

// Runs `f`, expects an opdlm::Error whose field and message name `flag`.
template <class F>
void expect_flag_error(F&& f, const std::string& flag) {
  try {
    f();
    ADD_FAILURE() << "no error for " << flag;
  } catch (const opdlm::Error& e) {
    EXPECT_EQ(e.context().field, flag) << e.what();
    EXPECT_NE(std::string(e.what()).find(flag), std::string::npos) << e.what();
  }
}

TEST(Facts, DeterministicForASeed) {
  const FactsSet a = generate_facts(small_facts()), b = generate_facts(small_facts());
  EXPECT_EQ(a.entities, b.entities);
  EXPECT_EQ(a.facts, b.facts);
  EXPECT_EQ(a.distractors, b.distractors);
  EXPECT_EQ(a.train_lines, b.train_lines);
  EXPECT_EQ(facts_records(a), facts_records(b));
  const FactsSet c = generate_facts(small_facts(4));
  EXPECT_NE(a.entities, c.entities);
  EXPECT_NE(a.train_lines, c.train_lines);
  // Entity i depends on (seed, i) and the names before it: fewer entities give a prefix.
  FactsConfig fewer = small_facts();
  fewer.n_facts = 50;
  const FactsSet p = generate_facts(fewer);
  EXPECT_TRUE(std::equal(p.entities.begin(), p.entities.end(), a.entities.begin()));
  EXPECT_TRUE(std::equal(p.facts.begin(), p.facts.end(), a.facts.begin()));
  EXPECT_EQ(p.value_pools, a.value_pools);
}

TEST(Facts, EntityNamesAreDistinctPronounceableAndNotValues) {
  const FactsSet s = generate_facts(small_facts());
  ASSERT_EQ(s.entities.size(), 200u);
  std::set<std::string> names(s.entities.begin(), s.entities.end());
  EXPECT_EQ(names.size(), s.entities.size());
  for (const auto& n : s.entities) {
    ASSERT_GE(n.size(), 4u) << n;
    EXPECT_TRUE(n[0] >= 'A' && n[0] <= 'Z') << n;
    EXPECT_TRUE(std::all_of(n.begin() + 1, n.end(), [](char c) { return c >= 'a' && c <= 'z'; })) << n;
  }
  ASSERT_EQ(s.value_pools.size(), static_cast<size_t>(kFactAttributeCount));
  for (const auto& pool : s.value_pools) {
    EXPECT_EQ(std::set<std::string>(pool.begin(), pool.end()).size(), pool.size());
    for (const auto& v : pool) EXPECT_FALSE(names.count(v)) << v << " is both an entity and a value";
  }
}

TEST(Facts, EachEntityHasOneOrTwoDistinctAttributes) {
  const FactsSet s = generate_facts(small_facts());
  std::map<std::string, std::set<int>> attrs;
  std::map<std::string, int> count;
  for (const auto& f : s.facts) {
    EXPECT_TRUE(attrs[f.entity].insert(f.attribute).second) << f.entity << " repeats an attribute";
    ++count[f.entity];
    const auto& pool = s.value_pools[f.attribute];
    EXPECT_NE(std::find(pool.begin(), pool.end(), f.value), pool.end()) << f.value;
  }
  EXPECT_EQ(count.size(), s.entities.size());
  int twos = 0;
  for (const auto& [e, n] : count) {
    EXPECT_TRUE(n == 1 || n == 2) << e;
    twos += n == 2;
  }
  EXPECT_GT(twos, 50);  // about half
  EXPECT_LT(twos, 150);
}

TEST(Facts, EvalItemsAreTrainingSentences) {
  const FactsConfig cfg = small_facts();
  const FactsSet s = generate_facts(cfg);
  ASSERT_EQ(s.train_lines.size(), s.facts.size() * static_cast<size_t>(cfg.repeats));
  std::map<std::string, int> line_count;
  for (const auto& l : s.train_lines) ++line_count[l];
  const auto recs = facts_records(s);
  ASSERT_EQ(recs.size(), s.facts.size());
  for (size_t i = 0; i < recs.size(); ++i) {
    const auto& r = recs[i];
    const Fact& f = s.facts[i];
    ASSERT_TRUE(r.gold.has_value());
    EXPECT_EQ(r.prompt + *r.gold, f.sentence(0));
    EXPECT_EQ(*r.gold, " " + f.value + ".");
    EXPECT_NE(r.prompt.back(), ' ') << "the gold carries the space: " << r.prompt;
    EXPECT_NE(r.prompt.find(f.entity), std::string::npos);
    EXPECT_EQ(r.meta["value"], f.value);
    // Each surface form appears repeats / templates times (6 repeats over 3 forms).
    for (int t = 0; t < cfg.templates; ++t) EXPECT_EQ(line_count[f.sentence(t)], 2) << f.sentence(t);
  }
  EXPECT_EQ(recs[0].id, "fact-0");
  EXPECT_EQ(*recs[0].split, "seen");
  // The canonical form and the fill: value last, entity in place.
  const Fact f{"Zorvani", 0, "Teluk"};
  EXPECT_EQ(f.sentence(0), "The capital of Zorvani is Teluk.");
  EXPECT_EQ(f.prompt(), "The capital of Zorvani is");
  EXPECT_EQ(f.gold(), " Teluk.");
  EXPECT_EQ(std::string(fact_attribute_name(3)), "animal");
  // One surface form: every line is the eval sentence.
  FactsConfig one = cfg;
  one.templates = 1;
  const FactsSet o = generate_facts(one);
  std::set<std::string> evals;
  for (const auto& fact : o.facts) evals.insert(fact.sentence(0));
  for (const auto& l : o.train_lines) ASSERT_TRUE(evals.count(l)) << l;
}

TEST(Facts, DistractorsAreOtherValuesOfTheSameAttribute) {
  const FactsSet s = generate_facts(small_facts());
  const auto recs = facts_records(s);
  for (size_t i = 0; i < recs.size(); ++i) {
    const auto& r = recs[i];
    ASSERT_EQ(r.distractors.size(), 3u);
    std::set<std::string> d(r.distractors.begin(), r.distractors.end());
    EXPECT_EQ(d.size(), 3u) << r.id;
    EXPECT_FALSE(d.count(*r.gold)) << r.id;
    const auto& pool = s.value_pools[s.facts[i].attribute];
    for (const auto& x : r.distractors) {
      ASSERT_GE(x.size(), 3u);
      EXPECT_EQ(x.front(), ' ');
      EXPECT_EQ(x.back(), '.');
      EXPECT_NE(std::find(pool.begin(), pool.end(), x.substr(1, x.size() - 2)), pool.end()) << x;
    }
  }
}

TEST(Facts, ConversionPromptsAreDisjointFromEvalAndFacts) {
  ArithmeticConfig cfg;
  cfg.n_train = 5000;
  cfg.n_eval = 200;
  cfg.n_conversion = 500;
  cfg.max_digits = 2;
  cfg.length_digits = 3;
  cfg.ops = "+-";
  cfg.seed = 5;
  const ArithmeticSets a = generate_arithmetic(cfg);
  EXPECT_EQ(a.conversion, generate_arithmetic(cfg).conversion);
  ASSERT_EQ(a.conversion.size(), 500u);
  std::set<std::string> held, seen, length, conv;
  for (const auto& p : a.eval_heldout) held.insert(p.key());
  for (const auto& p : a.eval_seen) seen.insert(p.key());
  for (const auto& p : a.eval_length) length.insert(p.key());
  for (const auto& p : a.conversion) {
    EXPECT_FALSE(arithmetic_held_out(p)) << p.key();
    EXPECT_FALSE(held.count(p.key()) || seen.count(p.key()) || length.count(p.key())) << p.key();
    EXPECT_TRUE(conv.insert(p.key()).second) << "duplicate " << p.key();
    EXPECT_TRUE(p.op == '+' || p.op == '-') << p.key();
    EXPECT_TRUE(p.a <= 99 && p.b <= 99) << p.key();
  }
  for (const auto& p : a.train) EXPECT_TRUE(p.op == '+' || p.op == '-') << p.key();
  // --no-negative: differences are drawn with a >= b everywhere; the rest of the stream is the same.
  ArithmeticConfig nn = cfg;
  nn.no_negative = true;
  const ArithmeticSets n = generate_arithmetic(nn);
  bool any_negative = false;
  for (const auto& p : a.train) any_negative |= p.result() < 0;
  EXPECT_TRUE(any_negative);
  for (const auto* set : {&n.train, &n.eval_heldout, &n.eval_seen, &n.conversion})
    for (const auto& p : *set) ASSERT_GE(p.result(), 0) << p.key();
  for (const auto& p : n.conversion) EXPECT_FALSE(arithmetic_held_out(p)) << p.key();
  const auto recs = arithmetic_conversion_records(a.conversion);
  ASSERT_EQ(recs.size(), 500u);
  EXPECT_EQ(recs[0].id, "conversion-0");
  EXPECT_EQ(*recs[0].split, "conversion");
  for (const auto& r : recs) {
    ASSERT_TRUE(r.response && r.gold);
    EXPECT_EQ(*r.response, *r.gold);
  }
  // No fact (entity, value or sentence) can leak into conversion text.
  const FactsSet f = generate_facts(small_facts());
  std::unordered_set<std::string> words(f.entities.begin(), f.entities.end());
  for (const auto& pool : f.value_pools) words.insert(pool.begin(), pool.end());
  for (const auto& r : recs)
    for (const auto& w : words) {
      ASSERT_EQ(r.prompt.find(w), std::string::npos) << r.prompt;
      ASSERT_EQ(r.response->find(w), std::string::npos) << *r.response;
    }
}

TEST(Facts, DefaultArithmeticStreamIsUnchanged) {
  // Pinned with the generator before --ops existed: the default "+-*" draw keeps old data valid.
  ArithmeticConfig cfg;
  cfg.n_train = 3;
  cfg.n_eval = 1;
  cfg.n_conversion = 1;
  const auto s = generate_arithmetic(cfg);
  EXPECT_EQ(s.train[0].line(), "7*63=441");
  EXPECT_EQ(s.train[1].line(), "15-3=12");
  EXPECT_EQ(s.train[2].line(), "39-24=15");
}

TEST(Facts, ConversionEntitiesLeaveTheEvalAndKeepTheirFactsTogether) {
  FactsConfig cfg = small_facts();
  const FactsSet s = generate_facts(cfg);
  // None by default: every fact is an eval item, no conversion record.
  const auto none = facts_conversion_entities(s, cfg);
  EXPECT_EQ(std::count(none.begin(), none.end(), true), 0);
  EXPECT_EQ(facts_records(s, none), facts_records(s));
  EXPECT_TRUE(facts_conversion_records(s, none).empty());

  cfg.conversion_entities = 80;
  const auto mask = facts_conversion_entities(s, cfg);
  ASSERT_EQ(mask.size(), s.entities.size());
  EXPECT_EQ(std::count(mask.begin(), mask.end(), true), 80);
  EXPECT_EQ(mask, facts_conversion_entities(s, cfg));  // a pure function of the config
  FactsConfig other = cfg;
  other.seed = cfg.seed + 1;
  EXPECT_NE(facts_conversion_entities(generate_facts(other), other), mask);  // the seed picks them

  std::set<std::string> conv_entities;
  for (size_t e = 0; e < mask.size(); ++e)
    if (mask[e]) conv_entities.insert(s.entities[e]);
  const auto eval = facts_records(s, mask);
  const auto conv = facts_conversion_records(s, mask);
  EXPECT_EQ(eval.size() + conv.size(), s.facts.size());  // a partition of the facts
  std::set<std::string> ids;
  for (const auto& r : eval) {
    EXPECT_EQ(conv_entities.count(r.meta["entity"].get<std::string>()), 0u) << r.id;
    EXPECT_EQ(r.split, "seen");
    ids.insert(r.id);
  }
  for (const auto& r : conv) {
    EXPECT_EQ(conv_entities.count(r.meta["entity"].get<std::string>()), 1u) << r.id;
    EXPECT_EQ(r.split, "conversion");
    ASSERT_TRUE(r.response && r.gold);
    EXPECT_EQ(*r.response, *r.gold);
    EXPECT_TRUE(r.distractors.empty());
    EXPECT_TRUE(ids.insert(r.id).second) << "id in both sets: " << r.id;
    // The record is the fact's eval form (same id, prompt and gold as without a split).
    const auto all = facts_records(s);
    const auto it = std::find_if(all.begin(), all.end(), [&](const PromptRecord& a) { return a.id == r.id; });
    ASSERT_NE(it, all.end());
    EXPECT_EQ(it->prompt, r.prompt);
    EXPECT_EQ(it->gold, r.gold);
  }
  // Every fact of a conversion entity is in the conversion set, so no entity is in both.
  std::map<std::string, int> facts_of;
  for (const auto& f : s.facts) facts_of[f.entity]++;
  std::map<std::string, int> conv_count;
  for (const auto& r : conv) conv_count[r.meta["entity"].get<std::string>()]++;
  for (const auto& e : conv_entities) EXPECT_EQ(conv_count[e], facts_of[e]) << e;
  // The training text does not depend on the split: the teacher learns every fact.
  EXPECT_EQ(generate_facts(cfg).train_lines, s.train_lines);
}

TEST(Facts, BadArgumentsNameTheFlag) {
  auto facts_with = [](auto mutate) {
    FactsConfig c = small_facts();
    mutate(c);
    return [c] { generate_facts(c); };
  };
  expect_flag_error(facts_with([](FactsConfig& c) { c.n_facts = 0; }), "--n-facts");
  expect_flag_error(facts_with([](FactsConfig& c) { c.n_facts = -5; }), "--n-facts");
  expect_flag_error(facts_with([](FactsConfig& c) { c.repeats = 0; }), "--repeats");
  expect_flag_error(facts_with([](FactsConfig& c) { c.templates = 4; }), "--templates");
  expect_flag_error(facts_with([](FactsConfig& c) { c.templates = 0; }), "--templates");
  expect_flag_error(facts_with([](FactsConfig& c) { c.n_distractors = 16; }), "--distractors");
  expect_flag_error(facts_with([](FactsConfig& c) { c.conversion_entities = -1; }), "--conversion-entities");
  expect_flag_error(facts_with([](FactsConfig& c) { c.conversion_entities = c.n_facts; }), "--conversion-entities");

  auto arith_with = [](auto mutate) {
    ArithmeticConfig c;
    c.n_train = 10;
    c.n_eval = 10;
    c.n_conversion = 10;
    mutate(c);
    return [c] { generate_arithmetic(c); };
  };
  expect_flag_error(arith_with([](ArithmeticConfig& c) { c.ops = ""; }), "--ops");
  expect_flag_error(arith_with([](ArithmeticConfig& c) { c.ops = "+/"; }), "--ops");
  expect_flag_error(arith_with([](ArithmeticConfig& c) { c.ops = "++"; }), "--ops");
  expect_flag_error(arith_with([](ArithmeticConfig& c) { c.max_digits = 0; }), "--max-digits");
  expect_flag_error(arith_with([](ArithmeticConfig& c) { c.length_digits = 10; }), "--length-digits");
  expect_flag_error(arith_with([](ArithmeticConfig& c) { c.n_conversion = uint64_t{1} << 30; }), "--n-conversion");
  // More conversion prompts than distinct trained problems exist (one-digit sums: ~90).
  expect_flag_error(arith_with([](ArithmeticConfig& c) {
                      c.max_digits = 1;
                      c.ops = "+";
                      c.n_eval = 5;
                      c.n_conversion = 200;
                    }),
                    "--n-conversion");
}

TEST(Facts, PackRowsStartsEveryWindowWithADocument) {
  TokenShard in(16, Sha256Digest{});
  const std::vector<std::vector<int32_t>> docs = {{1, 2, 3}, {4, 5}, {6, 7, 8, 9}, {10}, {}, {11, 12, 13, 14, 15}};
  for (const auto& d : docs) in.add_document(d);
  const TokenShard out = pack_rows(in, 5, 0);
  // Rows: [1 2 3 4 5] [6 7 8 9 10] [11 12 13 14 15], then the one-token boundary document.
  ASSERT_EQ(out.num_documents(), 4u);
  EXPECT_EQ(std::vector<int32_t>(out.document(0).begin(), out.document(0).end()), (std::vector<int32_t>{1, 2, 3, 4, 5}));
  EXPECT_EQ(std::vector<int32_t>(out.document(1).begin(), out.document(1).end()), (std::vector<int32_t>{6, 7, 8, 9, 10}));
  EXPECT_EQ(out.num_tokens(), 16u);  // 3 rows x 5 + 1: the trainer sees (16 - 1) / 5 = 3 windows
  const TokenShard padded = pack_rows(in, 6, 0);
  EXPECT_EQ(std::vector<int32_t>(padded.document(0).begin(), padded.document(0).end()),
            (std::vector<int32_t>{1, 2, 3, 4, 5, 0}));
  expect_flag_error([&] { pack_rows(in, 4, 0); }, "--pack-rows");  // a 5-token document
  expect_flag_error([&] { pack_rows(in, 1, 0); }, "--pack-rows");
}

}  // namespace
