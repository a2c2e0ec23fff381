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
// Threads: each entry point takes `threads`; above 2 * CHUNK positions it starts threads - 1
// helper threads for the call, and they and the caller take chunks of CHUNK positions in turn
// until none is left (a helper that starts late, or not at all, leaves its share to the
// others). Each core brings its own line fetches in flight: SmolLM2's q/v switch (265k
// positions into 53 MB) takes 0.68x the time on two threads as on one (python -m
// experiments.switch_kernel_probe --ab-threads BUNDLE). Chunks of packed int4 codes start at
// a new byte pair (32-code block), so no byte is written by two threads.
//
// Memory safety: a position outside [0, n) is skipped and counted (the caller raises); the
// caller checks the range of a sorted array before the call, so nothing is written then.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <system_error>
#include <thread>
#include <vector>

namespace {

constexpr int64_t AHEAD = 32;
constexpr int64_t CHUNK = 16384;

// body(c) for every c < chunks, on the caller and up to threads - 1 helpers started here, each
// taking the next chunk not taken yet; returns once every chunk is done
template <typename Body>
void share(int64_t chunks, int64_t threads, Body body) {
  std::atomic<int64_t> next{0};
  auto work = [&next, chunks, &body] {
    for (int64_t c = next.fetch_add(1, std::memory_order_relaxed); c < chunks;
         c = next.fetch_add(1, std::memory_order_relaxed))
      body(c);
  };
  std::vector<std::thread> helpers;
  const int64_t extra = std::min(threads, chunks) - 1;
  for (int64_t t = 0; t < extra; ++t) {
    try {
      helpers.emplace_back(work);
    } catch (const std::system_error&) {  // no thread to be had: the others take its share
      break;
    }
  }
  work();
  for (auto& helper : helpers) helper.join();
}

// the chunks the threads share for one scatter of m sorted positions: the start of each, then
// m. Chunk c starts at c * CHUNK; for int4 codes (itemsize 0) at the first position from there
// in another 32-code block (byte pair) than the one before it.
std::vector<int64_t> chunk_starts(const int64_t* pos, int64_t m, int64_t itemsize) {
  std::vector<int64_t> starts;
  for (int64_t c = 0; c * CHUNK < m; ++c) {
    int64_t i = c * CHUNK;
    while (itemsize == 0 && i > 0 && i < m && (pos[i] >> 5) == (pos[i - 1] >> 5)) ++i;
    starts.push_back(i);
  }
  starts.push_back(m);
  return starts;
}

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
int64_t scatter_one(T* dst, int64_t n, const int64_t* pos, const T* val, int64_t m) {
  return scatter_loop(
      n, pos, m, [dst](uint64_t p) -> T& { return dst[p]; },
      [val](T& elem, uint64_t, int64_t i) { elem = val[i]; });
}

int64_t nibbles_one(uint8_t* dst, int64_t n, const int64_t* pos, const int8_t* q, int64_t m) {
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

// one weight's scatter, its positions [a, b) (itemsize 0: packed int4 codes), on this thread
int64_t write_range(void* dst, int64_t n, const int64_t* pos, const void* val, int64_t a,
                    int64_t b, int64_t itemsize) {
  const int64_t* p = pos + a;
  const int64_t m = b - a;
  switch (itemsize) {
    case 0: return nibbles_one(static_cast<uint8_t*>(dst), n, p, static_cast<const int8_t*>(val) + a, m);
    case 1: return scatter_one(static_cast<uint8_t*>(dst), n, p, static_cast<const uint8_t*>(val) + a, m);
    case 2: return scatter_one(static_cast<uint16_t*>(dst), n, p, static_cast<const uint16_t*>(val) + a, m);
    case 4: return scatter_one(static_cast<uint32_t*>(dst), n, p, static_cast<const uint32_t*>(val) + a, m);
    case 8: return scatter_one(static_cast<uint64_t*>(dst), n, p, static_cast<const uint64_t*>(val) + a, m);
    default: return 0;
  }
}

struct Range {
  int64_t w, a, b;  // weight w's positions [a, b)
};

// the scatters of `count` weights in chunks of about CHUNK positions (int4 chunks at block
// starts), shared by `threads` threads (one where all of them hold fewer than 2 * CHUNK)
int64_t write_all(int64_t count, void* const* dst, const int64_t* n, const int64_t* const* pos,
                  const void* const* val, const int64_t* m, int64_t itemsize, int64_t threads) {
  int64_t total = 0;
  for (int64_t w = 0; w < count; ++w) total += m[w];
  if (threads <= 1 || total < 2 * CHUNK) {
    int64_t skipped = 0;
    for (int64_t w = 0; w < count; ++w)
      skipped += write_range(dst[w], n[w], pos[w], val[w], 0, m[w], itemsize);
    return skipped;
  }
  std::vector<Range> ranges;
  for (int64_t w = 0; w < count; ++w) {
    const std::vector<int64_t> starts = chunk_starts(pos[w], m[w], itemsize);
    for (size_t c = 0; c + 1 < starts.size(); ++c)
      if (starts[c] < starts[c + 1]) ranges.push_back({w, starts[c], starts[c + 1]});
  }
  std::atomic<int64_t> skipped{0};
  share(static_cast<int64_t>(ranges.size()), threads, [&](int64_t r) {
    const Range& g = ranges[r];
    const int64_t k = write_range(dst[g.w], n[g.w], pos[g.w], val[g.w], g.a, g.b, itemsize);
    if (k) skipped.fetch_add(k, std::memory_order_relaxed);
  });
  return skipped.load();
}

}  // namespace

// chunk_starts, the chunks the threads share, written to `starts` (room for ceil(m / CHUNK)
// + 1 entries); returns how many it wrote (tests/test_scatter.py checks that no 32-code block
// is split)
extern "C" int64_t edgeadapt_scatter_chunks(const int64_t* pos, int64_t m, int64_t itemsize,
                                            int64_t* starts) {
  const std::vector<int64_t> plan = chunk_starts(pos, m, itemsize);
  std::copy(plan.begin(), plan.end(), starts);
  return static_cast<int64_t>(plan.size());
}

// n: codes in the buffer (twice its bytes)
extern "C" int64_t edgeadapt_scatter_nibbles(void* dst, int64_t n, const int64_t* pos,
                                             const void* codes, int64_t m, int64_t threads) {
  return write_all(1, &dst, &n, &pos, &codes, &m, 0, threads);
}

// dst[pos[i]] = val[i] for i < m, elements of `itemsize` bytes (1, 2, 4, 8; else -1, nothing
// written)
extern "C" int64_t edgeadapt_scatter(void* dst, int64_t n, const int64_t* pos, const void* val,
                                     int64_t m, int64_t itemsize, int64_t threads) {
  if (itemsize != 1 && itemsize != 2 && itemsize != 4 && itemsize != 8) return -1;
  return write_all(1, &dst, &n, &pos, &val, &m, itemsize, threads);
}

// for w < count: the scatter of m[w] elements val[w] at positions pos[w] into dst[w] of n[w]
// elements, each as edgeadapt_scatter with `itemsize` (1, 2, 4, 8), or itemsize 0: int4 codes
// two per byte as edgeadapt_scatter_nibbles (n[w]: codes); returns the positions skipped in all,
// or -1 for another itemsize (nothing written)
extern "C" int64_t edgeadapt_scatter_many(int64_t count, void* const* dst, const int64_t* n,
                                          const int64_t* const* pos, const void* const* val,
                                          const int64_t* m, int64_t itemsize, int64_t threads) {
  if (itemsize != 0 && itemsize != 1 && itemsize != 2 && itemsize != 4 && itemsize != 8)
    return -1;
  return write_all(count, dst, n, pos, val, m, itemsize, threads);
}
