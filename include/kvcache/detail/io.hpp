// kvcache/detail/io.hpp — what every file format of kvcache shares: error
// messages, little-endian codecs, a checksum (FNV-1a), saturating sizes,
// bounded reads, opening a file with a clear error, the "may this path be
// replaced" check, and ONE atomic write. POSIX
// (Linux, macOS, the BSDs); the unnamed temporary file needs Linux.
//
// The guarantees of write_atomically(path, ...), used for every file kvcache
// writes (save_llama2c checkpoints, save_session files):
//
//   1. `path` ends up holding exactly one writer's complete file, or the file
//      it held before, untouched. Never a mix of two writers, never a prefix:
//      the bytes go to a file no one else can name, are flushed to disk
//      (fsync), and only then get a name in the directory by link or rename,
//      which the kernel performs atomically. The directory is then flushed
//      too, so after a power failure the name holds the old file or the new.
//   2. No temporary file outlives the process. On Linux the file is created
//      without a name (open(dir, O_TMPFILE)): until it is linked, a crash or
//      any signal, SIGKILL included, leaves nothing behind. When `path` does
//      not exist yet it is linked straight to `path` (linkat fails with
//      EEXIST rather than replace anything, so no temporary name is ever
//      visible). When it does, it is linked to a unique temporary name
//      (`path`.tmp.<16 random hex digits>) and renamed over `path` at once:
//      two system calls apart, the only moment a temporary name exists. A
//      failed rename removes it. Where O_TMPFILE is not available (some
//      file systems: EOPNOTSUPP, EISDIR, EINVAL; or no /proc to link it
//      through), the temporary is created by name with O_EXCL (never
//      shared with another writer) and removed on every error; then a
//      signal's default action during the write can leave it, which is why
//      kvcache-generate defers SIGINT and SIGTERM around its save. SIGKILL
//      in those windows cannot be caught by anyone.
//   3. Errors (ENOSPC, EACCES, EROFS, EDQUOT, EIO, ...) are std::runtime_error
//      "kvcache: <label>: <what failed>: <strerror>"; `path` is then as it
//      was and no temporary file is left.
//   4. It never writes over a file that the caller's check refuses: the check
//      (for example "is this a session file?") runs before anything is written
//      and again just before the rename, so that a file put there meanwhile
//      is refused too. The rename replaces a symbolic link itself, never the
//      file it points to. (A file swapped in within the microseconds between
//      that last check and the rename cannot be told apart: the same race
//      every "check, then rename" program has.)
//
// The file is created with mode 0666 minus the umask, like any new file; the
// mode of a replaced file is not carried over.
#pragma once

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <istream>
#include <limits>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>
#include <system_error>
#include <type_traits>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

namespace kvcache::detail::io {

// ============================================================================
// Errors
// ============================================================================

// One message from strings and numbers (numbers through std::to_string).
inline const std::string& piece(const std::string& s) { return s; }
template <typename N, typename = std::enable_if_t<std::is_arithmetic<N>::value>>
std::string piece(N n) {
  return std::to_string(n);
}
template <typename... Parts>
std::string text(const Parts&... parts) {
  return (std::string() + ... + piece(parts));
}

// "kvcache: <label>: <problem>", the problem put together as text() does;
// `label` names the file ("model.bin", or "session file 'a.kvs'").
template <typename... Parts>
[[noreturn]] void fail(const std::string& label, const Parts&... problem) {
  throw std::runtime_error("kvcache: " + label + ": " + text(problem...));
}

// std::invalid_argument "kvcache: <message>", put together as text() does.
template <typename... Parts>
[[noreturn]] void invalid(const Parts&... message) {
  throw std::invalid_argument("kvcache: " + text(message...));
}

inline std::string errno_text(int error) {
  return error != 0 ? ": " + std::generic_category().message(error) : std::string();
}

// ============================================================================
// Little-endian codecs
// ============================================================================

static_assert(sizeof(float) == 4 && std::numeric_limits<float>::is_iec559, "kvcache files hold IEEE-754 float32");
static_assert(sizeof(double) == 8 && std::numeric_limits<double>::is_iec559, "kvcache files hold IEEE-754 double");

// Floats are read and written as the host's bytes: right on little-endian
// IEEE-754 hosts only, so the others are refused.
inline void require_little_endian(const std::string& label, const std::string& format) {
  const std::uint32_t one = 1;
  if (*reinterpret_cast<const unsigned char*>(&one) != 1)
    fail(label, format, " are little-endian and this host is not (unsupported)");
}

// Bit casts, so that signed and floating values go through the codecs below.
template <typename To, typename From>
To bit_cast(const From& from) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast between types of one size");
  To to;
  std::memcpy(&to, &from, sizeof to);
  return to;
}

