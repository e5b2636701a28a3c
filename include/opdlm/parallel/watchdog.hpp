// HangWatchdog: a thread per rank that watches the FlightRecorder. When a collective has been pending
// longer than max(floor, factor x the longest step or save measured so far), or another rank has
// raised the alarm (a marker file in the shared dump directory), it writes this rank's flight record
// (JSON) next to the others, and ends the process with kExitHang after a grace period that lets the
// other ranks write theirs. `opdlm flight DIR` merges the records (parallel/flight_analysis.hpp).
#pragma once

#include <atomic>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>

#include "opdlm/parallel/communicator.hpp"

namespace opdlm::parallel {

struct WatchdogOptions {
  double floor_s = 300;  // never a hang before this many seconds pending
  double factor = 10;    // ... nor before factor x the expected time (set_expected)
  double grace_s = 5;    // after writing the record: time the other ranks get to write theirs
  double poll_s = 0.5;   // how often the thread looks
  std::string dump_dir;  // where rank<r>.json and the HANG marker go (shared by every rank)
  int world_rank = 0;
  // Who this rank is: its TP and DP coordinates and the world ranks of each communicator it uses
  // ({"world": [...], "tp": [...], "dp": [...]}), copied into the record.
  nlohmann::json identity;
  // Called on the watchdog thread once a hang is declared, before the record is written (the
  // trainer writes a "hang" metrics line). Must be thread-safe.
  std::function<void(const nlohmann::json&)> on_hang;
  // Tests: exit code; < 0 keeps the process alive (the record is still written).
  int exit_code = 88;
};

// A record of this rank's recent collectives with its identity, as written to rank<r>.json.
nlohmann::json flight_record_json(const FlightRecorder& rec, const nlohmann::json& identity, const std::string& reason);

class HangWatchdog {
 public:
  HangWatchdog(FlightRecorder& rec, WatchdogOptions opts);
  ~HangWatchdog();  // stops the thread
  HangWatchdog(const HangWatchdog&) = delete;
  HangWatchdog& operator=(const HangWatchdog&) = delete;

  // The longest step (or save) so far, in seconds: the bound becomes max(floor, factor x this).
  void set_expected(double seconds);
  double bound_s() const;
  // Whether this watchdog has declared a hang (tests with exit_code < 0).
  bool fired() const { return fired_.load(); }

 private:
  void loop();
  void fire(const std::string& reason);

  FlightRecorder& rec_;
  WatchdogOptions o_;
  std::atomic<double> expected_{0};
  std::atomic<bool> fired_{false};
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  std::thread thread_;
};

}  // namespace opdlm::parallel
