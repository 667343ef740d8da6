// Element types, SIMD vectors and masks for jaxbn's CPU kernels (batch_norm_cpu.cc).
//
// float and bfloat16 compute in float, double in double. Vectors are 64 bytes of the compute
// type through GCC/Clang vector extensions: the compiler maps them onto whatever -march offers
// (AVX-512, AVX2, NEON). No fast-math anywhere: reductions vectorize through independent
// per-lane accumulators, never by reassociating a sum.
//
// Like team.h and the passes' headers, this header belongs to the one translation unit that makes the
// library (and to the scheduler's test program): everything is in an unnamed namespace, so the
// library exports its six handlers and nothing else, and two builds loaded into one process
// cannot resolve to each other's functions.

#ifndef JAXBN_CSRC_SIMD_H_
#define JAXBN_CSRC_SIMD_H_

#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__AVX__) || defined(__SSE2__)
#include <immintrin.h>
#endif

namespace jaxbn {
namespace {

// bfloat16, stored as its 16 bits (it has no C++ type the FFI headers know).
struct BF16 {
  uint16_t bits;
};

template <typename T>
struct ComputeOf {
  using type = float;
};
template <>
struct ComputeOf<double> {
  using type = double;
};
template <typename T>
using Compute = typename ComputeOf<T>::type;

inline float ToFloat(BF16 v) {
  uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline BF16 ToBF16(float v) {
  // Round to nearest, ties to even; a NaN stays a (quiet) NaN.
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const uint32_t quiet_nan = (u >> 16) | 0x40u;
  return BF16{static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded)};
}

template <typename A>
inline A Load(const float* p, int64_t i) { return static_cast<A>(p[i]); }
template <typename A>
inline A Load(const double* p, int64_t i) { return static_cast<A>(p[i]); }
template <typename A>
inline A Load(const BF16* p, int64_t i) { return static_cast<A>(ToFloat(p[i])); }

template <typename A>
inline void Store(float* p, int64_t i, A v) { p[i] = static_cast<float>(v); }
template <typename A>
inline void Store(double* p, int64_t i, A v) { p[i] = static_cast<double>(v); }
template <typename A>
inline void Store(BF16* p, int64_t i, A v) { p[i] = ToBF16(static_cast<float>(v)); }

typedef float F32V __attribute__((vector_size(64)));
typedef double F64V __attribute__((vector_size(64)));
typedef uint32_t U32V __attribute__((vector_size(64)));
typedef uint16_t U16V __attribute__((vector_size(32)));

template <typename A>
struct SimdOf;
template <>
struct SimdOf<float> {
  using V = F32V;
  static constexpr int kLanes = 16;
};
template <>
struct SimdOf<double> {
  using V = F64V;
  static constexpr int kLanes = 8;
};
template <typename A>
using Simd = typename SimdOf<A>::V;
template <typename A>
constexpr int kLanes = SimdOf<A>::kLanes;

// LoadV<A>(p): kLanes<A> elements from p as a vector of A; StoreV does the reverse.
template <typename A, typename T>
inline Simd<A> LoadV(const T* p) {
  if constexpr (sizeof(T) == sizeof(A) && !std::is_same_v<T, BF16>) {
    Simd<A> v;
    std::memcpy(&v, p, sizeof v);
    return v;
  } else if constexpr (std::is_same_v<T, BF16> && std::is_same_v<A, float>) {
    U16V h;
    std::memcpy(&h, p, sizeof h);
    U32V w = __builtin_convertvector(h, U32V) << 16;
    F32V v;
    std::memcpy(&v, &w, sizeof v);
    return v;
  } else {
    Simd<A> v;
    for (int l = 0; l < kLanes<A>; ++l) v[l] = Load<A>(p, l);
    return v;
  }
}

// LoadV for a vector that exactly one operation consumes (the normalize and gradient-input
// formulas' x and dy, the moments' x, the gradient sums' x). bfloat16 on AVX2: each 8
// values' 16 bytes loaded into both 128-bit halves of a register (vbroadcasti128, a plain
// load) and moved into the top halves of the 32-bit lanes by one byte shuffle (vpshufb;
// its -1 bytes give the zero bottom halves): 4 instructions per 16 values against LoadV's 6
// (a load, vextracti128, two vpmovzxwd, two vpslld); the bfloat16 passes are bound by
// conversion arithmetic on AVX2 (docs/performance.md). Not for a vector used twice: GCC 12
// then built the 64-byte concatenation of the two halves lane by lane on the stack (the
// gradient sums' dy, 5x slower; perf annotate), where LoadV's widening conversion is safe.
template <typename A, typename T>
inline Simd<A> LoadUsedOnce(const T* p) {
#if defined(__AVX2__)
  if constexpr (std::is_same_v<T, BF16> && std::is_same_v<A, float>) {
    const __m256i pick = _mm256_setr_epi8(-1, -1, 0, 1, -1, -1, 2, 3, -1, -1, 4, 5, -1, -1, 6, 7,
                                          -1, -1, 8, 9, -1, -1, 10, 11, -1, -1, 12, 13, -1, -1,
                                          14, 15);
    auto widen = [&pick](const BF16* q) {
      return (__v8sf)_mm256_shuffle_epi8(
          _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i_u*>(q))),
          pick);
    };
    return __builtin_shufflevector(widen(p), widen(p + 8), 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11,
                                   12, 13, 14, 15);
  }
#endif
  return LoadV<A>(p);
}

