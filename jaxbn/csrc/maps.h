// The two elementwise passes, run by a Team (team.h) channels-last (rows × C, vectorized
// across features) or channels-first (pieces of one feature, vectorized along them):
//
//   NormalizeMap   reads x, writes y       → y = ((x − hi) − lo)·a + b       eqs. (3)-(4)
//   GradInputMap   reads x, dy, writes dx  → dx = a·dy + b + k·(x − μ)       closed form of (7)
//
// μ arrives as the float pair hi + lo (moments.h, SplitMean), so x − μ is (x − hi) − lo.
// (simd.h says why everything is in an unnamed namespace.)

#ifndef JAXBN_CSRC_MAPS_H_
#define JAXBN_CSRC_MAPS_H_

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "simd.h"
#include "team.h"

namespace jaxbn {
namespace {

// ---------------------------------------------------------------------------------------
// The two elementwise passes, with per-feature coefficients. A coefficients struct holds
// them by name, as K: pointers to per-feature vectors (const A*), one feature's values (A),
// or kLanes features' values (Simd<A>); At<K>(c) reads feature c's (or c's and the next
// kLanes − 1 features'), and the call operator is the formula.

// Feature c's value of a per-feature vector (K = A), or features [c, c + kLanes)'s.
template <typename K, typename A>
inline K FeatureValue(const A* v, int64_t c) {
  if constexpr (std::is_same_v<K, A>) {
    return v[c];
  } else {
    return LoadV<A>(v + c);
  }
}

// y = ((x − hi) − lo)·a + b, eqs. (3)-(4): μ = hi + lo, a = γ/σ, b = β.
template <typename K>
struct Normalization {
  K hi, lo, a, b;

  template <typename V, typename A>
  Normalization<V> At(int64_t c) const {
    return {FeatureValue<V, A>(hi, c), FeatureValue<V, A>(lo, c), FeatureValue<V, A>(a, c),
            FeatureValue<V, A>(b, c)};
  }
  template <typename X, typename G>
  auto operator()(X x, G /*dy*/) const {
    return ((x - hi) - lo) * a + b;
  }
};

// dx = a·dy + b + k·((x − hi) − lo), the closed form of eq. (7): μ = hi + lo, a = γ/σ,
// b = −a·(Σ dy)/m, k = −a/σ²·(Σ dy·(x − μ))/m.
template <typename K>
struct GradInput {
  K hi, lo, a, b, k;

