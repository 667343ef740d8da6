// The benchmark's floor (experiments/bench_ops.py): a BN training step's minimal memory
// traffic, eight activation-sized transfers, done by trivial streaming kernels through the
// same path as jaxbn's kernels (an XLA FFI call on XLA's intra-op pool, the same Team, the
// same number of threads, parts that start on cache lines), so that the only difference
// from a BN step is the arithmetic and the order in which BN has to touch memory:
//
//   floor_forward   reads x (a sum), then reads x and writes y = x ^ c         3 transfers
//   floor_backward  reads x and dy (a sum), then reads both and writes x ^ dy  5 transfers
//
// A floor, not a kernel: it moves bytes and does as little as can still not be optimized
// away. So it treats every dtype as raw 32-bit words (integer sums, bitwise maps): an
// earlier floor converted bfloat16 to float and back like the kernels do, which on AVX2 costs
// more than the memory traffic of a single thread (docs/performance.md), and PyTorch beat that
// "floor" by up to 35%. And it writes with the best stores jaxbn's kernels have: streaming
// stores where the kernels use them (outputs of at least kStreamingMinBytes, simd.h),
// ordinary ones below, so that no kernel can beat its floor by its choice of stores.
//
// The sums go into a per-thread slot of a small output so that nothing can be optimized
// away. Built by the benchmark with jaxbn/csrc on the include path.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "simd.h"
#include "team.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jaxbn {
namespace {

// Words of 32 bits, 16 to a 64-byte vector (a cache line).
typedef uint32_t Words __attribute__((vector_size(64)));
constexpr int64_t kWordsPerVector = 16;

inline Words LoadWords(const uint32_t* p) {
  Words v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// The parts of n words among the Team, as jaxbn's passes split `elements` values: as many
// parts (NumParts), each starting on a cache line.
inline Split WordSplit(const Team& team, int64_t n, int64_t elements) {
  return Split{n, NumParts(team, elements), kWordsPerVector};
}

// Σ of the words of x (and of g): one read of each.
void ReadPass(Team& team, const uint32_t* x, const uint32_t* g, int64_t n, int64_t elements,
              float* sink) {
  const Split split = WordSplit(team, n, elements);
  std::vector<uint32_t> part(split.parts);
  team.Run(split.parts, [&](int64_t p) {
    // In registers (simd.h: a plain 64-byte vector went through the stack, as in the kernels).
    Accumulator<Words> a, b;
    int64_t i = split.Begin(p);
    for (; i + 2 * kWordsPerVector <= split.End(p); i += 2 * kWordsPerVector) {
      a.Add(LoadWords(x + i) + (g ? LoadWords(g + i) : Words{}));
      const int64_t j = i + kWordsPerVector;
      b.Add(LoadWords(x + j) + (g ? LoadWords(g + j) : Words{}));
    }
    const Words total = a.Total() + b.Total();
    uint32_t s = 0;
    for (int l = 0; l < kWordsPerVector; ++l) s += total[l];
    for (; i < split.End(p); ++i) s += x[i] + (g ? g[i] : 0u);
    part[p] = s;
  });
  for (uint32_t s : part) *sink += static_cast<float>(s);
}

// out = x ^ g (g null: x ^ a constant), streaming where jaxbn's kernels would stream.
template <bool kStream>
void MapWords(Team& team, const uint32_t* x, const uint32_t* g, uint32_t* out, int64_t n,
              int64_t elements) {
  const Split split = WordSplit(team, n, elements);
  team.Run(split.parts, [&](int64_t p) {
    const int64_t end = split.End(p);
    int64_t i = split.Begin(p);
    auto value = [&](int64_t k) { return x[k] ^ (g ? g[k] : 0x3f800000u); };
    auto vector = [&](int64_t k) {
      return LoadWords(x + k) ^ (g ? LoadWords(g + k) : Words{} + 0x3f800000u);
    };
    auto ordinary = [&](int64_t to) {
      for (; i + kWordsPerVector <= to; i += kWordsPerVector)
        StoreBytes(out + i, vector(i), /*stream=*/false);
      for (; i < to; ++i) out[i] = value(i);
    };
    if constexpr (kStream) {  // whole lines streamed, as jaxbn's kernels do (simd.h)
      const Streamed lines = StreamedLines(out + i, end - i);
      const int64_t first = i + lines.first, last = i + lines.last;
      ordinary(first);
      for (; i < last; i += kWordsPerVector) StoreBytes(out + i, vector(i), /*stream=*/true);
    }
    ordinary(end);
    if constexpr (kStream) StreamingStoresDone();
  });
}

// A pass over `bytes` bytes of x (and g) as 32-bit words, the last 0-3 bytes on their own.
void Read(Team& team, const void* x, const void* g, int64_t bytes, int64_t elements,
          float* sink) {
  const int64_t n = bytes / 4;
  ReadPass(team, static_cast<const uint32_t*>(x), static_cast<const uint32_t*>(g), n, elements,
           sink);
  for (int64_t b = n * 4; b < bytes; ++b) {
    *sink += static_cast<const uint8_t*>(x)[b] + (g ? static_cast<const uint8_t*>(g)[b] : 0);
  }
}

void Map(Team& team, const void* x, const void* g, void* out, int64_t bytes, int64_t elements) {
  const int64_t n = bytes / 4;
  const auto* xw = static_cast<const uint32_t*>(x);
  const auto* gw = static_cast<const uint32_t*>(g);
  auto* ow = static_cast<uint32_t*>(out);
  if (kHaveStreamingStores && bytes >= kStreamingMinBytes) {
    MapWords<true>(team, xw, gw, ow, n, elements);
  } else {
    MapWords<false>(team, xw, gw, ow, n, elements);
  }
  for (int64_t b = n * 4; b < bytes; ++b) {
    static_cast<uint8_t*>(out)[b] =
        static_cast<const uint8_t*>(x)[b] ^ (g ? static_cast<const uint8_t*>(g)[b] : 0x5a);
  }
}

template <typename Fn>
ffi::Error Typed(ffi::DataType dtype, Fn&& fn) {
  switch (dtype) {
    case ffi::DataType::F32:
      return fn(static_cast<float*>(nullptr));
    case ffi::DataType::BF16:
      return fn(static_cast<BF16*>(nullptr));
    default:
      return ffi::Error::InvalidArgument("stream_floor: float32 or bfloat16 only");
  }
}

ffi::Error ForwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> y,
                       ffi::Result<ffi::AnyBuffer> sink) {
  Team team(pool);
  return Typed(x.element_type(), [&](auto*) {
    const int64_t n = x.element_count(), bytes = x.size_bytes();
    float* s = reinterpret_cast<float*>(sink->untyped_data());
    *s = 0;
    Read(team, x.untyped_data(), nullptr, bytes, n, s);
    Map(team, x.untyped_data(), nullptr, y->untyped_data(), bytes, n);
    return ffi::Error::Success();
  });
}

ffi::Error BackwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer dy,
                        ffi::AnyBuffer /*after*/, ffi::Result<ffi::AnyBuffer> dx,
                        ffi::Result<ffi::AnyBuffer> sink) {
  Team team(pool);
  return Typed(x.element_type(), [&](auto*) {
    const int64_t n = x.element_count(), bytes = x.size_bytes();
    float* s = reinterpret_cast<float*>(sink->untyped_data());
    *s = 0;
    Read(team, x.untyped_data(), dy.untyped_data(), bytes, n, s);
    Map(team, x.untyped_data(), dy.untyped_data(), dx->untyped_data(), bytes, n);
    return ffi::Error::Success();
  });
}

}  // namespace
}  // namespace jaxbn

XLA_FFI_DEFINE_HANDLER_SYMBOL(FloorForward, jaxbn::ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()    // x
                                  .Ret<ffi::AnyBuffer>()    // y = x ^ c, bitwise
                                  .Ret<ffi::AnyBuffer>());  // a sum of x's words (float32)

XLA_FFI_DEFINE_HANDLER_SYMBOL(FloorBackward, jaxbn::BackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()    // x
                                  .Arg<ffi::AnyBuffer>()    // dy
                                  .Arg<ffi::AnyBuffer>()    // the forward's sum: runs after it
                                  .Ret<ffi::AnyBuffer>()    // dx = x ^ dy, bitwise
                                  .Ret<ffi::AnyBuffer>());  // a sum of x's and dy's words
