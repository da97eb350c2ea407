// kvcache/gguf.hpp — GGUF files, llama.cpp's model format: the reader
// (versions 2 and 3), and the loader of `llama` models into a Decoder.
//
// The format, all little-endian ("string" = uint64 length, then that many
// UTF-8 bytes, no terminator):
//
//   header     "GGUF", uint32 version (2 or 3), uint64 n_tensors, uint64 n_kv
//   metadata   n_kv times: string key, uint32 value type, the value
//                value types: 0 u8  1 i8  2 u16  3 i16  4 u32  5 i32  6 f32
//                             7 bool (one byte, 0 or 1)  8 string  9 array
//                             10 u64  11 i64  12 f64
//                an array is uint32 element type, uint64 count, the elements
//                (kvcache refuses arrays of arrays)
//   tensors    n_tensors times: string name, uint32 n_dims (1..4),
//              uint64 ne[n_dims], uint32 ggml type, uint64 offset
//                ne[0] is the fastest axis: a row-major [out, in] matrix
//                is ne = [in, out]. offset counts from the data section and
//                is a multiple of the alignment.
//   padding    to general.alignment (a uint32 key, default 32, a power of 2)
//   data       the tensors' bytes
//
// Every count, length, type, shape, offset and size is checked against the
// file's real length, in saturating 64-bit arithmetic, before anything is
// read or allocated; arrays are not copied at parse time (they are decoded
// when asked for). A malformed file is a std::runtime_error
// "kvcache: <file>: <field>: <problem>" naming the key or tensor and the bad
// value. The file is mapped (mmap, read-only, MAP_PRIVATE: nothing can write
// to it), and weights of a type kvcache computes with are used where they
// are, the mapping kept alive by every matrix over it.
#pragma once

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "config.hpp"
#include "decoder.hpp"
#include "detail/io.hpp"
#include "limits.hpp"
#include "sentencepiece.hpp"
#include "weights.hpp"

namespace kvcache {

// ============================================================================
// ggml's tensor types
// ============================================================================

// A ggml type: its name as llama.cpp prints it, and its block (values and
// bytes; 1 value for the plain types).
struct GgmlType {
  std::uint32_t id;
  const char* name;
  std::uint32_t block_values, block_bytes;
};

// The ggml types a GGUF file may hold (ggml.h's enum ggml_type), or nullptr.
inline const GgmlType* find_ggml_type(std::uint32_t id) {
  static constexpr GgmlType table[] = {
      {0, "f32", 1, 4},          {1, "f16", 1, 2},         {2, "q4_0", 32, 18},      {3, "q4_1", 32, 20},
      {6, "q5_0", 32, 22},       {7, "q5_1", 32, 24},      {8, "q8_0", 32, 34},      {9, "q8_1", 32, 36},
      {10, "q2_K", 256, 84},     {11, "q3_K", 256, 110},   {12, "q4_K", 256, 144},   {13, "q5_K", 256, 176},
      {14, "q6_K", 256, 210},    {15, "q8_K", 256, 292},   {16, "iq2_xxs", 256, 66}, {17, "iq2_xs", 256, 74},
      {18, "iq3_xxs", 256, 98},  {19, "iq1_s", 256, 50},   {20, "iq4_nl", 32, 18},   {21, "iq3_s", 256, 110},
      {22, "iq2_s", 256, 82},    {23, "iq4_xs", 256, 136}, {24, "i8", 1, 1},         {25, "i16", 1, 2},
      {26, "i32", 1, 4},         {27, "i64", 1, 8},        {28, "f64", 1, 8},        {29, "iq1_m", 256, 56},
      {30, "bf16", 1, 2},        {34, "tq1_0", 256, 54},   {35, "tq2_0", 256, 66},   {39, "mxfp4", 32, 17}};
  for (const GgmlType& t : table)
    if (t.id == id) return &t;
  return nullptr;
}

inline std::string ggml_type_name(std::uint32_t id) {
  const GgmlType* t = find_ggml_type(id);
  return t != nullptr ? t->name : "unknown type " + std::to_string(id);
}

// The ggml types kvcache computes with, as the WeightType a WeightMatrix
// holds them in (the bytes are the same); nullopt for every other type.
inline std::optional<WeightType> gguf_weight_type(std::uint32_t ggml_type) {
  switch (ggml_type) {
    case 0: return WeightType::f32;
    case 30: return WeightType::bf16;
    case 1: return WeightType::f16;
    case 8: return WeightType::q8_0;
    case 2: return WeightType::q4_0;
    default: return std::nullopt;
  }
}

// ============================================================================
// Metadata values and tensor infos
// ============================================================================

enum class GgufType : std::uint32_t { u8, i8, u16, i16, u32, i32, f32, boolean, string, array, u64, i64, f64 };

inline const char* to_string(GgufType t) {
  static const char* const names[] = {"u8",   "i8",     "u16",   "i16", "u32", "i32", "f32",
                                      "bool", "string", "array", "u64", "i64", "f64"};
  const auto i = static_cast<std::size_t>(t);
  return i < sizeof names / sizeof names[0] ? names[i] : "unknown";
}

// Bytes of one value of a fixed-size type; 0 for string and array.
inline std::uint64_t gguf_value_bytes(GgufType t) {
  static const std::uint8_t bytes[] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};
  return bytes[static_cast<std::size_t>(t)];
}

// Where a metadata value is in the file. Nothing is decoded at parse time:
// GgufFile's getters decode on demand (the bytes were checked then).
struct GgufValue {
  GgufType type = GgufType::u8;
  GgufType element_type = GgufType::u8;  // arrays
  std::uint64_t count = 1;               // arrays: the number of elements
  std::uint64_t offset = 0;              // in the file: the value (an array's first element)
};

struct GgufTensorInfo {
  std::string name;
  std::vector<std::uint64_t> ne;  // GGUF order: ne[0] is the row length
  std::uint32_t ggml_type = 0;
  std::uint64_t offset = 0;    // from the start of the data section
  std::uint64_t elements = 0;  // ne[0] · ne[1] · …
  std::uint64_t bytes = 0;     // in the file
};

