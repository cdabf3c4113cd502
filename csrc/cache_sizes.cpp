#include "pybn/cache_sizes.h"

#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <fstream>
#include <stdexcept>
#include <string>

#include "pybn/kernels.h"
#include "pybn/printable.h"

namespace pybn {
namespace {

// Sizes outside these are taken for a misreading: the defaults are safer than blocks sized
// to them.
constexpr std::int64_t kMinL2Bytes = std::int64_t(64) << 10, kMaxL2Bytes = std::int64_t(64) << 20;
constexpr std::int64_t kMinL3Bytes = std::int64_t(1) << 20, kMaxL3Bytes = std::int64_t(1) << 30;

// The most L3 one process counts on. A server reports its socket's whole L3 (480 MiB on a
// 2-core slice of a Xeon), shared with dozens of cores and other tenants' processes; a
// quarter of it made the streaming threshold 120 MiB, and L's 102.8 MB outputs, written
// with ordinary stores, had each line read before it was written: inference 7.8 ms
// against 3.8 ms streamed. 32 MiB is what one Zen 4 complex has to itself, and its
// threshold, 8 MiB, was also the best of 4, 8, 16 and 120 MiB on the Xeon (16 MiB left
// 12.8 MB outputs at 53-95% of the copy from run to run; docs/performance.md, "the 5th,
// afternoon").
constexpr std::int64_t kUsableL3Bytes = std::int64_t(32) << 20;

std::string read_line(const std::string& path) {
  std::ifstream in(path);
  std::string s;
  std::getline(in, s);
  return s;
}

// "512K", "32768K", "1M" or a byte count; 0 when unreadable.
std::int64_t parse_size(const std::string& s) {
  std::size_t i = 0;
  std::int64_t v = 0;
  for (; i < s.size() && std::isdigit(static_cast<unsigned char>(s[i])) && v < (std::int64_t(1) << 40); ++i)
    v = v * 10 + (s[i] - '0');
  if (i == 0) return 0;
  const char unit = i < s.size() ? static_cast<char>(std::toupper(static_cast<unsigned char>(s[i++]))) : '\0';
  const int shift = unit == 'K' ? 10 : unit == 'M' ? 20 : unit == 'G' ? 30 : 0;
  while (i < s.size() && std::isspace(static_cast<unsigned char>(s[i]))) ++i;  // (an env file's trailing blanks)
  if ((unit != '\0' && !std::isspace(static_cast<unsigned char>(unit)) && shift == 0) || i < s.size())
    return 0;  // another unit, or text after it
  if (v >= (std::int64_t(1) << (62 - shift))) return 0;      // past 2**62 bytes: no cache, and no wrap
  return v << shift;
}

// The size of cpu0's data (or unified) cache of this level in sysfs, or 0.
std::int64_t sysfs_cache_bytes(int level) {
  for (int index = 0; index < 16; ++index) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/";
    const std::string lv = read_line(dir + "level");
    if (lv.empty()) break;
    const std::string type = read_line(dir + "type");
    if (lv == std::to_string(level) && (type == "Data" || type == "Unified")) return parse_size(read_line(dir + "size"));
  }
  return 0;
}

std::int64_t sysconf_cache_bytes([[maybe_unused]] int level) {
#if defined(_SC_LEVEL2_CACHE_SIZE) && defined(_SC_LEVEL3_CACHE_SIZE)
  const long v = sysconf(level == 2 ? _SC_LEVEL2_CACHE_SIZE : _SC_LEVEL3_CACHE_SIZE);
  return v > 0 ? v : 0;
#else
  return 0;
#endif
}

std::int64_t cache_bytes(int level, std::int64_t lo, std::int64_t hi, std::int64_t fallback) {
  for (const std::int64_t v : {sysfs_cache_bytes(level), sysconf_cache_bytes(level)})
    if (v >= lo && v <= hi) return v;
  return fallback;
}

// A size given in the environment (PYBN_L2_BYTES, PYBN_L3_BYTES: "2M", "1536K" or bytes),
// for systems that describe their caches wrongly (some containers and VMs) and for tests of
// the blocks other CPUs take; 0 when unset. A value outside [lo, hi] is an error, not a
// reason to guess.
std::int64_t env_bytes(const char* name, std::int64_t lo, std::int64_t hi) {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0') return 0;
  const std::int64_t v = parse_size(value);
  if (v < lo || v > hi)
    throw std::runtime_error(std::string(name) + "=" + printable(value) + ": must be a size from " + std::to_string(lo >> 10) +
                             "K to " + std::to_string(hi >> 20) + "M (bytes, or with K, M or G)");
  return v;
}

CacheSizes read_cache_sizes() {
  const std::int64_t l2 = env_bytes("PYBN_L2_BYTES", kMinL2Bytes, kMaxL2Bytes);
  const std::int64_t l3 = env_bytes("PYBN_L3_BYTES", kMinL3Bytes, kMaxL3Bytes);
  return {l2 ? l2 : cache_bytes(2, kMinL2Bytes, kMaxL2Bytes, kDefaultL2Bytes),
          l3 ? l3 : std::min(cache_bytes(3, kMinL3Bytes, kMaxL3Bytes, kDefaultL3Bytes), kUsableL3Bytes)};
}

}  // namespace

const CacheSizes& cache_sizes() {
  static const CacheSizes sizes = read_cache_sizes();
  return sizes;
}

std::int64_t stream_min_bytes() {
  static const std::int64_t bytes = std::max(kStreamBytes, cache_sizes().l3_bytes / 4);
  return bytes;
}

}  // namespace pybn
