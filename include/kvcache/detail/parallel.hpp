// kvcache/detail/parallel.hpp — the kernels that decide speed: linear layers
// split across threads by output features (several matrices in one parallel
// region when they read the same input), and static parallel loops.
// Not API.
//
// Two backends run the same split (the same Team ids and sizes, so the same
// slices and the same bits):
//   OpenMP (when compiled with it): one parallel region per call.
//   std::thread (without OpenMP, or with KVCACHE_THREADS_STD defined): each
//     calling thread keeps its own pool of helper threads, started when first
//     needed and joined when the calling thread ends; a region wakes them and
//     waits for them. ThreadSanitizer sees every synchronisation of this one
//     (Debian's libomp is not built for it), so .ci/run race-checks the
//     threads of a forward pass with it. (A child of fork() has no helpers:
//     it must not run a region with more than one thread.)
#pragma once

#include <algorithm>
#include <condition_variable>
#include <cstddef>
#include <memory>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#include <Eigen/Core>

#if defined(_OPENMP) && !defined(KVCACHE_THREADS_STD)
#define KVCACHE_DETAIL_OPENMP 1
#include <omp.h>
#endif

#include "../weights.hpp"
#include "gemv.hpp"
#include "quant.hpp"

namespace kvcache::detail {

// ============================================================================
// Threads
// ============================================================================

// A count that threads add to and wait for. Every use locks its mutex, so
// ThreadSanitizer sees the order it makes.
class Counter {
 public:
  // Returns the new count.
  std::size_t add() {
    std::lock_guard<std::mutex> lock(mutex_);
    reached_.notify_all();
    return ++count_;
  }
  void wait_for(std::size_t count) {
    std::unique_lock<std::mutex> lock(mutex_);
    reached_.wait(lock, [&] { return count_ >= count; });
  }

 private:
  std::mutex mutex_;
  std::condition_variable reached_;
  std::size_t count_ = 0;
};

#ifndef KVCACHE_DETAIL_OPENMP
// The helper threads of one calling thread. run(n, job) calls job(i) for i
// in [0, n), i = 0 on the caller and the others on helpers, and returns when
// all have returned. Allocates only when it needs more helpers than it has.
// Each helper is woken through a Counter of its own and reports to another,
// so the caller and the helpers share no lock while they run a job:
// ThreadSanitizer sees no order between two jobs of one region that the
// region's code does not make itself (a Team::barrier()).
class ThreadPool {
 public:
  ~ThreadPool() {
    job_ = nullptr;  // stops each helper once woken below
    for (auto& h : helpers_) h->wake.add();
    for (auto& h : helpers_) h->thread.join();
  }

  // False, having run nothing, when the helpers could not be started. job
  // must not throw (an exception that leaves it terminates the process).
  template <typename Job>
  bool run(std::size_t n, Job& job) {
    try {
      helpers_.reserve(n - 1);  // push_back below then cannot throw
      while (helpers_.size() + 1 < n) {
        auto h = std::make_unique<Helper>();
        h->thread = std::thread([this, helper = h.get(), id = helpers_.size() + 1] { work(*helper, id); });
        helpers_.push_back(std::move(h));
      }
    } catch (...) {  // std::system_error, std::bad_alloc
      return false;
    }
    job_ = [](void* context, std::size_t id) noexcept { (*static_cast<Job*>(context))(id); };
    context_ = &job;  // job_ and context_ are read by the helpers once woken
    for (std::size_t i = 0; i + 1 < n; ++i) helpers_[i]->wake.add();
    in_team = true;
    job(std::size_t{0});
    in_team = false;
    done_.wait_for(given_ += n - 1);
    return true;
  }

  // True on a thread that is running a region's job.
  static inline thread_local bool in_team = false;
  // The calling thread's pool.
  static ThreadPool& mine() {
    thread_local ThreadPool pool;
    return pool;
  }

 private:
  struct Helper {
    Counter wake;  // one more for each job, and one to stop (job_ null)
    std::thread thread;
  };

  void work(Helper& h, std::size_t id) {
    in_team = true;  // a region inside a job runs as a team of one
    for (std::size_t wakes = 1;; ++wakes) {
      h.wake.wait_for(wakes);
      if (job_ == nullptr) return;
      job_(context_, id);
      done_.add();
    }
  }

  std::vector<std::unique_ptr<Helper>> helpers_;
  void (*job_)(void*, std::size_t) noexcept = nullptr;
  void* context_ = nullptr;
  Counter done_;           // jobs the helpers have finished
  std::size_t given_ = 0;  // jobs the helpers have been given
};
#endif

// The threads of one parallel region, as seen by one of them: thread `id`
// of `size`.
struct Team {
  std::size_t id, size;
  Counter* arrivals = nullptr;  // std::thread backend: the barrier's count