  template <typename V, typename A>
  GradInput<V> At(int64_t c) const {
    return {FeatureValue<V, A>(hi, c), FeatureValue<V, A>(lo, c), FeatureValue<V, A>(a, c),
            FeatureValue<V, A>(b, c), FeatureValue<V, A>(k, c)};
  }
  template <typename X, typename G>
  auto operator()(X x, G dy) const {
    return a * dy + b + k * ((x - hi) - lo);
  }
};

// Writes a run of len outputs from out: vec(i) gives values i .. i + kLanes − 1, one(i) value
// i. With kStream, the run's whole cache lines (StreamedLines, simd.h) are written with
// streaming stores and the values before and after them with ordinary ones; without, all
// with ordinary stores.
template <bool kStream, typename A, typename O, typename Vec, typename One>
inline void WriteRun(O* out, int64_t len, const Vec& vec, const One& one) {
  constexpr int L = kLanes<A>;
  auto ordinary = [&](int64_t i, int64_t end) {
    for (; i + L <= end; i += L) StoreV<A>(out + i, vec(i));
    for (; i < end; ++i) Store<A>(out, i, one(i));
  };
  if constexpr (kStream) {
    const Streamed lines = StreamedLines(out, len);
    ordinary(0, lines.first);
    for (int64_t i = lines.first; i < lines.last; i += L) StoreStreaming<A>(out + i, vec(i));
    ordinary(lines.last, len);
  } else {
    ordinary(0, len);
  }
}

// Channels-last map (rows × features) with ordinary (kStream false) or streaming stores (then
// each thread ends its part with StreamingStoresDone).
template <bool kStream, typename A, typename T, typename G, typename O,
          template <typename> class Formula>
void MapRows(Team& team, const T* x, const G* g, const uint8_t* mask, O* out, Shape3 s,
             const Formula<const A*>& formula) {
  using V = Simd<A>;
  constexpr int L = kLanes<A>;
  // Each task works on copies of the operands in locals, captured by value: a store to the
  // output (through memcpy, so of any type) could otherwise alias the captured ones, and GCC
  // 12 reloaded every pointer and the feature count after each vector (seen in the assembly;
  // together with StoreV's stack copy, simd.h, 20% slower on cached data,
  // benchmarks/csrc/pass_bench.cc).
  {
    const Split split = RowSplit(team, s.outer, s.features);
    team.Run(split.parts, [&](int64_t p) {
      const T* const xs = x;
      const G* const gs = g;
      O* const ys = out;
      const uint8_t* const ms = mask;
      const int64_t features = s.features;
      const Formula<const A*> fs = formula;
      // The part's end in a local too: in the loop condition, Split::End's two divisions
      // were redone after every row (the stores may alias `split`, captured by reference),
      // 30% of the time of a channels-last normalize of 64 features in cache (perf annotate).
      const int64_t end = split.End(p);
      // Two rows per load of the coefficients, for float32 (and float64) outputs in cache
      // (no streaming stores): per vector of one row the formula loads 4 (normalize) or 5
      // (gradient input) coefficient vectors besides x (and dy), and in cache the load ports,
      // not the arithmetic, bounded these passes — two rows at a time, 64 features float32:
      // 15-30% faster (benchmarks/csrc/pass_bench.cc). Not from memory: reading and streaming two
      // rows at a time made 64×56×56×128 float32 1.6-1.8x slower (as the gradient sums'
      // pairs did, GradSumsRows); not for bfloat16, bound by its conversions on AVX2, where
      // pairs measured no faster.
      constexpr bool pairs =
          !kStream && sizeof(T) == sizeof(A) && sizeof(G) == sizeof(A) && sizeof(O) == sizeof(A);
      // Whether g is an input of its own (the gradient input's dy; the normalize pass gets x
      // as g), to prefetch.
      const bool reads_g = static_cast<const void*>(gs) != static_cast<const void*>(xs);
      auto two_rows = [&](int64_t o) {
        const T* const xa = xs + o * features;
        const T* const xb = xa + features;
        const G* const ga = gs + o * features;
        const G* const gb = ga + features;
        O* const ya = ys + o * features;
        O* const yb = ya + features;
        int64_t c = 0;
        for (; c + L <= features; c += L) {
          const Formula<V> f = fs.template At<V, A>(c);
          const V va = f(LoadUsedOnce<A>(xa + c), LoadUsedOnce<A>(ga + c));
          const V vb = f(LoadUsedOnce<A>(xb + c), LoadUsedOnce<A>(gb + c));
          StoreV<A>(ya + c, va);
          StoreV<A>(yb + c, vb);
        }
        for (; c < features; ++c) {
          const Formula<A> f = fs.template At<A, A>(c);
          Store<A>(ya, c, f(Load<A>(xa, c), Load<A>(ga, c)));
          Store<A>(yb, c, f(Load<A>(xb, c), Load<A>(gb, c)));
        }
      };
      // bfloat16 rows without a mask, of whole 64-byte lines, from a line boundary: a plain
      // loop nest, every vector a 32-byte-aligned half line. Through the general row loop
      // below, GCC 12 kept the row's pointers and bounds on the stack and stored some back
      // every row; while the output's stores wait on memory, those stores take places in
      // the store buffer, and at 64 features (4 vectors a row) normalize and gradient input
      // ran 1.2-1.4x their channels-first twins from memory; with this nest 1.0-1.1x
      // (benchmarks/csrc/pass_bench.cc, docs/performance.md). Not float32: from memory its
      // normalize measured 15% slower through the nest.
      if (sizeof(T) == 2 && sizeof(O) == 2 && ms == nullptr && features % L == 0 &&
          (features * static_cast<int64_t>(sizeof(O))) % static_cast<int64_t>(kLineBytes) ==
              0 &&
          reinterpret_cast<uintptr_t>(ys) % kLineBytes == 0) {
        const int64_t begin = split.Begin(p);
        const T* xr = xs + begin * features;
        const G* gr = gs + begin * features;
        O* yr = ys + begin * features;
        O* const stop = ys + end * features;
        for (; yr < stop; xr += features, gr += features, yr += features) {
          for (int64_t c = 0; c < features; c += L) {
            if constexpr (kStream) {  // from memory: see PrefetchAhead
              PrefetchAhead(xr + c);
              if (reads_g) PrefetchAhead(gr + c);
            }
            const V v =
                fs.template At<V, A>(c)(LoadUsedOnce<A>(xr + c), LoadUsedOnce<A>(gr + c));
            if constexpr (kStream && kPacks<O, A>) {
              StoreBytes(yr + c, Packed<O, A>(v), /*stream=*/true);
            } else {
              StoreV<A>(yr + c, v);
            }
          }
        }
        if constexpr (kStream) StreamingStoresDone();
        return;
      }
      for (int64_t o = split.Begin(p); o < end; ++o) {
        if (pairs && o + 1 < end && (ms == nullptr || (ms[o] != 0 && ms[o + 1] != 0))) {
          two_rows(o);
          ++o;
          continue;
        }
        O* const row = ys + o * features;
        if (ms != nullptr && ms[o] == 0) {  // all-zero bits are 0 in every output type
          if constexpr (kStream) {
            WriteRun<true, A>(row, features, [](int64_t) { return V{}; },
                              [](int64_t) { return A(0); });
          } else {
            std::memset(static_cast<void*>(row), 0, features * sizeof(O));
          }
          continue;
        }
        const T* const xr = xs + o * features;
        const G* const gr = gs + o * features;
        WriteRun<kStream, A>(
            row, features,
            [=](int64_t c) {
              if constexpr (kStream) {  // from memory: see PrefetchAhead
                PrefetchAhead(xr + c);
                if (reads_g) PrefetchAhead(gr + c);
              }
              return fs.template At<V, A>(c)(LoadUsedOnce<A>(xr + c), LoadUsedOnce<A>(gr + c));
            },
            [=](int64_t c) { return fs.template At<A, A>(c)(Load<A>(xr, c), Load<A>(gr, c)); });
      }
      if constexpr (kStream) StreamingStoresDone();
    });
  }
}

// Channels-first map (pieces of one feature's contiguous values), stores as MapRows.
template <bool kStream, typename A, typename T, typename G, typename O,
          template <typename> class Formula>
void MapPieces(Team& team, const T* x, const G* g, const uint8_t* mask, O* out, Shape3 s,
               const Formula<const A*>& formula) {
  const Pieces pieces(team, s, mask);
  team.Run(pieces.parts(), [&](int64_t p) {
    const T* const xs = x;
    const G* const gs = g;
    O* const ys = out;
    const Formula<const A*> fs = formula;
    pieces.ForEach(p, [=](const Piece& piece) {
      const Formula<A> f = fs.template At<A, A>(piece.feature);
      const T* const xb = xs + piece.offset;
      const G* const gb = gs + piece.offset;
      const uint8_t* const m = piece.mask;
      if (m == nullptr) {
        WriteRun<kStream, A>(
            ys + piece.offset, piece.len,
            [=](int64_t i) { return f(LoadUsedOnce<A>(xb + i), LoadUsedOnce<A>(gb + i)); },
            [=](int64_t i) { return f(Load<A>(xb, i), Load<A>(gb, i)); });
      } else {
        WriteRun<kStream, A>(
            ys + piece.offset, piece.len,
            [=](int64_t i) {
              return Keep(LoadKeep<A>(m + i), f(LoadUsedOnce<A>(xb + i), LoadUsedOnce<A>(gb + i)));
            },
            [=](int64_t i) { return Keep(m[i] != 0, f(Load<A>(xb, i), Load<A>(gb, i))); });
      }
    });
    if constexpr (kStream) StreamingStoresDone();
  });
}

template <bool kStream, typename A, typename T, typename G, typename O,
          template <typename> class Formula>
void MapWith(Team& team, const T* x, const G* g, const uint8_t* mask, O* out, Shape3 s,
             const Formula<const A*>& formula) {
  if (s.inner == 1) {
    MapRows<kStream>(team, x, g, mask, out, s, formula);
  } else {
    MapPieces<kStream>(team, x, g, mask, out, s, formula);
  }
}

// out = formula(x, g) over the array, vectorized along features (channels-last) or along the
// contiguous values of one feature (channels-first); masked positions get 0. `Formula` is
// Normalization or GradInput of const A*. Large outputs are written with streaming stores.
template <typename A, typename T, typename G, typename O, template <typename> class Formula>
void Map(Team& team, const T* x, const G* g, const uint8_t* mask, O* out, Shape3 s,
         const Formula<const A*>& formula) {
  const int64_t bytes = s.outer * s.features * s.inner * static_cast<int64_t>(sizeof(O));
  if (kHaveStreamingStores && bytes >= kStreamingMinBytes) {
    MapWith<true>(team, x, g, mask, out, s, formula);
  } else {
    MapWith<false>(team, x, g, mask, out, s, formula);
  }
}

template <typename A, typename T, typename Y>
void NormalizeMap(Team& team, const T* x, const uint8_t* mask, Y* y, Shape3 s,
                  const Normalization<const A*>& coefficients) {
  Map<A>(team, x, x, mask, y, s, coefficients);
}

template <typename A, typename T, typename G>
void GradInputMap(Team& team, const T* x, const G* dy, const uint8_t* mask, T* dx, Shape3 s,
                  const GradInput<const A*>& coefficients) {
  Map<A>(team, x, dy, mask, dx, s, coefficients);
}

}  // namespace
}  // namespace jaxbn

#endif  // JAXBN_CSRC_MAPS_H_
