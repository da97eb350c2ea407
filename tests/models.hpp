// tests/models.hpp — finding the real llama2.c checkpoints and tokenizers that
// some tests read. They are looked for in $KVCACHE_MODELS_DIR, else in
// KVCACHE_DEFAULT_MODELS_DIR (set by tests/CMakeLists.txt). A test whose file
// is absent is skipped, or fails when KVCACHE_REQUIRE_MODELS=1 (so that a CI
// job that has the files cannot pass by skipping).
#pragma once

#include <cstdlib>
#include <filesystem>
#include <string>
#include <system_error>

#include <gtest/gtest.h>

namespace kvcache_test {

// The folder the model files are looked for in ("" when none is configured).
inline std::string models_dir() {
  const char* from_env = std::getenv("KVCACHE_MODELS_DIR");
  if (from_env != nullptr && *from_env != '\0') return from_env;
#ifdef KVCACHE_DEFAULT_MODELS_DIR
  return KVCACHE_DEFAULT_MODELS_DIR;
#else
  return "";
#endif
}

// The path of `file` in models_dir(), or "" when it is not a regular file there.
inline std::string model_path(const std::string& file) {
  const std::string dir = models_dir();
  if (dir.empty()) return "";
  const std::filesystem::path path = std::filesystem::path(dir) / file;
  std::error_code ignored;
  return std::filesystem::is_regular_file(path, ignored) ? path.string() : "";
}

// True when KVCACHE_REQUIRE_MODELS=1: a missing model file is then a failure.
inline bool models_required() {
  const char* value = std::getenv("KVCACHE_REQUIRE_MODELS");
  return value != nullptr && std::string(value) == "1";
}

}  // namespace kvcache_test

// Declares `const std::string var` holding the path of model file `file`; when
// the file is absent, skips the current test (or fails it when
// KVCACHE_REQUIRE_MODELS=1) and returns. Use it in a TEST body or in SetUp.
#define KVCACHE_MODEL_FILE_OR_SKIP(var, file)                                          \
  const std::string var = ::kvcache_test::model_path(file);                            \
  if (var.empty()) {                                                                   \
    if (::kvcache_test::models_required()) {                                           \
      FAIL() << "model file " << (file) << " not found in '"                           \
             << ::kvcache_test::models_dir()                                           \
             << "' and KVCACHE_REQUIRE_MODELS=1 (set KVCACHE_MODELS_DIR)";             \
    }                                                                                  \
    GTEST_SKIP() << "model file " << (file) << " not found in '"                       \
                 << ::kvcache_test::models_dir() << "' (set KVCACHE_MODELS_DIR)";      \
  }                                                                                    \
  static_assert(true, "require a semicolon")
