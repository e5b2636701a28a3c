// bench_ckpt: checkpoint save and load throughput against the disk, measured in the same run. The
// save is the trainer's own (save_run_checkpoint: shard file of parameters + AdamW moments, state
// file, fsync, manifest with sha256, rename, LATEST); the baseline is `dd if=/dev/zero bs=1M
// conv=fsync` of the same number of bytes. The load (verify: sizes, sha256 and CRC32C of every
// dataset; then read, reassemble and reshard) is timed with the files dropped from the page cache
// (posix_fadvise DONTNEED after fsync), against a cold `dd` read of a file of the same size.
// Five rounds; medians. Run: build/bench/opdlm_bench_ckpt [hidden] [layers] [dir]
//   (default hidden 512, 8 layers: 33.6M parameters, 0.40 GB with the AdamW moments; ~30 s)
#include <fcntl.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <algorithm>
#include <filesystem>
#include <vector>
#include <string>

#include "opdlm/base/log.hpp"
#include "opdlm/io/checkpoint.hpp"
#include "opdlm/model/qwen3.hpp"
#include "opdlm/parallel/communicator.hpp"
#include "opdlm/parallel/zero1.hpp"
#include "opdlm/train/opd_checkpoint.hpp"

using namespace opdlm;
namespace fs = std::filesystem;

namespace {

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

// Drops a file's pages from the cache (they are clean after fsync), so the next read is cold.
void drop_cache(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) return;
  ::fdatasync(fd);
  ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
  ::close(fd);
}

double run(const std::string& cmd) {
  const double t0 = now();
  if (std::system(cmd.c_str()) != 0) {
    std::fprintf(stderr, "bench_ckpt: '%s' failed\n", cmd.c_str());
    std::exit(1);
  }
  return now() - t0;
}

}  // namespace

int main(int argc, char** argv) {
  parallel::MpiRuntime::ensure_initialized();
  LogOptions lo;
  lo.min_severity = Severity::warning;
  init_logging(lo);
  const int64_t hidden = argc > 1 ? std::atoll(argv[1]) : 512, layers = argc > 2 ? std::atoll(argv[2]) : 8;
  const std::string dir = argc > 3 ? argv[3] : "/tmp/opdlm_bench_ckpt";
  fs::remove_all(dir);
  fs::create_directories(dir);

  model::Qwen3Config c;
  c.vocab_size = 8192;
  c.hidden_size = hidden;
  c.intermediate_size = 3 * hidden;
  c.num_hidden_layers = layers;
  c.num_attention_heads = 8;
  c.num_key_value_heads = 4;
  c.head_dim = hidden / 8;
  c.tie_word_embeddings = false;
  model::Qwen3Weights w(c);
  w.init_random(1, 0.02);
  model::Qwen3Model student(std::move(w), true);
  std::vector<Tensor*> params;
  std::vector<bool> no_decay;
  for (auto& t : student.weights().tensors()) params.push_back(&t.value), no_decay.push_back(t.value.ndim() < 2);
  parallel::LocalCommunicator dp, tp;
  parallel::ShardedAdamW opt(params, no_decay, dp);
  std::vector<std::vector<float>> m, v;
  opt.gather_moments(m, v);
  for (auto& x : m) for (auto& e : x) e = 1e-3f;
  for (auto& x : v) for (auto& e : x) e = 1e-6f;
  opt.set_moments(m, v);
  train::RunState st;
  st.meta = {{"run_id", "bench"}, {"mode", "opd"}, {"metrics_offset", 0}, {"layout", {{"tp", 1}, {"dp", 1}}}};
  const train::CkptGrid g{tp, dp, 0};
  const std::string root = dir + "/checkpoints";

  // ---- five rounds of (save, dd write, cold verify, cold load, cold dd read); medians reported, as
  // this VM's disk varies by 2x from one second to the next ----
  std::vector<double> save_t, ddw_t, verify_t, load_t, ddr_t;
  uintmax_t bytes = 0;
  std::string ck;
  for (int round = 1; round <= 5; ++round) {
    double t0 = now();
    train::save_run_checkpoint(root, round, 10, g, student, std::nullopt, opt, st);
    save_t.push_back(now() - t0);
    ck = root + "/" + io::checkpoint_dir_name(round);
    bytes = 0;
    for (const auto& e : fs::directory_iterator(ck)) bytes += fs::file_size(e.path());
    const uint64_t mib = (bytes + (1u << 20) - 1) >> 20;
    ddw_t.push_back(run("dd if=/dev/zero of=" + dir + "/dd.bin bs=1M count=" + std::to_string(mib) +
                        " conv=fsync status=none"));
    for (const auto& e : fs::directory_iterator(ck)) drop_cache(e.path().string());
    t0 = now();
    io::verify_checkpoint(ck);
    verify_t.push_back(now() - t0);
    for (const auto& e : fs::directory_iterator(ck)) drop_cache(e.path().string());
    t0 = now();
    (void)train::read_run_state(ck);
    train::load_run_tensors(ck, student, std::nullopt, 0, opt);
    load_t.push_back(now() - t0);
    drop_cache(dir + "/dd.bin");
    ddr_t.push_back(run("dd if=" + dir + "/dd.bin of=/dev/null bs=1M status=none"));
  }
  auto median = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  };
  const double save_s = median(save_t), dd_write_s = median(ddw_t), verify_s = median(verify_t),
               load_s = median(load_t), dd_read_s = median(ddr_t);
  const double gb = double(bytes) / 1e9;
  std::printf("checkpoint of %lld parameters (params + AdamW m, v): %.3f GB in %s\n", (long long)c.num_params(), gb,
              ck.c_str());
  std::printf("%-34s %8s %10s %12s   (medians of 5 rounds)\n", "", "seconds", "GB/s", "vs disk");
  std::printf("%-34s %8.3f %10.3f %12s\n", "dd write, conv=fsync (baseline)", dd_write_s, gb / dd_write_s, "1.00");
  std::printf("%-34s %8.3f %10.3f %12.2f\n", "save_run_checkpoint (commit)", save_s, gb / save_s, dd_write_s / save_s);
  std::printf("%-34s %8.3f %10.3f %12s\n", "dd read, cold (baseline)", dd_read_s, gb / dd_read_s, "1.00");
  std::printf("%-34s %8.3f %10.3f %12.2f\n", "verify_checkpoint, cold", verify_s, gb / verify_s, dd_read_s / verify_s);
  std::printf("%-34s %8.3f %10.3f %12.2f\n", "read state + load tensors, cold", load_s, gb / load_s, dd_read_s / load_s);
  fs::remove_all(dir);
  return 0;
}