// "[288, 512]", GGUF order.
inline std::string gguf_shape(const std::vector<std::uint64_t>& ne) {
  std::string s = "[";
  for (std::size_t i = 0; i < ne.size(); ++i) s += (i != 0 ? ", " : "") + std::to_string(ne[i]);
  return s + "]";
}

namespace detail {

// Reads a GGUF file's bytes in order, each read checked against what is
// left: "file is truncated: <what> needs N bytes at offset P, M are left".
class GgufCursor {
 public:
  GgufCursor(const unsigned char* bytes, std::uint64_t size, const std::string& label)
      : bytes_(bytes), size_(size), label_(label) {}

  std::uint64_t position() const { return pos_; }
  std::uint64_t left() const { return size_ - pos_; }

  const unsigned char* take(std::uint64_t n, const std::string& what) {
    if (n > left())
      io::fail(label_, "file is truncated: " + what + " needs " + io::count_string(n) + " bytes at offset " +
                           std::to_string(pos_) + ", " + std::to_string(left()) + " are left");
    const unsigned char* p = bytes_ + pos_;
    pos_ += n;
    return p;
  }
  std::uint32_t u32(const std::string& what) { return io::get_le<std::uint32_t>(take(4, what)); }
  std::uint64_t u64(const std::string& what) { return io::get_le<std::uint64_t>(take(8, what)); }
  std::string_view string(const std::string& what) {
    const std::uint64_t n = u64(what + "'s length");
    return {reinterpret_cast<const char*>(take(n, what)), static_cast<std::size_t>(n)};
  }

 private:
  const unsigned char* bytes_;
  std::uint64_t size_, pos_ = 0;
  const std::string& label_;
};

constexpr std::uint64_t kGgufHeaderBytes = 24;
constexpr std::uint64_t kGgufMaxKeyBytes = 65535;
constexpr std::uint32_t kGgufMaxDims = 4;
// Tensors and keys a file may list: each costs about 100 bytes of memory
// (llama models have 9 tensors a layer and about 30 keys).
constexpr std::uint64_t kGgufMaxEntries = std::uint64_t{1} << 20;

// Checks one value of type `t` (not an array) at the cursor and skips it.
inline void skip_gguf_value(GgufCursor& c, GgufType t, const std::string& label, const std::string& what) {
  if (t == GgufType::string) {
    c.string(what);
  } else {
    const unsigned char* p = c.take(gguf_value_bytes(t), what);
    if (t == GgufType::boolean && *p > 1) io::fail(label, what + ": bool value " + std::to_string(*p) + ", must be 0 or 1");
  }
}

inline GgufType gguf_type(std::uint32_t raw, const std::string& label, const std::string& what) {
  if (raw > static_cast<std::uint32_t>(GgufType::f64))
    io::fail(label, what + ": unknown value type " + std::to_string(raw) + " (0 to 12)");
  return static_cast<GgufType>(raw);
}

// Parses and checks the value of metadata key `key` at the cursor.
inline GgufValue parse_gguf_value(GgufCursor& c, const std::string& label, const std::string& key) {
  const std::string what = "metadata key '" + key + "'";
  GgufValue v;
  v.type = gguf_type(c.u32(what + "'s type"), label, what);
  if (v.type != GgufType::array) {
    v.offset = c.position();
    skip_gguf_value(c, v.type, label, what);
    return v;
  }
  v.element_type = gguf_type(c.u32(what + "'s element type"), label, what);
  if (v.element_type == GgufType::array) io::fail(label, what + ": an array of arrays (not supported)");
  v.count = c.u64(what + "'s element count");
  v.offset = c.position();
  // Each element takes at least a byte (a string 8): a count the rest of the
  // file cannot hold is refused before any element is looked at.
  const std::uint64_t least = v.element_type == GgufType::string ? 8 : gguf_value_bytes(v.element_type);
  if (io::sat_mul(v.count, least) > c.left())
    io::fail(label, what + ": " + std::to_string(v.count) + " elements of type " + to_string(v.element_type) +
                        " do not fit in the " + std::to_string(c.left()) + " bytes left in the file");
  if (v.element_type == GgufType::string || v.element_type == GgufType::boolean) {
    for (std::uint64_t i = 0; i < v.count; ++i)
      skip_gguf_value(c, v.element_type, label, what + "[" + std::to_string(i) + "]");
  } else {
    c.take(v.count * least, what);
  }
  return v;
}

// Parses one tensor info at the cursor: its shape, type and size in the file.
inline GgufTensorInfo parse_gguf_tensor(GgufCursor& c, const std::string& label, std::uint64_t index) {
  GgufTensorInfo t;
  t.name = std::string(c.string("the name of tensor " + std::to_string(index)));
  const std::string what = "tensor '" + t.name + "'";
  if (t.name.empty() || t.name.size() > kGgufMaxKeyBytes)
    io::fail(label, what + " (number " + std::to_string(index) + "): name of " + std::to_string(t.name.size()) +
                        " bytes, must be 1 to 65535");
  const std::uint32_t n_dims = c.u32(what + "'s number of dimensions");
  if (n_dims == 0 || n_dims > kGgufMaxDims)
    io::fail(label, what + ": " + std::to_string(n_dims) + " dimensions, must be 1 to 4");
  std::uint64_t rows = 1;  // ne[1] · ne[2] · …
  for (std::uint32_t i = 0; i < n_dims; ++i) {
    t.ne.push_back(c.u64(what + "'s dimension " + std::to_string(i)));
    if (t.ne.back() == 0 || t.ne.back() > static_cast<std::uint64_t>(INT64_MAX))
      io::fail(label, what + ": dimension " + std::to_string(i) + " = " + std::to_string(t.ne.back()) +
                          ", must be 1 to 2^63 - 1");
    if (i != 0) rows = io::sat_mul(rows, t.ne.back());
  }
  t.elements = io::sat_mul(t.ne[0], rows);
  t.ggml_type = c.u32(what + "'s type");
  const GgmlType* type = find_ggml_type(t.ggml_type);
  if (type == nullptr) io::fail(label, what + ": unknown ggml type " + std::to_string(t.ggml_type));
  if (t.ne[0] % type->block_values != 0)
    io::fail(label, what + ": rows of " + std::to_string(t.ne[0]) + " values (shape " + gguf_shape(t.ne) +
                        ") are not a multiple of " + type->name + "'s block of " + std::to_string(type->block_values));
  t.bytes = io::sat_mul(io::sat_mul(t.ne[0] / type->block_values, type->block_bytes), rows);
  t.offset = c.u64(what + "'s offset");
  return t;
}

}  // namespace detail