// The bits StoreV writes for kLanes<A> values: the vector itself where T is the compute type,
// packed bfloat16 for BF16 from float. (Other pairs are stored lane by lane, in StoreV.)
template <typename T, typename A>
constexpr bool kPacks = (sizeof(T) == sizeof(A) && !std::is_same_v<T, BF16>) ||
                        (std::is_same_v<T, BF16> && std::is_same_v<A, float>);

template <typename T, typename A>
inline auto Packed(Simd<A> v) {
  static_assert(kPacks<T, A>);
  if constexpr (!std::is_same_v<T, BF16>) {
    return v;
  } else {
#if defined(__AVX2__)
    // The same rounding in AVX2 intrinsics, 8 lanes at a time: NaN lanes found by one
    // unordered compare of the half with itself and picked with one blend, and the two halves'
    // 16-bit results packed by vpackusdw (exact: every result is below 2^16) and put back in
    // order by one vpermq. 9 instructions per 8 values against the generic code's 15 below
    // (its mask arithmetic, and an `and` with 0xffff GCC adds before the pack): the bfloat16
    // stores are bound by this arithmetic on AVX2, not by memory (docs/performance.md).
    auto round_half = [](__m256 h) {
      const __m256i u = _mm256_castps_si256(h);
      const __m256i top = _mm256_srli_epi32(u, 16);
      const __m256i odd = _mm256_and_si256(top, _mm256_set1_epi32(1));
      const __m256i rounded = _mm256_srli_epi32(
          _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), odd), 16);
      const __m256i quiet_nan = _mm256_or_si256(top, _mm256_set1_epi32(0x40));
      const __m256i is_nan = _mm256_castps_si256(_mm256_cmp_ps(h, h, _CMP_UNORD_Q));
      return _mm256_blendv_epi8(rounded, quiet_nan, is_nan);
    };
    const __m256i low = round_half((__m256)__builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7));
    const __m256i high =
        round_half((__m256)__builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15));
    // vpackusdw packs within 128-bit lanes: (low 0-3, high 0-3, low 4-7, high 4-7).
    return (U16V)_mm256_permute4x64_epi64(_mm256_packus_epi32(low, high), 0xd8);
#else
    typedef int32_t S32V __attribute__((vector_size(64)));
    U32V u;
    std::memcpy(&u, &v, sizeof u);
    const U32V rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const U32V quiet_nan = (u >> 16) | 0x40u;
    // NaN lanes (|v|'s bits above infinity's) as an all-ones mask: the sign of
    // inf_bits − |v|_bits (both below 2^31, so the difference cannot overflow) spread by an
    // arithmetic shift. No vector compare or `? :`: on 64-byte vectors without AVX-512, GCC
    // 12 turned those into a lane-by-lane loop that made every bfloat16 store cost more than
    // its memory traffic (docs/performance.md).
    const U32V is_nan = (U32V)((S32V{} + 0x7f800000 - (S32V)(u & 0x7fffffffu)) >> 31);
    const U32V bits = (quiet_nan & is_nan) | (rounded & ~is_nan);
    return __builtin_convertvector(bits, U16V);
#endif
  }
}


// Streaming (non-temporal) stores, for outputs too large to stay in cache (the normalize and
// gradient-input passes above kStreamingMinBytes, maps.h). An ordinary store first reads
// the line it writes ("read for ownership"), so writing y costs two transfers; a streaming
// store writes whole lines straight to memory, one transfer. Measured on this project's
// machine (benchmarks/csrc/nt_store_bench.cc, docs/performance.md): y = 2x + 1 over 32-100
// MiB of float32 1.5-1.7x faster per thread. They need kStreamAlign-aligned addresses
// (StoreStreaming falls back to an ordinary store elsewhere) and must write whole cache lines
// (StreamedLines, below), and are weakly ordered: each thread ends its part of a pass with
// StreamingStoresDone() (an sfence) before it reports the part done. Without SSE2 or AVX
// (not x86) they are ordinary stores.
#if defined(__AVX__)
constexpr bool kHaveStreamingStores = true;
constexpr int kStreamAlign = 32;
#elif defined(__SSE2__)
constexpr bool kHaveStreamingStores = true;
constexpr int kStreamAlign = 16;
#else
constexpr bool kHaveStreamingStores = false;
constexpr int kStreamAlign = 1;
#endif

