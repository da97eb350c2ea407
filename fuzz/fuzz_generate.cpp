// fuzz/fuzz_generate.cpp — the whole of kvcache-generate, run in-process by
// run_generate (examples/generate_main.hpp) on a tiny model, with fuzzed
// arguments, --prompts-file and --prompt-cache file.
//
// An input is ARGS 0xFF 0xFE PROMPTS 0xFF 0xFE CACHE (generate_fuzz_input in
// fuzz_support.hpp): ARGS, split at NUL bytes, are the program's arguments;
// PROMPTS the bytes of the file that --prompts-file names; CACHE, when not
// empty, the bytes of the file that --prompt-cache names before the run.
//
// Files stay in the harness's own folder: the value of every option that
// names a file, and the model argument, is replaced by a file of that folder
// (MODEL, TOK, PROMPTS and CACHE name the model, the tokenizer, the prompts
// file and the cache file, so that the fuzzer can swap them; any other name
// becomes the file that option usually names; without -z, -z TOK is added).
// The runs are kept short: the model's context is 8 positions, and a
// --window run gets -n 8 at most; more than 2 threads become 2, and seed 0
// (the clock) becomes 1.
//
// Checked on every run: the exit code is 0 or 1; every message is one line
// (no control character but its newline); a failed run's last message is
// "kvcache-generate: ..."; a --prompts-file run prints one line per prompt;
// the model, tokenizer and prompts files are left as they were, even when
// the prompt cache names one of them.
#include <unistd.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <sstream>
#include <string>
#include <system_error>
#include <vector>

#include "cli_args.hpp"
#include "fuzz_support.hpp"
#include "generate_main.hpp"

using kvcache_fuzz::check;

namespace {

namespace fs = std::filesystem;


// The harness's folder, its model and tokenizer; removed at exit.
struct Folder {
  fs::path dir;
  kvcache_fuzz::GenerateFuzzFiles files;
  std::string prompts, cache;

