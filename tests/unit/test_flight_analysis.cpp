// The hang watchdog and the merge of flight records: which collective the ranks wait in, who never
// arrived and what it was doing; the watchdog's bound, alarm marker and record (exit disabled).
#include <gtest/gtest.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <thread>

#include "opdlm/base/error.hpp"
#include "opdlm/parallel/flight_analysis.hpp"
#include "opdlm/parallel/watchdog.hpp"

using namespace opdlm::parallel;
namespace fs = std::filesystem;

namespace {
CollectiveRecord rec(const std::string& comm, uint64_t seq, CollectiveOp op, double start, double end) {
  return CollectiveRecord{seq, comm, op, 16, start, end};
}
// TP 2 x DP 2: world ranks 0,1 form TP group 0, ranks 2,3 TP group 1; DP groups {0,2} and {1,3}.
RankFlight rank(int r, std::vector<CollectiveRecord> records, double now) {
  RankFlight f;
  f.world_rank = r;
  f.comms = {{"world", {0, 1, 2, 3}}, {"tp", r < 2 ? std::vector<int>{0, 1} : std::vector<int>{2, 3}},
             {"dp", r % 2 == 0 ? std::vector<int>{0, 2} : std::vector<int>{1, 3}}};
  f.records = std::move(records);
  f.now_s = now;
  return f;
}
fs::path temp_dir(const std::string& name) {
  fs::path d = fs::temp_directory_path() / (name + "." + std::to_string(getpid()));
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}
}  // namespace

TEST(FlightAnalysis, NamesTheRankInNoCollectiveAsTheCulprit) {
  // Rank 1 stopped after tp #7; rank 0 waits in tp #8, rank 3 in dp #3; rank 2 waits in dp #3 for
  // rank 0, which is itself waiting (in tp #8): not a culprit.
  std::vector<RankFlight> ranks = {
      rank(0, {rec("dp", 2, CollectiveOp::all_gather, 1, 1.1), rec("tp", 7, CollectiveOp::all_reduce, 2, 2.1),
               rec("tp", 8, CollectiveOp::reduce_scatter, 2.2, -1)}, 12),
      rank(1, {rec("dp", 2, CollectiveOp::all_gather, 1, 1.1), rec("tp", 7, CollectiveOp::all_reduce, 2, 2.1)}, 12),
      rank(2, {rec("dp", 2, CollectiveOp::all_gather, 1, 1.1), rec("dp", 3, CollectiveOp::all_gather, 2.5, -1)}, 12),
      rank(3, {rec("dp", 2, CollectiveOp::all_gather, 1, 1.1), rec("dp", 3, CollectiveOp::all_gather, 2.5, -1)}, 12)};
  const HangDiagnosis d = diagnose_hang(ranks);
  EXPECT_EQ(d.culprits, std::vector<int>{1});
  ASSERT_EQ(d.pending.size(), 3u);
  bool found_tp = false;
  for (const auto& p : d.pending)
    if (p.comm == "tp") {
      found_tp = true;
      EXPECT_EQ(p.seq, 8u);
      EXPECT_EQ(p.waiting, std::vector<int>{0});
      EXPECT_EQ(p.absent, std::vector<int>{1});
      EXPECT_NEAR(p.longest_wait_s, 9.8, 1e-9);
    }
  EXPECT_TRUE(found_tp);
  const std::string text = d.text();
  EXPECT_NE(text.find("rank 1 never arrived at tp #8: its newest tp call was #7; it is in no collective"), std::string::npos) << text;
  EXPECT_NE(text.find("culprit: rank 1"), std::string::npos) << text;
  EXPECT_NE(text.find("rank 0 never arrived at dp #3: its newest dp call was #2; it is in flight in tp #8"), std::string::npos) << text;
}

TEST(FlightAnalysis, ARankWithoutARecordIsNamedAndMismatchesAreNoted) {
  // Rank 1 left no record (killed): the ranks waiting for it name it. Ranks 2 and 3 disagree on the op.
  std::vector<RankFlight> ranks = {
      rank(0, {rec("tp", 4, CollectiveOp::all_reduce, 1, -1)}, 5),
      rank(2, {rec("tp", 4, CollectiveOp::all_reduce, 1, -1)}, 5),
      rank(3, {rec("tp", 4, CollectiveOp::broadcast, 1, -1)}, 5)};
  const HangDiagnosis d = diagnose_hang(ranks);
  EXPECT_EQ(d.culprits, std::vector<int>{1});
  ASSERT_FALSE(d.stragglers.empty());
  EXPECT_FALSE(d.stragglers[0].has_record);
  ASSERT_EQ(d.notes.size(), 1u);
  EXPECT_NE(d.notes[0].find("different collectives"), std::string::npos) << d.notes[0];
}

