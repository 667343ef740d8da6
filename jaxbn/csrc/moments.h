// The statistics pass, eqs. (1)-(2): per feature μ and M2 = Σ (x − μ)², read from x once, run
// by a Team (team.h) on the (outer, C, inner) view of x. A channels-last form (inner == 1:
// rows × C, vectorized across features) and a channels-first one (inner > 1: pieces of one
// feature's contiguous values, vectorized along them, through team.h's piece iterator).
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

#ifndef JAXBN_CSRC_MOMENTS_H_
#define JAXBN_CSRC_MOMENTS_H_

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
// One sweep, not two: sweeping each chunk twice while in cache (its sum, then Σd and Σd²
// against the chunk's own mean) is twice the arithmetic, which bounds this pass on AVX2
// (docs/performance.md).

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
  // 1.3-1.5x slower (64×56×56×128, benchmarks/csrc/pass_bench.cc).
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

}  // namespace
}  // namespace jaxbn

#endif  // JAXBN_CSRC_MOMENTS_H_