// ============================================================================
// GgufFile: a parsed, checked GGUF file
// ============================================================================

class GgufFile;

namespace detail {

// Maps `path` read-only (MAP_PRIVATE: no write can reach the file). Throws
// std::runtime_error naming it: missing, a directory, not a regular file,
// shorter than a GGUF header, or not mappable.
inline std::shared_ptr<const unsigned char> map_gguf(const std::string& path, std::uint64_t& size) {
  (void)io::open_for_reading(path, path);  // the usual messages: no such file, is a directory, …
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) io::fail(path, "cannot open for reading" + io::errno_text(errno));
  struct stat st;
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    io::fail(path, "not a regular file (a GGUF file is mapped into memory)");
  }
  size = static_cast<std::uint64_t>(st.st_size);
  if (size < kGgufHeaderBytes) {
    ::close(fd);
    io::fail(path, "file is too short for the 24-byte GGUF header (" + std::to_string(size) + " bytes)");
  }
  // MAP_POPULATE (Linux): the pages are mapped here, at load, as llama.cpp
  // maps its files, not faulted in by the first forward pass, where two
  // threads' faults contend: a 64-token prefill of the 110M q4_0 file on 2
  // threads had a median of 2085 tok/s (1286-2423) without it, 2252
  // (2069-2538) with it, 8 runs each, interleaved.
#if defined(MAP_POPULATE)
  const int flags = MAP_PRIVATE | MAP_POPULATE;
#else
  const int flags = MAP_PRIVATE;
#endif
  void* p = ::mmap(nullptr, static_cast<std::size_t>(size), PROT_READ, flags, fd, 0);
  const int error = errno;
  ::close(fd);
  if (p == MAP_FAILED) io::fail(path, "cannot map the file" + io::errno_text(error));
  const std::size_t length = static_cast<std::size_t>(size);
  // (Should the control block fail to allocate, shared_ptr unmaps itself.)
  return std::shared_ptr<const unsigned char>(static_cast<const unsigned char*>(p), [length](const unsigned char* q) {
    ::munmap(const_cast<unsigned char*>(q), length);
  });
}

}  // namespace detail

// A GGUF file, parsed and checked (the format is at the top of this file):
// its metadata and tensor infos, over the file's bytes, which it keeps alive
// (and so does every pointer tensor_memory() gives out). Cheap to copy.
class GgufFile {
 public:
  // Maps and parses the file at `path`.
  static GgufFile open(const std::string& path) {
    std::uint64_t size = 0;
    std::shared_ptr<const unsigned char> bytes = detail::map_gguf(path, size);
    return GgufFile(std::move(bytes), size, path);
  }

  // Parses `size` bytes in memory (kept alive by `bytes`); `name` stands for
  // the file in messages.
  GgufFile(std::shared_ptr<const unsigned char> bytes, std::uint64_t size, std::string name)
      : bytes_(std::move(bytes)), size_(size), name_(std::move(name)) {
    detail::io::require_little_endian(name_, "GGUF files read by kvcache");
    detail::GgufCursor c(bytes_.get(), size_, name_);
    parse_tensors(c, parse_header(c));
    check_data();
  }

  const std::string& name() const { return name_; }
  std::uint32_t version() const { return version_; }
  std::uint64_t alignment() const { return alignment_; }
  std::uint64_t size() const { return size_; }
  std::uint64_t data_offset() const { return data_offset_; }
  const std::vector<std::pair<std::string, GgufValue>>& metadata() const { return metadata_; }
  const std::vector<GgufTensorInfo>& tensors() const { return tensors_; }

  const GgufValue* find(const std::string& key) const {
    const auto it = keys_.find(key);
    return it == keys_.end() ? nullptr : &metadata_[it->second].second;
  }
  const GgufTensorInfo* find_tensor(const std::string& name) const {
    const auto it = tensor_index_.find(name);
    return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
  }

  // A tensor's bytes, in the file's memory; the pointer keeps it alive.
  std::shared_ptr<void> tensor_memory(const GgufTensorInfo& t) const {
    return std::shared_ptr<void>(bytes_, const_cast<unsigned char*>(bytes_.get() + data_offset_ + t.offset));
  }
  const unsigned char* tensor_data(const GgufTensorInfo& t) const { return bytes_.get() + data_offset_ + t.offset; }

  // ---- Typed metadata: nullopt when the key is absent; std::runtime_error
  // naming the key when it holds another type or a value out of range ----

  // Any integer type, non-negative.
  std::optional<std::uint64_t> get_uint(const std::string& key) const {
    const GgufValue* v = find(key);
    if (v == nullptr) return std::nullopt;
    const unsigned char* p = bytes_.get() + v->offset;
    std::int64_t s = 0;
    switch (v->type) {
      case GgufType::u8: return *p;
      case GgufType::u16: return detail::io::get_le<std::uint16_t>(p);
      case GgufType::u32: return detail::io::get_le<std::uint32_t>(p);
      case GgufType::u64: return detail::io::get_le<std::uint64_t>(p);
      case GgufType::i8: s = static_cast<std::int8_t>(*p); break;
      case GgufType::i16: s = static_cast<std::int16_t>(detail::io::get_le<std::uint16_t>(p)); break;
      case GgufType::i32: s = detail::io::get_le<std::int32_t>(p); break;
      case GgufType::i64: s = detail::io::bit_cast<std::int64_t>(detail::io::get_le<std::uint64_t>(p)); break;
      default: wrong_type(key, *v, "an integer");
    }
    if (s < 0) detail::io::fail(name_, "metadata key '" + key + "' = " + std::to_string(s) + ", must be >= 0");
    return static_cast<std::uint64_t>(s);
  }
  // f32 or f64.
  std::optional<double> get_float(const std::string& key) const {
    const GgufValue* v = find(key);
    if (v == nullptr) return std::nullopt;
    if (v->type == GgufType::f32) return detail::io::get_le<float>(bytes_.get() + v->offset);
    if (v->type == GgufType::f64) return detail::io::get_le<double>(bytes_.get() + v->offset);
    wrong_type(key, *v, "a float");
  }
  std::optional<bool> get_bool(const std::string& key) const {
    const GgufValue* v = find(key);
    if (v == nullptr) return std::nullopt;
    if (v->type != GgufType::boolean) wrong_type(key, *v, "a bool");
    return bytes_.get()[v->offset] != 0;
  }
  std::optional<std::string> get_string(const std::string& key) const {
    const GgufValue* v = find(key);
    if (v == nullptr) return std::nullopt;
    if (v->type != GgufType::string) wrong_type(key, *v, "a string");
    return string_at(v->offset);
  }