// get_le<T> and put_le<T> for any T of 2, 4 or 8 bytes (uint16, int32,
// float, uint64, double, ...): its bits as an unsigned integer, lowest byte
// first.
template <typename T>
using Bits = std::conditional_t<sizeof(T) == 8, std::uint64_t,
                                std::conditional_t<sizeof(T) == 4, std::uint32_t, std::uint16_t>>;

template <typename T>
T get_le(const unsigned char* p) {
  Bits<T> v = 0;
  for (std::size_t i = sizeof(T); i-- > 0;) v = static_cast<Bits<T>>((v << 8) | p[i]);
  return bit_cast<T>(v);
}
template <typename T>
void put_le(T value, unsigned char* p) {
  const auto v = bit_cast<Bits<T>>(value);
  for (std::size_t i = 0; i < sizeof(T); ++i) p[i] = static_cast<unsigned char>((v >> (8 * i)) & 0xFFu);
}

// ============================================================================
// Checksum
// ============================================================================

// FNV-1a, 64 bits, going on from the state h (kFnvStart at first): one xor
// and one multiply per byte. Both are bijections of the state, so changing
// any single byte always changes the result.
constexpr std::uint64_t kFnvStart = 0xcbf29ce484222325ull;
inline std::uint64_t fnv1a(std::uint64_t h, const unsigned char* p, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 0x100000001b3ull;
  return h;
}
inline std::uint64_t fnv1a(std::uint64_t h, std::uint64_t v) {  // v's 8 bytes, little-endian
  unsigned char b[8];
  put_le(v, b);
  return fnv1a(h, b, 8);
}

// ============================================================================
// Saturating sizes
// ============================================================================

// a·b and a+b saturating at 2^64 − 1 instead of wrapping, so that a corrupt
// header yields a huge count that the limits refuse, never a small wrapped
// one that they would let through.
constexpr std::uint64_t kSaturated = std::numeric_limits<std::uint64_t>::max();
inline std::uint64_t sat_mul(std::uint64_t a, std::uint64_t b) {
  return a != 0 && b > kSaturated / a ? kSaturated : a * b;
}
inline std::uint64_t sat_add(std::uint64_t a, std::uint64_t b) { return b > kSaturated - a ? kSaturated : a + b; }
inline std::string count_string(std::uint64_t n) { return n == kSaturated ? "more than 2^64" : std::to_string(n); }

// ============================================================================
// Reading
// ============================================================================

// `path` opened for binary reading, or throws "kvcache: <label>: <why>":
// "is a directory", "no such file", or the system's reason.
inline std::ifstream open_for_reading(const std::string& path, const std::string& label) {
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec)) fail(label, "is a directory");
  errno = 0;
  std::ifstream in(path, std::ios::binary);
  const int error = errno;
  if (!in)
    fail(label, std::filesystem::exists(path, ec) ? "cannot open for reading" + errno_text(error) : "no such file");
  return in;
}

// Bytes left in `in` from where it is, when it can seek (a file, a string
// stream); nothing otherwise (a pipe). The position is left where it was.
inline std::optional<std::uint64_t> remaining_bytes(std::istream& in) {
  const std::istream::pos_type here = in.tellg(), none(-1);
  const std::istream::pos_type end = here != none && in.seekg(0, std::ios::end) ? in.tellg() : none;
  in.clear(in.rdstate() & ~std::ios::failbit);
  const bool back = here != none && in.seekg(here);
  in.clear(in.rdstate() & ~std::ios::failbit);
  if (!back || end == none || end < here) return std::nullopt;
  return static_cast<std::uint64_t>(end - here);
}

