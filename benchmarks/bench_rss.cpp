// bench_rss — peak memory of the kvcache-generate program against what it
// must hold: the weights and the KV cache.
//
//   BM_GenerateRss/MODEL   runs kvcache-generate (built beside this program)
//                          once on a checkpoint of that shape with seeded
//                          random weights (bench_checkpoints.hpp): greedy,
//                          all max_seq_len positions, 2 threads, --stats
//
// Counters:
//   peak_rss_bytes   the child's ru_maxrss (wait4), in bytes
//   weight_bytes     the parameters' bytes (bench_work.hpp's count)
//   kv_bytes         what the program's --stats line reports
//   ratio            peak_rss_bytes / (weight_bytes + kv_bytes)
//   excess_MB        (peak_rss_bytes − weight_bytes − kv_bytes) / 10⁶
// The wall time is the whole run: loading, prefill, decoding, exit.

#include <sys/resource.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include <benchmark/benchmark.h>

#include "bench_checkpoints.hpp"
#include "bench_work.hpp"

#ifndef KVCACHE_GENERATE_EXE
#error "KVCACHE_GENERATE_EXE must name the kvcache-generate program"
#endif

namespace {

constexpr const char* kThreads = "2";

struct ChildRun {
  std::string stderr_text;
  long max_rss_kib = 0;  // Linux reports ru_maxrss in KiB
};

[[noreturn]] void fail_errno(const std::string& what) {
  throw std::runtime_error("bench_rss: " + what + ": " + std::strerror(errno));
}

// Runs argv[0] with stdout discarded and stderr captured; throws unless it
// exits with status 0.
ChildRun run_child(const std::vector<std::string>& args) {
  int err[2];
  if (pipe(err) != 0) fail_errno("pipe");
  const pid_t pid = fork();
  if (pid < 0) fail_errno("fork");
  if (pid == 0) {
    const int null = open("/dev/null", O_WRONLY);
    if (null >= 0) dup2(null, STDOUT_FILENO);
    dup2(err[1], STDERR_FILENO);
    close(err[0]);
    close(err[1]);
    std::vector<char*> argv;
    for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    execv(argv[0], argv.data());
    _exit(127);
  }
  close(err[1]);
  ChildRun run;
  char buffer[4096];
  for (ssize_t got; (got = read(err[0], buffer, sizeof buffer)) != 0;) {
    if (got < 0) {
      if (errno == EINTR) continue;
      fail_errno("read");
    }
    run.stderr_text.append(buffer, static_cast<std::size_t>(got));
  }
  close(err[0]);
  int status = 0;
  rusage usage{};
  while (wait4(pid, &status, 0, &usage) < 0)
    if (errno != EINTR) fail_errno("wait4");
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
    throw std::runtime_error("bench_rss: " + args[0] + " failed (status " + std::to_string(status) +
                             "): " + run.stderr_text);
  run.max_rss_kib = usage.ru_maxrss;
  return run;
}

// The value of `key=` in kvcache-generate's --stats line.
double stats_value(const std::string& text, const std::string& key) {
  const std::size_t at = text.find(" " + key + "=");
  if (at == std::string::npos)
    throw std::runtime_error("bench_rss: no " + key + "= in kvcache-generate's output: " + text);
  return std::stod(text.substr(at + key.size() + 2));
}

void BM_GenerateRss(benchmark::State& state, const std::string& name) {
  const kvcache_bench::ModelShape shape = kvcache_bench::stories_shape(name);
  const std::string checkpoint = kvcache_bench::write_checkpoint(shape);
  const std::vector<std::string> args = {KVCACHE_GENERATE_EXE, checkpoint, "--prompt-ids", "1", "--ids",
                                         "--ignore-eos", "-n", "0", "-t", "0", "--threads", kThreads, "--stats"};
  ChildRun run;
  for (auto _ : state) run = run_child(args);

  const double peak = static_cast<double>(run.max_rss_kib) * 1024.0;
  const double weights = kvcache_bench::parameter_count(shape.config) * sizeof(float);
  const double kv = stats_value(run.stderr_text, "kv_bytes");
  state.counters["peak_rss_bytes"] = peak;
  state.counters["weight_bytes"] = weights;
  state.counters["kv_bytes"] = kv;
  state.counters["ratio"] = peak / (weights + kv);
  state.counters["excess_MB"] = (peak - weights - kv) * 1e-6;
  state.counters["decode_tok_s"] = stats_value(run.stderr_text, "decode_tok_s");
}

[[maybe_unused]] const bool registered = [] {
  for (const auto& shape : kvcache_bench::stories_shapes())
    benchmark::RegisterBenchmark(("BM_GenerateRss/" + shape.name).c_str(), BM_GenerateRss, shape.name)
        ->Iterations(1)
        ->Unit(benchmark::kMillisecond)
        ->UseRealTime();
  return true;
}();

}  // namespace
