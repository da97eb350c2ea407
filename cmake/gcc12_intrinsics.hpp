// Force-included first into every source file of kvcache's own targets when
// they are built by g++ 12 with KVCACHE_NATIVE=ON (see CMakeLists.txt).
//
// g++ 12 warns "'__Y' may be used uninitialized" inside its own AVX-512
// headers wherever Eigen's products inline them: intrinsics such as
// _mm512_broadcastss_ps pass _mm512_undefined_ps(), a deliberately
// self-initialised "don't care" operand that the instruction never reads
// (GCC bug 105593, fixed in GCC 13). With -Werror that breaks the build.
// Including the intrinsics here, first, between these pragmas silences
// -Wmaybe-uninitialized for the lines of those headers only; every other
// line, kvcache's and the tests' included, keeps the warning.
#if defined(__x86_64__) || defined(__i386__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#endif