TEST(FlightAnalysis, NoPendingCollectiveMeansNoCulprit) {
  const HangDiagnosis d = diagnose_hang({rank(0, {rec("tp", 1, CollectiveOp::barrier, 0, 0.1)}, 1)});
  EXPECT_TRUE(d.pending.empty());
  EXPECT_TRUE(d.culprits.empty());
  EXPECT_NE(d.text().find("no rank is waiting"), std::string::npos);
}

TEST(FlightAnalysis, MalformedRecordsNameTheFile) {
  const fs::path dir = temp_dir("opdlm_flight_bad");
  std::ofstream(dir / "rank0.json") << R"({"world_rank": 0, "comms": {}, "now_s": 1, "records": [{"seq": 1}]})";
  try {
    read_flight_dir(dir.string());
    FAIL() << "a malformed record was accepted";
  } catch (const opdlm::Error& e) {
    EXPECT_NE(std::string(e.what()).find("rank0.json"), std::string::npos) << e.what();
  }
  fs::remove_all(dir);
  EXPECT_THROW(read_flight_dir(dir.string()), opdlm::Error);
}

TEST(HangWatchdog, FiresPastTheBoundWritesARecordAndAlertsPeers) {
  const fs::path dir = temp_dir("opdlm_watchdog");
  FlightRecorder rec_a(64), rec_b(64);
  WatchdogOptions o;
  o.floor_s = 0.3;
  o.factor = 2;
  o.poll_s = 0.02;
  o.grace_s = 0;
  o.exit_code = -1;  // keep the test process alive
  o.dump_dir = dir.string();
  o.world_rank = 0;
  o.identity = {{"world_rank", 0}, {"comms", {{"tp", {0, 1}}}}};
  std::atomic<int> events{0};
  o.on_hang = [&](const nlohmann::json& ev) {
    EXPECT_EQ(ev.at("event"), "hang");
    ++events;
  };
  WatchdogOptions ob = o;
  ob.world_rank = 1;
  ob.identity = {{"world_rank", 1}, {"comms", {{"tp", {0, 1}}}}};
  ob.floor_s = 60;  // rank 1 would not fire by itself: only the marker wakes it

  rec_a.finish(rec_a.start("tp", 0, CollectiveOp::all_reduce, 16));
  rec_a.start("tp", 1, CollectiveOp::all_reduce, 16);  // stays in flight
  HangWatchdog a(rec_a, o);
  a.set_expected(0.4);  // bound max(0.3, 2 x 0.4) = 0.8 s
  EXPECT_DOUBLE_EQ(a.bound_s(), 0.8);
  a.set_expected(0.1);  // the expected time only grows
  EXPECT_DOUBLE_EQ(a.bound_s(), 0.8);
  HangWatchdog b(rec_b, ob);
  std::this_thread::sleep_for(std::chrono::milliseconds(400));
  EXPECT_FALSE(a.fired()) << "fired before the bound";
  for (int i = 0; i < 200 && !(a.fired() && b.fired()); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  ASSERT_TRUE(a.fired());
  ASSERT_TRUE(b.fired()) << "the marker did not make the peer write its record";
  EXPECT_EQ(events.load(), 2);
  ASSERT_TRUE(fs::exists(dir / "HANG"));
  const auto ranks = read_flight_dir(dir.string());
  ASSERT_EQ(ranks.size(), 2u);
  EXPECT_NE(ranks[0].reason.find("tp #1 (all_reduce, 16 bytes) pending"), std::string::npos) << ranks[0].reason;
  EXPECT_NE(ranks[1].reason.find("another rank declared a hang"), std::string::npos) << ranks[1].reason;
  const auto d = diagnose_hang(ranks);
  EXPECT_EQ(d.culprits, std::vector<int>{1});
  fs::remove_all(dir);
}