// Outputs of at least this many bytes are written with streaming stores (maps.h, Map; and
// the benchmark's floor, benchmarks/csrc/stream_floor.cc): measured
// (benchmarks/csrc/nt_store_bench.cc, docs/performance.md), a consumer that reads y right
// after the pass pays more than streaming saves while y still fits in the last-level cache
// beside x (1 MiB: 16% slower), breaks even at 8 MiB and gains from 16 MiB on (32 MiB L3).
// A constant, not the cache size the OS reports: in this project's VM sysconf says 256 MiB
// (the host's) where the guest has 32 MiB.
constexpr int64_t kStreamingMinBytes = int64_t{8} << 20;

// The part [first, last) of a run of len values of T from p that streaming stores write: the
// whole 64-byte cache lines inside the run. A line that streaming stores only partly write
// (the rest by ordinary stores, or not at all before the write-combining buffer drains) costs
// a partial write to memory and evicts the line the ordinary stores just read: rows whose
// ends were off the line, as with 100 channels or a buffer 16 bytes past a boundary, made a
// float32 channels-last normalize 3-8x slower than aligned ones (benchmarks/csrc/pass_bench.cc,
// docs/performance.md). The values before `first` and from `last` on get ordinary stores;
// they share their lines with the neighbouring rows. last − first is a whole number of lines,
// so of vectors too (a vector is 32 or 64 bytes). {0, 0} if no whole line is inside.
struct Streamed {
  int64_t first, last;
};
constexpr uintptr_t kLineBytes = 64;
template <typename T>
inline Streamed StreamedLines(const T* p, int64_t len) {
  const uintptr_t begin = reinterpret_cast<uintptr_t>(p);
  const uintptr_t end = begin + static_cast<uintptr_t>(len) * sizeof(T);
  const uintptr_t line_begin = (begin + kLineBytes - 1) / kLineBytes * kLineBytes;
  const uintptr_t line_end = end / kLineBytes * kLineBytes;
  // (A p off T's own alignment, which XLA never passes, gets ordinary stores.)
  if (line_end <= line_begin || (line_begin - begin) % sizeof(T) != 0) return {0, 0};
  return {static_cast<int64_t>((line_begin - begin) / sizeof(T)),
          static_cast<int64_t>((line_end - begin) / sizeof(T))};
}

// Writes the bytes of a 32- or 64-byte vector w to p: with streaming stores if `stream` (p
// kStreamAlign-aligned), ordinary ones otherwise.
template <typename W>
inline void StoreBytes(void* p, W w, bool stream) {
  static_assert(sizeof(W) == 32 || sizeof(W) == 64);
#if defined(__AVX__)
  constexpr int kLanesW = sizeof(W) / sizeof(w[0]);
  // The halves of a 64-byte vector, as 32-byte vectors of its own lane type: shuffles in the
  // vector's own type stay in registers (a memcpy into __m256i, or a shuffle of a 64-bit-lane
  // view, went through the stack in GCC 12's code), and so do both branches below.
  auto put = [p, stream](int k, __m256i v) {
    char* to = static_cast<char*>(p) + 32 * k;
    if (stream) {
      _mm256_stream_si256(reinterpret_cast<__m256i*>(to), v);
    } else {  // through the unaligned type: `to` may be anywhere
      _mm256_storeu_si256(reinterpret_cast<__m256i_u*>(to), v);
    }
  };
  if constexpr (sizeof(W) == 32) {
    put(0, (__m256i)w);
  } else if constexpr (kLanesW == 16) {
    put(0, (__m256i)__builtin_shufflevector(w, w, 0, 1, 2, 3, 4, 5, 6, 7));
    put(1, (__m256i)__builtin_shufflevector(w, w, 8, 9, 10, 11, 12, 13, 14, 15));
  } else {
    static_assert(kLanesW == 8);
    put(0, (__m256i)__builtin_shufflevector(w, w, 0, 1, 2, 3));
    put(1, (__m256i)__builtin_shufflevector(w, w, 4, 5, 6, 7));
  }
#elif defined(__SSE2__)
  // 16-byte pieces through a copy: SSE2-only machines are not what this is tuned for.
  if (stream) {
    __m128i pieces[sizeof(W) / 16];
    std::memcpy(pieces, &w, sizeof w);
    for (size_t k = 0; k < sizeof(W) / 16; ++k)
      _mm_stream_si128(reinterpret_cast<__m128i*>(static_cast<char*>(p) + 16 * k), pieces[k]);
  } else {
    std::memcpy(p, &w, sizeof w);
  }
#else
  (void)stream;
  std::memcpy(p, &w, sizeof w);
#endif
}

