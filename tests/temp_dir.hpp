// tests/temp_dir.hpp — a fixture whose test gets a folder of its own under
// the build's test folder: KVCACHE_TEST_TMP_DIR/<area>/<suite>.<test>,
// emptied before the test and removed after it passes (kept after a
// failure, to look at).
#pragma once

#include <filesystem>
#include <string>
#include <system_error>
#include <utility>

#include <gtest/gtest.h>

namespace kvcache_test {

class TempDirTest : public ::testing::Test {
 protected:
  explicit TempDirTest(std::string area) : area_(std::move(area)) {}

  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = std::filesystem::path(KVCACHE_TEST_TMP_DIR) / area_ /
           (std::string(info->test_suite_name()) + "." + info->name());
    std::filesystem::remove_all(dir_);
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override {
    std::error_code ignored;
    if (!HasFailure()) std::filesystem::remove_all(dir_, ignored);
  }

  std::string path(const std::string& name) const { return (dir_ / name).string(); }

  std::filesystem::path dir_;

 private:
  std::string area_;
};

}  // namespace kvcache_test