// The bytes left in a stream that must be measurable, or throws naming it.
inline std::uint64_t file_length(std::istream& in, const std::string& label) {
  const std::optional<std::uint64_t> length = remaining_bytes(in);
  if (!length) fail(label, "cannot determine the file's length (not a regular file?)");
  return *length;
}

// Throws "file is truncated" or "file has trailing bytes" unless a file of
// `actual` bytes has the `expected` length that its header implies.
inline void require_length(const std::string& label, std::uint64_t actual, std::uint64_t expected) {
  if (actual != expected)
    fail(label, actual < expected ? "file is truncated" : "file has trailing bytes", ": the header implies ", expected,
         " bytes, the file has ", actual);
}

// Reads exactly the bytes asked for, or throws "file is truncated: it ends
// in the <what> after N bytes". `consumed()` counts the bytes read so far,
// `checksum()` is their FNV-1a. A stream that could not be measured (a pipe)
// is stopped once it has given more than `max_bytes`, named `limit` in the
// message, so that memory never grows with what it keeps sending.
class BoundedReader {
 public:
  BoundedReader(std::istream& in, std::string label, std::uint64_t max_bytes = UINT64_MAX, std::string limit = "")
      : in_(in), label_(std::move(label)), limit_(std::move(limit)), max_bytes_(max_bytes) {}

  void read(unsigned char* p, std::size_t n, const std::string& what) {
    if (n == 0) return;
    in_.read(reinterpret_cast<char*>(p), static_cast<std::streamsize>(n));
    const auto got = static_cast<std::size_t>(std::max<std::streamsize>(in_.gcount(), 0));
    consumed_ += got;
    if (consumed_ > max_bytes_) fail(label_, "is larger than ", limit_, " (more than ", max_bytes_, " bytes)");
    if (got != n) fail(label_, "file is truncated: it ends in the ", what, " after ", consumed_, " bytes");
    checksum_ = fnv1a(checksum_, p, n);
  }

  // `count` little-endian values of T (get_le), a block of 4 KB at a time,
  // each handed to on_value: memory grows with what actually arrives, never
  // with what a header claims.
  template <typename T, typename F>
  void read_values(std::uint64_t count, const std::string& what, F&& on_value) {
    unsigned char block[4096];
    while (count > 0) {
      const std::size_t n = static_cast<std::size_t>(std::min<std::uint64_t>(count, sizeof block / sizeof(T)));
      read(block, sizeof(T) * n, what);
      for (std::size_t k = 0; k < n; ++k) on_value(get_le<T>(block + sizeof(T) * k));
      count -= n;
    }
  }

  std::uint64_t consumed() const { return consumed_; }
  std::uint64_t checksum() const { return checksum_; }

 private:
  std::istream& in_;
  std::string label_, limit_;
  std::uint64_t max_bytes_, consumed_ = 0;
  std::uint64_t checksum_ = kFnvStart;
};

// ============================================================================
// May this path be replaced?
// ============================================================================

// What a caller's check sees of an existing regular file: its first bytes
// (fewer when the file is shorter) and its length.
struct FilePrefix {
  std::string bytes;
  std::uint64_t size = 0;
};

