// jaxbn's CPU kernels: the passes over activations that batch normalization needs.
//
// XLA:CPU compiles jaxbn's pure-JAX batch norm to 15 activation-sized transfers where the
// maths needs 8 (docs/performance.md says why). These kernels do the streaming parts in as
// few passes as the maths allows:
//
//   Moments     reads x once        → per feature μ (as hi + lo) and M2 = Σ (x − μ)²   eqs. (1)-(2)
//   Normalize   reads x, writes y   → y = ((x − hi) − lo)·a + b                       eqs. (3)-(4)
//   GradSums    reads x and dy      → Σ dy, Σ dy·(x − μ)                              eqs. (5)-(6)
//   GradInput   reads x, dy, writes dx → dx = a·dy + b + k·(x − μ)                    closed form of (7)
//
// Forward (Moments, then Normalize) and Backward (GradSums, then GradInput) are each one call
// for a batch on one device, with jaxbn/_per_feature.py's formulas between the passes; under
// axis_name JAX calls the four passes separately and pools across devices between them.
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
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
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

// Masks: one byte per (outer, inner) position, shared by every feature (a mask that varies
// across features takes the pure-JAX path); a null pointer means no mask. Masked values take
// no part in any sum and their outputs are 0 whatever x holds, NaN included, so masked terms
// are dropped with a select, never multiplied by 0.
typedef int32_t I32V __attribute__((vector_size(64)));
typedef int64_t I64V __attribute__((vector_size(64)));
typedef uint8_t U8x16 __attribute__((vector_size(16)));
typedef uint8_t U8x8 __attribute__((vector_size(8)));

// Lane conditions for Keep: kLanes<A> mask bytes as integers as wide as A.
inline I32V LoadKeep(const uint8_t* m, float*) {
  U8x16 b;
  std::memcpy(&b, m, sizeof b);
  return __builtin_convertvector(b, I32V) != 0;
}
inline I64V LoadKeep(const uint8_t* m, double*) {
  U8x8 b;
  std::memcpy(&b, m, sizeof b);
  return __builtin_convertvector(b, I64V) != 0;
}
template <typename A>
inline auto LoadKeep(const uint8_t* m) { return LoadKeep(m, static_cast<A*>(nullptr)); }

struct AllKept {};  // the condition when there is no mask
template <typename V>
inline V Keep(AllKept, V v) { return v; }
template <typename K, typename V>
inline V Keep(K keep, V v) { return keep ? v : V{}; }  // lane-wise for vectors

inline int64_t CountKept(const uint8_t* m, int64_t len) {
  int64_t n = 0;
  for (int64_t i = 0; i < len; ++i) n += m[i] != 0;
  return n;
}

// Calls fn(tag) with a null pointer of the C++ type of `dtype`. Every handler goes through
// here, so this is also where an exception (std::bad_alloc from a scratch vector) becomes an
// XLA error instead of unwinding into XLA's C caller.
template <typename Fn>
ffi::Error DispatchType(ffi::DataType dtype, const char* what, Fn&& fn) {
  try {
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
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string("jaxbn: ") + e.what());
  }
}

// Calls fn(x_tag, other_tag) for x's dtype and a second operand's (dy, or the output y).
template <typename Fn>
ffi::Error DispatchTypes(ffi::DataType x, ffi::DataType other, const char* what, Fn&& fn) {
  return DispatchType(x, "x", [&](auto* xtag) {
    return DispatchType(other, what, [&](auto* otag) { return fn(xtag, otag); });
  });
}

// ---------------------------------------------------------------------------------------
// Parallel loops on XLA's intra-op thread pool. A Team is the calling thread plus pool
// threads ("helpers") that stay for every loop of one kernel call: the fused Forward and
// Backward run two loops with serial per-feature work between them, and waking a sleeping
// pool thread costs more than a 1 MB kernel's whole run, so each helper is woken once per
// call, not once per loop.
//
// The caller takes tasks too, so a loop finishes even when no pool thread is free. Tasks are
// claimed with one compare-and-swap on a ticket that holds (loop, task count, first and last
// unclaimed task), so a helper can never take a task of a loop that has moved on; the caller
// claims from the front and helpers from the back, so that with two threads each keeps the
// same rows in every loop of a call, still in its own cache. A helper that starts after the
// call has ended, or waits too long for the next loop, just leaves.

class Team {
 public:
  // Yields a helper waits for the next loop before leaving, and the caller waits for the
  // helpers' last tasks before sleeping in between checks.
  static constexpr int kSpins = 20000;
  static constexpr int64_t kMaxTasks = 0xffff;

