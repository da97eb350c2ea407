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
#include <array>
#include <cstddef>
#include <cstdint>
#include <utility>

#include <Eigen/Core>

#if defined(_OPENMP) && !defined(KVCACHE_THREADS_STD)
#define KVCACHE_DETAIL_OPENMP 1
#include <omp.h>
#else
#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>
#endif

#include "../config.hpp"
#include "../weights.hpp"
#include "gemv.hpp"
#include "quant.hpp"

namespace kvcache {
namespace detail {

// ============================================================================
// Threads
// ============================================================================

#ifndef KVCACHE_DETAIL_OPENMP
// Holds `size` threads until all have arrived; reusable.
class Barrier {
 public:
  explicit Barrier(std::size_t size) : size_(size) {}
  void arrive_and_wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    const std::size_t round = round_;
    if (++arrived_ == size_) {
      arrived_ = 0;
      ++round_;
      all_arrived_.notify_all();
      return;
    }
    all_arrived_.wait(lock, [&] { return round_ != round; });
  }

 private:
  std::mutex mutex_;
  std::condition_variable all_arrived_;
  std::size_t size_, arrived_ = 0, round_ = 0;
};

// The helper threads of one calling thread. run(n, job, context) calls
// job(context, i) for i in [0, n), i = 0 on the caller and the others on
// helpers, and returns when all have returned. Allocates only when it needs
// more helpers than it has. Each helper sleeps on its own lock, and the
// caller and the helpers share no lock while they run a job, so
// ThreadSanitizer sees no order between two jobs of one region that the
// region's code does not make itself (a Team::barrier()).
class ThreadPool {
 public:
  using Job = void (*)(void*, std::size_t) noexcept;
  ~ThreadPool() {
    for (auto& h : helpers_) {
      h->wake(true);
      h->thread.join();
    }
  }

  // False, having run nothing, when the helpers could not be started.
  bool run(std::size_t n, Job job, void* context) {
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
    job_ = job;
    context_ = context;
    pending_ = n - 1;  // no helper runs until it is woken below
    for (std::size_t i = 0; i + 1 < n; ++i) helpers_[i]->wake(false);
    in_team = true;
    job(context, 0);
    in_team = false;
    std::unique_lock<std::mutex> lock(done_mutex_);
    done_.wait(lock, [&] { return pending_ == 0; });
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
    std::mutex mutex;
    std::condition_variable woken;
    std::size_t round = 0;
    bool stop = false;
    std::thread thread;
    void wake(bool stop_now) {
      {
        std::lock_guard<std::mutex> lock(mutex);
        ++round;
        stop = stop_now;
      }
      woken.notify_one();
    }
  };

  void work(Helper& h, std::size_t id) {
    in_team = true;  // a region inside a job runs as a team of one
    for (std::size_t seen = 0;; ++seen) {
      {
        std::unique_lock<std::mutex> lock(h.mutex);
        h.woken.wait(lock, [&] { return h.round != seen; });
        if (h.stop) return;
      }
      job_(context_, id);
      std::lock_guard<std::mutex> lock(done_mutex_);
      if (--pending_ == 0) done_.notify_one();
    }
  }

  std::vector<std::unique_ptr<Helper>> helpers_;
  Job job_ = nullptr;  // written by the caller before it wakes the helpers
  void* context_ = nullptr;
  std::mutex done_mutex_;
  std::condition_variable done_;
  std::size_t pending_ = 0;
};
#else
class Barrier;
#endif

// The threads of one parallel region, as seen by one of them.
class Team {
 public:
  Team(std::size_t id, std::size_t size, Barrier* barrier = nullptr) : id_(id), size_(size), barrier_(barrier) {}
  std::size_t id() const { return id_; }
  std::size_t size() const { return size_; }

  // This thread's contiguous part [first, second) of [0, n). Parts start at
  // multiples of `align` (16 floats: a cache line), so threads never write
  // the same line, and are as even as that allows.
  std::pair<std::size_t, std::size_t> slice(std::size_t n, std::size_t align) const {
    const std::size_t blocks = (n + align - 1) / align;
    return {std::min(n, blocks * id_ / size_ * align), std::min(n, blocks * (id_ + 1) / size_ * align)};
  }

  // Every thread of the team waits here until all have arrived.
  void barrier() const {
    if (size_ < 2) return;
#ifdef KVCACHE_DETAIL_OPENMP
#pragma omp barrier
#else
    barrier_->arrive_and_wait();
#endif
  }

 private:
  std::size_t id_, size_;
  [[maybe_unused]] Barrier* barrier_;  // unused with OpenMP
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
    body(Team(static_cast<std::size_t>(omp_get_thread_num()), static_cast<std::size_t>(omp_get_num_threads())));
    return;
  }
#else
  if (threads > 1 && !ThreadPool::in_team) {
    struct Region {
      Body& body;
      std::size_t size;
      Barrier barrier;
    } region{body, threads, Barrier(threads)};
    const ThreadPool::Job job = [](void* context, std::size_t id) noexcept {
      Region& r = *static_cast<Region*>(context);
      r.body(Team(id, r.size, &r.barrier));
    };
    if (ThreadPool::mine().run(threads, job, &region)) return;
  }
#endif
  body(Team(0, 1));
}

// Threads worth starting for n items handed out `align` at a time: no more
// than there are blocks, at least 1.
inline std::size_t team_size(std::size_t threads, std::size_t n, std::size_t align) {
  return std::max<std::size_t>(1, std::min(threads, n / std::max<std::size_t>(align, 1)));
}

