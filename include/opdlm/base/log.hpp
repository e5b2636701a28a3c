// Human-readable logging through Boost.Log, set up once per process: time, severity, rank tag.
// Machine-readable metrics go to JSONL elsewhere (train/metrics); this is for people.
#pragma once

#include <boost/log/sources/severity_logger.hpp>
#include <boost/log/sources/record_ostream.hpp>
#include <boost/log/trivial.hpp>
#include <string>

namespace opdlm {

using Severity = boost::log::trivial::severity_level;

struct LogOptions {
  int rank = 0;
  Severity min_severity = Severity::info;
  // Ranks other than 0 log only warnings and above unless this is set (keeps 64-rank logs readable).
  bool all_ranks_verbose = false;
  std::string file;  // also append to this file when non-empty
};

// Idempotent: a second call replaces the sinks (used by tests and after MPI_Init gives the rank).
void init_logging(const LogOptions& opts);
Severity parse_severity(const std::string& name);  // trace|debug|info|warning|error|fatal
boost::log::sources::severity_logger_mt<Severity>& logger();

}  // namespace opdlm

#define OPDLM_LOG(sev) BOOST_LOG_SEV(::opdlm::logger(), ::boost::log::trivial::sev)