  explicit Team(ffi::ThreadPool& pool) : pool_(pool), state_(std::make_shared<State>()) {}
  ~Team() { state_->ticket.store(kFinished, std::memory_order_release); }
  Team(const Team&) = delete;
  Team& operator=(const Team&) = delete;

  int64_t Workers() const { return std::max<int64_t>(1, pool_.num_threads()); }

  // Runs fn(0), ..., fn(n - 1), in parallel; returns when all have finished, and throws
  // std::runtime_error if any of them threw.
  template <typename Fn>
  void Run(int64_t n, Fn&& fn) {
    if (n <= 1) {
      if (n == 1) fn(0);
      return;
    }
    // More indices than a ticket can count run in strides over kMaxTasks tasks.
    const int64_t num_tasks = std::min(n, kMaxTasks);
    std::function<void(int64_t)> task = [&fn, n, num_tasks](int64_t t) {
      for (int64_t i = t; i < n; i += num_tasks) fn(i);
    };
    State& s = *state_;
    ++loop_;
    s.task[loop_ & 1].store(&task, std::memory_order_relaxed);
    s.done.store(0, std::memory_order_relaxed);
    s.ticket.store(Pack(loop_, num_tasks, 0, num_tasks), std::memory_order_release);
    const int64_t wanted = std::min(num_tasks, Workers()) - 1;
    scheduling_ = true;  // Schedule may run a helper inline, on this thread (see Help)
    for (int64_t h = s.helpers.load(); h < wanted; ++h) {
      s.helpers.fetch_add(1);
      pool_.Schedule([state = state_] { Help(*state); });
    }
    scheduling_ = false;
    while (Claim(s, loop_, /*from_front=*/true)) {
    }
    for (int spin = 0; s.done.load(std::memory_order_acquire) != num_tasks; ++spin) {
      // Claimed tasks are running; the wait is usually microseconds.
      if (spin < kSpins) {
        std::this_thread::yield();
      } else {
        std::this_thread::sleep_for(std::chrono::microseconds(20));
      }
    }
    if (s.failed.load(std::memory_order_acquire)) {
      s.failed.store(false, std::memory_order_relaxed);
      throw std::runtime_error("a parallel task failed (out of memory?)");
    }
  }

 private:
  static constexpr uint64_t kFinished = ~uint64_t{0};

  struct State {
    std::atomic<uint64_t> ticket{0};  // loop | task count | first | end of the unclaimed
    std::atomic<int64_t> done{0};
    std::atomic<int64_t> helpers{0};
    std::atomic<bool> failed{false};  // a task threw: its loop still ends, Run then throws
    // The loops' bodies, by loop parity: a claimed task's loop cannot end, and so its slot
    // cannot be reused, before the task is done.
    std::atomic<const std::function<void(int64_t)>*> task[2] = {nullptr, nullptr};
  };

  static uint64_t Pack(uint64_t loop, int64_t num_tasks, int64_t first, int64_t end) {
    return ((loop & 0xffff) << 48) | (static_cast<uint64_t>(num_tasks) << 32) |
           (static_cast<uint64_t>(first) << 16) | static_cast<uint64_t>(end);
  }
  static uint64_t Field(uint64_t ticket, int shift) { return (ticket >> shift) & 0xffff; }

  // Takes and runs one task of `loop` (of the current loop if loop == 0), the first or the
  // last unclaimed one; false if none is left.
  static bool Claim(State& s, uint64_t loop, bool from_front) {
    uint64_t t = s.ticket.load(std::memory_order_acquire);
    for (;;) {
      if (t == kFinished || (loop != 0 && Field(t, 48) != (loop & 0xffff))) return false;
      const int64_t first = static_cast<int64_t>(Field(t, 16));
      const int64_t end = static_cast<int64_t>(Field(t, 0));
      if (first >= end) return false;
      const int64_t task = from_front ? first : end - 1;
      const uint64_t claimed = Pack(Field(t, 48), static_cast<int64_t>(Field(t, 32)),
                                    from_front ? first + 1 : first, from_front ? end : end - 1);
      if (s.ticket.compare_exchange_weak(t, claimed, std::memory_order_acq_rel)) {
        try {
          (*s.task[Field(t, 48) & 1].load(std::memory_order_relaxed))(task);
        } catch (...) {
          s.failed.store(true, std::memory_order_release);
        }
        s.done.fetch_add(1, std::memory_order_release);
        return true;
      }
    }
  }

