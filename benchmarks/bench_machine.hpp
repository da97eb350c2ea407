// bench_machine.hpp — what this machine can do, measured in the same process
// as the benchmarks that are compared with it: the rate at which memory is
// read and the rate at which Eigen multiplies matrices. Both are noisy on a
// shared machine, so a benchmark measures them again right before it runs
// instead of trusting a figure taken minutes earlier.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstddef>

#include <Eigen/Core>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace kvcache_bench {

using Clock = std::chrono::steady_clock;

inline double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// ============================================================================
// Memory read bandwidth
// ============================================================================

// 256 MB of floats, 8× the 32 MB L3 of this machine, so that a pass reads
// DRAM. Allocated and touched once per process.
constexpr std::size_t kReadBufferFloats = std::size_t{64} << 20;

inline const Eigen::VectorXf& read_buffer() {
  static const Eigen::VectorXf buffer = Eigen::VectorXf::Constant(static_cast<Eigen::Index>(kReadBufferFloats), 1.0f);
  return buffer;
}

// One pass summing the buffer, split into `threads` contiguous slices (one
// per OpenMP thread). Eigen's sum() keeps several vector accumulators, so a
// core is limited by memory, not by the latency of a chain of additions.
inline float sum_buffer(std::size_t threads) {
  const Eigen::VectorXf& buffer = read_buffer();
  const auto n = static_cast<std::ptrdiff_t>(buffer.size());
  float total = 0.0f;
#ifdef _OPENMP
#pragma omp parallel num_threads(static_cast<int>(threads)) reduction(+ : total)
  {
    const std::ptrdiff_t t = omp_get_thread_num(), nt = omp_get_num_threads();
    const std::ptrdiff_t begin = n * t / nt, end = n * (t + 1) / nt;
    total += buffer.segment(begin, end - begin).sum();
  }
#else
  (void)threads;
  total = buffer.segment(0, n).sum();
#endif
  return total;
}

// Bytes per second of the fastest of `passes` passes (the best pass is the
// one least disturbed by other processes).
inline double read_bandwidth(std::size_t threads, int passes = 5) {
  read_buffer();  // allocate and touch outside the timing
  double best = 0.0;
  volatile float sink = 0.0f;
  for (int i = 0; i < passes; ++i) {
    const Clock::time_point start = Clock::now();
    sink = sink + sum_buffer(threads);
    best = std::max(best, static_cast<double>(kReadBufferFloats * sizeof(float)) / seconds_since(start));
  }
  return best;
}

// ============================================================================
// Matrix-multiply rate
// ============================================================================

// FLOPs per second (a multiply-add counts 2) of the fastest of `reps` Eigen
// products C = A·B of 512 × 512 float matrices on one thread: the rate the
// library's prefill and uncached forward passes can reach at best, since they
// run the same Eigen GEMM on one thread per slice.
inline double gemm_flops(int reps = 10) {
  constexpr Eigen::Index n = 512;
  static const Eigen::MatrixXf A = Eigen::MatrixXf::Random(n, n);
  static const Eigen::MatrixXf B = Eigen::MatrixXf::Random(n, n);
  static Eigen::MatrixXf C(n, n);
  double best = 0.0;
  for (int i = 0; i < reps; ++i) {
    const Clock::time_point start = Clock::now();
    C.noalias() = A * B;
    best = std::max(best, 2.0 * n * n * n / seconds_since(start));
  }
  volatile float sink = C(0, 0);
  (void)sink;
  return best;
}

// The two rates a time prediction is made from.
struct Peaks {
  double flops_per_second = 0.0;
  double bytes_per_second = 0.0;
};

inline Peaks measure_peaks(std::size_t threads = 1) {
  Peaks p;
  p.flops_per_second = gemm_flops();
  p.bytes_per_second = read_bandwidth(threads);
  return p;
}

}  // namespace kvcache_bench
