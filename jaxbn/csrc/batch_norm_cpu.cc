// jaxbn's CPU kernels: the four passes over activations that batch normalization needs.
//
// XLA:CPU compiles jaxbn's pure-JAX batch norm to 15 activation-sized transfers where the
// maths needs 8 (docs/performance.md says why). These kernels do the streaming parts in as
// few passes as the maths allows; every per-feature formula stays in JAX (jaxbn/ops.py):
//
//   Moments     reads x once        → per feature μ (as hi + lo) and M2 = Σ (x − μ)²   eqs. (1)-(2)
//   Normalize   reads x, writes y   → y = ((x − hi) − lo)·a + b                       eqs. (3)-(4)
//   GradSums    reads x and dy      → Σ dy, Σ dy·(x − μ)                              eqs. (5)-(6)
//   GradInput   reads x, dy, writes dx → dx = a·dy + b + k·(x − μ)                    closed form of (7)
//
// Every array is viewed as (outer, C, inner): C features, reduced over outer and inner
// (NHWC with axis=-1 is (N·H·W, C, 1); NCHW is (N, C, H·W)).
//
// Moments is one pass yet as exact as a two-pass algorithm: rows are taken in cache-sized
// chunks; each chunk's mean and M2 come from two sweeps of the chunk while it sits in cache
// (sum, then Σd and Σd² of d = x − chunk mean, the corrected two-pass form), and chunks are
// combined in double precision with Chan, Golub & LeVeque's pairwise update
//   M2 = M2_a + M2_b + δ² n_a n_b / n,   δ = mean_b − mean_a.
// Float sums run over one chunk only; nothing sums x itself over the whole batch, so a feature
// with |μ| ≫ σ keeps its digits. μ leaves as a float pair hi + lo, so that x − μ can be formed
// as (x − hi) − lo: x − hi is exact when x is near μ (Sterbenz), and lo carries what hi cannot.
//
// No fast-math: reductions vectorize through independent per-lane accumulators, never by
// reassociating a sum.

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jaxbn {
namespace {

// ---------------------------------------------------------------------------------------
// Element types: float, double and bfloat16 (stored as its 16 bits). float and bfloat16
// compute in float, double in double.

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

// 64-byte SIMD vectors of the compute type, through GCC/Clang vector extensions: the
// compiler maps them onto whatever -march offers (AVX-512, AVX2, NEON).
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

template <typename A, typename T>
inline void StoreV(T* p, Simd<A> v) {
  if constexpr (sizeof(T) == sizeof(A) && !std::is_same_v<T, BF16>) {
    std::memcpy(p, &v, sizeof v);
  } else if constexpr (std::is_same_v<T, BF16> && std::is_same_v<A, float>) {
    U32V u;
    std::memcpy(&u, &v, sizeof u);
    U32V rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    U32V quiet_nan = (u >> 16) | 0x40u;
    U32V bits = (u & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded;
    U16V h = __builtin_convertvector(bits, U16V);
    std::memcpy(p, &h, sizeof h);
  } else {
    for (int l = 0; l < kLanes<A>; ++l) Store<A>(p, l, v[l]);
  }
}

template <typename A>
inline A HorizontalSum(Simd<A> v) {
  A s = 0;
  for (int l = 0; l < kLanes<A>; ++l) s += v[l];
  return s;
}

// Calls fn(tag) with a null pointer of the C++ type of `dtype`.
template <typename Fn>
ffi::Error DispatchType(ffi::DataType dtype, const char* what, Fn&& fn) {
  switch (dtype) {
    case ffi::DataType::F32:
      return fn(static_cast<float*>(nullptr));
    case ffi::DataType::F64:
      return fn(static_cast<double*>(nullptr));
    case ffi::DataType::BF16:
      return fn(static_cast<BF16*>(nullptr));
    default:
      return ffi::Error::InvalidArgument(std::string("jaxbn: unsupported dtype for ") + what);
  }
}

// ---------------------------------------------------------------------------------------
// Parallel loop on XLA's intra-op thread pool. The calling thread takes tasks too, so the
// loop finishes even when no pool thread is free; a pool thread that starts after every task
// is taken finds nothing to do and touches only the shared counter block.

class ParallelFor {
 public:
  static constexpr int kSpinsBeforeSleep = 20000;

  static int64_t Workers(ffi::ThreadPool& pool) {
    return std::max<int64_t>(1, pool.num_threads());
  }

  template <typename Fn>
  static void Run(ffi::ThreadPool& pool, int64_t num_tasks, Fn&& fn) {
    if (num_tasks <= 1) {
      if (num_tasks == 1) fn(0);
      return;
    }
    std::function<void(int64_t)> task = fn;
    auto state = std::make_shared<State>();
    state->num_tasks = num_tasks;
    state->task = &task;
    for (int64_t t = 1; t < num_tasks; ++t) {
      pool.Schedule([state] { Work(*state); });
    }
    Work(*state);
    // The other tasks usually finish within microseconds of ours: spin briefly before
    // sleeping, since a futex wake-up costs more than a small kernel's whole run.
    for (int spin = 0; spin < kSpinsBeforeSleep && state->done.load() != num_tasks; ++spin)
      std::this_thread::yield();
    std::unique_lock<std::mutex> lock(state->mu);
    state->cv.wait(lock, [&] { return state->done.load() == num_tasks; });
  }

 private:
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    int64_t num_tasks = 0;
    const std::function<void(int64_t)>* task = nullptr;  // valid while tasks remain
    std::mutex mu;
    std::condition_variable cv;
  };

  static void Work(State& s) {
    for (int64_t i; (i = s.next.fetch_add(1)) < s.num_tasks;) {
      (*s.task)(i);
      if (s.done.fetch_add(1) + 1 == s.num_tasks) {
        std::lock_guard<std::mutex> lock(s.mu);
        s.cv.notify_all();
      }
    }
  }
};

// Splits [0, n) into `parts` contiguous ranges whose boundaries are multiples of `align`.
struct Split {
  int64_t n, parts, align;
  int64_t Begin(int64_t p) const {
    int64_t units = (n + align - 1) / align;
    return std::min(n, (units * p / parts) * align);
  }
  int64_t End(int64_t p) const { return Begin(p + 1); }
};

// Below this many elements per thread a second thread costs more than it saves.
constexpr int64_t kMinElementsPerThread = 1 << 16;
// Float sums run over at most kChunkRows values (channels-last: one accumulator per feature)
// or kPieceElements values in kLanes accumulators (channels-first) — 16 to 64 terms, so
// their rounding stays within a few float32 ulps — and everything longer adds up in double.
constexpr int64_t kChunkRows = 16;
constexpr int64_t kPieceElements = 1024;
// Features per column block of the channels-last kernels: a chunk of kChunkRows rows of a
// block (64 KiB in float32) stays in cache between the two sweeps of the moments.
constexpr int64_t kBlockFeatures = 1024;

int64_t NumParts(ffi::ThreadPool& pool, int64_t elements) {
  return std::max<int64_t>(1, std::min(ParallelFor::Workers(pool), elements / kMinElementsPerThread));
}


// ---------------------------------------------------------------------------------------
// Running (count, mean, M2) per feature, merged pairwise (Chan, Golub & LeVeque).

struct Moments {
  std::vector<double> count, mean, m2;
  explicit Moments(int64_t c) : count(c, 0.0), mean(c, 0.0), m2(c, 0.0) {}

  void Add(int64_t f, double n_b, double mean_b, double m2_b) {
    if (n_b == 0) return;
    double n_a = count[f], n = n_a + n_b;
    double delta = mean_b - mean[f];
    mean[f] += delta * (n_b / n);
    m2[f] += m2_b + delta * delta * (n_a * n_b / n);
    count[f] = n;
  }

  // A chunk of n values with provisional mean `shift` and Σd, Σd² of d = x − shift
  // (the corrected two-pass form: the chunk's mean is shift + Σd/n).
  void AddChunk(int64_t f, double n, double shift, double sum_d, double sum_dd) {
    Add(f, n, shift + sum_d / n, sum_dd - sum_d * sum_d / n);
  }

  // Chunks of n_b values for features [f0, f0 + width), all after n_a values each: the
  // channels-last case, where every feature has the same count, so the weights are shared.
  template <typename A>
  void AddChunks(int64_t f0, int64_t width, double n_a, double n_b, const A* shift,
                 const A* sum_d, const A* sum_dd) {
    const double inv_b = 1.0 / n_b, w_b = n_b / (n_a + n_b), w_ab = n_a * n_b / (n_a + n_b);
    double* mu = mean.data() + f0;
    double* q = m2.data() + f0;
    for (int64_t j = 0; j < width; ++j) {
      const double sd = sum_d[j];
      const double delta = (shift[j] + sd * inv_b) - mu[j];
      mu[j] += delta * w_b;
      q[j] += (sum_dd[j] - sd * sd * inv_b) + delta * delta * w_ab;
    }
  }

  void SetCount(double n) { std::fill(count.begin(), count.end(), n); }

  void Merge(const Moments& other) {
    for (size_t f = 0; f < count.size(); ++f) Add(f, other.count[f], other.mean[f], other.m2[f]);
  }
};

// Channels-last (inner == 1): rows × C, vectorized across features. Each chunk of rows is
// swept twice (sum, then Σd and Σd²) while it is in cache.
template <typename T>
void MomentsRows(ffi::ThreadPool& pool, const T* x, int64_t rows, int64_t features,
                 Moments& out) {
  using A = Compute<T>;
  using V = Simd<A>;
  constexpr int L = kLanes<A>;
  const int64_t block = std::min(features, kBlockFeatures);
  const int64_t chunk = kChunkRows;
  const int64_t parts = NumParts(pool, rows * features);
  const Split split{rows, parts, chunk};
  std::vector<Moments> partial(parts, Moments(features));
  ParallelFor::Run(pool, parts, [&](int64_t p) {
    const int64_t tiles = block / L;
    std::vector<V> s(tiles), shift(tiles), sd(tiles), sdd(tiles);
    std::vector<A> s1(L), shift1(L), sd1(L), sdd1(L);  // the < L features left over
    for (int64_t r0 = split.Begin(p); r0 < split.End(p); r0 += chunk) {
      const int64_t r1 = std::min(r0 + chunk, split.End(p));
      const A n = static_cast<A>(r1 - r0);
      for (int64_t c0 = 0; c0 < features; c0 += block) {
        const int64_t width = std::min(block, features - c0);
        const int64_t full = width / L, rest = width - full * L;
        std::fill(s.begin(), s.end(), V{});
        std::fill(sd.begin(), sd.end(), V{});
        std::fill(sdd.begin(), sdd.end(), V{});
        std::fill(s1.begin(), s1.end(), A(0));
        std::fill(sd1.begin(), sd1.end(), A(0));
        std::fill(sdd1.begin(), sdd1.end(), A(0));
        for (int64_t r = r0; r < r1; ++r) {
          const T* row = x + r * features + c0;
          for (int64_t t = 0; t < full; ++t) s[t] += LoadV<A>(row + t * L);
          for (int64_t c = 0; c < rest; ++c) s1[c] += Load<A>(row, full * L + c);
        }
        for (int64_t t = 0; t < full; ++t) shift[t] = s[t] / n;
        for (int64_t c = 0; c < rest; ++c) shift1[c] = s1[c] / n;
        for (int64_t r = r0; r < r1; ++r) {
          const T* row = x + r * features + c0;
          for (int64_t t = 0; t < full; ++t) {
            V d = LoadV<A>(row + t * L) - shift[t];
            sd[t] += d;
            sdd[t] += d * d;
          }
          for (int64_t c = 0; c < rest; ++c) {
            A d = Load<A>(row, full * L + c) - shift1[c];
            sd1[c] += d;
            sdd1[c] += d * d;
          }
        }
        const double done = static_cast<double>(r0 - split.Begin(p));
        partial[p].AddChunks(c0, full * L, done, n, reinterpret_cast<const A*>(shift.data()),
                             reinterpret_cast<const A*>(sd.data()),
                             reinterpret_cast<const A*>(sdd.data()));
        partial[p].AddChunks(c0 + full * L, rest, done, n, shift1.data(), sd1.data(),
                             sdd1.data());
      }
    }
    partial[p].SetCount(static_cast<double>(split.End(p) - split.Begin(p)));
  });
  for (const Moments& m : partial) out.Merge(m);
}

// Sweeps one contiguous run of len values of x (and of g, for two-input sums):
// term(x, g, acc1, acc2) on vectors of kLanes<A> values, then on the leftover values one at
// a time; term is generic, so one lambda serves both. Returns the accumulators' totals.
template <typename A, typename T, typename G, typename Fn>
inline void SweepRun(const T* x, const G* g, int64_t len, Fn&& term, A* out1, A* out2) {
  constexpr int L = kLanes<A>;
  Simd<A> a{}, b{};
  int64_t i = 0;
  for (; i + L <= len; i += L) term(LoadV<A>(x + i), LoadV<A>(g + i), a, b);
  A s1 = HorizontalSum<A>(a), s2 = HorizontalSum<A>(b);
  for (; i < len; ++i) term(Load<A>(x, i), Load<A>(g, i), s1, s2);
  *out1 = s1;
  *out2 = s2;
}

// Channels-first (inner > 1): segments of `inner` contiguous values of one feature, split
// into pieces of at most kPieceElements.
struct Pieces {
  int64_t per_segment, size;
  explicit Pieces(int64_t inner)
      : per_segment((inner + kPieceElements - 1) / kPieceElements),
        size((inner + per_segment - 1) / per_segment) {}
};

template <typename T>
void MomentsSegments(ffi::ThreadPool& pool, const T* x, int64_t outer, int64_t features,
                     int64_t inner, Moments& out) {
  using A = Compute<T>;
  const Pieces pieces(inner);
  const int64_t items = outer * features * pieces.per_segment;
  const int64_t parts = NumParts(pool, outer * features * inner);
  const Split split{items, parts, 1};
  std::vector<Moments> partial(parts, Moments(features));
  ParallelFor::Run(pool, parts, [&](int64_t p) {
    for (int64_t item = split.Begin(p); item < split.End(p); ++item) {
      const int64_t segment = item / pieces.per_segment;
      const int64_t start = (item % pieces.per_segment) * pieces.size;
      const int64_t len = std::min(pieces.size, inner - start);
      const T* v = x + segment * inner + start;
      A s, unused;
      SweepRun<A>(v, v, len, [](auto xv, auto, auto& a, auto&) { a += xv; }, &s, &unused);
      const A shift = s / static_cast<A>(len);
      A sd, sdd;
      SweepRun<A>(
          v, v, len,
          [shift](auto xv, auto, auto& a, auto& b) {
            auto d = xv - shift;
            a += d;
            b += d * d;
          },
          &sd, &sdd);
      partial[p].AddChunk(segment % features, static_cast<double>(len), shift, sd, sdd);
    }
  });
  for (const Moments& m : partial) out.Merge(m);
}

struct Shape3 {
  int64_t outer, features, inner;
};

// The (outer, C, inner) view of x, whatever its rank: JAX passes C and inner as attributes,
// so no reshape (which XLA:CPU may turn into a copy) comes between x and the kernel.
bool AsShape3(const ffi::AnyBuffer& buffer, int64_t features, int64_t inner, Shape3* shape) {
  const int64_t total = static_cast<int64_t>(buffer.element_count());
  if (features <= 0 || inner <= 0 || total % (features * inner) != 0) return false;
  *shape = Shape3{total / (features * inner), features, inner};
  return true;
}

ffi::Error BadShape() {
  return ffi::Error::InvalidArgument("jaxbn: x does not split into (outer, features, inner)");
}

// Typed views of untyped buffers (bfloat16 has no C++ type the FFI headers know).
template <typename T>
const T* Data(const ffi::AnyBuffer& b) {
  return reinterpret_cast<const T*>(b.untyped_data());
}
template <typename T>
T* Data(ffi::Result<ffi::AnyBuffer>& b) {
  return reinterpret_cast<T*>(b->untyped_data());
}

ffi::Error MomentsImpl(ffi::ThreadPool pool, int64_t features, int64_t inner, ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> hi,
                       ffi::Result<ffi::AnyBuffer> lo, ffi::Result<ffi::AnyBuffer> m2) {
  Shape3 shape;
  if (!AsShape3(x, features, inner, &shape)) return BadShape();
  const int64_t outer = shape.outer;
  return DispatchType(x.element_type(), "x", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    using A = Compute<T>;
    Moments moments(features);
    if (inner == 1) {
      MomentsRows(pool, Data<T>(x), outer, features, moments);
    } else {
      MomentsSegments(pool, Data<T>(x), outer, features, inner, moments);
    }
    A* hi_out = Data<A>(hi);
    A* lo_out = Data<A>(lo);
    A* m2_out = Data<A>(m2);
    for (int64_t c = 0; c < features; ++c) {
      const A h = static_cast<A>(moments.mean[c]);
      hi_out[c] = h;
      lo_out[c] = static_cast<A>(moments.mean[c] - static_cast<double>(h));
      m2_out[c] = static_cast<A>(moments.m2[c]);
    }
    return ffi::Error::Success();
  });
}

// ---------------------------------------------------------------------------------------
// Σ dy and Σ dy·(x − μ) per feature, one pass over x and dy; x − μ is (x − hi) − lo.
// Float sums run over one chunk; chunks add up in double.

struct FeatureSums {
  std::vector<double> g, gc;
  explicit FeatureSums(int64_t c) : g(c, 0.0), gc(c, 0.0) {}
};

template <typename T, typename G>
void GradSumsRows(ffi::ThreadPool& pool, const T* x, const G* g, int64_t rows, int64_t features,
                  const Compute<T>* hi, const Compute<T>* lo, FeatureSums& out) {
  using A = Compute<T>;
  using V = Simd<A>;
  constexpr int L = kLanes<A>;
  const int64_t block = std::min(features, kBlockFeatures);
  const int64_t chunk = kChunkRows;
  const int64_t parts = NumParts(pool, rows * features);
  const Split split{rows, parts, chunk};
  std::vector<FeatureSums> partial(parts, FeatureSums(features));
  ParallelFor::Run(pool, parts, [&](int64_t p) {
    const int64_t tiles = block / L;
    std::vector<V> sg(tiles), sgc(tiles), h(tiles), l(tiles);
    std::vector<A> sg1(L), sgc1(L);
    for (int64_t c0 = 0; c0 < features; c0 += block) {
      const int64_t width = std::min(block, features - c0);
      const int64_t full = width / L, rest = width - full * L;
      for (int64_t t = 0; t < full; ++t) {
        h[t] = LoadV<A>(hi + c0 + t * L);
        l[t] = LoadV<A>(lo + c0 + t * L);
      }
      for (int64_t r0 = split.Begin(p); r0 < split.End(p); r0 += chunk) {
        const int64_t r1 = std::min(r0 + chunk, split.End(p));
        std::fill(sg.begin(), sg.end(), V{});
        std::fill(sgc.begin(), sgc.end(), V{});
        std::fill(sg1.begin(), sg1.end(), A(0));
        std::fill(sgc1.begin(), sgc1.end(), A(0));
        for (int64_t r = r0; r < r1; ++r) {
          const T* xr = x + r * features + c0;
          const G* gr = g + r * features + c0;
          for (int64_t t = 0; t < full; ++t) {
            V gv = LoadV<A>(gr + t * L);
            sg[t] += gv;
            sgc[t] += gv * ((LoadV<A>(xr + t * L) - h[t]) - l[t]);
          }
          for (int64_t c = 0; c < rest; ++c) {
            const int64_t f = full * L + c;
            A gv = Load<A>(gr, f);
            sg1[c] += gv;
            sgc1[c] += gv * ((Load<A>(xr, f) - hi[c0 + f]) - lo[c0 + f]);
          }
        }
        FeatureSums& acc = partial[p];
        for (int64_t t = 0; t < full; ++t)
          for (int k = 0; k < L; ++k) {
            acc.g[c0 + t * L + k] += sg[t][k];
            acc.gc[c0 + t * L + k] += sgc[t][k];
          }
        for (int64_t c = 0; c < rest; ++c) {
          acc.g[c0 + full * L + c] += sg1[c];
          acc.gc[c0 + full * L + c] += sgc1[c];
        }
      }
    }
  });
  for (const FeatureSums& s : partial)
    for (int64_t c = 0; c < features; ++c) {
      out.g[c] += s.g[c];
      out.gc[c] += s.gc[c];
    }
}

template <typename T, typename G>
void GradSumsSegments(ffi::ThreadPool& pool, const T* x, const G* g, int64_t outer,
                      int64_t features, int64_t inner, const Compute<T>* hi,
                      const Compute<T>* lo, FeatureSums& out) {
  using A = Compute<T>;
  const Pieces pieces(inner);
  const int64_t items = outer * features * pieces.per_segment;
  const int64_t parts = NumParts(pool, outer * features * inner);
  const Split split{items, parts, 1};
  std::vector<FeatureSums> partial(parts, FeatureSums(features));
  ParallelFor::Run(pool, parts, [&](int64_t p) {
    for (int64_t item = split.Begin(p); item < split.End(p); ++item) {
      const int64_t segment = item / pieces.per_segment;
      const int64_t c = segment % features;
      const int64_t start = (item % pieces.per_segment) * pieces.size;
      const int64_t len = std::min(pieces.size, inner - start);
      const int64_t offset = segment * inner + start;
      const A h = hi[c], l = lo[c];
      A sg, sgc;
      SweepRun<A>(
          x + offset, g + offset, len,
          [h, l](auto xv, auto gv, auto& a, auto& b) {
            a += gv;
            b += gv * ((xv - h) - l);
          },
          &sg, &sgc);
      partial[p].g[c] += sg;
      partial[p].gc[c] += sgc;
    }
  });
  for (const FeatureSums& s : partial)
    for (int64_t c = 0; c < features; ++c) {
      out.g[c] += s.g[c];
      out.gc[c] += s.gc[c];
    }
}

ffi::Error GradSumsImpl(ffi::ThreadPool pool, int64_t features, int64_t inner, ffi::AnyBuffer x, ffi::AnyBuffer g,
                        ffi::AnyBuffer hi, ffi::AnyBuffer lo,
                        ffi::Result<ffi::AnyBuffer> sum_g, ffi::Result<ffi::AnyBuffer> sum_gc) {
  Shape3 shape;
  if (!AsShape3(x, features, inner, &shape)) return BadShape();
  const int64_t outer = shape.outer;
  return DispatchType(x.element_type(), "x", [&](auto* xtag) {
    using T = std::remove_pointer_t<decltype(xtag)>;
    return DispatchType(g.element_type(), "dy", [&](auto* gtag) {
      using G = std::remove_pointer_t<decltype(gtag)>;
      using A = Compute<T>;
      FeatureSums sums(features);
      if (inner == 1) {
        GradSumsRows(pool, Data<T>(x), Data<G>(g), outer, features, Data<A>(hi), Data<A>(lo),
                     sums);
      } else {
        GradSumsSegments(pool, Data<T>(x), Data<G>(g), outer, features, inner, Data<A>(hi),
                         Data<A>(lo), sums);
      }
      A* sg_out = Data<A>(sum_g);
      A* sgc_out = Data<A>(sum_gc);
      for (int64_t c = 0; c < features; ++c) {
        sg_out[c] = static_cast<A>(sums.g[c]);
        sgc_out[c] = static_cast<A>(sums.gc[c]);
      }
      return ffi::Error::Success();
    });
  });
}

// ---------------------------------------------------------------------------------------
// The two elementwise passes, with per-feature coefficients from JAX:
//   Normalize:  y  = ((x − hi) − lo)·a + b              (a = γ/σ, b = β)            eqs. (3)-(4)
//   GradInput:  dx = a·dy + b + k·((x − hi) − lo)        (eq. (7)'s closed form)
// `Map` runs op(x, g, feature vectors...) → out over the array, vectorized along features
// (channels-last) or along the contiguous run of one feature (channels-first).

template <typename A, int N>
struct Coefficients {
  const A* v[N];  // N per-feature vectors of A
};

template <typename A, typename T, typename G, typename O, int N, typename Op>
void Map(ffi::ThreadPool& pool, const T* x, const G* g, O* out, Shape3 s,
         Coefficients<A, N> coef, Op&& op) {
  using V = Simd<A>;
  constexpr int L = kLanes<A>;
  const int64_t parts = NumParts(pool, s.outer * s.features * s.inner);
  const Split split{s.outer, parts, 1};
  ParallelFor::Run(pool, parts, [&](int64_t p) {
    for (int64_t o = split.Begin(p); o < split.End(p); ++o) {
      if (s.inner == 1) {
        const int64_t base = o * s.features;
        int64_t c = 0;
        for (; c + L <= s.features; c += L) {
          V k[N];
          for (int j = 0; j < N; ++j) k[j] = LoadV<A>(coef.v[j] + c);
          StoreV<A>(out + base + c, op(LoadV<A>(x + base + c), LoadV<A>(g + base + c), k));
        }
        for (; c < s.features; ++c) {
          A k[N];
          for (int j = 0; j < N; ++j) k[j] = coef.v[j][c];
          Store<A>(out, base + c, op(Load<A>(x, base + c), Load<A>(g, base + c), k));
        }
      } else {
        for (int64_t c = 0; c < s.features; ++c) {
          const int64_t base = (o * s.features + c) * s.inner;
          A k[N];
          for (int j = 0; j < N; ++j) k[j] = coef.v[j][c];
          int64_t i = 0;
          for (; i + L <= s.inner; i += L)
            StoreV<A>(out + base + i, op(LoadV<A>(x + base + i), LoadV<A>(g + base + i), k));
          for (; i < s.inner; ++i)
            Store<A>(out, base + i, op(Load<A>(x, base + i), Load<A>(g, base + i), k));
        }
      }
    }
  });
}

ffi::Error NormalizeImpl(ffi::ThreadPool pool, int64_t features, int64_t inner, ffi::AnyBuffer x, ffi::AnyBuffer hi,
                         ffi::AnyBuffer lo, ffi::AnyBuffer a, ffi::AnyBuffer b,
                         ffi::Result<ffi::AnyBuffer> y) {
  Shape3 shape;
  if (!AsShape3(x, features, inner, &shape)) return BadShape();
  return DispatchType(x.element_type(), "x", [&](auto* xtag) {
    using T = std::remove_pointer_t<decltype(xtag)>;
    return DispatchType(y->element_type(), "y", [&](auto* ytag) {
      using Y = std::remove_pointer_t<decltype(ytag)>;
      using A = Compute<T>;
      Coefficients<A, 4> coef{{Data<A>(hi), Data<A>(lo), Data<A>(a), Data<A>(b)}};
      Map<A>(pool, Data<T>(x), Data<T>(x), Data<Y>(y), shape, coef,
             [](auto xv, auto, const auto* k) { return ((xv - k[0]) - k[1]) * k[2] + k[3]; });
      return ffi::Error::Success();
    });
  });
}

ffi::Error GradInputImpl(ffi::ThreadPool pool, int64_t features, int64_t inner, ffi::AnyBuffer x, ffi::AnyBuffer g,
                         ffi::AnyBuffer hi, ffi::AnyBuffer lo, ffi::AnyBuffer a,
                         ffi::AnyBuffer b, ffi::AnyBuffer k, ffi::Result<ffi::AnyBuffer> dx) {
  Shape3 shape;
  if (!AsShape3(x, features, inner, &shape)) return BadShape();
  return DispatchType(x.element_type(), "x", [&](auto* xtag) {
    using T = std::remove_pointer_t<decltype(xtag)>;
    return DispatchType(g.element_type(), "dy", [&](auto* gtag) {
      using G = std::remove_pointer_t<decltype(gtag)>;
      using A = Compute<T>;
      // dx has x's dtype (JAX checks that against the ffi_call's declared result).
      Coefficients<A, 5> coef{{Data<A>(hi), Data<A>(lo), Data<A>(a), Data<A>(b), Data<A>(k)}};
      Map<A>(pool, Data<T>(x), Data<G>(g), Data<T>(dx), shape, coef,
             [](auto xv, auto gv, const auto* c) {
               return c[2] * gv + c[3] + c[4] * ((xv - c[0]) - c[1]);
             });
      return ffi::Error::Success();
    });
  });
}

}  // namespace
}  // namespace jaxbn

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxbnMoments, jaxbn::MomentsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Attr<int64_t>("features")
                                  .Attr<int64_t>("inner")
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxbnGradSums, jaxbn::GradSumsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Attr<int64_t>("features")
                                  .Attr<int64_t>("inner")
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxbnNormalize, jaxbn::NormalizeImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Attr<int64_t>("features")
                                  .Attr<int64_t>("inner")
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxbnGradInput, jaxbn::GradInputImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Attr<int64_t>("features")
                                  .Attr<int64_t>("inner")
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());
