// kvcache/detail/resize.hpp — resizing a work buffer so that a failed
// allocation leaves it intact. Not API.
#pragma once

#include <Eigen/Core>

namespace kvcache::detail {

// m.resize(rows, cols), except when the allocation fails. Eigen 3.4's resize
// frees the old storage first and keeps the freed pointer when the new
// allocation throws std::bad_alloc: the matrix then owns freed memory, and
// its next resize or its destructor frees it again (heap corruption). A
// session that survived an out-of-memory forward pass crashed when it was
// destroyed. Here the new storage is allocated first and swapped in, so a
// failure leaves m as it was. Same-size resizes reuse the storage, as
// Eigen's do: a decode step that needs no growth still allocates nothing.
template <typename Derived>
void resize_buffer(Eigen::PlainObjectBase<Derived>& m, Eigen::Index rows, Eigen::Index cols) {
  if (m.size() == rows * cols)
    m.resize(rows, cols);  // the same number of elements: no allocation
  else
    Derived(rows, cols).swap(m.derived());
}

}  // namespace kvcache::detail