// kLanes<A> values to p, as T. (Through StoreBytes: GCC 12 sometimes lowered a memcpy of a
// 64-byte vector into four 16-byte stores from a copy on the stack, which made the normalize
// pass 20% slower on cached data.)
template <typename A, typename T>
inline void StoreV(T* p, Simd<A> v) {
  if constexpr (kPacks<T, A>) {
    StoreBytes(p, Packed<T, A>(v), /*stream=*/false);
  } else {
    for (int l = 0; l < kLanes<A>; ++l) Store<A>(p, l, v[l]);
  }
}

// StoreV through streaming stores where p allows them (see above), an ordinary store elsewhere.
template <typename A, typename T>
inline void StoreStreaming(T* p, Simd<A> v) {
  if constexpr (kHaveStreamingStores && kPacks<T, A>) {
    StoreBytes(p, Packed<T, A>(v), reinterpret_cast<uintptr_t>(p) % kStreamAlign == 0);
  } else {
    StoreV<A>(p, v);
  }
}

// Orders this thread's streaming stores before whatever it does next (reporting its part of
// a pass done, after which other threads and XLA read the output).
inline void StreamingStoresDone() {
#if defined(__AVX__) || defined(__SSE2__)
  _mm_sfence();
#endif
}

// Software prefetch for the passes that read from memory (channels-last moments, gradient
// sums and maps; channels-first moments): asks for the line kPrefetchBytes past p. The
// hardware prefetchers alone left the channels-last statistics at 1.2-1.3x the time of a
// plain read of x (in one sweep); 4 KiB ahead brought them to 0.94-1.14x, better than 1 or
// 2 KiB; the gradient sums went from 1.22x to 1.10x a read of x and dy (float32), the maps
// 5-10% closer to their channels-first twins (benchmarks/csrc/pass_bench.cc, docs/performance.md).
// A prefetch never faults, so one past the end of an array is harmless.
constexpr int64_t kPrefetchBytes = 4096;
template <typename T>
inline void PrefetchAhead(const T* p) {
  __builtin_prefetch(reinterpret_cast<const char*>(p) + kPrefetchBytes, /*rw=*/0,
                     /*locality=*/3);
}

template <typename A>
inline A HorizontalSum(Simd<A> v) {
  A s = 0;
  for (int l = 0; l < kLanes<A>; ++l) s += v[l];
  return s;
}

// A running sum of 64-byte vectors (V: Simd<A>, or the benchmark floor's words) that stays in
// registers. Where 64 bytes is wider than
// the machine's vectors (AVX2, SSE, NEON), a loop-carried 64-byte variable has no register
// (GCC 12 kept it on the stack: every add then waited on a store and a reload; `perf record
// -e cpu-clock` on benchmarks/csrc/pass_bench.cc, docs/performance.md), so it is kept as two 32-byte
// halves, which GCC maps onto ymm registers (or pairs of xmm ones).
#if !defined(__AVX512F__)
// The 32-byte halves of a 64-byte vector (see Accumulator).
template <typename V>
struct HalfType {
  using E = std::remove_cv_t<std::remove_reference_t<decltype(V{}[0])>>;
  typedef E type __attribute__((vector_size(32)));
};
template <typename V>
using HalfOf = typename HalfType<V>::type;
template <typename V>
inline auto LowHalf(V x) {
  if constexpr (sizeof(V) / sizeof(x[0]) == 16) {
    return __builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7);
  } else {
    return __builtin_shufflevector(x, x, 0, 1, 2, 3);
  }
}
template <typename V>
inline auto HighHalf(V x) {
  if constexpr (sizeof(V) / sizeof(x[0]) == 16) {
    return __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15);
  } else {
    return __builtin_shufflevector(x, x, 4, 5, 6, 7);
  }
}
#endif

