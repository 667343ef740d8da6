// The backward's reduction, eqs. (5)-(6): per feature Σ dy and Σ dy·(x − μ), one pass over x and
// dy, run by a Team (team.h) channels-last (rows × C) or channels-first (pieces of a feature).
// (simd.h says why everything is in an unnamed namespace.)

#ifndef JAXBN_CSRC_GRAD_SUMS_H_
#define JAXBN_CSRC_GRAD_SUMS_H_

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "reductions.h"
#include "simd.h"
#include "team.h"

namespace jaxbn {
namespace {

// ---------------------------------------------------------------------------------------
// Σ dy and Σ dy·(x − μ) per feature, one pass over x and dy; x − μ is (x − hi) − lo.
// Float sums run over one chunk; chunks add up in double.

struct FeatureSums {
  std::vector<double> g, gc;  // Σ dy, Σ dy·(x − μ)
  explicit FeatureSums(int64_t c) : g(c, 0.0), gc(c, 0.0) {}

  void Merge(const FeatureSums& other) {
    for (size_t c = 0; c < g.size(); ++c) {
      g[c] += other.g[c];
      gc[c] += other.gc[c];
    }
  }
};

template <typename T, typename G>
void GradSumsRows(Team& team, const T* x, const G* g, const uint8_t* mask, int64_t rows,
                  int64_t features, const Compute<T>* hi, const Compute<T>* lo,
                  FeatureSums& out) {
  using A = Compute<T>;
  using V = Simd<A>;
  constexpr int L = kLanes<A>;
  const int64_t block = std::min(features, kBlockFeatures);
  const Split split = RowSplit(team, rows, features);
  // Rows two at a time where the passes are bound by arithmetic: bfloat16, or arrays that
  // sit in cache (below the streaming stores' threshold). Reading float32 x and dy from
  // memory two rows at a time, the four interleaved streams made this pass 1.4-1.7x slower
  // at 64×56×56×128 (512-byte rows; benchmarks/csrc/pass_bench.cc, docs/performance.md).
  const bool paired = sizeof(T) == 2 ||
                      rows * features * static_cast<int64_t>(sizeof(T) + sizeof(G)) <
                          kStreamingMinBytes;
  Reduce(team, split.parts, features, out, [&](int64_t p, FeatureSums& acc) {
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
      const int64_t end = split.End(p);  // hoisted: see MapWith
      for (int64_t r0 = split.Begin(p); r0 < end; r0 += kChunkRows) {
        const int64_t r1 = std::min(r0 + kChunkRows, end);
        std::fill(sg.begin(), sg.end(), V{});
        std::fill(sgc.begin(), sgc.end(), V{});
        std::fill(sg1.begin(), sg1.end(), A(0));
        std::fill(sgc1.begin(), sgc1.end(), A(0));
        // The leftover features, one row at a time.
        auto sums_rest = [&](int64_t r) {
          const T* xr = x + r * features + c0;
          const G* gr = g + r * features + c0;
          for (int64_t c = 0; c < rest; ++c) {
            const int64_t f = full * L + c;
            A gv = Load<A>(gr, f);
            sg1[c] += gv;
            sgc1[c] += gv * ((Load<A>(xr, f) - hi[c0 + f]) - lo[c0 + f]);
          }
        };
        ForRowPairs(
            r0, r1, [&](int64_t r) { return mask != nullptr && mask[r] == 0; },
            [&](int64_t r, int64_t q) {
              const T* xa = x + r * features + c0;
              const G* ga = g + r * features + c0;
              const T* xb = x + q * features + c0;
              const G* gb = g + q * features + c0;
              for (int64_t t = 0; t < full; ++t) {
                PrefetchAhead(xa + t * L);
                PrefetchAhead(xb + t * L);
                PrefetchAhead(ga + t * L);
                PrefetchAhead(gb + t * L);
                const V u = LoadV<A>(ga + t * L), v = LoadV<A>(gb + t * L);
                AddInto(&sg[t], u + v);
                AddInto(&sgc[t], u * ((LoadUsedOnce<A>(xa + t * L) - h[t]) - l[t]) +
                                     v * ((LoadUsedOnce<A>(xb + t * L) - h[t]) - l[t]));
              }
              sums_rest(r);
              sums_rest(q);
            },
            [&](int64_t r) {
              const T* xr = x + r * features + c0;
              const G* gr = g + r * features + c0;
              for (int64_t t = 0; t < full; ++t) {
                PrefetchAhead(xr + t * L);
                PrefetchAhead(gr + t * L);
                const V gv = LoadV<A>(gr + t * L);
                AddInto(&sg[t], gv);
                AddInto(&sgc[t], gv * ((LoadUsedOnce<A>(xr + t * L) - h[t]) - l[t]));
              }
              sums_rest(r);
            },
            paired);
        AddChunkSums<A>(full, rest, sg.data(), sgc.data(), sg1.data(), sgc1.data(),
                        acc.g.data() + c0, acc.gc.data() + c0);
      }
    }
  });
}

template <typename T, typename G>
void GradSumsPieces(Team& team, const T* x, const G* g, const uint8_t* mask, Shape3 s,
                    const Compute<T>* hi, const Compute<T>* lo, FeatureSums& out) {
  using A = Compute<T>;
  const Pieces pieces(team, s, mask);
  Reduce(team, pieces.parts(), s.features, out, [&](int64_t p, FeatureSums& acc) {
    pieces.ForEach(p, [&](const Piece& piece) {
      const int64_t c = piece.feature;
      const A h = hi[c], l = lo[c];
      A sg, sgc;
      SweepRun<A, /*kXOnce=*/true>(
          x + piece.offset, g + piece.offset, piece.mask, piece.len,
          [h, l](auto xv, auto gv, auto keep) {
            return Terms<decltype(xv)>{Keep(keep, gv), Keep(keep, gv * ((xv - h) - l))};
          },
          &sg, &sgc);
      acc.g[c] += sg;
      acc.gc[c] += sgc;
    });
  });
}

template <typename T, typename G>
void BatchGradSums(Team& team, const T* x, const G* g, const uint8_t* mask, Shape3 s,
                   const Compute<T>* hi, const Compute<T>* lo, FeatureSums& out) {
  if (s.inner == 1) {
    GradSumsRows(team, x, g, mask, s.outer, s.features, hi, lo, out);
  } else {
    GradSumsPieces(team, x, g, mask, s, hi, lo, out);
  }
}

}  // namespace
}  // namespace jaxbn

#endif  // JAXBN_CSRC_GRAD_SUMS_H_