  // Arrays: every element, decoded (the count was checked against the file).
  std::vector<std::string> get_strings(const std::string& key) const {
    const GgufValue& v = array_of(key, GgufType::string);
    std::vector<std::string> out;
    out.reserve(static_cast<std::size_t>(v.count));
    for (std::uint64_t i = 0, at = v.offset; i < v.count; ++i, at += 8 + out.back().size()) out.push_back(string_at(at));
    return out;
  }
  std::vector<float> get_f32s(const std::string& key) const {
    const GgufValue& v = array_of(key, GgufType::f32);
    std::vector<float> out(static_cast<std::size_t>(v.count));
    for (std::size_t i = 0; i < out.size(); ++i) out[i] = detail::io::get_le<float>(bytes_.get() + v.offset + 4 * i);
    return out;
  }
  std::vector<std::int32_t> get_i32s(const std::string& key) const {
    const GgufValue& v = array_of(key, GgufType::i32);
    std::vector<std::int32_t> out(static_cast<std::size_t>(v.count));
    for (std::size_t i = 0; i < out.size(); ++i) out[i] = detail::io::get_le<std::int32_t>(bytes_.get() + v.offset + 4 * i);
    return out;
  }

 private:
  [[noreturn]] void wrong_type(const std::string& key, const GgufValue& v, const char* expected) const {
    const std::string type = v.type == GgufType::array ? std::string("an array of ") + to_string(v.element_type)
                                                       : std::string("a ") + to_string(v.type);
    detail::io::fail(name_, "metadata key '" + key + "' is " + type + ", expected " + expected);
  }
  const GgufValue& array_of(const std::string& key, GgufType element) const {
    const GgufValue* v = find(key);
    if (v == nullptr) detail::io::fail(name_, "metadata key '" + key + "' is missing");
    if (v->type != GgufType::array || v->element_type != element)
      wrong_type(key, *v, (std::string("an array of ") + to_string(element)).c_str());
    return *v;
  }
  std::string string_at(std::uint64_t offset) const {
    const std::uint64_t n = detail::io::get_le<std::uint64_t>(bytes_.get() + offset);
    return std::string(reinterpret_cast<const char*>(bytes_.get() + offset + 8), static_cast<std::size_t>(n));
  }

  std::uint64_t parse_header(detail::GgufCursor& c);
  void parse_tensors(detail::GgufCursor& c, std::uint64_t n_tensors);
  void check_data();

  std::shared_ptr<const unsigned char> bytes_;
  std::uint64_t size_ = 0;
  std::string name_;
  std::uint32_t version_ = 0;
  std::uint64_t alignment_ = 32, data_offset_ = 0;
  std::vector<std::pair<std::string, GgufValue>> metadata_;
  std::map<std::string, std::size_t, std::less<>> keys_;
  std::vector<GgufTensorInfo> tensors_;
  std::map<std::string, std::size_t, std::less<>> tensor_index_;
};

// The header and the metadata; general.alignment. Returns the tensor count.
inline std::uint64_t GgufFile::parse_header(detail::GgufCursor& c) {
  using detail::io::fail;
  const unsigned char* magic = c.take(4, "the magic bytes");
  if (std::memcmp(magic, "GGUF", 4) != 0) fail(name_, "not a GGUF file (it does not start with \"GGUF\")");
  version_ = c.u32("the version");
  if (version_ != 2 && version_ != 3)
    fail(name_, "GGUF version " + std::to_string(version_) +
                    (version_ > 0xFFFF ? " (a big-endian file?)" : "") + " is not supported (2 and 3 are)");
  const std::uint64_t n_tensors = c.u64("the tensor count"), n_kv = c.u64("the metadata key count");
  // A key takes at least 8 + 1 + 4 + 1 bytes, a tensor info 8 + 1 + 4 + 8 + 4 + 8.
  const auto check_count = [&](const char* what, std::uint64_t n, std::uint64_t least) {
    if (n > detail::kGgufMaxEntries || detail::io::sat_mul(n, least) > c.left())
      fail(name_, std::string(what) + " = " + std::to_string(n) + ": more than the " + std::to_string(c.left()) +
                      " bytes left in the file can hold (or than " + std::to_string(detail::kGgufMaxEntries) + ")");
  };
  check_count("the metadata key count", n_kv, 14);
  check_count("the tensor count", n_tensors, 33);
  metadata_.reserve(static_cast<std::size_t>(n_kv));
  tensors_.reserve(static_cast<std::size_t>(n_tensors));
  for (std::uint64_t i = 0; i < n_kv; ++i) {
    std::string key(c.string("metadata key " + std::to_string(i)));
    if (key.empty() || key.size() > detail::kGgufMaxKeyBytes)
      fail(name_, "metadata key " + std::to_string(i) + ": " + std::to_string(key.size()) +
                      " bytes long, must be 1 to 65535");
    if (keys_.count(key) != 0) fail(name_, "metadata key '" + key + "' appears twice");
    const GgufValue v = detail::parse_gguf_value(c, name_, key);
    keys_.emplace(key, metadata_.size());
    metadata_.emplace_back(std::move(key), v);
  }
  if (find("general.alignment") != nullptr) {
    const GgufValue& v = *find("general.alignment");
    if (v.type != GgufType::u32) wrong_type("general.alignment", v, "a u32");
    alignment_ = detail::io::get_le<std::uint32_t>(bytes_.get() + v.offset);
    if (alignment_ == 0 || (alignment_ & (alignment_ - 1)) != 0)
      fail(name_, "metadata key 'general.alignment' = " + std::to_string(alignment_) + ", must be a power of 2");
  }
  return n_tensors;
}

