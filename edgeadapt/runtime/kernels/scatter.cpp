// edgeadapt's switch scatter: dst[pos[i]] = val[i] for i < m, elements of 1, 2, 4 or 8 bytes
// copied bit for bit (fp32 weights, int8 codes, ...). Plain C ABI, loaded with ctypes by
// edgeadapt/runtime/scatter.py (which releases the GIL for the call).
//
// A switch writes a few hundred thousand scattered positions, sorted ascending, into weights of
// hundreds of MB: each write is a cache line fetched from memory, and numpy's fancy assignment
// waits for them one by one. Here the line of pos[i + AHEAD] is prefetched for writing while
// pos[i] is stored, so about AHEAD line fetches are in flight at once.
//
// Packed int4 codes (edgeadapt/format/nibbles.py): edgeadapt_scatter_nibbles writes int8 codes
// q at code positions p (blocked32 flat indices) of a buffer holding two per byte: byte
// (p >> 5) * 16 + (p & 15), high nibble iff p & 16, as offset binary q + 8; each write is a
// read-modify-write of its byte (two codes of one byte are applied in order).
//
// edgeadapt_scatter_many writes several such scatters (a cached switch's every weight, where
// the weights are not one span of memory) in one call: one crossing from Python instead of one
// per weight (about 5 us each, 0.3 ms over SmolLM2's 60 q/v weights).
//
// Memory safety: a position outside [0, n) is skipped and counted (the caller raises); the
// caller checks the range of a sorted array before the call, so nothing is written then.
#include <cstdint>

namespace {

constexpr int64_t AHEAD = 32;

// The one loop of both scatters: for i < m, write element i at position pos[i] < n through
// `at(p)` (the byte or element holding p) and `put(ref, i)`, prefetching the line of
// pos[i + AHEAD] for writing; positions outside [0, n) are skipped and counted.
template <typename At, typename Put>
int64_t scatter_loop(int64_t n, const int64_t* pos, int64_t m, At at, Put put) {
  int64_t skipped = 0;
  const uint64_t un = static_cast<uint64_t>(n);
  for (int64_t i = 0; i < m; ++i) {
    if (i + AHEAD < m) {
      const uint64_t ahead = static_cast<uint64_t>(pos[i + AHEAD]);
      if (ahead < un) __builtin_prefetch(&at(ahead), 1, 0);
    }
    const uint64_t p = static_cast<uint64_t>(pos[i]);
    if (p >= un) {
      ++skipped;
      continue;
    }
    put(at(p), p, i);
  }
  return skipped;
}

template <typename T>
int64_t scatter(T* dst, int64_t n, const int64_t* pos, const T* val, int64_t m) {
  return scatter_loop(
      n, pos, m, [dst](uint64_t p) -> T& { return dst[p]; },
      [val](T& elem, uint64_t, int64_t i) { elem = val[i]; });
}

int64_t scatter_nibbles(uint8_t* dst, int64_t n, const int64_t* pos, const int8_t* q, int64_t m) {
  return scatter_loop(
      n, pos, m, [dst](uint64_t p) -> uint8_t& { return dst[(p >> 5) * 16 + (p & 15)]; },
      [q](uint8_t& byte, uint64_t p, int64_t i) {
        // branch-free: which nibble is random, and a branch mispredicted on half the codes
        // took 1.9x the time
        const unsigned shift = static_cast<unsigned>(p >> 2) & 4u;  // p & 16 ? 4 : 0
        const unsigned nib = static_cast<unsigned>(q[i] + 8) & 15u;
        byte = static_cast<uint8_t>((byte & ~(15u << shift)) | (nib << shift));
      });
}

}  // namespace

// n: codes in the buffer (twice its bytes)
extern "C" int64_t edgeadapt_scatter_nibbles(void* dst, int64_t n, const int64_t* pos,
                                             const void* codes, int64_t m) {
  return scatter_nibbles(static_cast<uint8_t*>(dst), n, pos, static_cast<const int8_t*>(codes),
                         m);
}

extern "C" int64_t edgeadapt_scatter(void* dst, int64_t n, const int64_t* pos, const void* val,
                                     int64_t m, int64_t itemsize) {
  switch (itemsize) {
    case 1: return scatter(static_cast<uint8_t*>(dst), n, pos, static_cast<const uint8_t*>(val), m);
    case 2: return scatter(static_cast<uint16_t*>(dst), n, pos, static_cast<const uint16_t*>(val), m);
    case 4: return scatter(static_cast<uint32_t*>(dst), n, pos, static_cast<const uint32_t*>(val), m);
    case 8: return scatter(static_cast<uint64_t*>(dst), n, pos, static_cast<const uint64_t*>(val), m);
    default: return -1;
  }
}

// for w < count: the scatter of m[w] elements val[w] at positions pos[w] into dst[w] of n[w]
// elements, each as edgeadapt_scatter with `itemsize` (1, 2, 4, 8), or itemsize 0: int4 codes
// two per byte as edgeadapt_scatter_nibbles (n[w]: codes); returns the positions skipped in all,
// or -1 for another itemsize (nothing written)
extern "C" int64_t edgeadapt_scatter_many(int64_t count, void* const* dst, const int64_t* n,
                                          const int64_t* const* pos, const void* const* val,
                                          const int64_t* m, int64_t itemsize) {
  if (itemsize != 0 && itemsize != 1 && itemsize != 2 && itemsize != 4 && itemsize != 8)
    return -1;
  int64_t skipped = 0;
  for (int64_t w = 0; w < count; ++w)
    skipped += itemsize == 0 ? edgeadapt_scatter_nibbles(dst[w], n[w], pos[w], val[w], m[w])
                             : edgeadapt_scatter(dst[w], n[w], pos[w], val[w], m[w], itemsize);
  return skipped;
}
