// fuzz/fuzz_cli_args.cpp — kvcache-generate's argument parser on arbitrary
// command lines: the input split at NUL bytes into arguments; and the same
// bytes as a --prompts-file.
//
// parse_args either throws UsageError (with a one-line message) or returns
// options within their documented ranges and combinations.
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "cli_args.hpp"
#include "fuzz_support.hpp"

using kvcache_fuzz::check;

namespace {

// The same bytes as a --prompts-file: one prompt per line, none empty, and
// escape_line keeps each output on one line.
void prompts_file(const std::string& content) {
  std::vector<std::string> lines;
  try {
    lines = kvcache_cli::parse_prompt_lines("fuzz.txt", content);
  } catch (const kvcache_cli::UsageError& e) {
    for (const char c : std::string(e.what()))
      check(static_cast<unsigned char>(c) >= 0x20 && c != 0x7F, "a control character in a usage message");
    return;
  }
  check(!lines.empty(), "a prompts file of no prompts accepted");
  std::size_t bytes = 0;
  for (const std::string& line : lines) {
    check(!line.empty() && line.find('\n') == std::string::npos, "an empty or multi-line prompt");
    check(kvcache_cli::escape_line(line).find('\n') == std::string::npos, "escape_line kept a newline");
    bytes += line.size();
  }
  check(bytes <= content.size(), "prompts longer than the file");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  prompts_file(std::string(reinterpret_cast<const char*>(data), size));
  std::vector<std::string> args(1);
  for (std::size_t i = 0; i < size; ++i) {
    if (data[i] == 0) {
      args.emplace_back();
    } else {
      args.back().push_back(static_cast<char>(data[i]));
    }
  }
  if (size == 0) args.clear();

  kvcache_cli::Options o;
  try {
    o = kvcache_cli::parse_args(args);
  } catch (const kvcache_cli::UsageError& e) {
    const std::string message = e.what();
    check(!message.empty(), "an empty usage message");
    // The program prints it as one line: no argument may bring a newline
    // or another control character into it.
    for (const char c : message)
      check(static_cast<unsigned char>(c) >= 0x20 && c != 0x7F, "a control character in a usage message");
    return 0;
  }
  (void)o.needs_tokenizer();
  if (o.help) return 0;
  check(!o.model_path.empty() && o.model_path[0] != '-', "no model path, or an option taken for one");
  check(!o.tokenizer_path.empty(), "an empty tokenizer path");
  check(std::isfinite(o.temperature) && o.temperature >= 0.0f, "temperature out of range");
  check(o.top_p >= 0.0f && o.top_p <= 1.0f, "top_p out of range");
  check(o.threads >= 1 && o.threads <= kvcache_cli::kMaxThreads, "threads out of range");
  check(o.steps <= static_cast<std::size_t>(std::numeric_limits<int>::max()), "steps out of range");
  check(o.window == 0 ? o.sinks == 0 : o.sinks < o.window, "sinks without a window, or not fewer than it");
  check(o.parallel >= 1 && o.parallel <= kvcache_cli::kMaxParallel, "parallel out of range");
  check(!o.no_cache || (o.window == 0 && o.kv_type == kvcache::KVType::full && !o.prompt_cache),
        "--no-cache with a cache option");
  check(!o.prompts_file || (!o.prompt && !o.prompt_ids && !o.no_cache && !o.prompt_cache),
        "--prompts-file with an option it excludes");
  check(!o.prompt_cache || !o.prompt_cache->empty(), "an empty --prompt-cache name");
  if (o.prompt_ids) {
    check(!o.prompt_ids->empty(), "an empty --prompt-ids list");
    for (const int id : *o.prompt_ids) check(id >= 0, "a negative prompt id");
  }
  return 0;
}