  Folder() {
    const char* tmp = std::getenv("TMPDIR");
    std::string pattern = std::string(tmp != nullptr && *tmp != '\0' ? tmp : "/tmp") + "/kvcache-fuzz-generate.XXXXXX";
    if (mkdtemp(pattern.data()) == nullptr) kvcache_fuzz::fail("mkdtemp " + pattern);
    dir = pattern;
    files = kvcache_fuzz::write_generate_fuzz_files(dir);
    prompts = (dir / "prompts.txt").string();
    cache = (dir / "cache.kvs").string();
  }
  ~Folder() {
    std::error_code ignored;
    fs::remove_all(dir, ignored);
  }
};

Folder& folder() {
  static Folder f;
  return f;
}

// The options whose next argument is their value (cli_args.hpp's parse_args).
bool takes_value(const std::string& a) {
  for (const char* flag : {"-z", "-i", "-n", "-t", "-p", "-s", "--prompt-ids", "--threads", "--kv-type", "--window",
                           "--sinks", "--prompt-cache", "--prompts-file", "--parallel", "--weights"})
    if (a == flag) return true;
  return false;
}

// A file name given by the fuzzer, as a file of the folder.
std::string our_file(const std::string& name, const std::string& usual) {
  const Folder& f = folder();
  if (name == "MODEL") return f.files.model;
  if (name == "TOK") return f.files.tokenizer;
  if (name == "PROMPTS") return f.prompts;
  if (name == "CACHE") return f.cache;
  return usual;
}

bool ours(const std::string& path) {
  const Folder& f = folder();
  return path == f.files.model || path == f.files.tokenizer || path == f.prompts || path == f.cache;
}

// Every line of `text` is one line: printable bytes (and UTF-8), no control
// character but the newline that ends it.
void check_lines(const std::string& text, const char* what) {
  for (const char c : text)
    check(c == '\n' || static_cast<unsigned char>(c) >= 0x20, std::string("a control character in ") + what);
  check(text.empty() || text.back() == '\n', std::string(what) + " does not end with a newline");
}

std::size_t count_lines(const std::string& text) {
  std::size_t n = 0;
  for (const char c : text) n += c == '\n';
  return n;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  Folder& f = folder();
  const std::string input(reinterpret_cast<const char*>(data), size);
  const std::string marker = kvcache_fuzz::kGenerateFuzzMarker;
  const std::size_t first = input.find(marker);
  const std::size_t second = first == std::string::npos ? std::string::npos : input.find(marker, first + 2);
  const std::string arg_bytes = input.substr(0, first);
  const std::string prompts = first == std::string::npos ? "" : input.substr(first + 2, second - (first + 2));
  const std::string cache = second == std::string::npos ? "" : input.substr(second + 2);

  std::vector<std::string> args(1);
  for (const char c : arg_bytes) {
    if (c == '\0')
      args.emplace_back();
    else
      args.back().push_back(c);
  }
  if (arg_bytes.empty()) args.clear();

  // Only files of the folder, and short runs.
  bool parsed = false;
  kvcache_cli::Options o;
  try {
    o = kvcache_cli::parse_args(args);
    parsed = true;
  } catch (const kvcache_cli::UsageError&) {
    // Refused before any file is touched: run as is.
  }
  if (parsed && !o.help) {
    for (std::size_t i = 0; i < args.size(); ++i) {
      const std::string& a = args[i];
      if (takes_value(a) && i + 1 < args.size()) {
        if (a == "-z") args[i + 1] = our_file(args[i + 1], f.files.tokenizer);
        if (a == "--prompts-file") args[i + 1] = our_file(args[i + 1], f.prompts);
        if (a == "--prompt-cache") args[i + 1] = our_file(args[i + 1], f.cache);
        ++i;
      } else if (a.empty() || a[0] != '-') {
        args[i] = our_file(a, f.files.model);
      }
    }
    if (o.window != 0 && o.steps > 8) args.insert(args.end(), {"-n", "8"});
    if (o.threads > 2) args.insert(args.end(), {"--threads", "2"});
    if (o.seed == 0) args.insert(args.end(), {"-s", "1"});
    o = kvcache_cli::parse_args(args);
    if (!ours(o.tokenizer_path)) {  // no -z: ./tokenizer.bin
      args.insert(args.end(), {"-z", f.files.tokenizer});
      o = kvcache_cli::parse_args(args);
    }
    check(ours(o.model_path), "the model is not the harness's file");
    check(ours(o.tokenizer_path), "the tokenizer is not the harness's file");
    check(!o.prompts_file || ours(*o.prompts_file), "the prompts file is not the harness's file");
    check(!o.prompt_cache || ours(*o.prompt_cache), "the prompt cache is not the harness's file");
  }

  // The files as the run finds them.
  if (kvcache_fuzz::read_file(f.files.model) != f.files.model_bytes)
    kvcache_fuzz::write_file(f.files.model, f.files.model_bytes);
  if (kvcache_fuzz::read_file(f.files.tokenizer) != f.files.tokenizer_bytes)
    kvcache_fuzz::write_file(f.files.tokenizer, f.files.tokenizer_bytes);
  kvcache_fuzz::write_file(f.prompts, prompts);
  std::error_code ignored;
  if (cache.empty())
    fs::remove(f.cache, ignored);
  else
    kvcache_fuzz::write_file(f.cache, cache);

  std::vector<std::string> argv_strings{"kvcache-generate"};
  argv_strings.insert(argv_strings.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (std::string& a : argv_strings) argv.push_back(a.data());
  argv.push_back(nullptr);

  std::ostringstream out, err, cerr_text;
  std::streambuf* const cerr_buffer = std::cerr.rdbuf(cerr_text.rdbuf());  // the prompt cache's messages
  const int code = kvcache_cli::run_generate(static_cast<int>(argv_strings.size()), argv.data(), out, err);
  std::cerr.rdbuf(cerr_buffer);

  check(code == 0 || code == 1, "exit code " + std::to_string(code));
  check_lines(err.str(), "the messages");
  check_lines(cerr_text.str(), "the prompt cache's messages");
  if (code == 1) {
    const std::string e = err.str();
    check(!e.empty(), "a failed run without a message");
    const std::size_t previous = e.substr(0, e.size() - 1).rfind('\n');  // before the last line
    const std::size_t start = previous == std::string::npos ? 0 : previous + 1;
    check(e.compare(start, 18, "kvcache-generate: ") == 0, "a failed run's last message is not the program's");
  } else if (parsed && !o.help) {
    check(!out.str().empty() && out.str().back() == '\n', "a run's output does not end with a newline");
    if (o.prompts_file && *o.prompts_file == f.prompts)
      check(count_lines(out.str()) == kvcache_cli::parse_prompt_lines("p", prompts).size(),
            "not one output line per prompt");
  }

  // Never written over, even when the prompt cache names them.
  check(kvcache_fuzz::read_file(f.files.model) == f.files.model_bytes, "the model file changed");
  check(kvcache_fuzz::read_file(f.files.tokenizer) == f.files.tokenizer_bytes, "the tokenizer file changed");
  check(kvcache_fuzz::read_file(f.prompts) == prompts, "the prompts file changed");
  return 0;
}
