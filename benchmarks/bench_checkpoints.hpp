// bench_checkpoints.hpp — llama2.c checkpoints of the stories15M, 42M and
// 110M shapes with seeded random weights, written by kvcache itself, so that
// the benchmarks need no download and time the same loading path as a real
// model.
//
// They go to $KVCACHE_BENCH_CHECKPOINTS when it is set (scripts/bench.sh puts
// them in its build folder and removes them at the end), otherwise to a
// temporary folder removed when the program ends.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <random>
#include <stdexcept>
#include <string>
#include <system_error>
#include <vector>

#include <kvcache/decoder.hpp>
#include <kvcache/llama2c.hpp>

namespace kvcache_bench {

struct ModelShape {
  std::string name;  // "stories15M"
  kvcache::ModelConfig config;
};

inline std::vector<ModelShape> stories_shapes() {
  return {{"stories15M", kvcache::llama2c_stories15M_config()},
          {"stories42M", kvcache::llama2c_stories42M_config()},
          {"stories110M", kvcache::llama2c_stories110M_config()}};
}

inline ModelShape stories_shape(const std::string& name) {
  for (auto& s : stories_shapes())
    if (s.name == name) return s;
  throw std::invalid_argument("kvcache_bench: no model shape named " + name +
                              " (stories15M, stories42M, stories110M)");
}

namespace detail {

// The folder the checkpoints go to, created on first use.
class CheckpointDir {
 public:
  CheckpointDir() {
    namespace fs = std::filesystem;
    if (const char* env = std::getenv("KVCACHE_BENCH_CHECKPOINTS"); env && *env) {
      path_ = env;
    } else {
      path_ = fs::temp_directory_path() / ("kvcache-bench-" + std::to_string(std::random_device{}()));
      owned_ = true;
    }
    fs::create_directories(path_);
  }
  CheckpointDir(const CheckpointDir&) = delete;
  CheckpointDir& operator=(const CheckpointDir&) = delete;
  ~CheckpointDir() {
    std::error_code ignored;
    if (owned_) std::filesystem::remove_all(path_, ignored);
  }
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
  bool owned_ = false;
};

inline const CheckpointDir& checkpoint_dir() {
  static const CheckpointDir dir;
  return dir;
}

}  // namespace detail

// Writes `shape` with random weights from `seed` (kvcache::random_weights) as
// SHAPE.bin in the checkpoint folder, replacing any older file, and returns
// its path. Written anew on every call: a file left by an older build of the
// benchmarks is never trusted.
inline std::string write_checkpoint(const ModelShape& shape, std::uint64_t seed = 42) {
  const std::filesystem::path path = detail::checkpoint_dir().path() / (shape.name + ".bin");
  {
    const kvcache::Decoder<float> decoder(shape.config, kvcache::random_weights<float>(shape.config, seed));
    kvcache::save_llama2c(decoder, path.string());
  }  // freed before anyone loads the file back
  return path.string();
}

}  // namespace kvcache_bench
