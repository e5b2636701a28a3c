// Stop-signal handlers: a flag for the trainer, an immediate exit on a second SIGINT.
#include "opdlm/base/stop.hpp"

#include <unistd.h>

#include <atomic>
#include <csignal>

namespace opdlm {

namespace {
std::atomic<int> g_signal{0};
std::atomic<bool> g_sigint_seen{false};
static_assert(std::atomic<int>::is_always_lock_free && std::atomic<bool>::is_always_lock_free,
              "the signal flags must be lock-free");

extern "C" void on_stop_signal(int sig) {
  if (sig == SIGINT && g_sigint_seen.exchange(true)) _exit(130);  // the second ^C: stop at once
  int none = 0;
  g_signal.compare_exchange_strong(none, sig);
}
}  // namespace

void install_stop_handlers() {
  struct sigaction sa {};
  sa.sa_handler = on_stop_signal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;  // MPI and file I/O calls resume; the flag is polled between steps
  for (int sig : {SIGTERM, SIGUSR1, SIGINT}) sigaction(sig, &sa, nullptr);
}

int stop_signal() { return g_signal.load(); }

void reset_stop_signal() {
  g_signal.store(0);
  g_sigint_seen.store(false);
}

}  // namespace opdlm
