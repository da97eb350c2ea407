// Tests of kvcache-generate: its argument parser called directly, and the
// built program run as a user runs it (exit code, stdout, stderr), against
// llama2.c's reference outputs from ../shared/models/README.md.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <kvcache/llama2c.hpp>
#include <regex>
#include <string>
#include <vector>

#include "cli_args.hpp"
#include "models.hpp"

#if !defined(_WIN32)
#include <sys/wait.h>
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
  EXPECT_EQ(o.threads, 1u);
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

Result run(const std::vector<std::string>& args) {
  Result r;
#if defined(_WIN32)
  (void)args;
  ADD_FAILURE() << "the CLI test runs the program through a POSIX shell";
#else
  // A folder per test (ctest may run tests in parallel), also the working
  // directory, so that no stray ./tokenizer.bin is found.
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  const fs::path dir =
      fs::path(KVCACHE_TEST_TMP_DIR) / "cli_tmp" / (std::string(info->test_suite_name()) + "." + info->name());
  fs::create_directories(dir);
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
      R"(^stats: prompt_tokens=\d+ generated_tokens=\d+ prefill_tok_s=[0-9.]+ decode_tok_s=[0-9.]+ kv_bytes=\d+ threads=\d+\n$)");
  EXPECT_TRUE(std::regex_match(r.err, line)) << r.err;
  EXPECT_NE(r.err.find("prompt_tokens=5 generated_tokens=121 "), std::string::npos) << r.err;
  EXPECT_NE(r.err.find(" threads=2"), std::string::npos) << r.err;
  const Result nc = run(greedy({"-i", "The cat", "--stats", "--no-cache"}));
  EXPECT_TRUE(std::regex_match(nc.err, line)) << nc.err;
}

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
  expect_failure({fs::path(model_).parent_path().string(), "-z", tok_}, "directory");
  expect_failure({model_, "-z", "/nonexistent/tok.bin"}, "/nonexistent/tok.bin");
  // Without -z, text output needs ./tokenizer.bin, which is not there.
  expect_failure({model_, "-t", "0"}, "tokenizer.bin");
  // The tokenizer must have the model's vocabulary.
  const std::string llama_tok = ::kvcache_test::model_path("llama2_tokenizer.bin");
  if (!llama_tok.empty()) expect_failure({model_, "-z", llama_tok, "-t", "0"}, "vocab_size");
  // A checkpoint that is not one.
  expect_failure({tok_, "-z", tok_}, tok_);
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

TEST_F(Cli, Stories260KIds) {
  KVCACHE_MODEL_FILE_OR_SKIP(stories, "stories260K.bin");
  const Result r = run({stories, "-t", "0", "-n", "300", "--prompt-ids", "1", "--ids"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out.rfind("461 461 401 401 401 461 378 455 473 456 435 299 362 409 283 264 283 452 288 13 431", 0), 0u);
  EXPECT_EQ(std::count(r.out.begin(), r.out.end(), ' '), 299);
  EXPECT_NE(r.out.find("185 347 463 461 402 402 303 303 299 390 402 402\n"), std::string::npos);
}

}  // namespace