// The tensor infos, and where the data section starts.
inline void GgufFile::parse_tensors(detail::GgufCursor& c, std::uint64_t n_tensors) {
  for (std::uint64_t i = 0; i < n_tensors; ++i) {
    GgufTensorInfo t = detail::parse_gguf_tensor(c, name_, i);
    if (tensor_index_.count(t.name) != 0) detail::io::fail(name_, "tensor '" + t.name + "' appears twice");
    tensor_index_.emplace(t.name, tensors_.size());
    tensors_.push_back(std::move(t));
  }
  // The data section starts at the next multiple of the alignment.
  const std::uint64_t end = c.position(), pad = (alignment_ - end % alignment_) % alignment_;
  data_offset_ = detail::io::sat_add(end, pad);
  if (tensors_.empty()) data_offset_ = std::min(data_offset_, size_);  // no data: padding optional
  if (data_offset_ > size_)
    detail::io::fail(name_, "file is truncated: the data section would start at offset " +
                                detail::io::count_string(data_offset_) + ", the file has " + std::to_string(size_) +
                                " bytes");
}

// Every tensor lies inside the data section, at a multiple of the alignment,
// and no two overlap.
inline void GgufFile::check_data() {
  const std::uint64_t data_bytes = size_ - data_offset_;
  std::vector<const GgufTensorInfo*> by_offset;
  by_offset.reserve(tensors_.size());
  for (const GgufTensorInfo& t : tensors_) {
    const std::string what = "tensor '" + t.name + "' (" + ggml_type_name(t.ggml_type) + ", shape " + gguf_shape(t.ne) + ")";
    if (t.offset % alignment_ != 0)
      detail::io::fail(name_, what + ": offset " + std::to_string(t.offset) + " is not a multiple of the alignment " +
                                  std::to_string(alignment_));
    if (t.offset > data_bytes || t.bytes > data_bytes - t.offset)
      detail::io::fail(name_, what + ": " + detail::io::count_string(t.bytes) + " bytes at offset " +
                                  std::to_string(t.offset) + " go past the end of the data section (" +
                                  std::to_string(data_bytes) + " bytes)");
    by_offset.push_back(&t);
  }
  std::sort(by_offset.begin(), by_offset.end(),
            [](const GgufTensorInfo* a, const GgufTensorInfo* b) { return a->offset < b->offset; });
  for (std::size_t i = 1; i < by_offset.size(); ++i)
    if (by_offset[i - 1]->offset + by_offset[i - 1]->bytes > by_offset[i]->offset)
      detail::io::fail(name_, "tensors '" + by_offset[i - 1]->name + "' and '" + by_offset[i]->name +
                                  "' overlap (offsets " + std::to_string(by_offset[i - 1]->offset) + " and " +
                                  std::to_string(by_offset[i]->offset) + ", the first " +
                                  std::to_string(by_offset[i - 1]->bytes) + " bytes long)");
}


// ============================================================================
// The `llama` model
// ============================================================================

namespace detail {

// A size from the metadata: `fallback` when the key is absent (or an error
// when there is none), and in [1, 2^31).
inline std::size_t gguf_size(const GgufFile& f, const std::string& key, std::optional<std::uint64_t> fallback = {}) {
  const std::optional<std::uint64_t> v = f.get_uint(key);
  if (!v && !fallback) io::fail(f.name(), "metadata key '" + key + "' is missing");
  const std::uint64_t x = v ? *v : *fallback;
  if (x == 0 || x >= (std::uint64_t{1} << 31))
    io::fail(f.name(), "metadata key '" + key + "' = " + std::to_string(x) + ", must be 1 to 2^31 - 1");
  return static_cast<std::size_t>(x);
}

inline const GgufTensorInfo& gguf_tensor(const GgufFile& f, const std::string& name) {
  const GgufTensorInfo* t = f.find_tensor(name);
  if (t == nullptr) io::fail(f.name(), "tensor '" + name + "' is missing");
  return *t;
}

// What kvcache's Decoder cannot compute: refused, naming the key.
inline void refuse_unsupported_llama(const GgufFile& f, const ModelConfig& c) {
  const std::string& file = f.name();
  if (f.get_uint("llama.expert_count").value_or(0) > 0)
    io::fail(file, "metadata key 'llama.expert_count' > 0: mixture-of-experts models are not supported");
  const std::optional<std::string> scaling = f.get_string("llama.rope.scaling.type");
  if (scaling && *scaling != "none")
    io::fail(file, "metadata key 'llama.rope.scaling.type' = '" + *scaling + "': RoPE scaling is not supported");
  // kvcache rotates whole heads: every dimension of d_k.
  const std::size_t rope_dims = gguf_size(f, "llama.rope.dimension_count", c.d_k());
  if (rope_dims != c.d_k())
    io::fail(file, "metadata key 'llama.rope.dimension_count' = " + std::to_string(rope_dims) +
                       ": kvcache rotates all d_k = " + std::to_string(c.d_k()) + " dimensions of a head");
  for (const char* key : {"llama.attention.key_length", "llama.attention.value_length"})
    if (f.get_uint(key) && *f.get_uint(key) != c.d_k())
      io::fail(file, std::string("metadata key '") + key + "' = " + std::to_string(*f.get_uint(key)) +
                         ", kvcache needs the head size embedding_length / head_count = " + std::to_string(c.d_k()));
}

// The vocabulary size: token_embd's rows, which the token list and
// llama.vocab_size must agree with when present.
inline std::size_t gguf_vocab_size(const GgufFile& f) {
  const GgufTensorInfo& E = gguf_tensor(f, "token_embd.weight");
  if (E.ne.size() < 2 || E.ne[1] >= (std::uint64_t{1} << 31))
    io::fail(f.name(), "tensor 'token_embd.weight' has shape " + gguf_shape(E.ne) + ", expected [embedding_length, vocab]");
  const std::uint64_t V = E.ne[1];
  const GgufValue* tokens = f.find("tokenizer.ggml.tokens");
  if (tokens != nullptr && tokens->type == GgufType::array && tokens->count != V)
    io::fail(f.name(), "metadata key 'tokenizer.ggml.tokens' lists " + std::to_string(tokens->count) +
                           " tokens, token_embd.weight has " + std::to_string(V));
  if (const std::optional<std::uint64_t> n = f.get_uint("llama.vocab_size"); n && *n != V)
    io::fail(f.name(), "metadata key 'llama.vocab_size' = " + std::to_string(*n) + ", token_embd.weight has " +
                           std::to_string(V) + " rows");
  return static_cast<std::size_t>(V);
}

}  // namespace detail

