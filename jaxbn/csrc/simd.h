// Element types, SIMD vectors and masks for jaxbn's CPU kernels (batch_norm_cpu.cc).
//
// float and bfloat16 compute in float, double in double. Vectors are 64 bytes of the compute
// type through GCC/Clang vector extensions: the compiler maps them onto whatever -march offers
// (AVX-512, AVX2, NEON). No fast-math anywhere: reductions vectorize through independent
// per-lane accumulators, never by reassociating a sum.
//
// Like team.h and passes.h, this header belongs to the one translation unit that makes the
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
  }
}


// Streaming (non-temporal) stores, for outputs too large to stay in cache (the normalize and
// gradient-input passes above kStreamingMinBytes, passes.h). An ordinary store first reads
// the line it writes ("read for ownership"), so writing y costs two transfers; a streaming
// store writes whole lines straight to memory, one transfer. Measured on this project's
// machine (experiments/csrc/nt_store_bench.cc, docs/performance.md): y = 2x + 1 over 32-100
// MiB of float32 1.5-1.7x faster per thread. They need kStreamAlign-aligned addresses
// (StoreStreaming falls back to an ordinary store elsewhere, so callers peel the unaligned
// head of a run for speed, never for correctness), and are weakly ordered: each thread ends
// its part of a pass with StreamingStoresDone() (an sfence) before it reports the part done.
// Without SSE2 or AVX (not x86) they are ordinary stores.
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

// Outputs of at least this many bytes are written with streaming stores (passes.h, Map; and
// the benchmark's floor, experiments/csrc/stream_floor.cc): measured
// (experiments/csrc/nt_store_bench.cc, docs/performance.md), a consumer that reads y right
// after the pass pays more than streaming saves while y still fits in the last-level cache
// beside x (1 MiB: 16% slower), breaks even at 8 MiB and gains from 16 MiB on (32 MiB L3).
// A constant, not the cache size the OS reports: in this project's VM sysconf says 256 MiB
// (the host's) where the guest has 32 MiB.
constexpr int64_t kStreamingMinBytes = int64_t{8} << 20;

// Elements of T from p to the next kStreamAlign boundary: the head of a run to peel.
template <typename T>
inline int64_t ToStreamAlign(const T* p) {
  const uintptr_t misaligned = reinterpret_cast<uintptr_t>(p) % kStreamAlign;
  return misaligned == 0 ? 0 : static_cast<int64_t>((kStreamAlign - misaligned) / sizeof(T));
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

template <typename A>
inline A HorizontalSum(Simd<A> v) {
  A s = 0;
  for (int l = 0; l < kLanes<A>; ++l) s += v[l];
  return s;
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
