// kvcache/detail/parallel.hpp — the two kernels that decide speed: a linear
// layer split across threads by output features, and a static parallel loop.
// Not API.
#pragma once

#include <algorithm>
#include <cstddef>

#include <Eigen/Core>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "../config.hpp"

namespace kvcache {
namespace detail {

// Calls body(begin, end, slot) on up to `threads` contiguous slices of [0, n),
// in parallel when OpenMP is available; slot in [0, threads) numbers the
// slice, for per-thread scratch. Slices start at multiples of `align` so that
// each thread's rows begin on a cache line. body must not throw.
template <typename Body>
void parallel_slices(std::size_t n, std::size_t threads, std::size_t align, Body&& body) {
#ifdef _OPENMP
  const std::size_t usable = std::min(threads, n / std::max<std::size_t>(align, 1));
  if (usable > 1 && !omp_in_parallel()) {
#pragma omp parallel num_threads(static_cast<int>(usable))
    {
      const auto t = static_cast<std::size_t>(omp_get_thread_num());
      const auto nt = static_cast<std::size_t>(omp_get_num_threads());
      const std::size_t blocks = (n + align - 1) / align;
      const std::size_t begin = std::min(n, blocks * t / nt * align);
      const std::size_t end = std::min(n, blocks * (t + 1) / nt * align);
      if (begin < end) body(begin, end, t);
    }
    return;
  }
#else
  (void)threads;
  (void)align;
#endif
  body(std::size_t{0}, n, std::size_t{0});
}

// Y = X · Wᵀ (+ b broadcast over rows).
//   X: m × in (a row per token), W: out × in (stored column by column),
//   Y: m × out, already sized by the caller so that this never allocates.
// Each thread computes a slice of output features, so W is read once in total
// and the threads never write the same memory. For m == 1 (decode) Eigen runs
// a matrix-vector product per slice; for m > 1 (prefill) a GEMM.
template <typename T, typename DerivedX>
void linear(const Eigen::MatrixBase<DerivedX>& X, const WeightMatrix<T>& W, const Vector<T>& b,
            Eigen::Ref<Matrix<T>> Y, std::size_t threads) {
  parallel_slices(static_cast<std::size_t>(W.rows()), threads, 16, [&](std::size_t begin, std::size_t end, std::size_t) {
    const auto c0 = static_cast<Eigen::Index>(begin);
    const auto cn = static_cast<Eigen::Index>(end - begin);
    Y.middleCols(c0, cn).noalias() = X * W.middleRows(c0, cn).transpose();
    if (b.size() != 0) Y.middleCols(c0, cn).rowwise() += b.segment(c0, cn).transpose();
  });
}

}  // namespace detail
}  // namespace kvcache
