// The passes of jaxbn's CPU kernels over activations, each run by a Team (team.h) on the
// (outer, C, inner) view of x:
//
//   BatchMoments   reads x once            → per feature μ, M2 = Σ (x − μ)²   eqs. (1)-(2)
//   BatchGradSums  reads x and dy          → Σ dy, Σ dy·(x − μ)              eqs. (5)-(6)
//   NormalizeMap   reads x, writes y       → y = ((x − hi) − lo)·a + b       eqs. (3)-(4)
//   GradInputMap   reads x, dy, writes dx  → dx = a·dy + b + k·(x − μ)       closed form of (7)
//
// Each has a channels-last form (inner == 1: rows × C, vectorized across features) and a
// channels-first one (inner > 1: pieces of one feature's contiguous values, vectorized along
// them, through team.h's one piece iterator).
//
// Moments is one pass yet as exact as a two-pass algorithm. Channels-last, a part's rows are
// swept once for Σd and Σd² of d = x − shift, against a shift within about σ/4 of the mean (the
// mean of 16 rows spread over the part), and swept again against the estimated mean in the
// rare case the shift was too far for Σd² − (Σd)²/n to keep its digits (MomentsRows).
// Channels-first, a part's first piece of each feature is swept twice (sum, then Σd and Σd²
// of d = x − piece mean, the corrected two-pass form) and gives the feature its shift; later
// pieces are swept once against it, and again against their own mean where the shift is
// too far for them (MomentsPieces). Parts (and pieces swept again) are combined in double
// precision with Chan, Golub & LeVeque's pairwise update
//   M2 = M2_a + M2_b + δ² n_a n_b / n,   δ = mean_b − mean_a.
// Float sums run over one chunk of rows or one piece only; nothing sums x itself over the
// whole batch, so a feature with |μ| ≫ σ keeps its digits. μ leaves as a float pair hi + lo,
// so that x − μ can be formed as (x − hi) − lo: x − hi is exact when x is near μ (Sterbenz),
// and lo carries what hi cannot.
// (simd.h says why everything is in an unnamed namespace.)

#ifndef JAXBN_CSRC_PASSES_H_
#define JAXBN_CSRC_PASSES_H_

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "simd.h"
#include "team.h"

namespace jaxbn {
namespace {

// Features per column block of the channels-last reductions: a block's per-feature float sums
// (two of them, 8 KiB in float32) stay in L1 while rows stream past.
constexpr int64_t kBlockFeatures = 1024;

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

  // n values with provisional mean `shift` and Σd, Σd² of d = x − shift (the chunk's, or
  // the part's, mean is shift + Σd/n).
  void AddChunk(int64_t f, double n, double shift, double sum_d, double sum_dd) {
    Add(f, n, shift + sum_d / n, sum_dd - sum_d * sum_d / n);
  }