// Calls body(begin, end, slot) on up to `threads` contiguous slices of [0, n),
// in parallel; slot in [0, threads) numbers the slice, for per-thread scratch. Slices start at multiples of `align` so that
// each thread's rows begin on a cache line. body must not throw.
template <typename Body>
void parallel_slices(std::size_t n, std::size_t threads, std::size_t align, Body&& body) {
  parallel_team(team_size(threads, n, align), [&](const Team& team) {
    const auto [begin, end] = team.slice(n, align);
    if (begin < end) body(begin, end, team.id());
  });
}

// ============================================================================
// Linear layers
// ============================================================================

// Y[:, begin:end] = X · W[begin:end, :]ᵀ (+ b[begin:end]): output features
// [begin, end) of Y = X·Wᵀ + b, for the m rows (tokens) of X (m × in).
// Y is m × out, sized by the caller.
//   m < kFewTokens (decode, a batch of sessions decoding, a short chunk):
//     the decode kernel (gemv.hpp), one dot product per row of W and token,
//     over tiles of W that stay in the core's L1 cache while every token
//     passes over them, so W is read from memory once. Each Y[t, i] is
//     then computed exactly as for token t alone: batched decode gives the
//     bits of single decode. Allocates nothing.
//   more tokens, W as T (prefill): Eigen's matrix-matrix product on those
//     rows, which packs W once per call and then runs at the multiply rate.
//   more tokens, W as bfloat16: tiles of rows widened to T (128 KB, in the
//     core's L2 cache), each multiplied by Eigen. W is read from memory once.
//   W as f16 or q8_0, or bf16 over a GGUF file (external()), any number of
//     tokens: quant.hpp, as llama.cpp computes.
// (kFewTokens, and the tiles' sizes: measured with bench_batch and
// bench_decode on a 2-core AMD EPYC.)
constexpr Eigen::Index kFewTokens = 16;

template <typename T>
void linear_rows(const Eigen::Ref<const Matrix<T>>& X, const WeightMatrix<T>& W, const Vector<T>& b, Matrix<T>& Y,
                 Eigen::Index begin, Eigen::Index end) {
  if (begin >= end) return;
  const Eigen::Index m = X.rows(), in = X.cols(), n = end - begin;
  const bool f32 = W.type() == WeightType::f32;
  if (W.type() == WeightType::f16 || W.type() == WeightType::q8_0 ||
      (W.type() == WeightType::bf16 && W.external())) {
    quant_linear_rows<kGemvTokens, T>(X, W, Y, begin, end, kFewTokens);
  } else if (m < kFewTokens) {
    // 16 KB of weights per tile: they stay in a core's L1 data cache.
    const auto row_size = static_cast<Eigen::Index>(row_bytes<T>(W.type(), static_cast<std::size_t>(in)));
    const Eigen::Index tile = m == 1 ? n : std::max<Eigen::Index>(1, (16 << 10) / std::max<Eigen::Index>(1, row_size));
    const auto decode = [&](const auto* w) {  // W's values as stored: T or bfloat16
      for (Eigen::Index r = begin; r < end; r += tile) {
        const Eigen::Index r_end = std::min(end, r + tile);
        // kGemvTokens tokens per pass over the tile, then one at a time.
        Eigen::Index t = 0;
        for (; t + kGemvTokens <= m; t += kGemvTokens) {
          const T* x[kGemvTokens];
          T* y[kGemvTokens];
          for (int k = 0; k < kGemvTokens; ++k) x[k] = X.row(t + k).data(), y[k] = Y.row(t + k).data();
          gemv_rows_k<kGemvTokens>(w, in, x, y, r, r_end);
        }
        for (; t < m; ++t) {
          const T* x = X.row(t).data();
          T* y = Y.row(t).data();
          gemv_rows_k<1>(w, in, &x, &y, r, r_end);
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

// Y_k = X · W_kᵀ + b_k for every term k, in one parallel region: the output
// features of all the terms, side by side, are split across the threads
// together (as if the W_k were stacked into one matrix), so a decode step
// starts and joins the threads once, not once per matrix. Shapes as the
// one-matrix linear() below.
template <typename T, std::size_t N>
void linear(const Eigen::Ref<const Matrix<T>>& X, const std::array<LinearTerm<T>, N>& terms, std::size_t threads) {
  std::size_t total = 0;
  for (const auto& term : terms) total += static_cast<std::size_t>(term.W.rows());
  parallel_slices(total, threads, 16, [&](std::size_t begin, std::size_t end, std::size_t) {
    std::size_t offset = 0;  // where the current term's rows start in [0, total)
    for (const auto& term : terms) {
      const std::size_t rows = static_cast<std::size_t>(term.W.rows());
      const std::size_t lo = std::max(begin, offset), hi = std::min(end, offset + rows);
      if (lo < hi)
        linear_rows<T>(X, term.W, term.b, term.Y, static_cast<Eigen::Index>(lo - offset),
                       static_cast<Eigen::Index>(hi - offset));
      offset += rows;
    }
  });
}

// Y = X · Wᵀ (+ b broadcast over rows).
//   X: m × in (a row per token), W: out × in, Y: m × out, already sized by
//   the caller so that this never allocates.
// Each thread computes a slice of output features, so W is read once in total
// and the threads never write the same memory.
template <typename T>
void linear(const Eigen::Ref<const Matrix<T>>& X, const WeightMatrix<T>& W, const Vector<T>& b, Matrix<T>& Y,
            std::size_t threads) {
  linear<T, 1>(X, {{{W, b, Y}}}, threads);
}

}  // namespace detail
}  // namespace kvcache
