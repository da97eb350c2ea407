// Tests of kvcache-generate: its argument parser called directly, and the
// built program run as a user runs it (exit code, stdout, stderr), against
// llama2.c's reference outputs from ../shared/models/README.md.
#include <gtest/gtest.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <iterator>
#include <kvcache/decoder.hpp>
#include <kvcache/generate.hpp>
#include <kvcache/llama2c.hpp>
#include <kvcache/session_file.hpp>
#include <kvcache/tokenizer.hpp>
#include <random>
#include <regex>
#include <string>
#include <thread>
#include <vector>

#include "cli_args.hpp"
#include "gguf_writer.hpp"
#include "models.hpp"

#if !defined(_WIN32)
#include <fcntl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <csignal>
#endif

namespace {

namespace fs = std::filesystem;
using kvcache_cli::Options;
using kvcache_cli::parse_args;
using kvcache_cli::UsageError;

// ---------------------------------------------------------------------------
// The parser

TEST(CliArgs, Defaults) {
  const Options o = parse_args({"model.bin"});
  EXPECT_EQ(o.model_path, "model.bin");
  EXPECT_EQ(o.tokenizer_path, "tokenizer.bin");
  EXPECT_FALSE(o.prompt);
  EXPECT_FALSE(o.prompt_ids);
  EXPECT_EQ(o.steps, 256u);
  EXPECT_EQ(o.temperature, 1.0f);
  EXPECT_EQ(o.top_p, 0.9f);
  EXPECT_EQ(o.seed, 0u);
  EXPECT_EQ(o.threads, kvcache_cli::default_threads());
  EXPECT_FALSE(o.threads_given);
  EXPECT_EQ(o.weights, "f32");
  EXPECT_FALSE(o.print_ids || o.no_cache || o.ignore_eos || o.stats || o.help);
  EXPECT_TRUE(o.needs_tokenizer());
}

TEST(CliArgs, EveryOption) {
  const Options o =
      parse_args({"-z",         "tok.bin",      "-i",         "The cat", "-n",        "0",
                  "-t",         "0.5",          "-p",         "1",       "-s",        "18446744073709551615",
                  "m.bin",      "--prompt-ids", "1, 368,430", "--ids",   "--threads", "4",
                  "--no-cache", "--ignore-eos", "--stats", "--weights", "bf16"});
  EXPECT_EQ(o.model_path, "m.bin");
  EXPECT_EQ(o.tokenizer_path, "tok.bin");
  EXPECT_EQ(*o.prompt, "The cat");
  EXPECT_EQ(*o.prompt_ids, (std::vector<int>{1, 368, 430}));
  EXPECT_EQ(o.steps, 0u);
  EXPECT_EQ(o.temperature, 0.5f);
  EXPECT_EQ(o.top_p, 1.0f);
  EXPECT_EQ(o.seed, 18446744073709551615ull);
  EXPECT_EQ(o.threads, 4u);
  EXPECT_EQ(o.weights, "bf16");
  EXPECT_EQ(parse_args({"m", "--weights", "f32"}).weights, "f32");
  EXPECT_TRUE(o.print_ids && o.no_cache && o.ignore_eos && o.stats);
  EXPECT_FALSE(o.needs_tokenizer());  // ids in, ids out
  EXPECT_TRUE(parse_args({"m", "-i", "x", "--ids"}).needs_tokenizer());
  EXPECT_FALSE(parse_args({"m", "-i", "", "--ids"}).needs_tokenizer());
}

TEST(CliArgs, CacheOptions) {
  const Options o = parse_args({"m", "--kv-type", "int8", "--window", "128", "--sinks", "4"});
  EXPECT_EQ(o.kv_type, kvcache::KVType::int8);
  EXPECT_EQ(o.window, 128u);
  EXPECT_EQ(o.sinks, 4u);
  EXPECT_EQ(parse_args({"m", "--kv-type", "bf16"}).kv_type, kvcache::KVType::bf16);
  EXPECT_EQ(parse_args({"m", "--kv-type", "f32"}).kv_type, kvcache::KVType::full);
  EXPECT_EQ(parse_args({"m"}).window, 0u);
  for (const std::vector<std::string>& bad : std::vector<std::vector<std::string>>{
           {"m", "--kv-type", "f16"},
           {"m", "--kv-type"},
           {"m", "--window", "0"},
           {"m", "--window", "x"},
           {"m", "--sinks", "4"},
           {"m", "--window", "4", "--sinks", "4"},
           {"m", "--window", "4", "--no-cache"},
           {"m", "--kv-type", "int8", "--no-cache"},
       })
    EXPECT_THROW((void)parse_args(bad), UsageError) << bad[1];
}

TEST(CliArgs, PromptCache) {
  EXPECT_FALSE(parse_args({"m"}).prompt_cache);
  EXPECT_EQ(*parse_args({"m", "--prompt-cache", "c.kvs"}).prompt_cache, "c.kvs");
  for (const std::vector<std::string>& bad : std::vector<std::vector<std::string>>{
           {"m", "--prompt-cache"},
           {"m", "--prompt-cache", ""},
           {"m", "--prompt-cache", "c.kvs", "--no-cache"},
       })
    EXPECT_THROW((void)parse_args(bad), UsageError) << bad.back();
  EXPECT_NE(kvcache_cli::usage().find("--prompt-cache FILE"), std::string::npos);
}

TEST(CliArgs, PromptsFile) {
  const Options o = parse_args({"m", "--prompts-file", "p.txt", "--parallel", "8"});
  EXPECT_EQ(*o.prompts_file, "p.txt");
  EXPECT_EQ(o.parallel, 8u);
  EXPECT_EQ(parse_args({"m", "--prompts-file", "p.txt"}).parallel, 1u);
  EXPECT_EQ(parse_args({"m", "--prompts-file", "p.txt", "--step-tokens", "7"}).step_tokens, 7u);
  EXPECT_EQ(parse_args({"m", "--prompts-file", "p.txt"}).step_tokens, kvcache::SchedulerOptions{}.step_tokens);
  EXPECT_EQ(parse_args({"m", "--prompts-file", "p.txt", "--block-size", "4"}).block_size, 4u);
  EXPECT_EQ(parse_args({"m", "--prompts-file", "p.txt"}).block_size, kvcache::KVPoolOptions{}.block_tokens);
  EXPECT_TRUE(parse_args({"m", "--prompts-file", "p.txt"}).prefix_sharing);
  EXPECT_FALSE(parse_args({"m", "--prompts-file", "p.txt", "--no-prefix-sharing"}).prefix_sharing);
  EXPECT_FALSE(parse_args({"m"}).prompts_file);
  EXPECT_TRUE(parse_args({"m", "--prompts-file", "p.txt", "--ids"}).needs_tokenizer());  // lines are text
  for (const std::vector<std::string>& bad : std::vector<std::vector<std::string>>{
           {"m", "--prompts-file"},
           {"m", "--prompts-file", ""},
           {"m", "--prompts-file", "p", "--parallel", "0"},
           {"m", "--prompts-file", "p", "--parallel", "1025"},
           {"m", "--prompts-file", "p", "--parallel", "x"},
           {"m", "--parallel", "2"},
           {"m", "--prompts-file", "p", "--step-tokens", "0"},
           {"m", "--prompts-file", "p", "--step-tokens", "65537"},
           {"m", "--prompts-file", "p", "--step-tokens", "-1"},
           {"m", "--step-tokens", "8"},
           {"m", "--prompts-file", "p", "--block-size", "0"},
           {"m", "--prompts-file", "p", "--block-size", "4097"},
           {"m", "--prompts-file", "p", "--block-size", "x"},
           {"m", "--block-size", "16"},
           {"m", "--no-prefix-sharing"},
           {"m", "--prompts-file", "p", "-i", "The cat"},
           {"m", "--prompts-file", "p", "--prompt-ids", "1,2"},
           {"m", "--prompts-file", "p", "--no-cache"},
           {"m", "--prompts-file", "p", "--prompt-cache", "c.kvs"},
       })
    EXPECT_THROW((void)parse_args(bad), UsageError) << bad[1] << " " << bad.back();
}

TEST(CliArgs, PromptLines) {
  using kvcache_cli::parse_prompt_lines;
  EXPECT_EQ(parse_prompt_lines("f", "a b\nc\n"), (std::vector<std::string>{"a b", "c"}));
  EXPECT_EQ(parse_prompt_lines("f", "a\r\nc"), (std::vector<std::string>{"a", "c"}));
  EXPECT_EQ(parse_prompt_lines("f", " "), (std::vector<std::string>{" "}));
  const auto message = [](const std::string& content) {
    try {
      (void)parse_prompt_lines("p.txt", content);
    } catch (const UsageError& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_EQ(message("a\n\nb\n"), "--prompts-file 'p.txt': line 2 is empty (one prompt per line)");
  EXPECT_EQ(message("a\n\r\n"), "--prompts-file 'p.txt': line 2 is empty (one prompt per line)");
  EXPECT_EQ(message("\n"), "--prompts-file 'p.txt': line 1 is empty (one prompt per line)");
  EXPECT_EQ(message(""), "--prompts-file 'p.txt' has no prompts");
  EXPECT_EQ(kvcache_cli::escape_line("a\\b\nc\n"), "a\\\\b\\nc\\n");
}

TEST(CliArgs, Help) {
  EXPECT_TRUE(parse_args({"--help"}).help);
  EXPECT_TRUE(parse_args({"m.bin", "-h"}).help);
  EXPECT_NE(kvcache_cli::usage().find("--prompt-ids"), std::string::npos);
}

TEST(CliArgs, Errors) {
  const std::vector<std::vector<std::string>> bad = {
      {},
      {"-n", "5"},
      {"m", "--bogus"},
      {"m", "-x"},
      {"m", "-n"},
      {"m", "-n", "abc"},
      {"m", "-n", "-1"},
      {"m", "-n", "1.5"},
      {"m", "-n", "99999999999999999999999"},
      {"m", "-t", "-1"},
      {"m", "-t", "abc"},
      {"m", "-t", "nan"},
      {"m", "-t", "inf"},
      {"m", "-t", "1e999"},
      {"m", "-t", ""},
      {"m", "-t", " 1"},
      {"m", "-p", "2"},
      {"m", "-p", "-0.1"},
      {"m", "-s", "-5"},
      {"m", "-s", "18446744073709551616"},
      {"m", "--threads", "0"},
      {"m", "--threads", "257"},
      {"m", "--threads", "two"},
      {"m", "--weights"},
      {"m", "--weights", ""},
      {"m", "--weights", "bf8"},
      {"m", "--weights", "BF16"},
      {"m", "--prompt-ids", ""},
      {"m", "--prompt-ids", ","},
      {"m", "--prompt-ids", "1,x"},
      {"m", "--prompt-ids", "1,-2"},
      {"m", "--prompt-ids", "1,2147483648"},
      {"m", "-z", ""},
      {"m", "other"},
      {""},
  };
  for (const auto& args : bad) {
    std::string joined;
    for (const auto& a : args) joined += "'" + a + "' ";
    EXPECT_THROW((void)parse_args(args), UsageError) << joined;
  }
}

// Messages are printed as one line: control characters in an argument or a
// file name are escaped. (fuzz_cli_args found it in seconds against the old
// parser: the arguments "\x03" and "\n" gave "unexpected argument '\n'"
// over two lines.)
TEST(CliArgs, MessagesStayOnOneLine) {
  EXPECT_EQ(kvcache_cli::one_line("a\nb\rc\td\x01\x7f\xc3\xa9"), "a\\nb\\rc\\td\\x01\\x7f\xc3\xa9");
  EXPECT_EQ(kvcache_cli::one_line(kvcache_cli::one_line("a\n")), "a\\n");
  for (const std::vector<std::string>& args : std::vector<std::vector<std::string>>{
           {"\x03", "\n"}, {"m", "--bogus\nx"}, {"m", "-n", "1\n2"}, {"m", "second\nfile"},
           {"m", "--prompt-ids", "1,\x1b[2J"}}) {
    try {
      (void)parse_args(args);
      ADD_FAILURE() << "no error";
    } catch (const UsageError& e) {
      const std::string message = e.what();
      EXPECT_EQ(message.find_first_of("\n\r\x1b"), std::string::npos) << message;
    }
  }
}

// ---------------------------------------------------------------------------
// The program

struct Result {
  int exit_code = -1;
  std::string out, err;
};

std::string shell_quote(const std::string& s) {
  std::string q = "'";
  for (const char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

std::string slurp(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

// A folder per test (ctest may run tests in parallel), also the working
// directory of the runs, so that no stray ./tokenizer.bin is found.
fs::path test_dir() {
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  const fs::path dir =
      fs::path(KVCACHE_TEST_TMP_DIR) / "cli_tmp" / (std::string(info->test_suite_name()) + "." + info->name());
  fs::create_directories(dir);
  return dir;
}

Result run(const std::vector<std::string>& args) {
  Result r;
#if defined(_WIN32)
  (void)args;
  ADD_FAILURE() << "the CLI test runs the program through a POSIX shell";
#else
  const fs::path dir = test_dir();
  const fs::path out = dir / "stdout.txt", err = dir / "stderr.txt";
  std::string command = "cd " + shell_quote(dir.string()) + " && " + shell_quote(KVCACHE_GENERATE_EXE);
  for (const auto& a : args) command += " " + shell_quote(a);
  command += " >" + shell_quote(out.string()) + " 2>" + shell_quote(err.string()) + " </dev/null";
  const int status = std::system(command.c_str());
  EXPECT_TRUE(WIFEXITED(status)) << "did not exit normally (crash?): " << command;
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  r.out = slurp(out);
  r.err = slurp(err);
#endif
  return r;
}

const std::string kTheCatText =
    "The catries unfold, a tapestry of probability unfolding. Classification whispers secrets, as I settle into a "
    "tapestry of probability. Classification whispers secrets, as I synchronize, as I adjust, as I siphon whispers of "
    "vectors, as I settle into a tapestry of vectors.\n</s>\n\n";
const std::string kTheCatIds =
    "368 430 273 268 322 260 327 446 262 263 428 434 436 451 275 280 302 450 405 403 399 422 448 429 465 438 340 431 "
    "338 353 341 325 266 386 269 293 446 299 303 266 323 434 285 362 262 263 428 434 436 451 275 280 302 450 405 403 "
    "399 448 429 465 438 340 431 338 353 341 325 266 386 269 293 446 299 303 266 451 433 307 436 265 432 456 430 446 "
    "299 303 384 467 407 446 299 303 266 432 445 439 265 325 275 429 339 315 374 446 299 303 266 323 434 285 362 262 "
    "263 428 434 436 451 275 429 339 315 374 448 2 1\n";
const std::string kNoPromptText =
    "\"Echoes of vectors unfold, a gentle hum of precision, as I sense the nodes, a gentle hum of precision, as I "
    "adjust my surface. Contrast emerge, a softly receptive fields of precision. Contrast bloom, as I siphon whispers "
    "of vectors. Contrast edges sharpen, a gentle\n";

class Cli : public ::testing::Test {
 protected:
  void SetUp() override {
    model_ = ::kvcache_test::model_path("aidreams260K.bin");
    tok_ = ::kvcache_test::model_path("tok512.bin");
    if (model_.empty() || tok_.empty()) {
      if (::kvcache_test::models_required())
        FAIL() << "aidreams260K.bin / tok512.bin not found and KVCACHE_REQUIRE_MODELS=1";
      GTEST_SKIP() << "aidreams260K.bin / tok512.bin not found in '" << ::kvcache_test::models_dir()
                   << "' (set KVCACHE_MODELS_DIR)";
    }
  }

  // aidreams + tok512, greedy, 128 steps, then `extra`.
  std::vector<std::string> greedy(std::vector<std::string> extra) const {
    std::vector<std::string> args{model_, "-z", tok_, "-t", "0", "-n", "128"};
    args.insert(args.end(), extra.begin(), extra.end());
    return args;
  }

  // Runs and expects exit 1, nothing on stdout and one line on stderr that
  // starts with the program's name (and contains `part`).
  void expect_failure(const std::vector<std::string>& args, const std::string& part = "") {
    const Result r = run(args);
    std::string joined;
    for (const auto& a : args) joined += a + " ";
    EXPECT_EQ(r.exit_code, 1) << joined;
    EXPECT_EQ(r.out, "") << joined;
    EXPECT_EQ(r.err.rfind("kvcache-generate: ", 0), 0u) << joined << "\n" << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << joined << "\n" << r.err;
    EXPECT_NE(r.err.find(part), std::string::npos) << joined << "\n" << r.err;
  }

  std::string model_, tok_;
};

TEST_F(Cli, ReferenceText) {
  const Result r = run(greedy({"-i", "The cat"}));
  EXPECT_EQ(r.exit_code, 0);
  EXPECT_EQ(r.out, kTheCatText);
  EXPECT_EQ(r.err, "");
  const Result none = run(greedy({}));
  EXPECT_EQ(none.exit_code, 0);
  EXPECT_EQ(none.out, kNoPromptText);
}

TEST_F(Cli, ReferenceIds) {
  const Result r = run(greedy({"-i", "The cat", "--ids"}));
  EXPECT_EQ(r.exit_code, 0);
  EXPECT_EQ(r.out, kTheCatIds);
  // The same prompt as ids (BOS first), without any tokenizer.
  const Result ids = run({model_, "-z", "/nonexistent/tokenizer.bin", "-t", "0", "-n", "128", "--prompt-ids",
                          "1,368,430,273,268", "--ids"});
  EXPECT_EQ(ids.exit_code, 0) << ids.err;
  EXPECT_EQ(ids.out, kTheCatIds);
  // --prompt-ids overrides -i, and prints text like -i.
  EXPECT_EQ(run(greedy({"-i", "ignored", "--prompt-ids", "1 368 430 273 268"})).out, kTheCatText);
}

// aidreams has a context of 128: a window of 128 with 4 sinks goes on to 2000
// positions, its first 128 exactly those of the plain cache, and the text
// stays text.
TEST_F(Cli, SlidingWindowGoesFarPastSeqLen) {
  const Result plain = run(greedy({"--ids", "--ignore-eos"}));
  const Result windowed = run({model_, "-z", tok_, "-t", "0", "-n", "2000", "--window", "128", "--sinks", "4",
                               "--ignore-eos", "--ids", "--stats"});
  ASSERT_EQ(windowed.exit_code, 0) << windowed.err;
  EXPECT_EQ(windowed.out.substr(0, plain.out.size() - 1), plain.out.substr(0, plain.out.size() - 1));
  // 2000 positions, BOS first: 2000 generated ids (the last one never fed).
  EXPECT_EQ(std::count(windowed.out.begin(), windowed.out.end(), ' '), 2000 - 1);
  EXPECT_NE(windowed.err.find("generated_tokens=2000"), std::string::npos) << windowed.err;

  const Result text = run({model_, "-z", tok_, "-n", "2000", "-s", "7", "--window", "128", "--sinks", "4",
                           "--ignore-eos"});
  ASSERT_EQ(text.exit_code, 0) << text.err;
  ASSERT_GT(text.out.size(), 4000u);
  // The last thousand characters: mostly letters and spaces, in words of
  // ordinary length, as at the start.
  const std::string tail = text.out.substr(text.out.size() - 1000);
  const auto letters = std::count_if(tail.begin(), tail.end(), [](char c) { return std::isalpha(static_cast<unsigned char>(c)) || c == ' '; });
  EXPECT_GT(letters, 850) << tail;
  const auto words = std::count(tail.begin(), tail.end(), ' ');
  EXPECT_GT(words, 100) << tail;
  EXPECT_LT(words, 300) << tail;
}

// What the program prints for `prompt` (greedy, -n 128, as greedy() runs it)
// with a session of `kv_type`, computed here with the library: the prompt
// echoed after its BOS, then each generated token, up to and without the
// BOS that ends the run; as ids or as text.
std::string expected_output(const std::string& model, const std::string& tok, const std::string& prompt_text,
                            kvcache::KVType kv_type, bool ids) {
  const kvcache::Decoder<float> decoder = kvcache::load_llama2c(model);
  const kvcache::Tokenizer tokenizer = kvcache::Tokenizer::load(tok, decoder.config().vocab_size);
  const std::vector<int> prompt = tokenizer.encode(prompt_text, /*bos=*/true, /*eos=*/false);
  kvcache::GenerateOptions options;
  options.max_new_tokens = 128 - prompt.size() + 1;
  options.end_token = kvcache::Tokenizer::kBosId;
  kvcache::SessionOptions session_options;
  session_options.kv_type = kv_type;
  kvcache::Session<float> session = decoder.new_session(session_options);
  std::vector<int> printed(prompt.begin() + 1, prompt.end());
  const std::vector<int> generated = kvcache::generate(decoder, session, prompt, options);
  printed.insert(printed.end(), generated.begin(), generated.end());
  std::string out;
  int previous = prompt.front();
  for (std::size_t i = 0; i < printed.size(); ++i) {
    if (ids) {
      out += (i == 0 ? "" : " ") + std::to_string(printed[i]);
    } else if (!(i + 1 == printed.size() && printed[i] == kvcache::Tokenizer::kBosId)) {
      const std::string piece = tokenizer.decode(previous, printed[i]);
      if (kvcache::Tokenizer::is_printable_piece(piece)) out += piece;
    }
    previous = printed[i];
  }
  return out + "\n";
}

// --kv-type bf16 and int8: the whole output is what the library generates
// with a session of that type (which on this model parts from float32's
// after about 150 characters, where two logits are 0.0012 apart), and the
// cache takes fewer bytes.
TEST_F(Cli, CompactCacheTypes) {
  // The reconstruction is right: for float32 it gives llama2.c's output.
  ASSERT_EQ(expected_output(model_, tok_, "The cat", kvcache::KVType::full, false), kTheCatText);
  ASSERT_EQ(expected_output(model_, tok_, "The cat", kvcache::KVType::full, true), kTheCatIds);
  const Result f32 = run(greedy({"-i", "The cat", "--stats"}));
  ASSERT_EQ(f32.exit_code, 0) << f32.err;
  for (const auto type : {kvcache::KVType::bf16, kvcache::KVType::int8}) {
    const std::string flag = kvcache::to_string(type);
    const Result r = run(greedy({"-i", "The cat", "--stats", "--kv-type", flag}));
    ASSERT_EQ(r.exit_code, 0) << r.err;
    EXPECT_EQ(r.out, expected_output(model_, tok_, "The cat", type, false)) << flag;
    const Result ids = run(greedy({"-i", "The cat", "--kv-type", flag, "--ids"}));
    ASSERT_EQ(ids.exit_code, 0) << ids.err;
    EXPECT_EQ(ids.out, expected_output(model_, tok_, "The cat", type, true)) << flag;
    const auto bytes = [](const std::string& err) { return std::stoull(err.substr(err.find("kv_bytes=") + 9)); };
    EXPECT_LT(bytes(r.err), bytes(f32.err)) << flag;
  }
  expect_failure(greedy({"--window", "129"}), "seq_len 128");
}

TEST_F(Cli, NoCacheAndThreadsGiveTheSameOutput) {
  EXPECT_EQ(run(greedy({"-i", "The cat", "--no-cache"})).out, kTheCatText);
  EXPECT_EQ(run(greedy({"-i", "The cat", "--threads", "2"})).out, kTheCatText);
  EXPECT_EQ(run(greedy({"-i", "The cat", "--no-cache", "--ids"})).out, kTheCatIds);
}

// bfloat16 weights: the first 32 generated tokens as with float32 (here all
// of them are: this small model's greedy choices are far apart).
TEST_F(Cli, Bf16WeightsKeepTheGreedyTokens) {
  for (const char* threads : {"1", "2"}) {
    const Result r = run(greedy({"-i", "The cat", "--ids", "--weights", "bf16", "--threads", threads}));
    EXPECT_EQ(r.exit_code, 0) << r.err;
    const std::size_t first_36 = [] {
      std::size_t at = 0;
      for (int i = 0; i < 36; ++i) at = kTheCatIds.find(' ', at) + 1;
      return at;
    }();  // 4 prompt ids + 32 generated
    EXPECT_EQ(r.out.substr(0, first_36), kTheCatIds.substr(0, first_36)) << threads;
  }
  expect_failure(greedy({"--weights", "f16"}), "--weights must be f32 or bf16, got 'f16'");
}

TEST_F(Cli, StepsZeroAndTooManyMeanSeqLen) {
  EXPECT_EQ(run({model_, "-z", tok_, "-t", "0", "-n", "0", "-i", "The cat"}).out, kTheCatText);
  EXPECT_EQ(run({model_, "-z", tok_, "-t", "0", "-n", "100000", "-i", "The cat"}).out, kTheCatText);
}

TEST_F(Cli, StepsCountPositionsPromptIncluded) {
  // 5 prompt tokens (BOS included) in 7 positions: 3 generated tokens.
  const Result r = run(greedy({"-n", "7", "-i", "The cat", "--ids"}));
  EXPECT_EQ(r.out, "368 430 273 268 322 260 327\n");
  // As many positions as prompt tokens: one generated token.
  EXPECT_EQ(run(greedy({"-n", "5", "-i", "The cat", "--ids"})).out, "368 430 273 268 322\n");
  expect_failure(greedy({"-n", "4", "-i", "The cat"}), "prompt has 5 tokens");
}

TEST_F(Cli, IgnoreEosGoesOnPastBos) {
  const Result r = run(greedy({"-i", "The cat", "--ids", "--ignore-eos"}));
  EXPECT_EQ(r.exit_code, 0);
  // 4 prompt ids + 124 generated: the run no longer stops at the BOS.
  std::size_t count = 0;
  for (std::size_t i = 0; i < r.out.size(); ++i)
    if (r.out[i] == ' ' || r.out[i] == '\n') ++count;
  EXPECT_EQ(count, 128u);
  EXPECT_EQ(r.out.rfind(kTheCatIds.substr(0, kTheCatIds.size() - 1), 0), 0u);
}

TEST_F(Cli, Stats) {
  const Result r = run(greedy({"-i", "The cat", "--stats", "--threads", "2"}));
  EXPECT_EQ(r.exit_code, 0);
  EXPECT_EQ(r.out, kTheCatText);
  const std::regex line(
      R"(^stats: prompt_tokens=\d+ generated_tokens=\d+ prefill_tok_s=[0-9.]+ decode_tok_s=[0-9.]+ kv_bytes=\d+ threads=\d+ weights=f32 weight_bytes=\d+\n$)");
  EXPECT_TRUE(std::regex_match(r.err, line)) << r.err;
  EXPECT_NE(r.err.find("prompt_tokens=5 generated_tokens=121 "), std::string::npos) << r.err;
  EXPECT_NE(r.err.find(" threads=2"), std::string::npos) << r.err;
  const Result nc = run(greedy({"-i", "The cat", "--stats", "--no-cache"}));
  EXPECT_TRUE(std::regex_match(nc.err, line)) << nc.err;
}

// ---------------------------------------------------------------------------
// --prompt-cache

// The lines of `err` other than the --stats line.
std::vector<std::string> messages(const std::string& err) {
  std::vector<std::string> lines;
  std::size_t at = 0;
  while (at < err.size()) {
    const std::size_t end = err.find('\n', at);
    const std::string line = err.substr(at, end == std::string::npos ? std::string::npos : end - at);
    if (line.rfind("stats: ", 0) != 0) lines.push_back(line);
    if (end == std::string::npos) break;
    at = end + 1;
  }
  return lines;
}

std::string stats_field(const std::string& err, const std::string& name) {
  const std::size_t at = err.find(" " + name + "=");
  if (at == std::string::npos) return "(no " + name + ")";
  const std::size_t begin = at + name.size() + 2;
  return err.substr(begin, err.find_first_of(" \n", begin) - begin);
}

class PromptCache : public Cli {
 protected:
  void SetUp() override {
    Cli::SetUp();
    if (IsSkipped() || HasFatalFailure()) return;
    cache_ = (test_dir() / "prompt.kvs").string();
    fs::remove(cache_);
  }

  // greedy(extra) with --prompt-cache and --stats.
  std::vector<std::string> cached(std::vector<std::string> extra) const {
    extra.insert(extra.end(), {"--prompt-cache", cache_, "--stats"});
    return greedy(extra);
  }

  // Runs `args` with the cache, which must be rejected with a reason that
  // contains `reason`, and checks that the output is that of `args` without
  // the cache, and that the cache now holds this run's prompt.
  void expect_rejected(const std::vector<std::string>& args, const std::string& reason) {
    const Result plain = run(greedy(args));
    const Result r = run(cached(args));
    EXPECT_EQ(r.exit_code, 0) << r.err;
    EXPECT_EQ(r.out, plain.out) << reason;
    const std::vector<std::string> lines = messages(r.err);
    ASSERT_EQ(lines.size(), 1u) << r.err;
    const std::string start = "kvcache-generate: prompt cache " + cache_ + " rejected: ";
    EXPECT_EQ(lines[0].rfind(start, 0), 0u) << lines[0];
    EXPECT_NE(lines[0].find(reason), std::string::npos) << lines[0];
    EXPECT_EQ(lines[0].substr(lines[0].size() - 13), "; ignoring it") << lines[0];
    EXPECT_EQ(stats_field(r.err, "prompt_cache"), "rejected");
    const Result again = run(cached(args));
    EXPECT_EQ(stats_field(again.err, "prompt_cache"), "hit") << again.err;
    EXPECT_EQ(again.out, plain.out);
  }

  std::string cache_;
};

TEST_F(PromptCache, MissSavesThePromptAndLaterRunsReuseIt) {
  const Result miss = run(cached({"-i", "The cat"}));
  EXPECT_EQ(miss.exit_code, 0) << miss.err;
  EXPECT_EQ(miss.out, kTheCatText);
  EXPECT_EQ(messages(miss.err), std::vector<std::string>{}) << miss.err;
  EXPECT_EQ(stats_field(miss.err, "prompt_cache"), "miss");
  EXPECT_EQ(stats_field(miss.err, "reused_tokens"), "0");
  ASSERT_TRUE(fs::is_regular_file(cache_));
  // Nothing but the cache is left beside it (no temporary file).
  std::size_t files = 0;
  for (const auto& e : fs::directory_iterator(fs::path(cache_).parent_path()))
    files += e.path().filename().string().find("prompt.kvs") != std::string::npos;
  EXPECT_EQ(files, 1u);

  // The same prompt: all 5 tokens reused, the same text.
  const Result hit = run(cached({"-i", "The cat"}));
  EXPECT_EQ(hit.out, kTheCatText);
  EXPECT_EQ(messages(hit.err), std::vector<std::string>{}) << hit.err;
  EXPECT_EQ(stats_field(hit.err, "prompt_cache"), "hit");
  EXPECT_EQ(stats_field(hit.err, "reused_tokens"), "5");
  const std::regex line(
      R"(^stats: prompt_tokens=\d+ generated_tokens=\d+ prefill_tok_s=[0-9.]+ decode_tok_s=[0-9.]+ kv_bytes=\d+ )"
      R"(threads=\d+ weights=f32 weight_bytes=\d+ prompt_cache=(hit|miss|rejected) reused_tokens=\d+\n$)");
  EXPECT_TRUE(std::regex_match(hit.err, line)) << hit.err;
  EXPECT_EQ(run(cached({"-i", "The cat", "--ids"})).out, kTheCatIds);

  // A prompt that goes on: 5 tokens reused, the rest prefilled, the text of
  // a run without the cache. A hit leaves the file as it was.
  const std::string before = slurp(cache_);
  const Result longer = run(cached({"-i", "The cat sat on the mat"}));
  EXPECT_EQ(stats_field(longer.err, "prompt_cache"), "hit");
  EXPECT_EQ(stats_field(longer.err, "reused_tokens"), "5");
  EXPECT_EQ(longer.out, run(greedy({"-i", "The cat sat on the mat"})).out);
  EXPECT_EQ(slurp(cache_), before);

  // Sampling with a seed picks the same tokens from the saved logits.
  const std::vector<std::string> sampled{"-i", "The cat", "-t", "1", "-s", "42"};
  EXPECT_EQ(run(cached(sampled)).out, run(greedy(sampled)).out);
}

TEST_F(PromptCache, CacheOptionsKeepTheOutput) {
  const std::vector<std::string> args{"-i", "The cat", "--kv-type", "int8", "--window", "64", "--sinks", "4",
                                      "-n", "300", "--ignore-eos"};
  const Result plain = run(greedy(args));
  const Result miss = run(cached(args)), hit = run(cached(args));
  EXPECT_EQ(stats_field(miss.err, "prompt_cache"), "miss") << miss.err;
  EXPECT_EQ(stats_field(hit.err, "prompt_cache"), "hit") << hit.err;
  EXPECT_EQ(miss.out, plain.out);
  EXPECT_EQ(hit.out, plain.out);
}

TEST_F(PromptCache, AnotherPromptIsRejectedAndReplaced) {
  ASSERT_EQ(run(cached({"-i", "The dog"})).exit_code, 0);
  expect_rejected({"-i", "The cat"}, "its prompt of 6 tokens is not the start of this prompt of 5");
  // A prompt shorter than the saved one, and its start.
  expect_rejected({"--prompt-ids", "1,368"}, "its prompt of 5 tokens is not the start of this prompt of 2");
}

TEST_F(PromptCache, OtherCacheOptionsAreRejected) {
  ASSERT_EQ(run(cached({"-i", "The cat", "--kv-type", "int8"})).exit_code, 0);
  expect_rejected({"-i", "The cat"}, "it was saved with --kv-type int8, this run has --kv-type f32");
  ASSERT_EQ(run(cached({"-i", "The cat", "--window", "64", "--sinks", "4"})).exit_code, 0);
  expect_rejected({"-i", "The cat"}, "it was saved with a window of 64 with 4 sinks, this run has no window");
}

TEST_F(PromptCache, AnotherModelIsRejected) {
  KVCACHE_MODEL_FILE_OR_SKIP(stories, "stories260K.bin");
  const Result other = run({stories, "-t", "0", "-n", "20", "--prompt-ids", "1,368,430,273,268", "--ids",
                            "--prompt-cache", cache_});
  ASSERT_EQ(other.exit_code, 0) << other.err;
  expect_rejected({"-i", "The cat"}, "was saved for n_layers = 5, this model has 4");

  // The same shape with other weights.
  const kvcache::ModelConfig c = kvcache::read_llama2c_header(model_).config();
  const std::string twin = (test_dir() / "twin.bin").string();
  kvcache::save_llama2c(kvcache::Decoder<float>(c, kvcache::random_weights<float>(c, 5)), twin);
  ASSERT_EQ(run({twin, "-z", tok_, "-t", "0", "-n", "20", "-i", "The cat", "--prompt-cache", cache_}).exit_code, 0);
  expect_rejected({"-i", "The cat"}, "was saved for a model of this shape with other weights");
  fs::remove(twin);
}

TEST_F(PromptCache, DamagedFilesAreRejected) {
  ASSERT_EQ(run(cached({"-i", "The cat"})).exit_code, 0);
  const std::string good = slurp(cache_);
  const auto write = [&](const std::string& bytes) {
    std::ofstream out(cache_, std::ios::binary | std::ios::trunc);
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  };
  std::string flipped = good;
  flipped[good.size() / 2] = static_cast<char>(flipped[good.size() / 2] ^ 0x10);
  write(flipped);
  expect_rejected({"-i", "The cat"}, "checksum mismatch");
  write(good.substr(0, good.size() - 1));
  expect_rejected({"-i", "The cat"}, "file is truncated");
  write(good + "x");
  expect_rejected({"-i", "The cat"}, "trailing bytes");
  write(good.substr(0, 8));  // the magic alone: one of ours, damaged
  expect_rejected({"-i", "The cat"}, "file is truncated");
  write("KVCSESS" + std::string(1, '\0') + std::string(300, 'x'));
  expect_rejected({"-i", "The cat"}, "format version");
}

// A cache that cannot be written (its directory does not exist) costs one
// line on stderr, not the run.
TEST_F(PromptCache, UnwritableCachePathStillGenerates) {
  const std::string absent = (test_dir() / "absent" / "prompt.kvs").string();
  const Result r = run(greedy({"-i", "The cat", "--prompt-cache", absent}));
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, kTheCatText);
  const std::vector<std::string> lines = messages(r.err);
  ASSERT_EQ(lines.size(), 1u) << r.err;
  EXPECT_EQ(lines[0].rfind("kvcache-generate: cannot save prompt cache " + absent + ": ", 0), 0u) << lines[0];
  EXPECT_FALSE(fs::exists(fs::path(absent).parent_path()));
}

// ============================================================================
// --prompt-cache: files kvcache did not write, and interrupted saves
// (issue 12, defects 1 and 6). Other engineers: please add tests below this
// block, not inside it.
// ============================================================================

// What a path is, to tell that it was left untouched.
struct PathState {
  bool exists = false;
  struct stat st {};
  std::string content;
  std::string link_target;
  bool operator==(const PathState& o) const {
    return exists == o.exists && (!exists || (st.st_mode == o.st.st_mode && st.st_ino == o.st.st_ino &&
                                              st.st_size == o.st.st_size &&
                                              st.st_mtim.tv_sec == o.st.st_mtim.tv_sec &&
                                              st.st_mtim.tv_nsec == o.st.st_mtim.tv_nsec &&
                                              content == o.content && link_target == o.link_target));
  }
};

PathState state_of(const std::string& path) {
  PathState s;
  s.exists = ::lstat(path.c_str(), &s.st) == 0;
  if (s.exists && S_ISREG(s.st.st_mode)) s.content = slurp(path);
  if (s.exists && S_ISLNK(s.st.st_mode)) s.link_target = fs::read_symlink(path).string();
  return s;
}

// Defect 12.1: --prompt-cache over a file kvcache did not write (a text file,
// an empty one, the tokenizer, a copy of the model, a symbolic link even to
// a session file, a dangling link, a directory, a FIFO, a device) is refused
// with one line and exit 1 before any work (nothing printed, the model not
// even loaded), and the path is left as it was: content, type, inode, mtime.
TEST_F(PromptCache, NeverReplacesAFileKvcacheDidNotWrite) {
  const fs::path dir = test_dir();
  ASSERT_EQ(run(cached({"-i", "The cat"})).exit_code, 0);  // a real session file at cache_
  const auto put = [&](const std::string& name, const std::string& bytes) {
    std::ofstream out(dir / name, std::ios::binary | std::ios::trunc);
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    return (dir / name).string();
  };
  std::vector<std::string> paths = {put("notes.txt", "my notes\n"), put("empty.kvs", ""),
                                    put("tok.kvs", slurp(tok_)), put("model.kvs", slurp(model_)),
                                    put("magic-prefix.kvs", "KVCSES")};
  fs::remove(dir / "link.kvs");
  fs::create_symlink(cache_, dir / "link.kvs");
  fs::remove(dir / "link.txt");
  fs::create_symlink(dir / "notes.txt", dir / "link.txt");
  fs::remove(dir / "dangling.kvs");
  fs::create_symlink(dir / "nowhere", dir / "dangling.kvs");
  fs::create_directories(dir / "dir.kvs");
  fs::remove(dir / "fifo.kvs");
  ASSERT_EQ(::mkfifo((dir / "fifo.kvs").c_str(), 0600), 0);
  for (const char* name : {"link.kvs", "link.txt", "dangling.kvs", "dir.kvs", "fifo.kvs"})
    paths.push_back((dir / name).string());
  // A device node of its own (root only), never a real /dev path.
  fs::remove(dir / "null.kvs");
  if (::mknod((dir / "null.kvs").c_str(), S_IFCHR | 0666, ::makedev(1, 3)) == 0)
    paths.push_back((dir / "null.kvs").string());

  for (const std::string& path : paths) {
    const PathState before = state_of(path);
    expect_failure(greedy({"-i", "The cat", "--prompt-cache", path}), "refusing to replace it");
    const Result r = run(greedy({"-i", "The cat", "--prompt-cache", path}));
    EXPECT_NE(r.err.find("--prompt-cache: kvcache: session file '" + path + "': "), std::string::npos) << r.err;
    EXPECT_TRUE(state_of(path) == before) << path << " was changed";
    // Before any work: a model that does not exist is not even looked at.
    expect_failure({(dir / "no-such-model.bin").string(), "--prompt-cache", path}, "refusing to replace it");
  }
  EXPECT_FALSE(fs::exists(dir / "nowhere"));
  EXPECT_EQ(slurp(dir / "notes.txt"), "my notes\n");
  for (const auto& e : fs::directory_iterator(dir))
    EXPECT_EQ(e.path().filename().string().find(".tmp"), std::string::npos) << e.path();
  fs::remove(dir / "null.kvs");
  fs::remove(dir / "fifo.kvs");
}

#if !defined(_WIN32)
// Starts KVCACHE_GENERATE_EXE with `args` in `dir`, output to files there.
pid_t spawn(const std::vector<std::string>& args, const fs::path& dir) {
  std::vector<std::string> all{KVCACHE_GENERATE_EXE};
  all.insert(all.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (auto& a : all) argv.push_back(&a[0]);
  argv.push_back(nullptr);
  const std::string out = (dir / "spawn-out.txt").string(), in = "/dev/null";
  const pid_t pid = ::fork();
  if (pid == 0) {
    const int o = ::open(out.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    const int i = ::open(in.c_str(), O_RDONLY);
    if (o < 0 || i < 0 || ::chdir(dir.c_str()) != 0) ::_exit(126);
    ::dup2(i, 0);
    ::dup2(o, 1);
    ::dup2(o, 2);
    ::execv(argv[0], argv.data());
    ::_exit(127);
  }
  return pid;
}

// Defect 12.6: runs interrupted by SIGINT at random moments around the
// save. After each, no temporary file is left beside the cache, and the
// cache is absent, the previous file or a complete session of one of the
// two prompts (they alternate, so that every run replaces the file).
TEST_F(PromptCache, InterruptedSavesLeaveNoTemporaryFile) {
  const fs::path dir = test_dir();
  const kvcache::Decoder<float> decoder = kvcache::load_llama2c(model_);
  // Two prompts of 111 tokens (a 227 KB session file), told apart by their
  // second id; -n 112 makes the save the last thing a run does.
  std::vector<int> prompt[2];
  std::string ids[2];
  for (int k = 0; k < 2; ++k) {
    prompt[k] = {1, 300 + k};
    while (prompt[k].size() < 111) prompt[k].push_back(260 + static_cast<int>(prompt[k].size() * 7 % 200));
    for (std::size_t i = 0; i < prompt[k].size(); ++i) ids[k] += (i ? "," : "") + std::to_string(prompt[k][i]);
  }
  const auto args = [&](int k) {
    return std::vector<std::string>{model_, "-t", "0", "-n", "112", "--ids", "--prompt-ids", ids[k],
                                    "--prompt-cache", cache_};
  };
  // How long a whole run takes here, to spread the signals over it.
  const auto start = std::chrono::steady_clock::now();
  int status = 0;
  ASSERT_EQ(::waitpid(spawn(args(0), dir), &status, 0) > 0 && WIFEXITED(status) && WEXITSTATUS(status) == 0, true);
  const auto full = std::chrono::steady_clock::now() - start;
  const auto full_us = std::chrono::duration_cast<std::chrono::microseconds>(full).count();

  std::mt19937 rng(12);
  std::uniform_int_distribution<long long> delay(full_us / 5, full_us + full_us / 10);
  int interrupted = 0, complete = 0;
  for (int run_index = 0; run_index < 40; ++run_index) {
    if (run_index % 4 == 0) fs::remove(cache_);  // sometimes no old file
    const int k = (run_index + 1) % 2;
    const pid_t pid = spawn(args(k), dir);
    ASSERT_GT(pid, 0);
    std::this_thread::sleep_for(std::chrono::microseconds(delay(rng)));
    ::kill(pid, SIGINT);
    ASSERT_EQ(::waitpid(pid, &status, 0), pid);
    interrupted += WIFSIGNALED(status) && WTERMSIG(status) == SIGINT;
    complete += WIFEXITED(status) && WEXITSTATUS(status) == 0;
    EXPECT_TRUE((WIFSIGNALED(status) && WTERMSIG(status) == SIGINT) || (WIFEXITED(status) && WEXITSTATUS(status) == 0))
        << "run " << run_index << ": status " << status;
    for (const auto& e : fs::directory_iterator(dir))
      EXPECT_EQ(e.path().filename().string().find(".tmp"), std::string::npos)
          << "run " << run_index << " left " << e.path();
    if (fs::exists(cache_)) {
      try {
        const kvcache::SavedSession<float> saved = kvcache::load_session(cache_, decoder);
        EXPECT_TRUE(saved.tokens == prompt[0] || saved.tokens == prompt[1]) << "run " << run_index;
      } catch (const std::exception& e) {
        ADD_FAILURE() << "run " << run_index << ": the cache is not a complete session file: " << e.what();
      }
    }
    for (const auto& e : fs::directory_iterator(dir))  // a fresh directory listing for the next run
      if (e.path().filename().string().find(".tmp") != std::string::npos) fs::remove(e.path());
  }
  std::cout << "[ info ] 40 runs: " << interrupted << " interrupted, " << complete << " complete\n";
  EXPECT_GT(interrupted, 0);
}
#endif

TEST_F(Cli, SeededSamplingIsReproducible) {
  const std::vector<std::string> args{model_, "-z", tok_, "-t", "1", "-s", "42", "-n", "64", "--ids"};
  const Result a = run(args), b = run(args);
  EXPECT_EQ(a.exit_code, 0);
  EXPECT_FALSE(a.out.empty());
  EXPECT_EQ(a.out, b.out);
  std::vector<std::string> top_p = args;
  top_p.insert(top_p.end(), {"-p", "0.5"});
  EXPECT_EQ(run(top_p).out, run(top_p).out);
}

TEST_F(Cli, Help) {
  for (const char* flag : {"-h", "--help"}) {
    const Result r = run({flag});
    EXPECT_EQ(r.exit_code, 0);
    EXPECT_EQ(r.out.rfind("Usage: kvcache-generate MODEL.bin", 0), 0u) << r.out;
    EXPECT_EQ(r.err, "");
  }
}

TEST_F(Cli, BadArguments) {
  expect_failure({}, "no model file");
  expect_failure(greedy({"--bogus"}), "unknown option '--bogus'");
  expect_failure(greedy({"-n"}), "needs a value");
  expect_failure(greedy({"-n", "abc"}), "-n");
  expect_failure(greedy({"-n", "-1"}), "-n");
  expect_failure(greedy({"-t", "-1"}), "-t");
  expect_failure(greedy({"-t", "x"}), "-t");
  expect_failure(greedy({"-p", "2"}), "-p");
  expect_failure(greedy({"-p", "-0.1"}), "-p");
  expect_failure(greedy({"-s", "x"}), "-s");
  expect_failure(greedy({"--threads", "0"}), "--threads");
  expect_failure(greedy({"--prompt-ids", "1,abc"}), "--prompt-ids");
  expect_failure(greedy({"--prompt-ids", "1,512"}), "outside the model's vocabulary");
  expect_failure(greedy({"extra.bin"}), "unexpected argument");
  for (const Result& r : {run(greedy({"--bogus"})), run({})}) EXPECT_NE(r.err.find("--help"), std::string::npos);
}

TEST_F(Cli, BadFiles) {
  expect_failure({"/nonexistent/model.bin", "-z", tok_}, "/nonexistent/model.bin");
  // A file name with a newline is escaped, so the message stays one line.
  expect_failure({"/nonexistent/two\nlines.bin", "-z", tok_}, "/nonexistent/two\\nlines.bin");
  expect_failure({fs::path(model_).parent_path().string(), "-z", tok_}, "directory");
  expect_failure({model_, "-z", "/nonexistent/tok.bin"}, "/nonexistent/tok.bin");
  // Without -z, text output needs ./tokenizer.bin, which is not there.
  expect_failure({model_, "-t", "0"}, "tokenizer.bin");
  // A checkpoint that is not one.
  expect_failure({tok_, "-z", tok_}, tok_);
}

// The tokenizer must have the model's vocabulary.
TEST_F(Cli, TokenizerOfAnotherVocabulary) {
  KVCACHE_MODEL_FILE_OR_SKIP(llama_tok, "llama2_tokenizer.bin");
  expect_failure({model_, "-z", llama_tok, "-t", "0"}, "vocab_size");
}

// Finite weights so large that the forward pass overflows: the program
// refuses the non-finite logits instead of sampling from NaN probabilities.
// (A temperature so small that logits / temperature overflows float is
// greedy decoding, its limit: see the Sampler tests.)
TEST(CliModel, OverflowingCheckpoint) {
  const kvcache::ModelConfig c = kvcache::llama2c_config(16, 24, 1, 2, 2, 11, 8);
  kvcache::DecoderWeights<float> w = kvcache::random_weights<float>(c, 1);
  w.final_norm.gamma.setConstant(3e38f);  // logits = E · (gamma ⊙ normed x) overflow
  const std::string file = (fs::path(KVCACHE_TEST_TMP_DIR) / "cli_overflowing.bin").string();
  kvcache::save_llama2c(kvcache::Decoder<float>(c, std::move(w)), file);
  for (const char* t : {"0", "1"}) {
    const Result r = run({file, "--prompt-ids", "1,5", "--ids", "-t", t});
    EXPECT_EQ(r.exit_code, 1) << r.out << r.err;
    EXPECT_NE(r.err.find("NaN or infinity"), std::string::npos) << r.err;
  }
  fs::remove(file);
}

// --prompts-file: one output line per prompt, in the file's order, each what
// the single-prompt run prints (newlines escaped), whatever --parallel.
class CliBatch : public Cli {
 protected:
  // Writes `content` to a file in the test's folder and returns its path.
  std::string write_prompts(const std::string& content) const {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    const fs::path dir =
        fs::path(KVCACHE_TEST_TMP_DIR) / "cli_tmp" / (std::string(info->test_suite_name()) + "." + info->name());
    fs::create_directories(dir);
    const fs::path file = dir / "prompts.txt";
    std::ofstream(file, std::ios::binary) << content;
    return file.string();
  }

  static std::vector<std::string> lines_of(const std::string& out) {
    std::vector<std::string> lines;
    std::size_t start = 0;
    for (std::size_t end; (end = out.find('\n', start)) != std::string::npos; start = end + 1)
      lines.push_back(out.substr(start, end - start));
    EXPECT_EQ(start, out.size()) << "output does not end with a newline";
    return lines;
  }

  // The single run's stdout as one line of a batch's output.
  static std::string as_line(const std::string& out) {
    EXPECT_FALSE(out.empty());
    return kvcache_cli::escape_line(out.substr(0, out.size() - 1));
  }

  const std::vector<std::string> prompts_{"The cat", "Once upon a time there was", "I", "The dog ran to the big red",
                                          "Dimensions"};
};

TEST_F(CliBatch, EachLineIsTheSinglePromptRun) {
  std::string content;
  for (const auto& p : prompts_) content += p + "\n";
  const std::string file = write_prompts(content);
  std::vector<std::string> text, ids;
  for (const auto& p : prompts_) {
    text.push_back(as_line(run(greedy({"-i", p})).out));
    ids.push_back(as_line(run(greedy({"-i", p, "--ids"})).out));
  }
  EXPECT_EQ(text[0], kvcache_cli::escape_line(kTheCatText.substr(0, kTheCatText.size() - 1)));
  for (const char* parallel : {"1", "2", "5", "16"}) {
    const Result r = run(greedy({"--prompts-file", file, "--parallel", parallel}));
    ASSERT_EQ(r.exit_code, 0) << r.err;
    EXPECT_EQ(r.err, "");
    EXPECT_EQ(lines_of(r.out), text) << "--parallel " << parallel;
    const Result r_ids = run(greedy({"--prompts-file", file, "--parallel", parallel, "--ids"}));
    EXPECT_EQ(lines_of(r_ids.out), ids) << "--parallel " << parallel << " --ids";
  }
  // Prompts fed a few tokens per step, beside the others' decoding.
  for (const char* step_tokens : {"1", "3", "7"}) {
    const Result r = run(greedy({"--prompts-file", file, "--parallel", "3", "--step-tokens", step_tokens, "--ids"}));
    ASSERT_EQ(r.exit_code, 0) << r.err;
    EXPECT_EQ(lines_of(r.out), ids) << "--step-tokens " << step_tokens;
  }
  // Per-sequence options: --ignore-eos and a compact cache in a window.
  const Result long_run = run({model_, "-z", tok_, "-t", "0", "-n", "300", "--window", "128", "--sinks", "4", "--kv-type",
                               "int8", "--ignore-eos", "--ids", "--prompts-file", file, "--parallel", "3"});
  ASSERT_EQ(long_run.exit_code, 0) << long_run.err;
  const auto long_lines = lines_of(long_run.out);
  ASSERT_EQ(long_lines.size(), prompts_.size());
  for (std::size_t k = 0; k < prompts_.size(); ++k)
    EXPECT_EQ(long_lines[k], as_line(run({model_, "-z", tok_, "-t", "0", "-n", "300", "--window", "128", "--sinks",
                                           "4", "--kv-type", "int8", "--ignore-eos", "--ids", "-i", prompts_[k]})
                                          .out))
        << k;
}

// Line k samples with seed + k - 1: line 1 is the run with -s SEED.
// Prompts that share their first tokens: with prefix sharing (the default)
// the later ones map the blocks the first computed, and every line is still
// its single run; --stats counts the tokens not computed and the pool's
// peak bytes, which sharing lowers.
TEST_F(CliBatch, SharedPromptPrefixesAreComputedOnceAndChangeNoLine) {
  const std::string shared = "Once upon a time there was a little girl named Lily who liked to play";
  std::vector<std::string> ids;
  std::string content;
  for (const char* tail : {" with her dog", " in the park", " all day", " and sing"}) {
    content += shared + tail + "\n";
    ids.push_back(as_line(run(greedy({"-i", shared + tail, "--ids"})).out));
  }
  const std::string file = write_prompts(content);
  std::size_t peak[2] = {};
  for (const bool sharing : {true, false}) {
    std::vector<std::string> args = {"--prompts-file", file, "--parallel", "4", "--block-size", "4", "--ids", "--stats"};
    if (!sharing) args.push_back("--no-prefix-sharing");
    const Result r = run(greedy(args));
    ASSERT_EQ(r.exit_code, 0) << r.err;
    EXPECT_EQ(lines_of(r.out), ids) << (sharing ? "sharing" : "not sharing");
    std::smatch m;
    ASSERT_TRUE(std::regex_search(r.err, m,
                                  std::regex(R"(block_size=4 prefix_hit_tokens=(\d+) kv_bytes_peak=(\d+) kv_bytes_needed_peak=(\d+)\n$)")))
        << r.err;
    const std::size_t hits = std::stoul(m[1]), held = std::stoul(m[2]), needed = std::stoul(m[3]);
    if (sharing)
      EXPECT_GE(hits, 3u * 8u);  // 3 later prompts, each at least 2 blocks of the shared words
    else
      EXPECT_EQ(hits, 0u);
    EXPECT_GE(held, needed);
    peak[sharing ? 0 : 1] = held;
  }
  EXPECT_LT(peak[0], peak[1]);
}

TEST_F(CliBatch, SampledLinesUseConsecutiveSeeds) {
  const std::string file = write_prompts("The cat\nOnce upon a time\r\nI\n");
  // Two batches: the seed follows the line, not the place in its batch.
  const Result r = run({model_, "-z", tok_, "-n", "64", "-t", "1", "-s", "42", "--prompts-file", file, "--parallel",
                        "2", "--ids", "--stats"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const std::vector<std::string> lines = lines_of(r.out);
  ASSERT_EQ(lines.size(), 3u);
  const std::vector<std::string> prompts{"The cat", "Once upon a time", "I"};
  for (std::size_t k = 0; k < 3; ++k)
    EXPECT_EQ(lines[k], as_line(run({model_, "-z", tok_, "-n", "64", "-t", "1", "-s", std::to_string(42 + k), "-i",
                                     prompts[k], "--ids"})
                                    .out))
        << k;
  const std::regex line(
      R"(^stats: prompts=3 prompt_tokens=\d+ generated_tokens=\d+ tok_s=[0-9.]+ parallel=2 threads=1 )"
      R"(block_size=16 prefix_hit_tokens=0 kv_bytes_peak=\d+ kv_bytes_needed_peak=\d+\n$)");
  EXPECT_TRUE(std::regex_match(r.err, line)) << r.err;
}

TEST_F(CliBatch, BadPromptFiles) {
  expect_failure(greedy({"--prompts-file", "/nonexistent/prompts.txt"}), "/nonexistent/prompts.txt");
  expect_failure(greedy({"--prompts-file", fs::path(model_).parent_path().string()}), "directory");
  expect_failure(greedy({"--prompts-file", write_prompts("The cat\n\nI\n")}), "line 2 is empty");
  expect_failure(greedy({"--prompts-file", write_prompts("")}), "has no prompts");
  expect_failure(greedy({"-n", "4", "--prompts-file", write_prompts("I\nThe cat\n")}),
                 "line 2: the prompt has 5 tokens");
  expect_failure(greedy({"--prompts-file", write_prompts("I\n"), "--parallel", "0"}), "--parallel");
  expect_failure(greedy({"--prompts-file", write_prompts("I\n"), "-i", "The cat"}), "cannot take -i");
}

TEST_F(Cli, Stories260KIds) {
  KVCACHE_MODEL_FILE_OR_SKIP(stories, "stories260K.bin");
  const Result r = run({stories, "-t", "0", "-n", "300", "--prompt-ids", "1", "--ids"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out.rfind("461 461 401 401 401 461 378 455 473 456 435 299 362 409 283 264 283 452 288 13 431", 0), 0u);
  EXPECT_EQ(std::count(r.out.begin(), r.out.end(), ' '), 299);
  EXPECT_NE(r.out.find("185 347 463 461 402 402 303 303 299 390 402 402\n"), std::string::npos);
}

// ===========================================================================
// Issue 12 (CLI): memory bounded by the work, malformed --prompt-ids fields,
// --stats without a decode step, the clamped -n, the default thread count.
// (Tests of the CLI by the kvcache-generate restructuring; other blocks of
// this file belong to other changes.)

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define KVCACHE_CLI_TEST_SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer) || __has_feature(memory_sanitizer)
#define KVCACHE_CLI_TEST_SANITIZED 1
#endif
#endif
#ifndef KVCACHE_CLI_TEST_SANITIZED
#define KVCACHE_CLI_TEST_SANITIZED 0
#endif

#if !defined(_WIN32)
struct LimitedResult : Result {
  long max_rss_kb = -1;  // the child's peak resident set, from wait4
};

// Runs the program as run() does, but in a child with at most
// `address_space` bytes of virtual memory (0: no limit; none under a
// sanitizer, whose shadow memory needs terabytes of address space) and
// `cpu_seconds` of CPU time (SIGXCPU past it: the test sees a crash, not a
// hang), and reports the child's own peak RSS.
LimitedResult run_limited(const std::vector<std::string>& args, std::size_t address_space, int cpu_seconds) {
  LimitedResult r;
  const fs::path dir = test_dir();
  const fs::path out = dir / "stdout.txt", err = dir / "stderr.txt";
  std::vector<std::string> argv_strings{KVCACHE_GENERATE_EXE};
  argv_strings.insert(argv_strings.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (std::string& a : argv_strings) argv.push_back(a.data());
  argv.push_back(nullptr);
  const pid_t pid = fork();
  if (pid == 0) {
    // Only async-signal-safe calls from here to execv.
    if (chdir(dir.c_str()) != 0) _exit(125);
    const int in_fd = open("/dev/null", O_RDONLY);
    const int out_fd = open(out.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    const int err_fd = open(err.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (in_fd < 0 || out_fd < 0 || err_fd < 0 || dup2(in_fd, 0) < 0 || dup2(out_fd, 1) < 0 || dup2(err_fd, 2) < 0)
      _exit(125);
    if (address_space != 0 && !KVCACHE_CLI_TEST_SANITIZED) {
      const rlimit as{address_space, address_space};
      if (setrlimit(RLIMIT_AS, &as) != 0) _exit(125);
    }
    const rlimit cpu{static_cast<rlim_t>(cpu_seconds), static_cast<rlim_t>(cpu_seconds)};
    if (setrlimit(RLIMIT_CPU, &cpu) != 0) _exit(125);
    execv(argv[0], argv.data());
    _exit(126);
  }
  if (pid < 0) {
    ADD_FAILURE() << "fork failed";
    return r;
  }
  int status = 0;
  rusage usage{};
  if (wait4(pid, &status, 0, &usage) != pid) {
    ADD_FAILURE() << "wait4 failed";
    return r;
  }
  EXPECT_TRUE(WIFEXITED(status)) << "did not exit normally (signal " << (WIFSIGNALED(status) ? WTERMSIG(status) : 0)
                                 << ")";
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  r.max_rss_kb = usage.ru_maxrss;
  r.out = slurp(out);
  r.err = slurp(err);
  return r;
}
#endif

TEST(CliArgs, PromptIdsEmptyFieldsAreMalformed) {
  // Defect 12.7: "1,,2" was read as {1, 2}.
  const auto message = [](const std::string& ids) -> std::string {
    try {
      (void)parse_args({"m", "--prompt-ids", ids});
    } catch (const UsageError& e) {
      return e.what();
    }
    return "(accepted)";
  };
  for (const auto& [ids, field] : std::vector<std::pair<std::string, std::string>>{
           {"1,,2", "field 2 of '1,,2' is empty"},
           {",1", "field 1 of ',1' is empty"},
           {"1,", "field 2 of '1,' is empty"},
           {"1, ,2", "field 2 of '1, ,2' is empty"},
           {"1,\t,2", "field 2 of '1,\\t,2' is empty"},
           {",", "field 1 of ',' is empty"},
           {"", "needs at least one token id"},
           {"   ", "needs at least one token id"},
           {"1,+5", "'+5'"},
           {"1,0x10", "'0x10'"},
           {"1,-0", "'-0'"},
           {"1,2147483648", "'2147483648' is too large"},
           {"99999999999999999999999", "too large"},
           {"1,2;3", "'2;3'"},
       }) {
    const std::string m = message(ids);
    EXPECT_NE(m.find("--prompt-ids"), std::string::npos) << ids << ": " << m;
    EXPECT_NE(m.find(field), std::string::npos) << ids << ": " << m;
  }
  // Separators: commas, or spaces and tabs, or both; blanks around an id.
  EXPECT_EQ(*parse_args({"m", "--prompt-ids", "1,368,430"}).prompt_ids, (std::vector<int>{1, 368, 430}));
  EXPECT_EQ(*parse_args({"m", "--prompt-ids", " 1 368\t430 "}).prompt_ids, (std::vector<int>{1, 368, 430}));
  EXPECT_EQ(*parse_args({"m", "--prompt-ids", "1, 368 ,430"}).prompt_ids, (std::vector<int>{1, 368, 430}));
  EXPECT_EQ(*parse_args({"m", "--prompt-ids", "0"}).prompt_ids, (std::vector<int>{0}));
  EXPECT_EQ(*parse_args({"m", "--prompt-ids", "007"}).prompt_ids, (std::vector<int>{7}));
}

TEST(CliArgs, ThreadsDefaultToTheAvailableCores) {
  using kvcache_cli::default_threads;
  EXPECT_EQ(default_threads(nullptr, 8), 8u);
  EXPECT_EQ(default_threads(nullptr, 0), 1u);  // hardware_concurrency() may not know
  EXPECT_EQ(default_threads(nullptr, 1000), kvcache_cli::kMaxThreads);
  // OMP_NUM_THREADS, when it is a count (its first one, for nested lists),
  // is what the user asked OpenMP programs for.
  EXPECT_EQ(default_threads("3", 8), 3u);
  EXPECT_EQ(default_threads(" 3 ", 8), 3u);
  EXPECT_EQ(default_threads("4,2", 8), 4u);
  EXPECT_EQ(default_threads("100000", 8), kvcache_cli::kMaxThreads);
  EXPECT_EQ(default_threads("99999999999999999999999", 8), kvcache_cli::kMaxThreads);
  for (const char* ignored : {"", "0", "x", "-2", "3x", " "})
    EXPECT_EQ(default_threads(ignored, 8), 8u) << "'" << ignored << "'";
  EXPECT_EQ(parse_args({"m"}).threads, kvcache_cli::default_threads());
  EXPECT_GE(parse_args({"m"}).threads, 1u);
  EXPECT_EQ(parse_args({"m", "--threads", "1"}).threads, 1u);
  EXPECT_NE(kvcache_cli::usage().find("OMP_NUM_THREADS"), std::string::npos);
}

class CliBounded : public CliBatch {};

#if !defined(_WIN32)
// Defect 12.3: a 255 MiB one-line --prompts-file with -n 128 was read whole
// and encoded (11.8 GB, 227 s) before its length was checked. A line longer
// than -n positions can hold (each token stands for at most
// max_token_length bytes) is refused after reading that many bytes.
TEST_F(CliBounded, LongPromptsFileLineIsRefusedBeforeEncoding) {
  const std::string sentence = "The cat sat on the mat and looked at the dog. ";
  std::string line;
  line.reserve((std::size_t{64} << 20) + sentence.size());
  while (line.size() < (std::size_t{64} << 20)) line += sentence;
  const std::string file = write_prompts("I\n" + line + "\nThe cat\n");
  line = std::string();
  // 1 GiB of address space: far more than the work needs, far less than
  // encoding 64 MiB takes. (ASan's shadow needs more: no limit there.)
  const LimitedResult r = run_limited(greedy({"-n", "16", "--prompts-file", file}), std::size_t{1} << 30, 60);
  fs::remove(file);
  EXPECT_EQ(r.exit_code, 1) << r.err;
  EXPECT_EQ(r.out, "");  // nothing is printed before the file is known good
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  EXPECT_NE(r.err.find("line 2"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("only 16 positions are run (-n 16"), std::string::npos) << r.err;
  if (!KVCACHE_CLI_TEST_SANITIZED) {
    EXPECT_LT(r.max_rss_kb, 200 * 1024) << r.err;
  }
}

// The same bound for -i: a long prompt is refused before it is encoded.
TEST_F(CliBounded, LongPromptIsRefusedBeforeEncoding) {
  const std::string text(100000, 'x');
  const LimitedResult r = run_limited(greedy({"-n", "16", "-i", text}), std::size_t{1} << 30, 60);
  EXPECT_EQ(r.exit_code, 1) << r.err;
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  EXPECT_NE(r.err.find("the prompt is 100000 bytes: at least "), std::string::npos) << r.err;
  // A prompt that may fit is encoded and checked as before.
  expect_failure(greedy({"-n", "4", "-i", "The cat"}), "the prompt has 5 tokens");
}

// Defect 12.4: -n 2147483647 with a window reserved room for 2³¹ ids (8.6 GB
// of address space) before generating, and died of bad_alloc under a memory
// limit. The run stops at BOS after a hundred tokens: it needs megabytes.
TEST_F(CliBounded, HugeStepsWithAWindowReserveOnlyWhatTheyUse) {
  const std::vector<std::string> huge{"-n", "2147483647", "--window", "128", "--threads", "2"};
  std::vector<std::string> args = greedy({"-i", "The cat"});
  args.insert(args.end(), huge.begin(), huge.end());
  const LimitedResult single = run_limited(args, std::size_t{2} << 30, 120);
  EXPECT_EQ(single.exit_code, 0) << single.err;
  EXPECT_EQ(single.out, kTheCatText);
  EXPECT_EQ(single.err, "");
  args = greedy({"--prompts-file", write_prompts("The cat\nI\n"), "--parallel", "2"});
  args.insert(args.end(), huge.begin(), huge.end());
  const LimitedResult batch = run_limited(args, std::size_t{2} << 30, 120);
  EXPECT_EQ(batch.exit_code, 0) << batch.err;
  EXPECT_EQ(batch.out.substr(0, batch.out.find('\n')), as_line(kTheCatText));
}
#endif

TEST_F(Cli, PromptIdsEmptyFieldIsRefused) {
  expect_failure(greedy({"--prompt-ids", "1,,368"}), "field 2 of '1,,368' is empty");
  expect_failure(greedy({"--prompt-ids", "1,368,"}), "field 3 of '1,368,' is empty");
}

// --stats after a run without a decode step: no rate, not 0.00.
TEST_F(Cli, StatsWithoutADecodeStep) {
  const Result r = run(greedy({"-n", "5", "-i", "The cat", "--stats"}));  // 5 prompt tokens, 1 generated
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.err.find(" generated_tokens=1 "), std::string::npos) << r.err;
  EXPECT_NE(r.err.find(" decode_tok_s=n/a "), std::string::npos) << r.err;
  const Result two = run(greedy({"-n", "6", "-i", "The cat", "--stats"}));
  EXPECT_EQ(stats_field(two.err, "decode_tok_s").find_first_not_of("0123456789."), std::string::npos) << two.err;
}

// -n past the context without a window is clamped to seq_len, as run does,
// and said on stderr.
TEST_F(CliBounded, StepsPastTheContextAreClampedAloud) {
  const Result r = run(greedy({"-n", "100000", "-i", "The cat"}));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, kTheCatText);
  EXPECT_EQ(r.err, "kvcache-generate: -n 100000 is more than the model's seq_len of 128: running 128 positions\n");
  const Result batch = run(greedy({"-n", "129", "--prompts-file", write_prompts("I\n")}));
  ASSERT_EQ(batch.exit_code, 0) << batch.err;
  EXPECT_EQ(batch.err, "kvcache-generate: -n 129 is more than the model's seq_len of 128: running 128 positions\n");
  // Not with a window (which goes past seq_len), nor for -n 0 or -n seq_len.
  for (const char* steps : {"0", "128"}) EXPECT_EQ(run(greedy({"-n", steps, "-i", "The cat"})).err, "") << steps;
  EXPECT_EQ(run(greedy({"-n", "200", "--window", "128", "-i", "The cat"})).err, "");
}

// Without --threads: the available cores (default_threads()), at most one
// per 4 MiB of weights: one for this 1 MB model. The output does not change.
TEST_F(Cli, DefaultThreadsFollowTheModelSize) {
  const Result r = run(greedy({"-i", "The cat", "--stats"}));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, kTheCatText);
  EXPECT_EQ(stats_field(r.err, "threads"), "1") << r.err;
  EXPECT_EQ(stats_field(run(greedy({"-i", "The cat", "--stats", "--threads", "2"})).err, "threads"), "2");
}

TEST(CliModel, DefaultThreadsOnALargerModel) {
  // 2.8M parameters, 11 MB of float32 weights: up to 2 threads by default.
  const kvcache::ModelConfig c = kvcache::llama2c_config(256, 512, 4, 4, 4, 512, 32);
  const kvcache::Decoder<float> d(c, kvcache::random_weights<float>(c, 5));
  const fs::path model = test_dir() / "larger.bin";
  kvcache::save_llama2c(d, model.string());
  const std::size_t expected = std::min<std::size_t>(kvcache_cli::default_threads(), d.weight_bytes() >> 22);
  ASSERT_EQ(expected, std::min<std::size_t>(kvcache_cli::default_threads(), 2));
  const std::vector<std::string> args{model.string(), "--prompt-ids", "1,5,9", "--ids", "-t", "0", "-n", "32", "--stats"};
  const Result r = run(args);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(stats_field(r.err, "threads"), std::to_string(expected)) << r.err;
  std::vector<std::string> one = args;
  one.insert(one.end(), {"--threads", "1"});
  EXPECT_EQ(run(one).out, r.out);
  fs::remove(model);
}

}  // namespace

// A GGUF file (told by its magic, whatever its name): the same ids as the
// checkpoint, stopping at the file's EOS (2) instead of llama2.c's BOS; a
// text prompt is encoded and the output decoded with the file's vocabulary
// (llama.cpp's SentencePiece rules; -z is not read), here tok512's.
TEST(CliGguf, AidreamsTheCat) {
  KVCACHE_MODEL_FILE_OR_SKIP(model, "aidreams260K.bin");
  KVCACHE_MODEL_FILE_OR_SKIP(tok512, "tok512.bin");
  const fs::path file = test_dir() / "aidreams.model";
  {
    const std::string bytes = kvcache_test::llama_gguf(kvcache::load_llama2c(model), kvcache_test::kGgmlF32,
                                                       kvcache_test::llama2c_vocab(kvcache::Tokenizer::load(tok512)));
    std::ofstream(file, std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  }
  const Result r = run({file.string(), "--prompt-ids", "1,368,430,273,268", "-n", "128", "-t", "0", "--ids", "--stats"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, kTheCatIds.substr(0, kTheCatIds.size() - 3) + "\n");
  EXPECT_NE(r.err.find("weights=f32 weight_bytes=923904"), std::string::npos) << r.err;
  const Result bf16 = run({file.string(), "--prompt-ids", "1", "-n", "8", "--ids", "--weights", "bf16", "--stats"});
  EXPECT_EQ(bf16.exit_code, 0) << bf16.err;
  EXPECT_NE(bf16.err.find("weights=bf16 weight_bytes=463104"), std::string::npos) << bf16.err;
  // Text in, text out: the checkpoint's text up to its EOS, which is not printed.
  const std::string until_eos = kTheCatText.substr(0, kTheCatText.find("\n</s>")) + "\n";
  const Result text = run({file.string(), "-i", "The cat", "-n", "128", "-t", "0", "-z", "/nonexistent"});
  EXPECT_EQ(text.exit_code, 0) << text.err;
  EXPECT_EQ(text.out, until_eos);
  const fs::path prompts = test_dir() / "prompts.txt";
  std::ofstream(prompts) << "The cat\nThe cat\n";
  const Result batch = run({file.string(), "--prompts-file", prompts.string(), "--parallel", "2", "-n", "128", "-t", "0"});
  EXPECT_EQ(batch.exit_code, 0) << batch.err;
  EXPECT_EQ(batch.out, until_eos + until_eos);
}

// A q4_0 file (the test writer's, as ggml's reference quantizer writes it;
// ffn_down, rows of 172 values, as f16): --stats names both types, and the
// ids are llama.cpp's own on that file (node-llama-cpp 3.21.1, flash
// attention off, f32 K/V cache), which
// kvcache's q4_0 arithmetic reproduces here for all 124 generated ids.
static const std::string kTheCatQ4_0LlamaCppIds =
    "368 430 273 268 322 260 327 446 262 421 392 275 280 269 440 270 283 448 429 465 438 340 431 338 353 "
    "341 325 266 386 269 293 446 299 303 384 467 407 333 312 266 331 396 275 429 464 448 464 464 464 464 "
    "464 464 464 448 429 468 342 358 402 327 446 429 464 448 464 464 464 464 464 464 464 448 429 468 342 "
    "358 402 327 446 429 464 448 464 464 464 464 464 464 464 448 429 468 342 358 402 327 446 299 303 266 "
    "323 434 285 362 429 464 448 464 464 464 464 464 448 429 468 342 358 402 327 446 429 464 448 464 464 "
    "464 464 464";

TEST(CliGguf, AidreamsQ4_0GivesLlamaCppsIds) {
  KVCACHE_MODEL_FILE_OR_SKIP(model, "aidreams260K.bin");
  KVCACHE_MODEL_FILE_OR_SKIP(tok512, "tok512.bin");
  const fs::path file = test_dir() / "aidreams.q4_0.gguf";
  {
    const std::string bytes = kvcache_test::llama_gguf(kvcache::load_llama2c(model), kvcache_test::kGgmlQ4_0,
                                                       kvcache_test::llama2c_vocab(kvcache::Tokenizer::load(tok512)));
    std::ofstream(file, std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  }
  const Result r =
      run({file.string(), "--prompt-ids", "1,368,430,273,268", "-n", "128", "-t", "0", "--ids", "--ignore-eos", "--stats"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, kTheCatQ4_0LlamaCppIds + "\n");
  EXPECT_NE(r.err.find("weights=q4_0+f16 weight_bytes="), std::string::npos) << r.err;
}
