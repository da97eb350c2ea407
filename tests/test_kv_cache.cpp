#include <gtest/gtest.h>
#include <kvcache/kv_cache.hpp>
TEST(KVCache, Placeholder) { kvcache::KVCache<float> c(2, 4); EXPECT_EQ(c.size(), 0u); }