  // This thread's contiguous part [first, second) of [0, n). Parts start at
  // multiples of `align` (16 floats: a cache line), so threads never write
  // the same line, and are as even as that allows.
  std::pair<std::size_t, std::size_t> slice(std::size_t n, std::size_t align) const {
    const std::size_t blocks = (n + align - 1) / align;
    return {std::min(n, blocks * id / size * align), std::min(n, blocks * (id + 1) / size * align)};
  }

  // Every thread of the team waits here until all have arrived.
  void barrier() const {
    if (size < 2) return;
#ifdef KVCACHE_DETAIL_OPENMP
#pragma omp barrier
#else
    // Arrivals k·size + 1 to (k + 1)·size are those at the team's k-th barrier.
    const std::size_t arrival = arrivals->add();
    arrivals->wait_for((arrival + size - 1) / size * size);
#endif
  }
};

// Runs body(team) on `threads` threads at once (one OpenMP parallel region,
// or the calling thread and threads-1 helpers of its pool); when already
// inside a region, or when threads cannot be started, on the calling thread
// alone as a team of one. body must not throw (an exception that leaves it
// terminates the process), and must reach every barrier() on every thread.
template <typename Body>
void parallel_team(std::size_t threads, Body&& body) {
#ifdef KVCACHE_DETAIL_OPENMP
  if (threads > 1 && !omp_in_parallel()) {
#pragma omp parallel num_threads(static_cast<int>(threads))
    body(Team{static_cast<std::size_t>(omp_get_thread_num()), static_cast<std::size_t>(omp_get_num_threads())});
    return;
  }
#else
  if (threads > 1 && !ThreadPool::in_team) {
    Counter arrivals;
    auto job = [&](std::size_t id) { body(Team{id, threads, &arrivals}); };
    if (ThreadPool::mine().run(threads, job)) return;
  }
#endif
  body(Team{0, 1});
}

// Threads worth starting for n items handed out `align` at a time: no more
// than there are blocks, at least 1.
inline std::size_t team_size(std::size_t threads, std::size_t n, std::size_t align) {
  return std::max<std::size_t>(1, std::min(threads, n / std::max<std::size_t>(align, 1)));
}

// Calls body(begin, end, slot) on up to `threads` contiguous slices of [0, n),
// in parallel; slot in [0, threads) numbers the slice, for per-thread
// scratch. Slices start at multiples of `align` so that each thread's rows
// begin on a cache line. body must not throw.
template <typename Body>
void parallel_slices(std::size_t n, std::size_t threads, std::size_t align, Body&& body) {
  parallel_team(team_size(threads, n, align), [&](const Team& team) {
    const auto [begin, end] = team.slice(n, align);
    if (begin < end) body(begin, end, team.id);
  });
}

// ============================================================================
// Linear layers
// ============================================================================

// Y[:, begin:end] = X · W[begin:end, :]ᵀ (+ b[begin:end]): output features
// [begin, end) of Y = X·Wᵀ + b, for the m rows (tokens) of X (m × in).
// Y is m × out, sized by the caller.
//   m < kFewTokens, or kFewTokensF32 for W as f32 (decode, a batch of
//   sessions decoding, a short chunk):
//     the decode kernel (gemv.hpp), up to kGemvBatch tokens at once with
//     each packet of W multiplied with all of them in registers; more
//     tokens pass over tiles of W that stay in the core's L1 cache, so W
//     is read from memory once. Each Y[t, i] is computed exactly as for
//     token t alone: batched decode gives the bits of single decode.
//     Allocates nothing.
//   more tokens, W as T (prefill): Eigen's matrix-matrix product on those
//     rows, which packs W once per call and then runs at the multiply rate.
//   more tokens, W as bfloat16: tiles of rows widened to T (128 KB, in the
//     core's L2 cache), each multiplied by Eigen. W is read from memory once.
//   W as f16, q8_0 or q4_0, or bf16 over a GGUF file (external()), any number of
//     tokens: quant.hpp, as llama.cpp computes.
// (kFewTokens, and the tiles' sizes: measured with bench_batch and
// bench_decode on a 2-core AMD EPYC.) W as f32 keeps the decode kernel up to
// kFewTokensF32: passes of 8 tokens over L1 tiles of W take 64 µs for 16
// tokens of a 768 × 288 matrix and 3.4 ms of the 32000 × 288 classifier,
// Eigen's product 73 µs and 4.9 ms; at 24 tokens they are even, and
// Eigen is faster from 32 (2-core Intel Xeon, AVX-512). Batch 16 went
// from 4.0× to 6.7× batch 1 (bench_batch, one thread).
constexpr Eigen::Index kFewTokens = 16;
constexpr Eigen::Index kFewTokensF32 = 24;

template <typename T>
void linear_rows(const Eigen::Ref<const Matrix<T>>& X, const WeightMatrix<T>& W, const Vector<T>& b, Matrix<T>& Y,
                 Eigen::Index begin, Eigen::Index end) {
  if (begin >= end) return;
  const Eigen::Index m = X.rows(), in = X.cols(), n = end - begin;
  const bool f32 = W.type() == WeightType::f32;
  if (W.type() == WeightType::f16 || W.type() == WeightType::q8_0 || W.type() == WeightType::q4_0 ||
      (W.type() == WeightType::bf16 && W.external())) {
    quant_linear_rows<kGemvTokens, T>(X, W, Y, begin, end, kFewTokens);
  } else if (m < (f32 ? kFewTokensF32 : kFewTokens)) {
    // W as T and up to kGemvBatch tokens: one pass over the rows. More
    // tokens, or bfloat16 (whose kernel takes one token at a time): tiles of
    // about 16 KB of weights, which stay in a core's L1 data cache while
    // every group of tokens passes over them; a multiple of 12 rows, so that
    // the kernel's blocks of 2, 3 or 4 rows (gemv_block_rows) fill them.
    const auto row_size = static_cast<Eigen::Index>(row_bytes<T>(W.type(), static_cast<std::size_t>(in)));
    const Eigen::Index tile = m == 1 || (f32 && m <= kGemvBatch)
                                  ? n
                                  : std::max<Eigen::Index>(12, (16 << 10) / std::max<Eigen::Index>(1, row_size) / 12 * 12);
    const auto decode = [&](const auto* w) {  // W's values as stored: T or bfloat16
      for (Eigen::Index r = begin; r < end; r += tile) {
        const Eigen::Index r_end = std::min(end, r + tile);
        // kGemvBatch tokens per pass over the tile, then the rest.
        for (Eigen::Index t = 0; t < m; t += kGemvBatch) {
          const int count = static_cast<int>(std::min<Eigen::Index>(kGemvBatch, m - t));
          const T* x[kGemvBatch];
          T* y[kGemvBatch];
          for (int k = 0; k < count; ++k) x[k] = X.row(t + k).data(), y[k] = Y.row(t + k).data();
          gemv_rows_upto(count, w, in, x, y, r, r_end);
        }
      }
    };
    if (f32)
      decode(W.f32().data());
    else
      decode(W.bf16().data());
  } else if (f32) {
    Y.middleCols(begin, n).noalias() = X * W.f32().middleRows(begin, n).transpose();
  } else {
    const Eigen::Index tile = std::min(n, std::max<Eigen::Index>(16, (128 << 10) / (in * Eigen::Index{sizeof(T)})));
    Matrix<T> widened(tile, in);
    for (Eigen::Index r = begin; r < end; r += tile) {
      const Eigen::Index rows = std::min(tile, end - r);
      for (Eigen::Index i = 0; i < rows; ++i) W.row_to(r + i, widened.row(i).data());
      Y.middleCols(r, rows).noalias() = X * widened.topRows(rows).transpose();
    }
  }
  if (b.size() != 0) Y.middleCols(begin, n).rowwise() += b.segment(begin, n).transpose();
}

// One product of a fused linear: Y = X·Wᵀ + b (b empty: none).
template <typename T>
struct LinearTerm {
  const WeightMatrix<T>& W;
  const Vector<T>& b;
  Matrix<T>& Y;
};

// Y_k = X · W_kᵀ + b_k for every term k (b_k empty: none), in one parallel
// region; one term is a plain linear layer: linear<T>(X, {{W, b, Y}}, threads).
//   X: m × in (a row per token), W_k: out_k × in, Y_k: m × out_k, already
//   sized by the caller so that this never allocates.
// The output features of all the terms, side by side, are split across the
// threads together (as if the W_k were stacked into one matrix), so a decode
// step starts and joins the threads once, not once per matrix; each W_k is
// read once in total and the threads never write the same memory.
template <typename T, std::size_t N>
void linear(const Eigen::Ref<const Matrix<T>>& X, const LinearTerm<T> (&terms)[N], std::size_t threads) {
  Eigen::Index total = 0;
  for (const auto& term : terms) total += term.W.rows();
  parallel_slices(static_cast<std::size_t>(total), threads, 16, [&](std::size_t begin, std::size_t end, std::size_t) {
    // The slice's rows of each term: rows [begin, end) of all the terms,
    // less where the term starts (none when the range is empty).
    Eigen::Index first = 0;  // where the current term's rows start
    for (const auto& term : terms) {
      linear_rows<T>(X, term.W, term.b, term.Y, std::max(static_cast<Eigen::Index>(begin) - first, Eigen::Index{0}),
                     std::min(static_cast<Eigen::Index>(end) - first, term.W.rows()));
      first += term.W.rows();
    }
  });
}

}  // namespace kvcache::detail