// Throws std::runtime_error unless `path` may be written over: it does not
// exist, or it is a regular file (a symbolic link is not followed: it is
// refused) that `accept(prefix)` recognises as a file of `kind` (for
// example "kvcache session file"), given its first `prefix_bytes` bytes.
// Nothing is changed.
template <typename Accept>
void require_replaceable(const std::string& path, const std::string& label, const std::string& kind,
                         std::size_t prefix_bytes, Accept&& accept) {
  const std::string refuse = "; refusing to replace it";
  const auto require_regular = [&](mode_t mode) {
    if (S_ISREG(mode)) return;
    fail(label, "is ",
         S_ISLNK(mode)                    ? "a symbolic link"
         : S_ISDIR(mode)                  ? "a directory"
         : S_ISFIFO(mode)                 ? "a FIFO"
         : S_ISCHR(mode) || S_ISBLK(mode) ? "a device"
                                          : "not a regular file",
         ", not a ", kind, refuse);
  };
  struct stat st;
  if (::lstat(path.c_str(), &st) != 0) {
    const int error = errno;
    if (error == ENOENT || error == ENOTDIR) return;  // nothing to replace (writing then fails, naming why)
    fail(label, "cannot inspect it before replacing it", errno_text(error));
  }
  require_regular(st.st_mode);
  // O_NOFOLLOW and O_NONBLOCK: if it became a link or a FIFO since lstat,
  // fail rather than follow or block.
  const int fd = ::open(path.c_str(), O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
  int error = fd < 0 ? errno : 0;
  FilePrefix prefix;
  prefix.bytes.resize(prefix_bytes);
  std::size_t got = 0;
  while (fd >= 0 && got < prefix_bytes) {
    const ::ssize_t n = ::read(fd, &prefix.bytes[got], prefix_bytes - got);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) error = errno;
    if (n <= 0) break;
    got += static_cast<std::size_t>(n);
  }
  const bool measured = fd >= 0 && ::fstat(fd, &st) == 0;
  if (fd >= 0) ::close(fd);
  if (error != 0)
    fail(label, "exists and is not a ", kind, refuse, " (cannot read it to check", errno_text(error), ")");
  require_regular(measured ? st.st_mode : 0);  // mode 0: "not a regular file"
  prefix.bytes.resize(got);
  prefix.size = static_cast<std::uint64_t>(st.st_size);
  if (!accept(static_cast<const FilePrefix&>(prefix))) fail(label, "exists and is not a ", kind, refuse);
}

// ============================================================================
// The atomic write
// ============================================================================

// What the writer callback writes into: put(bytes, n) appends, buffered,
// and throws std::runtime_error naming the file on failure.
class FileSink {
 public:
  FileSink(int fd, const std::string& label) : fd_(fd), label_(label) { buffer_.reserve(kBuffer); }

  void put(const void* data, std::size_t n) {
    if (buffer_.size() + n > kBuffer) flush();
    if (n >= kBuffer) return write_out(static_cast<const char*>(data), n);  // large pieces go straight out
    buffer_.append(static_cast<const char*>(data), n);
  }

  void flush() {
    write_out(buffer_.data(), buffer_.size());
    buffer_.clear();
  }

 private:
  static constexpr std::size_t kBuffer = std::size_t{1} << 16;

  void write_out(const char* p, std::size_t n) {
    while (n > 0) {
      const ::ssize_t w = ::write(fd_, p, std::min<std::size_t>(n, std::size_t{1} << 30));
      if (w < 0 && errno == EINTR) continue;
      if (w <= 0) fail(label_, "write error", errno_text(w < 0 ? errno : EIO));
      p += w;
      n -= static_cast<std::size_t>(w);
    }
  }

  int fd_;
  const std::string& label_;
  std::string buffer_;
};

// Closes a descriptor once, and removes a named temporary unless released.
struct TemporaryFile {
  int fd = -1;
  std::string name;  // empty while the file has no name
  ~TemporaryFile() {
    if (fd >= 0) ::close(fd);
    if (!name.empty()) ::unlink(name.c_str());
  }
};

// Calls make(name) with names beside `path` that no one else is using,
// `path`.tmp.<16 hex digits> from the random device, the clock and the
// attempt, while it fails with EEXIST (16 times at most). Returns make's
// last errno, 0 once it succeeded with `chosen` set to the name.
template <typename Make>
int with_temporary_name(const std::string& path, std::string& chosen, Make&& make) {
  std::random_device device;
  int error = EEXIST;
  for (unsigned attempt = 0; attempt < 16 && error == EEXIST; ++attempt) {
    const auto now = static_cast<std::uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count());
    const std::uint64_t salt = ((static_cast<std::uint64_t>(device()) << 32) | device()) ^ now ^ attempt;
    char suffix[32];
    std::snprintf(suffix, sizeof suffix, ".tmp.%016llx", static_cast<unsigned long long>(salt));
    error = make(path + suffix);
    if (error == 0) chosen = path + suffix;
  }
  return error;
}