  static void Help(State& s) {
    if (scheduling_) {
      // Run inline by a failed Schedule: waiting here for the next loop would stall the
      // caller, which cannot publish it until this returns.
      while (Claim(s, 0, /*from_front=*/false)) {
      }
      s.helpers.fetch_sub(1);
      return;
    }
    for (int idle = 0; idle < kSpins; ++idle) {
      if (s.ticket.load(std::memory_order_acquire) == kFinished) break;
      if (Claim(s, 0, /*from_front=*/false)) {
        idle = 0;
      } else {
        std::this_thread::yield();
      }
    }
    s.helpers.fetch_sub(1);
  }

  static inline thread_local bool scheduling_ = false;
  ffi::ThreadPool& pool_;
  std::shared_ptr<State> state_;
  uint64_t loop_ = 0;
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

int64_t NumParts(const Team& team, int64_t elements) {
  return std::max<int64_t>(1, std::min(team.Workers(), elements / kMinElementsPerThread));
}

// Every channels-last pass splits the rows alike (whole chunks of kChunkRows), so within a
// call each task meets the rows it had in the previous pass, still in its thread's cache.
Split RowSplit(const Team& team, int64_t rows, int64_t features) {
  return Split{rows, NumParts(team, rows * features), kChunkRows};
}


// x viewed as (outer, C, inner).
struct Shape3 {
  int64_t outer, features, inner;
};

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
void MomentsRows(Team& team, const T* x, const uint8_t* mask, int64_t rows, int64_t features,
                 Moments& out) {
  using A = Compute<T>;
  using V = Simd<A>;
  constexpr int L = kLanes<A>;
  const int64_t block = std::min(features, kBlockFeatures);
  const int64_t chunk = kChunkRows;
  const Split split = RowSplit(team, rows, features);
  const int64_t parts = split.parts;
  std::vector<Moments> partial(parts, Moments(features));
  team.Run(parts, [&](int64_t p) {
    const int64_t tiles = block / L;
    std::vector<V> s(tiles), shift(tiles), sd(tiles), sdd(tiles);
    std::vector<A> s1(L), shift1(L), sd1(L), sdd1(L);  // the < L features left over
    double seen = 0;  // rows taken so far by this part
    for (int64_t r0 = split.Begin(p); r0 < split.End(p); r0 += chunk) {
      const int64_t r1 = std::min(r0 + chunk, split.End(p));
      const int64_t kept = mask ? CountKept(mask + r0, r1 - r0) : r1 - r0;
      if (kept == 0) continue;
      const A n = static_cast<A>(kept);
      auto skip = [&](int64_t r) { return mask != nullptr && mask[r] == 0; };
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
          if (skip(r)) continue;
          const T* row = x + r * features + c0;
          for (int64_t t = 0; t < full; ++t) s[t] += LoadV<A>(row + t * L);
          for (int64_t c = 0; c < rest; ++c) s1[c] += Load<A>(row, full * L + c);
        }
        for (int64_t t = 0; t < full; ++t) shift[t] = s[t] / n;
        for (int64_t c = 0; c < rest; ++c) shift1[c] = s1[c] / n;
        for (int64_t r = r0; r < r1; ++r) {
          if (skip(r)) continue;
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
        partial[p].AddChunks(c0, full * L, seen, n, reinterpret_cast<const A*>(shift.data()),
                             reinterpret_cast<const A*>(sd.data()),
                             reinterpret_cast<const A*>(sdd.data()));
        partial[p].AddChunks(c0 + full * L, rest, seen, n, shift1.data(), sd1.data(),
                             sdd1.data());
      }
      seen += kept;
    }
    partial[p].SetCount(seen);
  });
  for (const Moments& m : partial) out.Merge(m);
}