template <typename V>
struct Accumulator {
#if defined(__AVX512F__)
  V v{};
  void Add(V x) { v += x; }
  V Total() const { return v; }
#else
  static_assert(sizeof(V) == 64);
  HalfOf<V> low{}, high{};
  void Add(V x) {
    low += LowHalf(x);
    high += HighHalf(x);
  }
  V Total() const {
    if constexpr (sizeof(V) / sizeof(low[0]) == 16) {
      return __builtin_shufflevector(low, high, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13,
                                     14, 15);
    } else {
      return __builtin_shufflevector(low, high, 0, 1, 2, 3, 4, 5, 6, 7);
    }
  }
#endif
};

// *acc += x for a 64-byte vector in memory (the channels-last reductions' per-feature sums),
// through its 32-byte halves where 64 bytes is no register type: GCC 12 compiled the plain
// `*acc += x` into a copy on the stack stored back in 16-byte pieces (perf annotate,
// docs/performance.md).
template <typename V>
inline void AddInto(V* acc, V x) {
#if defined(__AVX512F__)
  *acc += x;
#else
  typedef HalfOf<V> Half __attribute__((may_alias));
  Half* halves = reinterpret_cast<Half*>(acc);
  halves[0] += LowHalf(x);
  halves[1] += HighHalf(x);
#endif
}

// Masks: one byte per (outer, inner) position, shared by every feature (a mask that varies
// across features takes the pure-JAX path); a null pointer means no mask. Masked values take
// no part in any sum and their outputs are 0 whatever x holds, NaN included, so masked terms
// are dropped with a select, never multiplied by 0.
typedef int32_t I32V __attribute__((vector_size(64)));
typedef int64_t I64V __attribute__((vector_size(64)));
typedef uint8_t U8x16 __attribute__((vector_size(16)));
typedef uint8_t U8x8 __attribute__((vector_size(8)));

// Lane conditions for Keep: kLanes<A> mask bytes as all-ones (kept) or zero lanes of integers
// as wide as A. Formed as the sign of 0 − byte, spread by an arithmetic shift, and applied by
// Keep with a bitwise and: on 64-byte vectors without AVX-512, GCC 12 compiles a vector
// compare or `? :` lane by lane (docs/performance.md).
// (The bytes are widened by a shuffle with zeros, which GCC also keeps in vector registers.)
inline I32V LoadKeep(const uint8_t* m, float*) {
  U8x16 b, z{};
  std::memcpy(&b, m, sizeof b);
  const auto wide = __builtin_shufflevector(
      b, z, 0, 16, 16, 16, 1, 16, 16, 16, 2, 16, 16, 16, 3, 16, 16, 16, 4, 16, 16, 16, 5, 16, 16,
      16, 6, 16, 16, 16, 7, 16, 16, 16, 8, 16, 16, 16, 9, 16, 16, 16, 10, 16, 16, 16, 11, 16, 16,
      16, 12, 16, 16, 16, 13, 16, 16, 16, 14, 16, 16, 16, 15, 16, 16, 16);
  I32V w;
  std::memcpy(&w, &wide, sizeof w);
  return (I32V{} - w) >> 31;
}
inline I64V LoadKeep(const uint8_t* m, double*) {
  U8x8 b, z{};
  std::memcpy(&b, m, sizeof b);
  const auto wide = __builtin_shufflevector(
      b, z, 0, 8, 8, 8, 8, 8, 8, 8, 1, 8, 8, 8, 8, 8, 8, 8, 2, 8, 8, 8, 8, 8, 8, 8, 3, 8, 8, 8, 8,
      8, 8, 8, 4, 8, 8, 8, 8, 8, 8, 8, 5, 8, 8, 8, 8, 8, 8, 8, 6, 8, 8, 8, 8, 8, 8, 8, 7, 8, 8, 8,
      8, 8, 8, 8);
  I64V w;
  std::memcpy(&w, &wide, sizeof w);
  return (I64V{} - w) >> 63;
}
template <typename A>
inline auto LoadKeep(const uint8_t* m) { return LoadKeep(m, static_cast<A*>(nullptr)); }

struct AllKept {};  // the condition when there is no mask
template <typename V>
inline V Keep(AllKept, V v) { return v; }
template <typename K, typename V>
inline V Keep(K keep, V v) {
  if constexpr (std::is_same_v<K, bool>) {
    return keep ? v : V{};
  } else {  // lane-wise: v's bits where keep's lane is all ones, +0 where it is zero
    K bits;
    std::memcpy(&bits, &v, sizeof bits);
    bits &= keep;
    std::memcpy(&v, &bits, sizeof v);
    return v;
  }
}

inline int64_t CountKept(const uint8_t* m, int64_t len) {
  int64_t n = 0;
  for (int64_t i = 0; i < len; ++i) n += m[i] != 0;
  return n;
}

}  // namespace
}  // namespace jaxbn

#endif  // JAXBN_CSRC_SIMD_H_