// The ModelConfig of a GGUF file's `llama` model: RoPE, RMSNorm, SwiGLU, the
// sizes from the llama.* keys, the vocabulary from token_embd, the LM head
// tied unless an `output` tensor is there. Throws std::runtime_error naming
// the file and the key for another architecture, a missing or impossible
// size, or what kvcache cannot compute (experts, RoPE scaling, partial RoPE),
// and past `limits` (all tensors' values: max_parameters; keys and values at
// context_length positions: max_kv_cache_bytes).
inline ModelConfig gguf_llama_config(const GgufFile& f, const LoadLimits& limits = {}) {
  using detail::gguf_size;
  const std::string& file = f.name();
  const std::optional<std::string> arch = f.get_string("general.architecture");
  if (arch != "llama")
    detail::io::fail(file, "metadata key 'general.architecture' = " + (arch ? "'" + *arch + "'" : "(missing)") +
                               ": kvcache loads 'llama' models only");
  ModelConfig c;
  c.d_model = gguf_size(f, "llama.embedding_length");
  c.n_layers = gguf_size(f, "llama.block_count");
  c.d_ff = gguf_size(f, "llama.feed_forward_length");
  c.n_heads = gguf_size(f, "llama.attention.head_count");
  c.n_kv_heads = gguf_size(f, "llama.attention.head_count_kv", c.n_heads);
  c.max_seq_len = gguf_size(f, "llama.context_length");
  const std::optional<double> eps = f.get_float("llama.attention.layer_norm_rms_epsilon");
  const double base = f.get_float("llama.rope.freq_base").value_or(10000.0);
  if (!eps || !(*eps > 0.0 && *eps < 1.0))
    detail::io::fail(file, "metadata key 'llama.attention.layer_norm_rms_epsilon' " +
                               (eps ? "= " + std::to_string(*eps) + ", must be in (0, 1)" : std::string("is missing")));
  if (!(base > 1.0 && base < 1e30))
    detail::io::fail(file, "metadata key 'llama.rope.freq_base' = " + std::to_string(base) + ", must be > 1");
  if (c.d_model % c.n_heads != 0 || c.n_heads % c.n_kv_heads != 0 || c.d_k() % 2 != 0)
    detail::io::fail(file, "impossible heads: embedding_length " + std::to_string(c.d_model) + ", head_count " +
                               std::to_string(c.n_heads) + ", head_count_kv " + std::to_string(c.n_kv_heads) +
                               " (needs head_count | embedding_length, head_count_kv | head_count, an even head size)");
  c.vocab_size = detail::gguf_vocab_size(f);
  c.positions = PositionEncoding::rope;
  c.rope_base = base;
  c.norm = NormKind::rms_norm;
  c.norm_eps = *eps;
  c.mlp = MlpKind::swiglu;
  c.tied_lm_head = f.find_tensor("output.weight") == nullptr;
  c.numerics = Numerics::ggml;  // llama.cpp's bits, so that greedy ids are its ids
  detail::refuse_unsupported_llama(f, c);

  std::uint64_t parameters = 0;
  for (const GgufTensorInfo& t : f.tensors()) parameters = detail::io::sat_add(parameters, t.elements);
  if (parameters > limits.max_parameters)
    detail::io::fail(file, "the tensors hold " + detail::io::count_string(parameters) +
                               " values, more than LoadLimits::max_parameters = " + std::to_string(limits.max_parameters));
  const std::uint64_t kv_cache_bytes = detail::io::sat_mul(detail::io::sat_mul(8, c.n_layers), c.kv_dim() * c.max_seq_len);
  if (kv_cache_bytes > limits.max_kv_cache_bytes)
    detail::io::fail(file, "a session at context_length = " + std::to_string(c.max_seq_len) +
                               " positions would cache more than LoadLimits::max_kv_cache_bytes (" +
                               detail::io::count_string(kv_cache_bytes) + " vs " +
                               std::to_string(limits.max_kv_cache_bytes) + " bytes)");
  try {
    c.validate();
  } catch (const std::invalid_argument& e) {
    detail::io::fail(file, e.what());
  }
  return c;
}

