// Building blocks of the two reductions over activations (moments.h, grad_sums.h): the column
// block of the channels-last sweeps, rows taken in pairs, the flush of float chunk sums into
// double ones, and the channels-first sweep of one contiguous run of values.
// (simd.h says why everything is in an unnamed namespace.)

#ifndef JAXBN_CSRC_REDUCTIONS_H_
#define JAXBN_CSRC_REDUCTIONS_H_

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
  // (benchmarks/csrc/pass_bench.cc) 1.3-1.7x faster moments and gradient sums on this project's
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
  // in cache; benchmarks/csrc/pass_bench.cc), and with both, the same in-cache sweeps are 17%
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

}  // namespace
}  // namespace jaxbn

#endif  // JAXBN_CSRC_REDUCTIONS_H_