// Sweeps one contiguous run of len values of x (and of g, for two-input sums), with their
// mask bytes (or none): term(x, g, keep, acc1, acc2) on vectors of kLanes<A> values, then on
// the leftover values one at a time; term is generic, so one lambda serves every case and
// applies Keep(keep, ·) to what it adds. Returns the accumulators' totals.
template <typename A, typename T, typename G, typename Fn>
inline void SweepRun(const T* x, const G* g, const uint8_t* mask, int64_t len, Fn&& term,
                     A* out1, A* out2) {
  constexpr int L = kLanes<A>;
  Simd<A> a{}, b{};
  int64_t i = 0;
  if (mask == nullptr) {
    for (; i + L <= len; i += L) term(LoadV<A>(x + i), LoadV<A>(g + i), AllKept{}, a, b);
  } else {
    for (; i + L <= len; i += L)
      term(LoadV<A>(x + i), LoadV<A>(g + i), LoadKeep<A>(mask + i), a, b);
  }
  A s1 = HorizontalSum<A>(a), s2 = HorizontalSum<A>(b);
  for (; i < len; ++i) {
    if (mask == nullptr) {
      term(Load<A>(x, i), Load<A>(g, i), AllKept{}, s1, s2);
    } else {
      term(Load<A>(x, i), Load<A>(g, i), mask[i] != 0, s1, s2);
    }
  }
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

// Likewise for every channels-first pass: the pieces of all segments, split evenly.
Split PieceSplit(const Team& team, Shape3 s, const Pieces& pieces) {
  return Split{s.outer * s.features * pieces.per_segment,
               NumParts(team, s.outer * s.features * s.inner), 1};
}

template <typename T>
void MomentsSegments(Team& team, const T* x, const uint8_t* mask, int64_t outer,
                     int64_t features, int64_t inner, Moments& out) {
  using A = Compute<T>;
  const Pieces pieces(inner);
  const Split split = PieceSplit(team, Shape3{outer, features, inner}, pieces);
  const int64_t parts = split.parts;
  std::vector<Moments> partial(parts, Moments(features));
  team.Run(parts, [&](int64_t p) {
    for (int64_t item = split.Begin(p); item < split.End(p); ++item) {
      const int64_t segment = item / pieces.per_segment;
      const int64_t start = (item % pieces.per_segment) * pieces.size;
      const int64_t len = std::min(pieces.size, inner - start);
      const T* v = x + segment * inner + start;
      const uint8_t* m = mask ? mask + (segment / features) * inner + start : nullptr;
      const int64_t kept = m ? CountKept(m, len) : len;
      if (kept == 0) continue;
      A s, unused;
      SweepRun<A>(v, v, m, len,
                  [](auto xv, auto, auto keep, auto& a, auto&) { a += Keep(keep, xv); }, &s,
                  &unused);
      const A shift = s / static_cast<A>(kept);
      A sd, sdd;
      SweepRun<A>(
          v, v, m, len,
          [shift](auto xv, auto, auto keep, auto& a, auto& b) {
            auto d = Keep(keep, xv - shift);
            a += d;
            b += d * d;
          },
          &sd, &sdd);
      partial[p].AddChunk(segment % features, static_cast<double>(kept), shift, sd, sdd);
    }
  });
  for (const Moments& m : partial) out.Merge(m);
}

template <typename T>
void BatchMoments(Team& team, const T* x, const uint8_t* mask, Shape3 s, Moments& out) {
  if (s.inner == 1) {
    MomentsRows(team, x, mask, s.outer, s.features, out);
  } else {
    MomentsSegments(team, x, mask, s.outer, s.features, s.inner, out);
  }
}

// μ of feature c as the float pair hi + lo.
template <typename A>
void SplitMean(const Moments& moments, int64_t c, A* hi, A* lo) {
  const A h = static_cast<A>(moments.mean[c]);
  hi[c] = h;
  lo[c] = static_cast<A>(moments.mean[c] - static_cast<double>(h));
}

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

// The mask operand: empty (no mask) or one bool per (outer, inner) position.
bool MaskOf(const ffi::AnyBuffer& mask, Shape3 s, const uint8_t** kept) {
  *kept = nullptr;
  if (mask.element_count() == 0) return true;
  const ffi::DataType type = mask.element_type();
  if ((type != ffi::DataType::PRED && type != ffi::DataType::U8) ||
      static_cast<int64_t>(mask.element_count()) != s.outer * s.inner)
    return false;
  *kept = reinterpret_cast<const uint8_t*>(mask.untyped_data());
  return true;
}

ffi::Error BadMask() {
  return ffi::Error::InvalidArgument(
      "jaxbn: the mask must be empty or hold one bool per (outer, inner) position");
}

// x as (outer, features, inner) and its mask (null for none), or why the operands do not fit.
ffi::Error View(const ffi::AnyBuffer& x, const ffi::AnyBuffer& mask, int64_t features,
                int64_t inner, Shape3* shape, const uint8_t** kept) {
  if (!AsShape3(x, features, inner, shape)) return BadShape();
  if (!MaskOf(mask, *shape, kept)) return BadMask();
  return ffi::Error::Success();
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

ffi::Error MomentsImpl(ffi::ThreadPool pool, int64_t features, int64_t inner, ffi::AnyBuffer x,
                       ffi::AnyBuffer mask, ffi::Result<ffi::AnyBuffer> hi,
                       ffi::Result<ffi::AnyBuffer> lo, ffi::Result<ffi::AnyBuffer> m2) {
  Shape3 shape;
  const uint8_t* kept;
  if (ffi::Error e = View(x, mask, features, inner, &shape, &kept); e.failure()) return e;
  Team team(pool);
  return DispatchType(x.element_type(), "x", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    using A = Compute<T>;
    Moments moments(features);
    BatchMoments(team, Data<T>(x), kept, shape, moments);
    A* m2_out = Data<A>(m2);
    for (int64_t c = 0; c < features; ++c) {
      SplitMean(moments, c, Data<A>(hi), Data<A>(lo));
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
void GradSumsRows(Team& team, const T* x, const G* g, const uint8_t* mask, int64_t rows,
                  int64_t features, const Compute<T>* hi, const Compute<T>* lo,
                  FeatureSums& out) {
  using A = Compute<T>;
  using V = Simd<A>;
  constexpr int L = kLanes<A>;
  const int64_t block = std::min(features, kBlockFeatures);
  const int64_t chunk = kChunkRows;
  const Split split = RowSplit(team, rows, features);
  const int64_t parts = split.parts;
  std::vector<FeatureSums> partial(parts, FeatureSums(features));
  team.Run(parts, [&](int64_t p) {
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
          if (mask != nullptr && mask[r] == 0) continue;
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
void GradSumsSegments(Team& team, const T* x, const G* g, const uint8_t* mask, int64_t outer,
                      int64_t features, int64_t inner, const Compute<T>* hi,
                      const Compute<T>* lo, FeatureSums& out) {
  using A = Compute<T>;
  const Pieces pieces(inner);
  const Split split = PieceSplit(team, Shape3{outer, features, inner}, pieces);
  const int64_t parts = split.parts;
  std::vector<FeatureSums> partial(parts, FeatureSums(features));
  team.Run(parts, [&](int64_t p) {
    for (int64_t item = split.Begin(p); item < split.End(p); ++item) {
      const int64_t segment = item / pieces.per_segment;
      const int64_t c = segment % features;
      const int64_t start = (item % pieces.per_segment) * pieces.size;
      const int64_t len = std::min(pieces.size, inner - start);
      const int64_t offset = segment * inner + start;
      const A h = hi[c], l = lo[c];
      const uint8_t* m = mask ? mask + (segment / features) * inner + start : nullptr;
      A sg, sgc;
      SweepRun<A>(
          x + offset, g + offset, m, len,
          [h, l](auto xv, auto gv, auto keep, auto& a, auto& b) {
            a += Keep(keep, gv);
            b += Keep(keep, gv * ((xv - h) - l));
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

template <typename T, typename G>
void BatchGradSums(Team& team, const T* x, const G* g, const uint8_t* mask, Shape3 s,
                   const Compute<T>* hi, const Compute<T>* lo, FeatureSums& out) {
  if (s.inner == 1) {
    GradSumsRows(team, x, g, mask, s.outer, s.features, hi, lo, out);
  } else {
    GradSumsSegments(team, x, g, mask, s.outer, s.features, s.inner, hi, lo, out);
  }
}

ffi::Error GradSumsImpl(ffi::ThreadPool pool, int64_t features, int64_t inner, ffi::AnyBuffer x,
                        ffi::AnyBuffer g, ffi::AnyBuffer mask, ffi::AnyBuffer hi,
                        ffi::AnyBuffer lo, ffi::Result<ffi::AnyBuffer> sum_g,
                        ffi::Result<ffi::AnyBuffer> sum_gc) {
  Shape3 shape;
  const uint8_t* kept;
  if (ffi::Error e = View(x, mask, features, inner, &shape, &kept); e.failure()) return e;
  Team team(pool);
  return DispatchTypes(x.element_type(), g.element_type(), "dy",
                       [&](auto* xtag, auto* gtag) {
    using T = std::remove_pointer_t<decltype(xtag)>;
    using G = std::remove_pointer_t<decltype(gtag)>;
    using A = Compute<T>;
    FeatureSums sums(features);
    BatchGradSums(team, Data<T>(x), Data<G>(g), kept, shape, Data<A>(hi), Data<A>(lo),
                  sums);
    A* sg_out = Data<A>(sum_g);
    A* sgc_out = Data<A>(sum_gc);
    for (int64_t c = 0; c < features; ++c) {
      sg_out[c] = static_cast<A>(sums.g[c]);
      sgc_out[c] = static_cast<A>(sums.gc[c]);
    }
    return ffi::Error::Success();
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
void Map(Team& team, const T* x, const G* g, const uint8_t* mask, O* out, Shape3 s,
         Coefficients<A, N> coef, Op&& op) {
  using V = Simd<A>;
  constexpr int L = kLanes<A>;
  if (s.inner == 1) {  // channels-last: rows, vectorized across features
    const Split split = RowSplit(team, s.outer, s.features);
    team.Run(split.parts, [&](int64_t p) {
      for (int64_t o = split.Begin(p); o < split.End(p); ++o) {
        const int64_t base = o * s.features;
        if (mask != nullptr && mask[o] == 0) {  // all-zero bits are 0 in every output type
          std::memset(static_cast<void*>(out + base), 0, s.features * sizeof(O));
          continue;
        }
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
      }
    });
    return;
  }
  // Channels-first: the pieces of MomentsSegments and GradSumsSegments, so one long segment
  // (N = 1) is spread over all threads too.
  const Pieces pieces(s.inner);
  const Split split = PieceSplit(team, s, pieces);
  team.Run(split.parts, [&](int64_t p) {
    for (int64_t item = split.Begin(p); item < split.End(p); ++item) {
      const int64_t segment = item / pieces.per_segment;
      const int64_t c = segment % s.features;
      const int64_t start = (item % pieces.per_segment) * pieces.size;
      const int64_t len = std::min(pieces.size, s.inner - start);
      const int64_t base = segment * s.inner + start;
      A k[N];
      for (int j = 0; j < N; ++j) k[j] = coef.v[j][c];
      int64_t i = 0;
      if (mask == nullptr) {
        for (; i + L <= len; i += L)
          StoreV<A>(out + base + i, op(LoadV<A>(x + base + i), LoadV<A>(g + base + i), k));
        for (; i < len; ++i)
          Store<A>(out, base + i, op(Load<A>(x, base + i), Load<A>(g, base + i), k));
      } else {
        const uint8_t* m = mask + (segment / s.features) * s.inner + start;
        for (; i + L <= len; i += L)
          StoreV<A>(out + base + i, Keep(LoadKeep<A>(m + i), op(LoadV<A>(x + base + i),
                                                                LoadV<A>(g + base + i), k)));
        for (; i < len; ++i)
          Store<A>(out, base + i,
                   Keep(m[i] != 0, op(Load<A>(x, base + i), Load<A>(g, base + i), k)));
      }
    }
  });
}

template <typename A, typename T, typename Y>
void NormalizeMap(Team& team, const T* x, const uint8_t* mask, Y* y, Shape3 s, const A* hi,
                  const A* lo, const A* a, const A* b) {
  Map<A>(team, x, x, mask, y, s, Coefficients<A, 4>{{hi, lo, a, b}},
         [](auto xv, auto, const auto* k) { return ((xv - k[0]) - k[1]) * k[2] + k[3]; });
}

template <typename A, typename T, typename G>
void GradInputMap(Team& team, const T* x, const G* g, const uint8_t* mask, T* dx, Shape3 s,
                  const A* hi, const A* lo, const A* a, const A* b, const A* k) {
  Map<A>(team, x, g, mask, dx, s, Coefficients<A, 5>{{hi, lo, a, b, k}},
         [](auto xv, auto gv, const auto* c) {
           return c[2] * gv + c[3] + c[4] * ((xv - c[0]) - c[1]);
         });
}

ffi::Error NormalizeImpl(ffi::ThreadPool pool, int64_t features, int64_t inner, ffi::AnyBuffer x,
                         ffi::AnyBuffer mask, ffi::AnyBuffer hi, ffi::AnyBuffer lo,
                         ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::Result<ffi::AnyBuffer> y) {
  Shape3 shape;
  const uint8_t* kept;
  if (ffi::Error e = View(x, mask, features, inner, &shape, &kept); e.failure()) return e;
  Team team(pool);
  return DispatchTypes(x.element_type(), y->element_type(), "y",
                       [&](auto* xtag, auto* ytag) {
    using T = std::remove_pointer_t<decltype(xtag)>;
    using Y = std::remove_pointer_t<decltype(ytag)>;
    using A = Compute<T>;
    NormalizeMap(team, Data<T>(x), kept, Data<Y>(y), shape, Data<A>(hi), Data<A>(lo),
                 Data<A>(a), Data<A>(b));
    return ffi::Error::Success();
  });
}

ffi::Error GradInputImpl(ffi::ThreadPool pool, int64_t features, int64_t inner, ffi::AnyBuffer x,
                         ffi::AnyBuffer g, ffi::AnyBuffer mask, ffi::AnyBuffer hi,
                         ffi::AnyBuffer lo, ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::AnyBuffer k,
                         ffi::Result<ffi::AnyBuffer> dx) {
  Shape3 shape;
  const uint8_t* kept;
  if (ffi::Error e = View(x, mask, features, inner, &shape, &kept); e.failure()) return e;
  Team team(pool);
  return DispatchTypes(x.element_type(), g.element_type(), "dy",
                       [&](auto* xtag, auto* gtag) {
    using T = std::remove_pointer_t<decltype(xtag)>;
    using G = std::remove_pointer_t<decltype(gtag)>;
    using A = Compute<T>;
    // dx has x's dtype (JAX checks that against the ffi_call's declared result).
    GradInputMap(team, Data<T>(x), Data<G>(g), kept, Data<T>(dx), shape, Data<A>(hi),
                 Data<A>(lo), Data<A>(a), Data<A>(b), Data<A>(k));
    return ffi::Error::Success();
  });
}

// ---------------------------------------------------------------------------------------
// The whole training forward and the whole backward of a batch on one device, one call
// each. Between the passes the per-feature formulas of jaxbn/_per_feature.py run here, in
// the same order of operations in the compute type, so XLA runs nothing between them: on
// CPU each XLA op between two custom calls costs tens of microseconds of hand-off between
// threads, more than the passes themselves over a 1 MB batch. (Under axis_name the
// statistics are pooled across devices between the passes, in JAX, with the kernels above.)
// m is the number of unmasked values per feature, at least 1 (a feature with none has
// μ = 0 and var = 0, and all its outputs are masked).
//
//   Forward:   moments; var = max(M2/m, 0); 1/σ = 1/√(var + ε); y = ((x − hi) − lo)·(γ/σ) + β
//   Backward:  Σ dy, Σ dy·(x − μ); ∂L/∂β = Σ dy, ∂L/∂γ = Σ dy·(x − μ)/σ, and dx with
//              a = γ/σ, b = −a·(Σ dy)/m, k = −a/σ²·(Σ dy·(x − μ))/m

ffi::Error ForwardImpl(ffi::ThreadPool pool, int64_t features, int64_t inner, double epsilon,
                       ffi::AnyBuffer x, ffi::AnyBuffer mask, ffi::AnyBuffer scale,
                       ffi::AnyBuffer bias, ffi::Result<ffi::AnyBuffer> y,
                       ffi::Result<ffi::AnyBuffer> hi, ffi::Result<ffi::AnyBuffer> lo,
                       ffi::Result<ffi::AnyBuffer> var, ffi::Result<ffi::AnyBuffer> inv_std,
                       ffi::Result<ffi::AnyBuffer> count) {
  Shape3 shape;
  const uint8_t* kept;
  if (ffi::Error e = View(x, mask, features, inner, &shape, &kept); e.failure()) return e;
  Team team(pool);
  return DispatchTypes(x.element_type(), y->element_type(), "y",
                       [&](auto* xtag, auto* ytag) {
    using T = std::remove_pointer_t<decltype(xtag)>;
    using Y = std::remove_pointer_t<decltype(ytag)>;
    using A = Compute<T>;
    Moments moments(features);
    BatchMoments(team, Data<T>(x), kept, shape, moments);  // eqs. (1)-(2)
    const A eps = static_cast<A>(epsilon);
    const A* gamma = Data<A>(scale);
    A* var_out = Data<A>(var);
    A* inv_out = Data<A>(inv_std);
    // m per feature, written only with a mask (without one JAX knows it: count is empty).
    A* count_out = count->element_count() > 0 ? Data<A>(count) : nullptr;
    std::vector<A> a(features);
    for (int64_t c = 0; c < features; ++c) {
      SplitMean(moments, c, Data<A>(hi), Data<A>(lo));
      const A m = static_cast<A>(moments.count[c]);
      if (count_out != nullptr) count_out[c] = m;
      var_out[c] = std::max(static_cast<A>(moments.m2[c]) / std::max(m, A(1)), A(0));
      // _per_feature.inverse_std: an overflowed variance gives NaN, not 1/√inf = 0.
      inv_out[c] = std::isinf(var_out[c]) ? std::numeric_limits<A>::quiet_NaN()
                                          : A(1) / std::sqrt(var_out[c] + eps);
      a[c] = gamma[c] * inv_out[c];
    }
    NormalizeMap(team, Data<T>(x), kept, Data<Y>(y), shape, Data<A>(hi), Data<A>(lo),
                 a.data(), Data<A>(bias));  // eqs. (3)-(4)
    return ffi::Error::Success();
  });
}

ffi::Error BackwardImpl(ffi::ThreadPool pool, int64_t features, int64_t inner, ffi::AnyBuffer x,
                        ffi::AnyBuffer g, ffi::AnyBuffer mask, ffi::AnyBuffer hi,
                        ffi::AnyBuffer lo, ffi::AnyBuffer inv_std, ffi::AnyBuffer scale,
                        ffi::Result<ffi::AnyBuffer> dx, ffi::Result<ffi::AnyBuffer> d_scale,
                        ffi::Result<ffi::AnyBuffer> d_bias) {
  Shape3 shape;
  const uint8_t* kept;
  if (ffi::Error e = View(x, mask, features, inner, &shape, &kept); e.failure()) return e;
  Team team(pool);
  return DispatchTypes(x.element_type(), g.element_type(), "dy",
                       [&](auto* xtag, auto* gtag) {
    using T = std::remove_pointer_t<decltype(xtag)>;
    using G = std::remove_pointer_t<decltype(gtag)>;
    using A = Compute<T>;
    const A* mu_hi = Data<A>(hi);
    const A* mu_lo = Data<A>(lo);
    FeatureSums sums(features);
    BatchGradSums(team, Data<T>(x), Data<G>(g), kept, shape, mu_hi, mu_lo, sums);
    const int64_t positions = shape.outer * shape.inner;
    const A count =
        std::max(static_cast<A>(kept ? CountKept(kept, positions) : positions), A(1));
    const A* inv = Data<A>(inv_std);
    const A* gamma = Data<A>(scale);
    A* d_scale_out = Data<A>(d_scale);
    A* d_bias_out = Data<A>(d_bias);
    std::vector<A> a(features), b(features), k(features);
    for (int64_t c = 0; c < features; ++c) {
      const A sum_g = static_cast<A>(sums.g[c]), sum_gc = static_cast<A>(sums.gc[c]);
      d_bias_out[c] = sum_g;              // eq. (6)
      d_scale_out[c] = sum_gc * inv[c];  // eq. (5)
      a[c] = gamma[c] * inv[c];          // closed form of (7)
      b[c] = -a[c] * (sum_g / count);
      k[c] = -a[c] * (inv[c] * inv[c]) * (sum_gc / count);
    }
    GradInputMap(team, Data<T>(x), Data<G>(g), kept, Data<T>(dx), shape, mu_hi, mu_lo,
                 a.data(), b.data(), k.data());
    return ffi::Error::Success();
  });
}

// Every handler's leading bindings: XLA's thread pool, then x's (features, inner) view.
auto BindView() {
  return ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Attr<int64_t>("features").Attr<int64_t>("inner");
}

// `binding` followed by `num_args` buffer operands and `num_results` (≥ 1) buffer results.
// (Bindings can be neither copied nor moved, only extended: each step returns a new one.)
template <int num_args, int num_results, typename Binding>
auto Buffers(Binding&& binding) {
  static_assert(num_results >= 1);
  if constexpr (num_args > 0) {
    return Buffers<num_args - 1, num_results>(std::move(binding).template Arg<ffi::AnyBuffer>());
  } else if constexpr (num_results > 1) {
    return Buffers<0, num_results - 1>(std::move(binding).template Ret<ffi::AnyBuffer>());
  } else {
    return std::move(binding).template Ret<ffi::AnyBuffer>();
  }
}

}  // namespace
}  // namespace jaxbn

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxbnMoments, jaxbn::MomentsImpl,
                              (jaxbn::Buffers<2, 3>(jaxbn::BindView())));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxbnGradSums, jaxbn::GradSumsImpl,
                              (jaxbn::Buffers<5, 2>(jaxbn::BindView())));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxbnNormalize, jaxbn::NormalizeImpl,
                              (jaxbn::Buffers<6, 1>(jaxbn::BindView())));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxbnGradInput, jaxbn::GradInputImpl,
                              (jaxbn::Buffers<8, 1>(jaxbn::BindView())));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxbnForward, jaxbn::ForwardImpl,
                              (jaxbn::Buffers<4, 6>(jaxbn::BindView().Attr<double>("epsilon"))));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxbnBackward, jaxbn::BackwardImpl,
                              (jaxbn::Buffers<7, 3>(jaxbn::BindView())));