namespace detail {

// The index of the first NaN or infinity among a tensor's values (for
// q8_0, q4_0: the first value of a block whose scale is not finite), if any.
inline std::optional<std::uint64_t> gguf_first_non_finite(const unsigned char* p, const GgufTensorInfo& t) {
  const auto scan = [&](std::uint64_t n, std::uint64_t stride, auto exponent_all_ones) -> std::optional<std::uint64_t> {
    for (std::uint64_t i = 0; i < n; ++i)
      if (exponent_all_ones(p + i * stride)) return i;
    return std::nullopt;
  };
  const auto f32 = [](const unsigned char* q) { return (io::get_le<std::uint32_t>(q) & 0x7F800000u) == 0x7F800000u; };
  const auto f16 = [](const unsigned char* q) { return (io::get_le<std::uint16_t>(q) & 0x7C00u) == 0x7C00u; };
  const auto bf16 = [](const unsigned char* q) { return (io::get_le<std::uint16_t>(q) & 0x7F80u) == 0x7F80u; };
  switch (t.ggml_type) {
    case 0: return scan(t.elements, 4, f32);
    case 1: return scan(t.elements, 2, f16);
    case 30: return scan(t.elements, 2, bf16);
    case 8:
      if (const auto block = scan(t.elements / 32, 34, f16)) return *block * 32;
      return std::nullopt;
    case 2:
      if (const auto block = scan(t.elements / 32, 18, f16)) return *block * 32;
      return std::nullopt;
    default: return std::nullopt;
  }
}

// Throws unless tensor t is [cols, rows] in GGUF order (further dimensions 1).
inline void check_gguf_shape(const GgufFile& f, const GgufTensorInfo& t, std::size_t rows, std::size_t cols) {
  std::vector<std::uint64_t> expected{cols};
  if (rows != 0) expected.push_back(rows);
  std::vector<std::uint64_t> ne = t.ne;
  while (ne.size() > expected.size() && ne.back() == 1) ne.pop_back();
  if (ne != expected)
    io::fail(f.name(), "tensor '" + t.name + "' has shape " + gguf_shape(t.ne) + ", expected " + gguf_shape(expected) +
                           " (GGUF order: the row length first)");
}

// Tensor `name` as a rows × cols WeightMatrix<T>. For T = float, over the
// file's memory (no copy) when its address suits float (it does at every
// alignment ≥ 4), else over a copy; for another T, converted to T.
template <typename T>
WeightMatrix<T> gguf_matrix(const GgufFile& f, const std::string& name, std::size_t rows, std::size_t cols,
                            bool check_finite) {
  const GgufTensorInfo& t = gguf_tensor(f, name);
  check_gguf_shape(f, t, rows, cols);
  const std::optional<WeightType> type = gguf_weight_type(t.ggml_type);
  if (!type)
    io::fail(f.name(), "tensor '" + name + "' has ggml type " + ggml_type_name(t.ggml_type) +
                           ", which kvcache does not compute with (not supported; f32, f16, bf16, q8_0 and q4_0 are)");
  if (check_finite)
    if (const auto at = gguf_first_non_finite(f.tensor_data(t), t))
      io::fail(f.name(), "tensor '" + name + "' holds a non-finite value at element " + std::to_string(*at));
  std::shared_ptr<void> values = f.tensor_memory(t);
  if (reinterpret_cast<std::uintptr_t>(values.get()) % alignof(float) != 0) {
    std::shared_ptr<void> copy = allocate_weights(static_cast<std::size_t>(t.bytes));
    std::memcpy(copy.get(), values.get(), static_cast<std::size_t>(t.bytes));
    values = std::move(copy);
  }
  WeightMatrix<float> W(static_cast<Eigen::Index>(rows), static_cast<Eigen::Index>(cols), *type, std::move(values));
  if constexpr (std::is_same_v<T, float>) {
    return W;
  } else {
    return WeightMatrix<T>(W.to_dense().template cast<T>());
  }
}

// Norm weights `name`: d float32 values, copied as T.
template <typename T>
Vector<T> gguf_norm(const GgufFile& f, const std::string& name, std::size_t d, bool check_finite) {
  const GgufTensorInfo& t = gguf_tensor(f, name);
  check_gguf_shape(f, t, 0, d);
  if (t.ggml_type != 0)
    io::fail(f.name(), "tensor '" + name + "' has ggml type " + ggml_type_name(t.ggml_type) +
                           ", norm weights must be f32 (not supported)");
  if (check_finite)
    if (const auto at = gguf_first_non_finite(f.tensor_data(t), t))
      io::fail(f.name(), "tensor '" + name + "' holds a non-finite value at element " + std::to_string(*at));
  Vector<T> v(static_cast<Eigen::Index>(d));
  for (std::size_t i = 0; i < d; ++i) v[static_cast<Eigen::Index>(i)] = static_cast<T>(io::get_le<float>(f.tensor_data(t) + 4 * i));
  return v;
}

// The tensors of one block, as llama.cpp names them.
template <typename T, typename Matrix, typename Norm>
BlockWeights<T> gguf_block(const ModelConfig& c, std::size_t l, Matrix&& matrix, Norm&& norm) {
  const std::string at = "blk." + std::to_string(l) + ".";
  const std::size_t d = c.d_model, kv = c.kv_dim(), ff = c.d_ff;
  BlockWeights<T> b;
  b.attention_norm.gamma = norm(at + "attn_norm.weight");
  b.attention.W_Q = matrix(at + "attn_q.weight", d, d);
  b.attention.W_K = matrix(at + "attn_k.weight", kv, d);
  b.attention.W_V = matrix(at + "attn_v.weight", kv, d);
  b.attention.W_O = matrix(at + "attn_output.weight", d, d);
  b.mlp_norm.gamma = norm(at + "ffn_norm.weight");
  b.mlp.W_1 = matrix(at + "ffn_gate.weight", ff, d);
  b.mlp.W_2 = matrix(at + "ffn_down.weight", d, ff);
  b.mlp.W_3 = matrix(at + "ffn_up.weight", ff, d);
  return b;
}

}  // namespace detail

// A GGUF file's `llama` model: its configuration and weights, and the file
// (whose metadata holds the tokenizer, and whose memory the weights use).
template <typename T = float>
struct GgufModel {
  GgufFile file;
  ModelConfig config;
  DecoderWeights<T> weights;
  WeightType weight_type = WeightType::f32;  // the type most weight matrices are stored as
};

