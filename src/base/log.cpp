// Boost.Log sinks for opdlm: one console sink (stderr) and an optional file sink, rank-tagged.
#include "opdlm/base/log.hpp"

#include <boost/core/null_deleter.hpp>
#include <boost/log/attributes/constant.hpp>
#include <boost/log/core.hpp>
#include <boost/log/expressions.hpp>
#include <boost/log/sinks/sync_frontend.hpp>
#include <boost/log/sinks/text_ostream_backend.hpp>
#include <boost/log/support/date_time.hpp>
#include <boost/log/utility/setup/common_attributes.hpp>
#include <boost/shared_ptr.hpp>
#include <boost/make_shared.hpp>
#include <fstream>
#include <iostream>
#include <mutex>

#include "opdlm/base/error.hpp"

namespace opdlm {

namespace logging = boost::log;
namespace expr = boost::log::expressions;
namespace sinks = boost::log::sinks;

BOOST_LOG_ATTRIBUTE_KEYWORD(rank_attr, "Rank", int)

boost::log::sources::severity_logger_mt<Severity>& logger() {
  static boost::log::sources::severity_logger_mt<Severity> lg;
  return lg;
}

Severity parse_severity(const std::string& name) {
  static const char* names[] = {"trace", "debug", "info", "warning", "error", "fatal"};
  for (int i = 0; i < 6; ++i)
    if (name == names[i]) return static_cast<Severity>(i);
  OPDLM_FAIL_AT("", "log.level", "unknown log level '", name, "' (trace|debug|info|warning|error|fatal)");
}

void init_logging(const LogOptions& opts) {
  static std::mutex mu;
  std::lock_guard<std::mutex> lock(mu);
  auto core = logging::core::get();
  core->remove_all_sinks();
  static bool common_added = false;
  if (!common_added) {
    logging::add_common_attributes();
    common_added = true;
  }
  auto attrs = core->get_global_attributes();
  attrs.erase("Rank");
  attrs.insert("Rank", logging::attributes::constant<int>(opts.rank));
  core->set_global_attributes(attrs);

  using backend_t = sinks::text_ostream_backend;
  auto backend = boost::make_shared<backend_t>();
  backend->add_stream(boost::shared_ptr<std::ostream>(&std::clog, boost::null_deleter()));
  if (!opts.file.empty()) {
    auto f = boost::make_shared<std::ofstream>(opts.file, std::ios::app);
    if (!*f) OPDLM_FAIL_AT(opts.file, "log.file", "cannot open log file for appending");
    backend->add_stream(f);
  }
  backend->auto_flush(true);
  auto sink = boost::make_shared<sinks::synchronous_sink<backend_t>>(backend);
  sink->set_formatter(expr::stream
                      << expr::format_date_time<boost::posix_time::ptime>("TimeStamp", "%Y-%m-%d %H:%M:%S.%f")
                      << " [" << logging::trivial::severity << "] [rank " << rank_attr << "] "
                      << expr::smessage);
  const Severity floor = (opts.rank == 0 || opts.all_ranks_verbose)
                             ? opts.min_severity
                             : std::max(opts.min_severity, Severity::warning);
  sink->set_filter(logging::trivial::severity >= floor);
  core->add_sink(sink);
}

}  // namespace opdlm
