// Graceful stops (docs/fault_tolerance.md): SIGTERM, SIGUSR1 and SIGINT only set a flag that the
// trainer polls at RL-step boundaries (where all ranks agree, checkpoint and exit with the requeue
// code); a second SIGINT ends the process at once (exit 130). Async-signal-safe: the handler touches
// one lock-free atomic and, for the second SIGINT, calls _exit.
#pragma once

namespace opdlm {

// The exit code of a run that stopped on a signal or at its time limit after committing a checkpoint:
// "requeue me" (EX_TEMPFAIL), distinct from success (0), errors (1) and usage errors (2).
inline constexpr int kExitRequeue = 75;
// The exit code of a rank the hang watchdog ended (parallel/watchdog.hpp): a collective stayed pending
// far longer than a step takes; the per-rank flight records were written for `opdlm flight`.
inline constexpr int kExitHang = 88;

// Installs the handlers (idempotent). The CLI does this before training.
void install_stop_handlers();
// The first stop signal this process received (0: none).
int stop_signal();
// Clears the flag (tests).
void reset_stop_signal();

}  // namespace opdlm
