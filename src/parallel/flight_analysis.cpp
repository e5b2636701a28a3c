// Merging per-rank flight records into a hang diagnosis: pending collectives, absent members, culprits.
#include "opdlm/parallel/flight_analysis.hpp"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <regex>
#include <set>
#include <sstream>

#include "opdlm/base/error.hpp"

namespace opdlm::parallel {

namespace {
CollectiveOp parse_op(const std::string& s, const std::string& source) {
  for (CollectiveOp op : {CollectiveOp::all_reduce, CollectiveOp::reduce_scatter, CollectiveOp::all_gather,
                          CollectiveOp::broadcast, CollectiveOp::barrier})
    if (s == collective_op_name(op)) return op;
  OPDLM_FAIL_AT(source, "records.op", "unknown collective '", s, "'");
}

std::string join(const std::vector<int>& v) {
  std::string s;
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  return s;
}
}  // namespace

RankFlight parse_flight_record(const nlohmann::json& j, const std::string& source) {
  RankFlight f;
  f.source = source;
  try {
    f.world_rank = j.at("world_rank").get<int>();
    for (const auto& [name, members] : j.at("comms").items()) f.comms[name] = members.get<std::vector<int>>();
    f.now_s = j.at("now_s").get<double>();
    f.reason = j.value("reason", "");
    f.host = j.value("host", "");
    for (const auto& r : j.at("records")) {
      CollectiveRecord c;
      c.seq = r.at("seq").get<uint64_t>();
      c.comm = r.at("comm").get<std::string>();
      c.op = parse_op(r.at("op").get<std::string>(), source);
      c.bytes = r.at("bytes").get<size_t>();
      c.start_s = r.at("start_s").get<double>();
      c.end_s = r.at("end_s").is_null() ? -1.0 : r.at("end_s").get<double>();
      f.records.push_back(std::move(c));
    }
  } catch (const nlohmann::json::exception& e) {
    OPDLM_FAIL_AT(source, "flight record", "malformed: ", e.what());
  }
  return f;
}

std::vector<RankFlight> read_flight_dir(const std::string& dir) {
  namespace fs = std::filesystem;
  if (!fs::is_directory(dir)) OPDLM_FAIL_AT(dir, "", "not a directory of flight records");
  std::vector<RankFlight> out;
  const std::regex name(R"(rank(\d+)\.json)");
  for (const auto& e : fs::directory_iterator(dir)) {
    const std::string file = e.path().filename().string();
    if (!std::regex_match(file, name)) continue;
    std::ifstream in(e.path());
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(in);
    } catch (const nlohmann::json::exception& ex) {
      OPDLM_FAIL_AT(e.path().string(), "", "not JSON: ", ex.what());
    }
    out.push_back(parse_flight_record(j, e.path().string()));
  }
  if (out.empty()) OPDLM_FAIL_AT(dir, "", "no rank<N>.json flight records");
  std::sort(out.begin(), out.end(), [](const RankFlight& a, const RankFlight& b) { return a.world_rank < b.world_rank; });
  return out;
}