  void Merge(const Moments& other) {
    for (size_t f = 0; f < count.size(); ++f) Add(f, other.count[f], other.mean[f], other.m2[f]);
  }
};

// Calls two(r, q) for consecutive pairs of the rows in [r0, r1) that skip(r) does not drop,
// and one(r) for the last row if their number is odd. The channels-last reductions take rows
// two at a time: each add to the per-feature accumulators (in L1, loaded and stored back per
// vector) then carries two rows, which halves those loads and stores — the bound of the
// bfloat16 reductions on AVX2, where a row of values is half as many bytes.
// (With paired false, one(r) for every row.)
template <typename Skip, typename Two, typename One>
inline void ForRowPairs(int64_t r0, int64_t r1, Skip&& skip, Two&& two, One&& one,
                        bool paired = true) {
  int64_t pending = -1;
  for (int64_t r = r0; r < r1; ++r) {
    if (skip(r)) continue;
    if (!paired) {
      one(r);
    } else if (pending < 0) {
      pending = r;
    } else {
      two(pending, r);
      pending = -1;
    }
  }
  if (pending >= 0) one(pending);
}

// A chunk's two float sums per feature into the part's double ones: `full` vectors of them
// (first1, first2) and `rest` single values (rest1, rest2), for consecutive features from
// out1, out2 on (a loop the compiler vectorizes). The channels-last reductions' flush.
template <typename A>
inline void AddChunkSums(int64_t full, int64_t rest, const Simd<A>* first1,
                         const Simd<A>* first2, const A* rest1, const A* rest2, double* out1,
                         double* out2) {
  constexpr int L = kLanes<A>;
  const A* v1 = reinterpret_cast<const A*>(first1);
  const A* v2 = reinterpret_cast<const A*>(first2);
  for (int64_t f = 0; f < full * L; ++f) {
    out1[f] += v1[f];
    out2[f] += v2[f];
  }
  for (int64_t c = 0; c < rest; ++c) {
    out1[full * L + c] += rest1[c];
    out2[full * L + c] += rest2[c];
  }
}

// Channels-last statistics: one sweep of a part's rows for Σd and Σd² of d = x − shift per
// feature, against a shift that estimates the part's mean (ShiftOfRows), then
//   mean = shift + Σd/n,   M2 = Σd² − (Σd)²/n.
// Float sums run over one chunk of kChunkRows rows and add up in double. The subtraction
// loses digits only where the shift is far from the mean: Σd² = M2 + n·δ² with δ = mean −
// shift, and Σd² carries the float sums' rounding, so its error relative to M2 grows as
// 1 + n·δ²/M2. A feature is accepted where (Σd)²/n ≤ Σd²/2, i.e. δ² ≤ M2/n (the shift
// within one σ of the mean; then M2 ≥ Σd²/2, the error at most twice the two-pass form's);
// where a feature is not, the part's columns from the first such feature to the last are
// swept again against their means as estimated (shift + Σd/n), which is far closer. Non-finite sums are accepted as they are (a NaN or
// an infinity in x propagates, it is not retried).
// Before 2026-12-02 each chunk was swept twice while in cache (its sum, then Σd and Σd²
// against the chunk's own mean) and chunks were merged pairwise: twice the arithmetic,
// which bounded this pass on AVX2 (docs/performance.md).

// Rows whose mean is the shift of MomentsRows: up to kShiftRows kept rows spread evenly over
// the part (not its first rows: neighbouring rows of an image are alike, so their mean can
// sit far from the part's). Sixteen independent rows put the shift within σ/4 of the mean
// in a typical case: the acceptance test above then fails for one feature in ~16,000 (a
// deviation of 4σ/4), and sweeping that feature's columns again costs a fraction of a sweep.
constexpr int64_t kShiftRows = 16;

template <typename T>
void ShiftOfRows(const T* x, const uint8_t* mask, int64_t begin, int64_t end, int64_t features,
                 Compute<T>* shift) {
  using A = Compute<T>;
  constexpr int L = kLanes<A>;
  std::fill(shift, shift + features, A(0));
  int64_t taken = 0;
  const int64_t len = end - begin;
  for (int64_t k = 0; k < kShiftRows; ++k) {
    // The first kept row in the k-th of kShiftRows equal stretches of the part.
    const int64_t stop = begin + len * (k + 1) / kShiftRows;
    int64_t r = begin + len * k / kShiftRows;
    while (r < stop && mask != nullptr && mask[r] == 0) ++r;
    if (r >= stop) continue;
    const T* row = x + r * features;
    int64_t c = 0;
    for (; c + L <= features; c += L) StoreV<A>(shift + c, LoadV<A>(shift + c) + LoadV<A>(row + c));
    for (; c < features; ++c) shift[c] += Load<A>(row, c);
    ++taken;
  }
  // (A part with kept rows has a kept row in some stretch: taken > 0 there.)
  const A inv = A(1) / static_cast<A>(std::max<int64_t>(taken, 1));
  for (int64_t c = 0; c < features; ++c) shift[c] *= inv;
}

// Σd and Σd² of d = x − shift over the kept rows of [begin, end), for the features in
// [first, last), into sum_d and sum_dd (per feature, doubles, added to); rows two at a time
// if `paired` (ForRowPairs).
template <typename T>
void ShiftedSumsRows(const T* x, const uint8_t* mask, int64_t begin, int64_t end,
                     int64_t features, int64_t first, int64_t last, const Compute<T>* shift,
                     bool paired, double* sum_d, double* sum_dd) {
  using A = Compute<T>;
  using V = Simd<A>;
  constexpr int L = kLanes<A>;
  const int64_t block = std::min(last - first, kBlockFeatures);
  const int64_t tiles = block / L;
  std::vector<V> h(tiles), sd(tiles), sdd(tiles);
  std::vector<A> sd1(L), sdd1(L);  // the < L features left over
  auto skip = [&](int64_t r) { return mask != nullptr && mask[r] == 0; };
  for (int64_t r0 = begin; r0 < end; r0 += kChunkRows) {
    const int64_t r1 = std::min(r0 + kChunkRows, end);
    for (int64_t c0 = first; c0 < last; c0 += block) {
      const int64_t width = std::min(block, last - c0);
      const int64_t full = width / L, rest = width - full * L;
      for (int64_t t = 0; t < full; ++t) h[t] = LoadV<A>(shift + c0 + t * L);
      std::fill(sd.begin(), sd.end(), V{});
      std::fill(sdd.begin(), sdd.end(), V{});
      std::fill(sd1.begin(), sd1.end(), A(0));
      std::fill(sdd1.begin(), sdd1.end(), A(0));
      auto at = [&](int64_t r) { return x + r * features + c0; };
      auto deviations_rest = [&](const T* row) {
        for (int64_t c = 0; c < rest; ++c) {
          const A d = Load<A>(row, full * L + c) - shift[c0 + full * L + c];
          sd1[c] += d;
          sdd1[c] += d * d;
        }
      };
      ForRowPairs(
          r0, r1, skip,
          [&](int64_t r, int64_t q) {
            const T* a = at(r);
            const T* b = at(q);
            for (int64_t t = 0; t < full; ++t) {
              PrefetchAhead(a + t * L);
              PrefetchAhead(b + t * L);
              const V d = LoadUsedOnce<A>(a + t * L) - h[t];
              const V e = LoadUsedOnce<A>(b + t * L) - h[t];
              AddInto(&sd[t], d + e);
              AddInto(&sdd[t], d * d + e * e);
            }
            deviations_rest(a);
            deviations_rest(b);
          },
          [&](int64_t r) {
            for (int64_t t = 0; t < full; ++t) {
              PrefetchAhead(at(r) + t * L);
              const V d = LoadUsedOnce<A>(at(r) + t * L) - h[t];
              AddInto(&sd[t], d);
              AddInto(&sdd[t], d * d);
            }
            deviations_rest(at(r));
          },
          paired);
      AddChunkSums<A>(full, rest, sd.data(), sdd.data(), sd1.data(), sdd1.data(), sum_d + c0,
                      sum_dd + c0);
    }
  }
}

// Whether Σd² − (Σd)²/n keeps its digits (see above); true for non-finite sums.
inline bool ShiftAccepted(double n, double sum_d, double sum_dd) {
  return !(sum_d * sum_d > 0.5 * n * sum_dd);
}

template <typename T>
void MomentsRows(Team& team, const T* x, const uint8_t* mask, int64_t rows, int64_t features,
                 Moments& out) {
  using A = Compute<T>;
  // Sweeps of a part at most: a second one against the first's mean is within rounding of
  // the mean; a third only covers a first shift wrong by more than ~10^6 σ.
  constexpr int kMaxSweeps = 3;
  const Split split = RowSplit(team, rows, features);
  // Rows two at a time for bfloat16 or an array in cache, one at a time for float32 and
  // float64 from memory: as in GradSumsRows, pairs of float32 rows read from memory measured
  // 1.3-1.5x slower (64×56×56×128, scripts/pass_bench.cc).
  const bool paired =
      sizeof(T) == 2 || rows * features * static_cast<int64_t>(sizeof(T)) < kStreamingMinBytes;
  Reduce(team, split.parts, features, out, [&](int64_t p, Moments& acc) {
    const int64_t begin = split.Begin(p), end = split.End(p);
    const int64_t kept = mask ? CountKept(mask + begin, end - begin) : end - begin;
    if (kept == 0) return;
    const double n = static_cast<double>(kept);
    std::vector<A> shift(features);
    std::vector<double> sum_d(features), sum_dd(features);
    ShiftOfRows(x, mask, begin, end, features, shift.data());
    int64_t first = 0, last = features;  // the features (re)swept
    for (int sweep = 1;; ++sweep) {
      std::fill(sum_d.begin() + first, sum_d.begin() + last, 0.0);
      std::fill(sum_dd.begin() + first, sum_dd.begin() + last, 0.0);
      ShiftedSumsRows(x, mask, begin, end, features, first, last, shift.data(), paired,
                      sum_d.data(), sum_dd.data());
      if (sweep == kMaxSweeps) break;
      // The features from the first to the last not accepted are swept again; of them, only
      // those not accepted move their shift (an accepted one's sums, a NaN's included, come
      // out of the next sweep the same).
      int64_t again_first = last, again_last = first;
      for (int64_t f = first; f < last; ++f) {
        if (!ShiftAccepted(n, sum_d[f], sum_dd[f])) {
          shift[f] = static_cast<A>(shift[f] + sum_d[f] / n);
          again_first = std::min(again_first, f);
          again_last = f + 1;
        }
      }
      if (again_first >= again_last) break;
      first = again_first;
      last = again_last;
    }
    for (int64_t f = 0; f < features; ++f) acc.AddChunk(f, n, shift[f], sum_d[f], sum_dd[f]);
  });
}

// A pair of terms, one per sum: what SweepRun's term returns for a vector (V) or a value.
template <typename X>
struct Terms {
  X first, second;
};

// Sweeps one contiguous run of len values of x (and of g, for two-input sums), with their
// mask bytes (or none): term(x, g, keep) gives the Terms to add, on vectors of kLanes<A>
// values, then on the leftover values one at a time; term is generic, so one lambda serves
// every case and applies Keep(keep, ·) to what it returns. Writes the two sums' totals.
template <typename A, bool kXOnce = false, bool kGOnce = false, typename T, typename G,
          typename Fn>
inline void SweepRun(const T* x, const G* g, const uint8_t* mask, int64_t len, Fn&& term,
                     A* out1, A* out2) {
  constexpr int L = kLanes<A>;
  // Two accumulators per sum, so that consecutive adds do not wait on each other: measured
  // (scripts/pass_bench.cc) 1.3-1.7x faster moments and gradient sums on this project's
  // machine, where one chain of adds held the loads back.
  using Sum = Accumulator<Simd<A>>;
  Sum a, b, a2, b2;
  auto add = [](Sum& s1, Sum& s2, const Terms<Simd<A>>& t) {
    s1.Add(t.first);
    s2.Add(t.second);
  };
  // kXOnce, kGOnce: x, g through LoadUsedOnce (simd.h) rather than LoadV. The gradient sums
  // load x so, and dy (used twice) by LoadV. The moments pass x as g too and load both so:
  // with x alone through LoadUsedOnce, GCC 12 built each x vector on the stack (4x slower
  // in cache; scripts/pass_bench.cc), and with both, the same in-cache sweeps are 17%
  // faster than through LoadV in bfloat16.
  auto load_x = [x](int64_t at) {
    if constexpr (kXOnce) {
      return LoadUsedOnce<A>(x + at);
    } else {
      return LoadV<A>(x + at);
    }
  };
  auto load_g = [g](int64_t at) {
    if constexpr (kGOnce) {
      return LoadUsedOnce<A>(g + at);
    } else {
      return LoadV<A>(g + at);
    }
  };
  int64_t i = 0;
  if (mask == nullptr) {
    for (; i + 2 * L <= len; i += 2 * L) {
      add(a, b, term(load_x(i), load_g(i), AllKept{}));
      add(a2, b2, term(load_x(i + L), load_g(i + L), AllKept{}));
    }
    for (; i + L <= len; i += L) add(a, b, term(load_x(i), load_g(i), AllKept{}));
  } else {
    for (; i + 2 * L <= len; i += 2 * L) {
      add(a, b, term(load_x(i), load_g(i), LoadKeep<A>(mask + i)));
      add(a2, b2, term(load_x(i + L), load_g(i + L), LoadKeep<A>(mask + i + L)));
    }
    for (; i + L <= len; i += L) add(a, b, term(load_x(i), load_g(i), LoadKeep<A>(mask + i)));
  }
  A s1 = HorizontalSum<A>(a.Total() + a2.Total()), s2 = HorizontalSum<A>(b.Total() + b2.Total());
  for (; i < len; ++i) {
    const Terms<A> t = mask == nullptr ? term(Load<A>(x, i), Load<A>(g, i), AllKept{})
                                       : term(Load<A>(x, i), Load<A>(g, i), mask[i] != 0);
    s1 += t.first;
    s2 += t.second;
  }
  *out1 = s1;
  *out2 = s2;
}

// Channels-first: a part's first piece of each feature is swept twice (sum, then Σd and Σd² of
// d = x − piece mean), and its mean becomes the feature's shift for the part; every later piece
// of the feature is swept once, for Σd and Σd² against that shift, accepted where
// (Σd)²/n ≤ Σd²/2 (ShiftAccepted: the piece's mean within its σ of the shift) and then
// added up in double per feature (mean = shift + Σd/n, M2 = Σd² − (Σd)²/n, as in
// MomentsRows: the pieces' acceptance bounds the sums' too, by Cauchy-Schwarz). A piece
// not accepted is swept again against its own mean while it is in L1, as before, and
// merged pairwise on its own. From memory, one sweep of x with prefetch instead of two
// (docs/performance.md).
template <typename T>
void MomentsPieces(Team& team, const T* x, const uint8_t* mask, Shape3 s, Moments& out) {
  using A = Compute<T>;
  const Pieces pieces(team, s, mask);
  // Arrays above the streaming stores' threshold come from memory (see Map).
  const bool from_memory = s.outer * s.features * s.inner * static_cast<int64_t>(sizeof(T)) >=
                           kStreamingMinBytes;
  Reduce(team, pieces.parts(), s.features, out, [&](int64_t p, Moments& acc) {
    // Per feature: its shift for this part, and the count and sums of its pieces against it
    // (count 0: no shift yet).
    std::vector<A> shift(s.features);
    std::vector<double> count(s.features, 0.0), sum_d(s.features, 0.0),
        sum_dd(s.features, 0.0);
    pieces.ForEach(p, [&](const Piece& piece) {
      const T* v = x + piece.offset;
      const uint8_t* m = piece.mask;
      const int64_t len = piece.len;
      const int64_t kept = m ? CountKept(m, len) : len;
      if (kept == 0) return;
      const int64_t f = piece.feature;
      const double n = static_cast<double>(kept);
      // From memory, the lines kPrefetchBytes past this piece's (the part's pieces are
      // consecutive in memory), one prefetch per line; inside SweepRun's loop the prefetches
      // made GCC 12 build each bfloat16 vector on the stack (5x slower).
      if (from_memory) {
        const char* bytes = reinterpret_cast<const char*>(v);
        for (int64_t b = 0; b < len * static_cast<int64_t>(sizeof(T)); b += kLineBytes)
          PrefetchAhead(bytes + b);
      }
      auto deviations = [&](A from, A* sd, A* sdd) {
        SweepRun<A, /*kXOnce=*/true, /*kGOnce=*/true>(
            v, v, m, len,
            [from](auto xv, auto, auto keep) {
              const auto d = Keep(keep, xv - from);
              return Terms<decltype(xv)>{d, d * d};
            },
            sd, sdd);
      };
      A sd, sdd;
      if (count[f] > 0) {
        deviations(shift[f], &sd, &sdd);
        if (ShiftAccepted(n, sd, sdd)) {
          count[f] += n;
          sum_d[f] += sd;
          sum_dd[f] += sdd;
          return;
        }
      }
      A sum, unused;
      SweepRun<A, /*kXOnce=*/true, /*kGOnce=*/true>(
          v, v, m, len,
          [](auto xv, auto, auto keep) { return Terms<decltype(xv)>{Keep(keep, xv), {}}; },
          &sum, &unused);
      const A own = sum / static_cast<A>(kept);
      deviations(own, &sd, &sdd);
      if (count[f] == 0) {  // the feature's first piece in this part: its shift
        shift[f] = own;
        count[f] = n;
        sum_d[f] = sd;
        sum_dd[f] = sdd;
      } else {
        acc.AddChunk(f, n, own, sd, sdd);
      }
    });
    for (int64_t f = 0; f < s.features; ++f) {
      if (count[f] > 0) acc.AddChunk(f, count[f], shift[f], sum_d[f], sum_dd[f]);
    }
  });
}

template <typename T>
void BatchMoments(Team& team, const T* x, const uint8_t* mask, Shape3 s, Moments& out) {
  if (s.inner == 1) {
    MomentsRows(team, x, mask, s.outer, s.features, out);
  } else {
    MomentsPieces(team, x, mask, s, out);
  }
}

// μ of feature c as the float pair hi + lo.
template <typename A>
void SplitMean(const Moments& moments, int64_t c, A* hi, A* lo) {
  const A h = static_cast<A>(moments.mean[c]);
  hi[c] = h;
  lo[c] = static_cast<A>(moments.mean[c] - static_cast<double>(h));
}

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
  // at 64×56×56×128 (512-byte rows; scripts/pass_bench.cc, docs/performance.md).
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

// Map with ordinary (kStream false) or streaming stores (then each thread ends its part with
// StreamingStoresDone).
template <bool kStream, typename A, typename T, typename G, typename O,
          template <typename> class Formula>
void MapWith(Team& team, const T* x, const G* g, const uint8_t* mask, O* out, Shape3 s,
             const Formula<const A*>& formula) {
  using V = Simd<A>;
  constexpr int L = kLanes<A>;
  // Each task works on copies of the operands in locals, captured by value: a store to the
  // output (through memcpy, so of any type) could otherwise alias the captured ones, and GCC
  // 12 reloaded every pointer and the feature count after each vector (seen in the assembly;
  // together with StoreV's stack copy, simd.h, 20% slower on cached data,
  // scripts/pass_bench.cc).
  if (s.inner == 1) {
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
      // 15-30% faster (scripts/pass_bench.cc). Not from memory: reading and streaming two
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
      // (scripts/pass_bench.cc, docs/performance.md). Not float32: from memory its
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
    return;
  }
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

#endif  // JAXBN_CSRC_PASSES_H_
