// HangWatchdog: the polling thread, the alarm marker shared through the dump directory, and the
// per-rank flight record it writes before ending the process.
#include "opdlm/parallel/watchdog.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <ctime>
#include <filesystem>
#include <iostream>

#include "opdlm/base/log.hpp"
#include "opdlm/io/file_util.hpp"

namespace opdlm::parallel {

nlohmann::json flight_record_json(const FlightRecorder& rec, const nlohmann::json& identity, const std::string& reason) {
  nlohmann::json records = nlohmann::json::array();
  for (const auto& r : rec.snapshot()) {
    nlohmann::json j = {{"seq", r.seq}, {"comm", r.comm}, {"op", collective_op_name(r.op)}, {"bytes", r.bytes},
                        {"start_s", r.start_s}};
    j["end_s"] = r.end_s < 0 ? nlohmann::json(nullptr) : nlohmann::json(r.end_s);
    records.push_back(std::move(j));
  }
  char host[256] = {0};
  gethostname(host, sizeof host - 1);
  const double t0 = std::chrono::duration<double>(rec.wall_t0().time_since_epoch()).count();
  nlohmann::json out = identity;
  out["reason"] = reason;
  out["host"] = host;
  out["pid"] = static_cast<int64_t>(getpid());
  out["now_s"] = rec.now();           // the records' clock at the time of writing
  out["clock_epoch_s"] = t0;          // wall clock (Unix seconds) of that clock's 0
  out["calls_total"] = rec.total();
  out["records"] = std::move(records);
  return out;
}

HangWatchdog::HangWatchdog(FlightRecorder& rec, WatchdogOptions opts) : rec_(rec), o_(std::move(opts)) {
  std::filesystem::create_directories(o_.dump_dir);
  thread_ = std::thread([this] { loop(); });
}

HangWatchdog::~HangWatchdog() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void HangWatchdog::set_expected(double seconds) {
  double cur = expected_.load();
  while (seconds > cur && !expected_.compare_exchange_weak(cur, seconds)) {
  }
}

double HangWatchdog::bound_s() const { return std::max(o_.floor_s, o_.factor * expected_.load()); }

void HangWatchdog::loop() {
  const std::string marker = o_.dump_dir + "/HANG";
  std::unique_lock<std::mutex> lock(mu_);
  while (!stop_) {
    cv_.wait_for(lock, std::chrono::duration<double>(o_.poll_s));
    if (stop_ || fired_) break;
    std::string reason;
    if (auto r = rec_.oldest_in_flight()) {
      const double pending = rec_.now() - r->start_s;
      if (pending > bound_s()) {
        char buf[512];
        std::snprintf(buf, sizeof buf, "%s #%llu (%s, %zu bytes) pending %.1f s > the bound %.1f s", r->comm.c_str(),
                      static_cast<unsigned long long>(r->seq), collective_op_name(r->op), r->bytes, pending, bound_s());
        reason = buf;
      }
    }
    if (reason.empty() && std::filesystem::exists(marker)) reason = "another rank declared a hang (" + marker + ")";
    if (reason.empty()) continue;
    lock.unlock();
    fire(reason);
    lock.lock();
  }
}

void HangWatchdog::fire(const std::string& reason) {
  fired_ = true;
  const std::string marker = o_.dump_dir + "/HANG";
  // The first rank to declare a hang leaves the marker that makes the others write their records.
  if (int fd = ::open(marker.c_str(), O_CREAT | O_EXCL | O_WRONLY, 0644); fd >= 0) {
    const std::string who = "world rank " + std::to_string(o_.world_rank) + ": " + reason + "\n";
    (void)!::write(fd, who.data(), who.size());
    ::close(fd);
  }
  nlohmann::json event = {{"event", "hang"}, {"world_rank", o_.world_rank}, {"reason", reason},
                          {"bound_s", bound_s()}, {"dump_dir", o_.dump_dir}};
  if (o_.on_hang) o_.on_hang(event);
  const std::string path = o_.dump_dir + "/rank" + std::to_string(o_.world_rank) + ".json";
  try {
    io::atomic_write_bytes(path, flight_record_json(rec_, o_.identity, reason).dump(1) + "\n");
  } catch (const std::exception& e) {
    std::cerr << "opdlm: watchdog: cannot write " << path << ": " << e.what() << std::endl;
  }
  OPDLM_LOG(error) << "hang watchdog: " << reason << "; flight record written to " << path << "; "
                   << (o_.exit_code < 0 ? std::string("exit disabled")
                                        : "exiting with code " + std::to_string(o_.exit_code) + " in " +
                                              std::to_string(o_.grace_s) + " s")
                   << " (merge the records: opdlm flight " << o_.dump_dir << ")";
  std::cerr.flush();
  if (o_.exit_code < 0) return;
  std::this_thread::sleep_for(std::chrono::duration<double>(o_.grace_s));
  std::fflush(nullptr);
  std::_Exit(o_.exit_code);
}

}  // namespace opdlm::parallel
