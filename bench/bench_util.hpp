// Helpers shared by the MPI benches.
#pragma once

#include <mpi.h>

#include <chrono>
#include <memory>
#include <thread>

#include "opdlm/base/log.hpp"
#include "opdlm/parallel/communicator.hpp"

namespace opdlm::bench {

// Waits for the world without spinning: idle ranks must not steal the cores of the measured group.
inline void sleepy_barrier() {
  MPI_Request req;
  MPI_Ibarrier(MPI_COMM_WORLD, &req);
  for (int done = 0; !done;) {
    MPI_Test(&req, &done, MPI_STATUS_IGNORE);
    if (!done) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
}

// Starts MPI and quiet rank-tagged logging (warnings and errors only); returns MPI_COMM_WORLD.
inline std::shared_ptr<parallel::MpiCommunicator> start_mpi_bench() {
  parallel::MpiRuntime::ensure_initialized();
  auto world = parallel::MpiCommunicator::world();
  LogOptions lo;
  lo.rank = world->rank();
  lo.min_severity = Severity::warning;
  init_logging(lo);
  return world;
}

}  // namespace opdlm::bench
