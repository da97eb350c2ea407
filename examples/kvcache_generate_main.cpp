// kvcache-generate's main(): llama2.c's `run`, on kvcache. The program is
// run_generate() in generate_main.hpp (so that the fuzz harness can run it
// in-process); see there and cli_args.hpp for what it does.
#include <iostream>

#include "generate_main.hpp"

int main(int argc, char** argv) { return kvcache_cli::run_generate(argc, argv, std::cout, std::cerr); }