HangDiagnosis diagnose_hang(const std::vector<RankFlight>& ranks) {
  HangDiagnosis d;
  std::map<int, const RankFlight*> by_rank;
  for (const auto& r : ranks) by_rank[r.world_rank] = &r, d.ranks.push_back(r.world_rank);
  auto in_flight = [](const RankFlight& r) -> const CollectiveRecord* {
    for (const auto& c : r.records)
      if (c.end_s < 0) return &c;
    return nullptr;
  };
  // The collectives ranks are stuck in, keyed by (communicator, members, sequence number).
  std::map<std::tuple<std::string, std::vector<int>, uint64_t>, PendingCollective> pending;
  for (const auto& r : ranks) {
    const CollectiveRecord* c = in_flight(r);
    if (!c) continue;
    auto it = r.comms.find(c->comm);
    const std::vector<int> members = it != r.comms.end() ? it->second : std::vector<int>{r.world_rank};
    auto& p = pending[{c->comm, members, c->seq}];
    if (p.waiting.empty()) {
      p.comm = c->comm, p.members = members, p.seq = c->seq, p.op = collective_op_name(c->op), p.bytes = c->bytes;
    } else if (p.op != collective_op_name(c->op) || p.bytes != c->bytes) {
      d.notes.push_back("rank " + std::to_string(r.world_rank) + " is in " + c->comm + " #" + std::to_string(c->seq) + " as " +
                        collective_op_name(c->op) + " of " + std::to_string(c->bytes) + " bytes, rank " +
                        std::to_string(p.waiting.front()) + " as " + p.op + " of " + std::to_string(p.bytes) +
                        " bytes: the ranks issue different collectives");
    }
    p.waiting.push_back(r.world_rank);
    p.longest_wait_s = std::max(p.longest_wait_s, r.now_s - c->start_s);
  }
  std::set<int> culprits;
  for (auto& [key, p] : pending) {
    for (int m : p.members) {
      if (std::find(p.waiting.begin(), p.waiting.end(), m) != p.waiting.end()) continue;
      Straggler s;
      s.world_rank = m, s.comm = p.comm, s.awaited_seq = p.seq;
      auto it = by_rank.find(m);
      if (it == by_rank.end()) {
        s.doing = "left no flight record (it died, or its watchdog never ran)";
        p.absent.push_back(m);
        d.stragglers.push_back(s);
        culprits.insert(m);
        continue;
      }
      const RankFlight& r = *it->second;
      s.has_record = true;
      const CollectiveRecord* last = nullptr;
      for (const auto& c : r.records)
        if (c.comm == p.comm) last = &c;
      if (last) s.last_seq = last->seq;
      if (last && last->seq >= p.seq) {  // it got past this call: the ranks disagree on the sequence
        d.notes.push_back("rank " + std::to_string(m) + " is past " + p.comm + " #" + std::to_string(p.seq) + " (its newest is #" +
                          std::to_string(last->seq) + ") while ranks " + join(p.waiting) + " wait in it");
        continue;
      }
      p.absent.push_back(m);
      if (const CollectiveRecord* c = in_flight(r)) {
        s.doing = "in flight in " + c->comm + " #" + std::to_string(c->seq) + " (" + collective_op_name(c->op) + ")";
      } else {
        s.doing = "in no collective (computing, or stuck outside the communication library)";
        double newest_end = -1;
        for (const auto& c : r.records) newest_end = std::max(newest_end, c.end_s);
        if (newest_end >= 0) s.idle_s = r.now_s - newest_end;
        culprits.insert(m);
      }
      d.stragglers.push_back(s);
    }
    d.pending.push_back(p);
  }
  if (culprits.empty())
    for (const auto& s : d.stragglers) culprits.insert(s.world_rank);
  d.culprits.assign(culprits.begin(), culprits.end());
  return d;
}

nlohmann::json HangDiagnosis::to_json() const {
  nlohmann::json j = {{"ranks", ranks}, {"culprits", culprits}, {"notes", notes}};
  j["pending"] = nlohmann::json::array();
  for (const auto& p : pending)
    j["pending"].push_back({{"comm", p.comm}, {"members", p.members}, {"seq", p.seq}, {"op", p.op}, {"bytes", p.bytes},
                            {"waiting", p.waiting}, {"longest_wait_s", p.longest_wait_s}, {"absent", p.absent}});
  j["stragglers"] = nlohmann::json::array();
  for (const auto& s : stragglers) {
    nlohmann::json x = {{"world_rank", s.world_rank}, {"comm", s.comm}, {"awaited_seq", s.awaited_seq},
                        {"has_record", s.has_record}, {"doing", s.doing}, {"idle_s", s.idle_s}};
    x["last_seq"] = s.last_seq ? nlohmann::json(*s.last_seq) : nlohmann::json(nullptr);
    j["stragglers"].push_back(std::move(x));
  }
  return j;
}

std::string HangDiagnosis::text() const {
  std::ostringstream os;
  os.setf(std::ios::fixed);
  os.precision(1);
  os << "flight records of ranks " << join(ranks) << "\n";
  if (pending.empty()) os << "no rank is waiting in a collective\n";
  for (const auto& p : pending) {
    os << "pending: " << p.comm << " #" << p.seq << " " << p.op << " (" << p.bytes << " bytes), members " << join(p.members)
       << ": ranks " << join(p.waiting) << " waiting (up to " << p.longest_wait_s << " s)";
    if (!p.absent.empty()) os << ", never arrived: " << join(p.absent);
    os << "\n";
  }
  for (const auto& s : stragglers) {
    os << "rank " << s.world_rank << " never arrived at " << s.comm << " #" << s.awaited_seq << ": ";
    if (s.has_record) {
      if (s.last_seq) os << "its newest " << s.comm << " call was #" << *s.last_seq << "; ";
      os << "it is " << s.doing;
      if (s.idle_s >= 0) os << ", " << s.idle_s << " s after its last collective finished";
    } else {
      os << "it " << s.doing;
    }
    os << "\n";
  }
  for (const auto& n : notes) os << "note: " << n << "\n";
  if (!culprits.empty()) {
    os << "culprit: rank" << (culprits.size() > 1 ? "s " : " ") << join(culprits);
    for (const auto& s : stragglers)
      if (std::find(culprits.begin(), culprits.end(), s.world_rank) != culprits.end()) {
        for (const auto& p : pending)
          if (p.comm == s.comm && p.seq == s.awaited_seq) {
            os << " (never arrived at " << p.comm << " #" << p.seq << " " << p.op << ")";
            break;
          }
        break;
      }
    os << "\n";
  }
  return os.str();
}

}  // namespace opdlm::parallel
