// SlotTable: where a sequence's tokens go, planned once for every layer, and
// the one rollback.
#include <cstddef>
#include <vector>

#include <gtest/gtest.h>
#include <kvcache/slots.hpp>

using kvcache::SlidingWindow;
using kvcache::SlotRun;
using kvcache::SlotTable;

namespace {

// Where each of m tokens goes when fed one at a time: the independent
// account of a window (sinks fixed, the ring overwritten oldest first).
std::vector<std::size_t> slots_one_by_one(SlotTable t, std::size_t m) {
  std::vector<std::size_t> slots;
  for (std::size_t i = 0; i < m; ++i) t.commit(t.plan(1, false, [&](const SlotRun& r) { slots.push_back(r.slot); }));
  return slots;
}

// The runs t plans for m tokens (in runs, overwritten) and the state after.
SlotTable::State plan(const SlotTable& t, std::size_t m, bool rope, std::vector<SlotRun>& runs) {
  runs.clear();
  return t.plan(m, rope, [&](const SlotRun& r) { runs.push_back(r); });
}

}  // namespace

TEST(SlotTable, WithoutAWindowOneRunTakesTheNextSlots) {
  SlotTable t(10);
  std::vector<SlotRun> runs;
  SlotTable::State end = plan(t, 4, true, runs);
  ASSERT_EQ(runs.size(), 1u);
  EXPECT_EQ(runs[0].slot, 0u);
  EXPECT_EQ(runs[0].rows, 4u);
  EXPECT_EQ(runs[0].n, 4u);
  EXPECT_FALSE(runs[0].rebased);
  EXPECT_EQ(t.size(), 0u) << "plan changes nothing";
  t.commit(end);
  end = plan(t, 3, true, runs);
  ASSERT_EQ(runs.size(), 1u);
  EXPECT_EQ(runs[0].slot, 4u);
  EXPECT_EQ(runs[0].n, 7u);
  EXPECT_EQ(end.size, 7u);
  EXPECT_EQ(end.position, 7u);
  EXPECT_THROW(t.slots_for(11), std::length_error);
}

// Runs never let the window drop a token one of the run's own tokens sees:
// they fill the window together, then go one at a time; every token lands
// where feeding it alone puts it.
TEST(SlotTable, AWindowIsFilledTogetherThenOneTokenAtATime) {
  for (const std::size_t sinks : {0u, 2u}) {
    for (const bool rope : {false, true}) {
      SlotTable t(0, SlidingWindow{6, sinks});
      std::vector<SlotRun> runs;
      t.commit(plan(t, 2, rope, runs));
      const std::vector<std::size_t> expected = slots_one_by_one(t, 9);
      const SlotTable::State end = plan(t, 9, rope, runs);
      std::vector<std::size_t> planned;
      std::size_t first = 0;
      for (const SlotRun& r : runs) {
        EXPECT_EQ(r.first, first);
        first += r.rows;
        for (std::size_t i = 0; i < r.rows; ++i) planned.push_back(r.slot + i);
        EXPECT_LE(r.n, 6u);
        if (r.rows > 1) {
          EXPECT_LE(r.slot + r.rows, 6u) << "a run of several tokens never wraps";
        }
        // Re-based sinks: RoPE, sinks, and tokens already dropped.
        EXPECT_EQ(r.rebased, rope && sinks != 0 && r.n == 6 && &r != &runs.front()) << sinks << rope;
      }
      EXPECT_EQ(first, 9u);
      EXPECT_EQ(planned, expected);
      EXPECT_EQ(runs.front().rows, 4u) << "the 4 free slots first";
      EXPECT_EQ(end.size, 6u);
      EXPECT_EQ(end.position, 11u);
    }
  }
}

TEST(SlotTable, RollBackDropsAppendsAndClearsAnOverwrittenWindow) {
  SlotTable t(0, SlidingWindow{4, 1});
  std::vector<SlotRun> runs;
  const SlotTable::State start = t.state();
  t.commit(plan(t, 3, false, runs));
  t.roll_back(start);
  EXPECT_EQ(t.size(), 0u);
  t.commit(plan(t, 3, false, runs));
  const SlotTable::State held = t.state();
  t.commit(plan(t, 1, false, runs));  // fills the window: nothing dropped yet
  t.roll_back(held);
  EXPECT_EQ(t.size(), 3u);
  t.commit(plan(t, 3, false, runs));  // overwrites two tokens
  t.roll_back(held);
  EXPECT_EQ(t.size(), 0u) << "overwritten tokens cannot come back: cleared";
  EXPECT_EQ(t.position(), 0u);
  t.commit(plan(t, 6, false, runs));
  const SlotTable::State wrapped = t.state();
  t.commit(plan(t, 1, false, runs));
  t.roll_back(wrapped, /*slots_intact=*/true);  // nothing was written: exactly back
  EXPECT_EQ(t.ring_start(), wrapped.ring_start);
  EXPECT_EQ(t.position(), 6u);
}