// Reads the `llama` model of a parsed GGUF file (its config: see
// gguf_llama_config). Tensors by llama.cpp's names: token_embd, blk.N.
// {attn_norm, attn_q, attn_k, attn_v, attn_output, ffn_norm, ffn_gate (W_1),
// ffn_down (W_2), ffn_up (W_3)}, output_norm, and output (else the LM head is
// tied to token_embd). A GGUF matrix of ne = [in, out] is the [out, in]
// row-major matrix kvcache uses, byte for byte; Q and K rows are as llama.cpp
// uses them for its `llama` RoPE (consecutive pairs, as kvcache rotates),
// so nothing is permuted.
//
// With `convert` unset, every matrix of a type kvcache computes with (f32,
// f16, bf16, q8_0, q4_0) is used where it is in the file (for T = float), each in
// its own type (a file may mix them: llama.cpp's q8_0 files keep matrices
// whose rows are not whole blocks as f16); with it set, each is converted to
// that type in memory of its own. Norms (f32) are copied.
// A tensor of another type (q4_K, …), a missing, misshapen, non-finite (when
// limits.check_finite) or unused tensor is a std::runtime_error naming it.
template <typename T = float>
GgufModel<T> read_gguf_model(const GgufFile& f, const LoadLimits& limits = {},
                             std::optional<WeightType> convert = std::nullopt) {
  GgufModel<T> m{f, gguf_llama_config(f, limits), {}, WeightType::f32};
  const ModelConfig& c = m.config;
  std::vector<std::string> used;
  std::map<WeightType, std::size_t> types;
  const auto matrix = [&](const std::string& name, std::size_t rows, std::size_t cols) {
    WeightMatrix<T> W = detail::gguf_matrix<T>(f, name, rows, cols, limits.check_finite);
    try {
      if (convert) W.convert_to(*convert);
    } catch (const std::invalid_argument& e) {  // q8_0 of rows that are not whole blocks
      detail::io::fail(f.name(), "tensor '" + name + "': " + e.what());
    }
    used.push_back(name);
    ++types[W.type()];
    return W;
  };
  const auto norm = [&](const std::string& name) {
    used.push_back(name);
    return detail::gguf_norm<T>(f, name, c.d_model, limits.check_finite);
  };
  DecoderWeights<T>& w = m.weights;
  w.token_embedding = matrix("token_embd.weight", c.vocab_size, c.d_model);
  for (std::size_t l = 0; l < c.n_layers; ++l) w.blocks.push_back(detail::gguf_block<T>(c, l, matrix, norm));
  w.final_norm.gamma = norm("output_norm.weight");
  if (!c.tied_lm_head) w.lm_head = matrix("output.weight", c.vocab_size, c.d_model);
  if (used.size() != f.tensors().size()) {
    std::sort(used.begin(), used.end());
    for (const GgufTensorInfo& t : f.tensors())
      if (!std::binary_search(used.begin(), used.end(), t.name))
        detail::io::fail(f.name(), "tensor '" + t.name + "' is not part of a llama model as kvcache runs it (not supported)");
  }
  m.weight_type = std::max_element(types.begin(), types.end(), [](const auto& a, const auto& b) {
                    return a.second < b.second;
                  })->first;
  return m;
}

// A Decoder of the `llama` model in a parsed GGUF file (read_gguf_model).
// Its weight matrices stay in the file's memory, shared by every copy of f
// and of the Decoder, unless `convert` asks for another type.
template <typename T = float>
Decoder<T> load_gguf(const GgufFile& f, const LoadLimits& limits = {}, std::optional<WeightType> convert = std::nullopt) {
  GgufModel<T> m = read_gguf_model<T>(f, limits, convert);
  try {
    return Decoder<T>(m.config, std::move(m.weights), m.weight_type);
  } catch (const std::bad_alloc&) {
    detail::io::fail(f.name(), "out of memory building the model");
  }
}

// The same for the GGUF file at `path`, which is mapped and parsed first.
// Throws std::runtime_error "kvcache: <path>: <problem>" on any failure.
template <typename T = float>
Decoder<T> load_gguf(const std::string& path, const LoadLimits& limits = {},
                     std::optional<WeightType> convert = std::nullopt) {
  return load_gguf<T>(GgufFile::open(path), limits, convert);
}

// True when the first bytes of the file at `path` are "GGUF" (how
// kvcache-generate tells a GGUF file from a llama2.c checkpoint).
inline bool is_gguf_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  char magic[4] = {};
  return in.read(magic, 4) && std::memcmp(magic, "GGUF", 4) == 0;
}

// ============================================================================
// The tokenizer's vocabulary
// ============================================================================

// The SentencePiece vocabulary of a GGUF file (tokenizer.ggml.model =
// "llama"): tokens, scores (0 when absent), token types (1, normal, when
// absent), the BOS, EOS and unknown ids, add_bos_token, add_space_prefix.
// Throws std::runtime_error naming the key: another tokenizer model, lists
// of different lengths, an id outside the vocabulary, more tokens than
// limits.max_vocab_size.
inline SentencePieceVocab read_gguf_vocab(const GgufFile& f, const LoadLimits& limits = {}) {
  const std::string& file = f.name();
  const std::optional<std::string> model = f.get_string("tokenizer.ggml.model");
  if (model != "llama")
    detail::io::fail(file, "metadata key 'tokenizer.ggml.model' = " + (model ? "'" + *model + "'" : "(missing)") +
                               ": only the SentencePiece tokenizer 'llama' is supported");
  const GgufValue* tokens = f.find("tokenizer.ggml.tokens");
  if (tokens != nullptr && tokens->type == GgufType::array && tokens->count > limits.max_vocab_size)
    detail::io::fail(file, "metadata key 'tokenizer.ggml.tokens' lists " + std::to_string(tokens->count) +
                               " tokens, more than LoadLimits::max_vocab_size = " + std::to_string(limits.max_vocab_size));
  SentencePieceVocab v;
  v.pieces = f.get_strings("tokenizer.ggml.tokens");
  const std::size_t n = v.pieces.size();
  v.scores = f.find("tokenizer.ggml.scores") ? f.get_f32s("tokenizer.ggml.scores") : std::vector<float>(n, 0.0f);
  v.types = f.find("tokenizer.ggml.token_type") ? f.get_i32s("tokenizer.ggml.token_type") : std::vector<std::int32_t>(n, 1);
  if (v.scores.size() != n || v.types.size() != n)
    detail::io::fail(file, "tokenizer.ggml.scores (" + std::to_string(v.scores.size()) + ") and token_type (" +
                               std::to_string(v.types.size()) + ") must list as many entries as tokens (" +
                               std::to_string(n) + ")");
  const auto id = [&](const char* key, std::int32_t fallback) {
    const std::uint64_t x = f.get_uint(key).value_or(static_cast<std::uint64_t>(fallback));
    if (x >= n)
      detail::io::fail(file, std::string("metadata key '") + key + "' = " + std::to_string(x) +
                                 ", outside the vocabulary of " + std::to_string(n) + " tokens");
    return static_cast<std::int32_t>(x);
  };
  v.bos_id = id("tokenizer.ggml.bos_token_id", 1);
  v.eos_id = id("tokenizer.ggml.eos_token_id", 2);
  v.unknown_id = id("tokenizer.ggml.unknown_token_id", 0);
  v.add_bos = f.get_bool("tokenizer.ggml.add_bos_token").value_or(true);
  v.add_space_prefix = f.get_bool("tokenizer.ggml.add_space_prefix").value_or(true);
  return v;
}

}  // namespace kvcache
