// The merge of the per-rank flight records a hang leaves (parallel/watchdog.hpp): which collective
// the ranks wait in, which members never arrived at it, and what those were doing instead. Pure
// functions over parsed records, behind `opdlm flight DIR`.
#pragma once

#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "opdlm/parallel/communicator.hpp"

namespace opdlm::parallel {

struct RankFlight {
  int world_rank = -1;
  std::string source;                             // the file it came from
  std::map<std::string, std::vector<int>> comms;  // communicator name -> world ranks of its members
  std::vector<CollectiveRecord> records;          // oldest first
  double now_s = 0;                               // the records' clock when written
  std::string reason, host;
};

// Parses one rank<r>.json; a malformed record is an Error naming `source` and the field.
RankFlight parse_flight_record(const nlohmann::json& j, const std::string& source);
// Every rank*.json under dir, by world rank (an Error when there is none).
std::vector<RankFlight> read_flight_dir(const std::string& dir);

// A collective some ranks are stuck in: one (communicator, member set, sequence number).
struct PendingCollective {
  std::string comm;
  std::vector<int> members;
  uint64_t seq = 0;
  std::string op;
  size_t bytes = 0;
  std::vector<int> waiting;   // members in flight in it
  double longest_wait_s = 0;  // of the waiting ranks, at the time of their record
  std::vector<int> absent;    // members that never arrived
};

// A member that never arrived at a pending collective.
struct Straggler {
  int world_rank = -1;
  std::string comm;
  uint64_t awaited_seq = 0;
  bool has_record = false;          // false: no rank<r>.json (it died, or its watchdog never ran)
  std::optional<uint64_t> last_seq;  // its newest call on that communicator still in its ring
  std::string doing;                 // "in flight in dp #12 (all_reduce)" or "in no collective"
  double idle_s = -1;                // since its newest call finished, when it is in no collective
};

struct HangDiagnosis {
  std::vector<int> ranks;  // whose records were read
  std::vector<PendingCollective> pending;
  std::vector<Straggler> stragglers;
  std::vector<int> culprits;       // stragglers in no collective (or without a record): where to look
  std::vector<std::string> notes;  // mismatches: members at the same call with different ops or sizes
  nlohmann::json to_json() const;
  std::string text() const;
};

// Members of a pending collective with no record of their own are named as stragglers too.
HangDiagnosis diagnose_hang(const std::vector<RankFlight>& ranks);

}  // namespace opdlm::parallel