inline void sync_directory(const std::string& dir) {
  // Best effort: some file systems refuse to fsync a directory (EINVAL), and
  // the file is already in place whatever happens here.
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return;
  (void)::fsync(fd);
  ::close(fd);
}

// Opens an unnamed file in `dir` (O_TMPFILE), or returns -1 when this file
// system or kernel cannot, or cannot link one later (no /proc).
inline int open_unnamed(const std::string& dir, const std::string& label) {
#if defined(__linux__) && defined(O_TMPFILE)
  if (::access("/proc/self/fd", X_OK) != 0) return -1;
  const int fd = ::open(dir.c_str(), O_TMPFILE | O_WRONLY | O_CLOEXEC, 0666);
  if (fd >= 0) return fd;
  const int error = errno;
  if (error == EOPNOTSUPP || error == EISDIR || error == EINVAL) return -1;
  fail(label, "cannot create a temporary file in ", dir, errno_text(error));
#else
  (void)dir, (void)label;
  return -1;
#endif
}

// Gives the unnamed file `fd` the name `name`: linkat through /proc, which
// fails with EEXIST instead of replacing anything. Returns errno, 0 on success.
inline int link_unnamed(int fd, const std::string& name) {
  const std::string proc = "/proc/self/fd/" + std::to_string(fd);
  return ::linkat(AT_FDCWD, proc.c_str(), AT_FDCWD, name.c_str(), AT_SYMLINK_FOLLOW) == 0 ? 0 : errno;
}

// How write_atomically makes its temporary file: unnamed (O_TMPFILE) where
// the system offers it, else by name; `named` forces the fallback, so that
// the tests can reach it on any system.
enum class Temporary { unnamed_if_possible, named };

// Writes the file at `path` atomically (the guarantees are at the top of this
// file): write(sink) puts the bytes, may_replace() throws unless an existing
// `path` may be written over (it runs before anything is written and again
// right before the file is put in place). `label` names the file in errors.
template <typename Write, typename MayReplace>
void write_atomically(const std::string& path, const std::string& label, Write&& write, MayReplace&& may_replace,
                      Temporary temporary = Temporary::unnamed_if_possible) {
  if (path.empty()) invalid("empty file name");
  may_replace();
  const std::filesystem::path parent = std::filesystem::path(path).parent_path();
  const std::string dir = parent.empty() ? std::string(".") : parent.string();
  TemporaryFile tmp;
  if (temporary == Temporary::unnamed_if_possible) tmp.fd = open_unnamed(dir, label);
  const bool unnamed = tmp.fd >= 0;
  if (!unnamed) {  // O_EXCL: a fresh file, never one another writer is using.
    const int error = with_temporary_name(path, tmp.name, [&](const std::string& name) {
      tmp.fd = ::open(name.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
      return tmp.fd >= 0 ? 0 : errno;
    });
    if (error != 0) fail(label, "cannot create a temporary file in ", dir, errno_text(error));
  }

  FileSink sink(tmp.fd, label);
  write(sink);
  sink.flush();
  // On disk before it gets its name: after a power failure `path` holds the
  // old file or the whole new one.
  if (::fsync(tmp.fd) != 0) fail(label, "cannot flush to disk", errno_text(errno));

  may_replace();
  if (unnamed) {
    // When `path` does not exist, link the file straight to it: it appears
    // whole, and no temporary name ever exists. linkat never replaces: when
    // `path` exists (or appeared meanwhile) it fails with EEXIST.
    int error = link_unnamed(tmp.fd, path);
    if (error == 0) return sync_directory(dir);
    if (error == EEXIST) {
      may_replace();  // it may have appeared since the last check
      error = with_temporary_name(path, tmp.name, [&](const std::string& name) { return link_unnamed(tmp.fd, name); });
    }
    if (error != 0) fail(label, "cannot link the new file into ", dir, errno_text(error));
  }
  // The only moment a temporary name is visible: from the link (or the
  // O_EXCL create) to here. A failed rename removes it (~TemporaryFile).
  if (::rename(tmp.name.c_str(), path.c_str()) != 0)
    fail(label, "cannot rename ", tmp.name, " into place", errno_text(errno));
  tmp.name.clear();
  sync_directory(dir);
}

}  // namespace kvcache::detail::io
