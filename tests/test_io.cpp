// The file layer every format shares (detail/io.hpp): little-endian codecs,
// saturating sizes, bounded reads, the "may this path be replaced" check and
// the one atomic write, in both of its ways to make a temporary file (unnamed
// with O_TMPFILE, and the named O_EXCL fallback that file systems without
// O_TMPFILE get).
#include <gtest/gtest.h>

#if defined(__unix__)
#include <fcntl.h>
#include <unistd.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <kvcache/detail/io.hpp>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace {

namespace fs = std::filesystem;
namespace io = kvcache::detail::io;
using io::Temporary;

std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

std::string temp_dir(const std::string& name) {
  const fs::path dir = fs::path(KVCACHE_TEST_TMP_DIR) / "io_tmp" / name;
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir.string();
}

std::vector<std::string> entries(const std::string& dir) {
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(dir)) names.push_back(e.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

// Writes `content` to `path` atomically, in pieces of 1000 bytes.
void write_string(const std::string& path, const std::string& content, Temporary t, bool fail_midway = false) {
  io::write_atomically(
      path, path,
      [&](io::FileSink& out) {
        for (std::size_t at = 0; at < content.size(); at += 1000) {
          if (fail_midway && at > content.size() / 2) throw std::runtime_error("writer failed");
          out.put(content.data() + at, std::min<std::size_t>(1000, content.size() - at));
        }
      },
      [] {}, t);
}

const Temporary kBoth[] = {Temporary::unnamed_if_possible, Temporary::named};
const char* name_of(Temporary t) { return t == Temporary::named ? "named" : "unnamed"; }

TEST(IoCodecs, LittleEndianBytes) {
  unsigned char b[8];
  io::put_le<std::uint32_t>(0x04030201u, b);
  EXPECT_EQ(std::vector<unsigned char>(b, b + 4), (std::vector<unsigned char>{1, 2, 3, 4}));
  EXPECT_EQ(io::get_le<std::uint32_t>(b), 0x04030201u);
  io::put_le<std::uint64_t>(0x0807060504030201ull, b);
  EXPECT_EQ(std::vector<unsigned char>(b, b + 8), (std::vector<unsigned char>{1, 2, 3, 4, 5, 6, 7, 8}));
  EXPECT_EQ(io::get_le<std::uint64_t>(b), 0x0807060504030201ull);
  io::put_le<std::int32_t>(-2, b);
  EXPECT_EQ(std::vector<unsigned char>(b, b + 4), (std::vector<unsigned char>{0xFE, 0xFF, 0xFF, 0xFF}));
  EXPECT_EQ(io::get_le<std::int32_t>(b), -2);
  EXPECT_EQ(io::get_le<std::int32_t>(reinterpret_cast<const unsigned char*>("\x00\x00\x00\x80")),
            std::numeric_limits<std::int32_t>::min());
  io::put_le(1.0f, b);
  EXPECT_EQ(io::get_le<std::uint32_t>(b), 0x3F800000u);
  EXPECT_EQ(io::get_le<float>(b), 1.0f);
  io::put_le(-0.5, b);
  EXPECT_EQ(io::get_le<std::uint64_t>(b), 0xBFE0000000000000ull);
  EXPECT_EQ(io::get_le<double>(b), -0.5);
}

TEST(IoSizes, SaturateInsteadOfWrapping) {
  const std::uint64_t big = std::uint64_t{1} << 40;
  EXPECT_EQ(io::sat_mul(big, big), io::kSaturated);
  EXPECT_EQ(io::sat_mul(big, 3), 3 * big);
  EXPECT_EQ(io::sat_mul(0, io::kSaturated), 0u);
  EXPECT_EQ(io::sat_add(io::kSaturated - 1, 2), io::kSaturated);
  EXPECT_EQ(io::sat_add(io::sat_mul(big, big), 1), io::kSaturated);
  EXPECT_EQ(io::count_string(io::kSaturated), "more than 2^64");
  EXPECT_EQ(io::count_string(12), "12");
}

TEST(IoReads, ExactReadsNameTheFileWhatAndWhere) {
  std::istringstream in(std::string("\x01\x00\x00\x00\x02\x00\x00\x00\x03", 9));
  io::BoundedReader r(in, "f.bin");
  std::vector<std::int32_t> got;
  r.read_values<std::int32_t>(2, "ids", [&](std::int32_t v) { got.push_back(v); });
  EXPECT_EQ(got, (std::vector<std::int32_t>{1, 2}));
  unsigned char b[4];
  try {
    r.read(b, 4, "checksum");
    ADD_FAILURE() << "no exception";
  } catch (const std::runtime_error& e) {
    EXPECT_EQ(std::string(e.what()), "kvcache: f.bin: file is truncated: it ends in the checksum after 9 bytes");
  }
}

// A header may claim 2^40 ids: they are read a block at a time, so only what
// arrives is ever handed on, and the end of the stream stops it.
TEST(IoReads, AClaimedCountCostsOnlyWhatArrives) {
  std::istringstream in(std::string(4 * 3000, '\0'));
  io::BoundedReader r(in, "s");
  std::size_t seen = 0;
  EXPECT_THROW(r.read_values<std::int32_t>(std::uint64_t{1} << 40, "ids", [&](std::int32_t) { ++seen; }), std::runtime_error);
  EXPECT_LE(seen, 3000u);
  EXPECT_EQ(r.consumed(), 4u * 3000);
}

TEST(IoReads, RemainingBytesOfSeekableStreamsOnly) {
  std::istringstream in("abcdef");
  in.get();
  EXPECT_EQ(io::remaining_bytes(in), std::optional<std::uint64_t>(5));
  EXPECT_EQ(in.get(), 'b');
}

TEST(IoReads, OpeningNamesTheProblem) {
  const std::string dir = temp_dir("open");
  const auto message = [&](const std::string& path) {
    try {
      io::open_for_reading(path, "L");
    } catch (const std::runtime_error& e) {
      return std::string(e.what());
    }
    return std::string("opened");
  };
  EXPECT_EQ(message(dir + "/absent"), "kvcache: L: no such file");
  EXPECT_EQ(message(dir), "kvcache: L: is a directory");
}

TEST(IoAtomicWrite, WritesReplacesAndLeavesNoTemporary) {
  for (const Temporary t : kBoth) {
    const std::string dir = temp_dir(std::string("write_") + name_of(t));
    const std::string path = dir + "/f";
    const std::string a(150000, 'a'), b(70001, 'b');
    write_string(path, a, t);
    EXPECT_EQ(slurp(path), a) << name_of(t);
    write_string(path, b, t);
    EXPECT_EQ(slurp(path), b) << name_of(t);
    write_string(path, "", t);
    EXPECT_EQ(slurp(path), "") << name_of(t);
    EXPECT_EQ(entries(dir), std::vector<std::string>{"f"}) << name_of(t);
  }
}

// While the bytes are written, the unnamed way shows no name in the
// directory at all (nothing a signal could leave behind); the named fallback
// shows one temporary, `path`.tmp.<16 hex digits>.
TEST(IoAtomicWrite, NoNameIsVisibleWhileWritingWhereOTmpfileWorks) {
  for (const Temporary t : kBoth) {
    const std::string dir = temp_dir(std::string("visible_") + name_of(t));
    const std::string path = dir + "/f";
    std::vector<std::string> seen;
    io::write_atomically(
        path, path, [&](io::FileSink& out) {
          out.put("x", 1);
          seen = entries(dir);
        }, [] {}, t);
    if (t == Temporary::named) {
      ASSERT_EQ(seen.size(), 1u);
      EXPECT_EQ(seen[0].size(), std::string("f.tmp.").size() + 16) << seen[0];
      EXPECT_EQ(seen[0].rfind("f.tmp.", 0), 0u) << seen[0];
    } else {
#if defined(__linux__) && defined(O_TMPFILE)
      const int probe = ::open(dir.c_str(), O_TMPFILE | O_WRONLY, 0600);
      if (probe < 0) GTEST_SKIP() << "no O_TMPFILE on this file system";
      ::close(probe);
      EXPECT_TRUE(seen.empty()) << seen[0];
#endif
    }
    EXPECT_EQ(entries(dir), std::vector<std::string>{"f"});
  }
}

// A writer that throws, or a check that refuses, leaves the old file and
// nothing else.
TEST(IoAtomicWrite, AFailureLeavesTheOldFileAndNoTemporary) {
  for (const Temporary t : kBoth) {
    const std::string dir = temp_dir(std::string("failure_") + name_of(t));
    const std::string path = dir + "/f";
    write_string(path, "old", t);
    EXPECT_THROW(write_string(path, std::string(100000, 'n'), t, /*fail_midway=*/true), std::runtime_error);
    EXPECT_EQ(slurp(path), "old") << name_of(t);
    int checks = 0;
    const auto refuse_second = [&] {
      if (++checks == 2) throw std::runtime_error("refused at the last moment");
    };
    EXPECT_THROW(io::write_atomically(
                     path, path, [](io::FileSink& out) { out.put("new", 3); }, refuse_second, t),
                 std::runtime_error);
    EXPECT_EQ(checks, 2) << "the check runs again just before the rename";
    EXPECT_EQ(slurp(path), "old") << name_of(t);
    EXPECT_EQ(entries(dir), std::vector<std::string>{"f"}) << name_of(t);
  }
}

// Errors name the file and the system's reason, as root too: nothing can be
// created in /proc, and a missing directory has no room for a temporary.
TEST(IoAtomicWrite, ErrorsNameThePathAndTheReason) {
  for (const Temporary t : kBoth) {
    const std::string dir = temp_dir(std::string("errors_") + name_of(t));
    for (const std::string& path : {dir + "/absent/f", std::string("/proc/kvcache-io-test")}) {
      try {
        write_string(path, "x", t);
        ADD_FAILURE() << path << " was written";
      } catch (const std::runtime_error& e) {
        const std::string m = e.what();
        EXPECT_EQ(m.rfind("kvcache: " + path + ": cannot create a temporary file in ", 0), 0u) << m;
        EXPECT_NE(m.find(": ", m.find(" in ")), std::string::npos) << m << " (no reason)";
      }
    }
    EXPECT_FALSE(fs::exists("/proc/kvcache-io-test"));
    EXPECT_TRUE(entries(dir).empty());
  }
}

// Writers racing on one path (half the rounds start without the file): every
// write succeeds and the file is exactly one writer's, never a mix.
TEST(IoAtomicWrite, ConcurrentWritersLeaveExactlyOneWritersFile) {
  constexpr int kWriters = 6, kRounds = 20;
  for (const Temporary t : kBoth) {
    const std::string dir = temp_dir(std::string("race_") + name_of(t));
    const std::string path = dir + "/f";
    std::vector<std::string> contents;
    for (int w = 0; w < kWriters; ++w)
      contents.push_back(std::string(static_cast<std::size_t>(200000 + 1000 * w), static_cast<char>('a' + w)));
    for (int round = 0; round < kRounds; ++round) {
      if (round % 2 == 0) fs::remove(path);
      std::vector<std::string> errors(kWriters);
      std::vector<std::thread> threads;
      for (int w = 0; w < kWriters; ++w)
        threads.emplace_back([&, w] {
          try {
            write_string(path, contents[static_cast<std::size_t>(w)], t);
          } catch (const std::exception& e) {
            errors[static_cast<std::size_t>(w)] = e.what();
          }
        });
      for (auto& th : threads) th.join();
      for (const std::string& e : errors) EXPECT_EQ(e, "") << name_of(t) << ", round " << round;
      const std::string got = slurp(path);
      EXPECT_NE(std::find(contents.begin(), contents.end(), got), contents.end())
          << name_of(t) << ", round " << round << ": the file is no writer's";
    }
    EXPECT_EQ(entries(dir), std::vector<std::string>{"f"}) << name_of(t);
  }
}

TEST(IoReplaceable, TheCheckSeesThePrefixAndNeverFollowsLinks) {
  const std::string dir = temp_dir("replaceable");
  const auto accept_abc = [](const io::FilePrefix& p) { return p.bytes == "abc" && p.size == 5; };
  EXPECT_NO_THROW(io::require_replaceable(dir + "/absent", "L", "thing", 3, accept_abc));
  std::ofstream(dir + "/abcde") << "abcde";
  EXPECT_NO_THROW(io::require_replaceable(dir + "/abcde", "L", "thing", 3, accept_abc));
  std::ofstream(dir + "/other") << "xyzzy";
  EXPECT_THROW(io::require_replaceable(dir + "/other", "L", "thing", 3, accept_abc), std::runtime_error);
  fs::create_symlink(dir + "/abcde", dir + "/link");
  try {
    io::require_replaceable(dir + "/link", "L", "thing", 3, accept_abc);
    ADD_FAILURE() << "a link was accepted";
  } catch (const std::runtime_error& e) {
    EXPECT_EQ(std::string(e.what()), "kvcache: L: is a symbolic link, not a thing; refusing to replace it");
  }
}

}  // namespace
