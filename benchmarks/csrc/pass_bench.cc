// Per-pass times of jaxbn's CPU kernels (jaxbn/csrc/moments.h, grad_sums.h, maps.h) outside XLA: the same bytes
// viewed channels-last (N·H·W, C, 1) and channels-first (N, C, H·W), each pass timed alone
// on a Team over a plain pool, next to a trivial streaming kernel with the pass's traffic
// (the floor). Prints one line per (layout, pass): median ms and GB/s.
//
//   g++ -O3 -march=native -std=c++17 -pthread -Ijaxbn/csrc benchmarks/csrc/pass_bench.cc -o /tmp/pass_bench
//   /tmp/pass_bench N H W C [f32|bf16] [threads=2] [repeats=15] [passes=all|moments,...]
//
// With threads=1 the times are the calling thread's CPU time (robust to other jobs).

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <memory>
#include <functional>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <time.h>
#include <vector>

#include "grad_sums.h"
#include "maps.h"
#include "moments.h"
#include "../../tests/csrc/thread_pool.h"

namespace {

using jaxbn_test::Pool;

// Trivial streaming kernels over flat arrays, split among the Team like the passes.
template <typename T>
void ReadOne(jaxbn::Team& team, const T* x, int64_t n, float* sink) {
  using namespace jaxbn;
  const Split split{n, NumParts(team, n), 64};
  std::vector<float> part(split.parts * 16);
  team.Run(split.parts, [&](int64_t p) {
    Accumulator<Simd<float>> acc;  // in registers (simd.h)
    int64_t i = split.Begin(p);
    for (; i + 16 <= split.End(p); i += 16) acc.Add(LoadV<float>(x + i));
    part[p * 16] = HorizontalSum<float>(acc.Total());
  });
  *sink += part[0];
}
template <typename T>
void ReadTwo(jaxbn::Team& team, const T* x, const T* g, int64_t n, float* sink) {
  using namespace jaxbn;
  const Split split{n, NumParts(team, n), 64};
  std::vector<float> part(split.parts * 16);
  team.Run(split.parts, [&](int64_t p) {
    Accumulator<Simd<float>> acc;  // in registers (simd.h)
    int64_t i = split.Begin(p);
    for (; i + 16 <= split.End(p); i += 16) acc.Add(LoadV<float>(x + i) * LoadV<float>(g + i));
    part[p * 16] = HorizontalSum<float>(acc.Total());
  });
  *sink += part[0];
}
template <typename T>
void MapOne(jaxbn::Team& team, const T* x, T* y, int64_t n) {
  using namespace jaxbn;
  const Split split{n, NumParts(team, n), 64};
  team.Run(split.parts, [&](int64_t p) {
    for (int64_t i = split.Begin(p); i + 16 <= split.End(p); i += 16)
      StoreV<float>(y + i, LoadV<float>(x + i) * 2.0f + 1.0f);
  });
}
template <typename T>
void MapTwo(jaxbn::Team& team, const T* x, const T* g, T* y, int64_t n) {
  using namespace jaxbn;
  const Split split{n, NumParts(team, n), 64};
  team.Run(split.parts, [&](int64_t p) {
    for (int64_t i = split.Begin(p); i + 16 <= split.End(p); i += 16)
      StoreV<float>(y + i, LoadV<float>(x + i) + LoadV<float>(g + i));
  });
}

template <typename T>
void Bench(int64_t n, int64_t h, int64_t w, int64_t c, int threads, int repeats,
           const std::string& which) {
  using namespace jaxbn;
  using A = float;
  const int64_t size = n * h * w * c;
  // Arrays at a 64-byte boundary, as XLA allocates them, plus PASS_BENCH_OFFSET bytes (0 by
  // default): std::vector's large allocations start 16 bytes past a page, which puts every
  // row of a streaming store off the 32-byte boundary (maps.h peels a head per row).
  const char* offset_env = std::getenv("PASS_BENCH_OFFSET");
  const int64_t offset = offset_env ? std::atoll(offset_env) : 0;
  std::vector<std::unique_ptr<char, decltype(&std::free)>> storage;
  auto array = [&] {
    const size_t bytes = (size * sizeof(T) + 127) / 64 * 64;  // room for the offset
    storage.emplace_back(static_cast<char*>(std::aligned_alloc(64, bytes)), &std::free);
    return reinterpret_cast<T*>(storage.back().get() + offset);
  };
  T* const x = array();
  T* const g = array();
  T* const y = array();
  T* const dx = array();
  std::mt19937 rng(0);
  std::normal_distribution<float> normal(1.0f, 2.0f);
  for (int64_t i = 0; i < size; ++i) {
    Store<A>(x, i, normal(rng));
    Store<A>(g, i, normal(rng) - 1.0f);
  }
  std::vector<A> hi(c, 1.0f), lo(c, 0.0f), a(c, 0.5f), b(c, 0.1f), k(c, -0.01f);
  Pool pool(threads);
  const double mb = size * sizeof(T) / 1e6;
  float sink = 0;
  auto want = [&](const char* pass) {
    return which == "all" || which.find(pass) != std::string::npos;
  };
  // Every (layout, pass) once per round, rounds repeated: the medians compare passes that
  // met the same load (this machine is shared).
  struct Case {
    std::string layout, pass;
    double transfers;
    std::function<void()> run;
    std::vector<double> ms;
  };
  std::vector<Case> cases;
  const Shape3 layouts[2] = {{n * h * w, c, 1}, {n, c, h * w}};
  const char* names[2] = {"NHWC", "NCHW"};
  for (int l = 0; l < 2; ++l) {
    const Shape3 s = layouts[l];
    if (want("moments"))
      cases.push_back({names[l], "moments", 1, [&, s] {
                         Team team(pool);
                         Moments m(c);
                         BatchMoments(team, x, nullptr, s, m);
                         sink += m.m2[0];
                       }, {}});
    if (want("normalize"))
      cases.push_back({names[l], "normalize", 2, [&, s] {
                         Team team(pool);
                         NormalizeMap(team, x, nullptr, y, s,
                                      Normalization<const A*>{hi.data(), lo.data(), a.data(),
                                                              b.data()});
                       }, {}});
    if (want("grad_sums"))
      cases.push_back({names[l], "grad_sums", 2, [&, s] {
                         Team team(pool);
                         FeatureSums sums(c);
                         BatchGradSums(team, x, g, nullptr, s, hi.data(),
                                       lo.data(), sums);
                         sink += sums.gc[0];
                       }, {}});
    if (want("grad_input"))
      cases.push_back({names[l], "grad_input", 3, [&, s] {
                         Team team(pool);
                         GradInputMap(team, x, g, nullptr, dx, s,
                                      GradInput<const A*>{hi.data(), lo.data(), a.data(),
                                                          b.data(), k.data()});
                       }, {}});
  }
  if (want("floor")) {
    cases.push_back({"flat", "read1", 1, [&] {
                       Team team(pool);
                       ReadOne(team, x, size, &sink);
                     }, {}});
    cases.push_back({"flat", "map1", 2, [&] {
                       Team team(pool);
                       MapOne(team, x, y, size);
                     }, {}});
    cases.push_back({"flat", "read2", 2, [&] {
                       Team team(pool);
                       ReadTwo(team, x, g, size, &sink);
                     }, {}});
    cases.push_back({"flat", "map2", 3, [&] {
                       Team team(pool);
                       MapTwo(team, x, g, dx, size);
                     }, {}});
  }
  for (Case& k : cases) k.run();  // warm-up: pages touched, code and pool threads warm
  // One thread: the calling thread's CPU time, which the other jobs on a shared machine
  // change far less than the wall clock (the pass runs inline: a Team of one worker).
  auto now_ms = [threads] {
    if (threads == 1) {
      timespec t;
      clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
      return t.tv_sec * 1e3 + t.tv_nsec * 1e-6;
    }
    return std::chrono::duration<double, std::milli>(
               std::chrono::steady_clock::now().time_since_epoch())
        .count();
  };
  for (int r = 0; r < repeats; ++r)
    for (Case& k : cases) {
      const double start = now_ms();
      k.run();
      k.ms.push_back(now_ms() - start);
    }
  for (Case& k : cases) {
    std::sort(k.ms.begin(), k.ms.end());
    const double ms = k.ms[k.ms.size() / 2];
    std::printf("%-6s %-11s %8.3f ms %7.1f GB/s\n", k.layout.c_str(), k.pass.c_str(), ms,
                k.transfers * mb / ms);
  }
  if (sink == 12345.678f) std::printf("\n");
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 5) {
    std::fprintf(stderr, "usage: %s N H W C [f32|bf16] [threads] [repeats] [passes]\n", argv[0]);
    return 2;
  }
  const int64_t n = std::atoll(argv[1]), h = std::atoll(argv[2]), w = std::atoll(argv[3]),
                c = std::atoll(argv[4]);
  const std::string dtype = argc > 5 ? argv[5] : "f32";
  const int threads = argc > 6 ? std::atoi(argv[6]) : 2;
  const int repeats = argc > 7 ? std::atoi(argv[7]) : 15;
  const std::string which = argc > 8 ? argv[8] : "all";
  std::printf("# %lldx%lldx%lldx%lld %s, %d threads, median of %d\n", (long long)n, (long long)h,
              (long long)w, (long long)c, dtype.c_str(), threads, repeats);
  if (dtype == "bf16") {
    Bench<jaxbn::BF16>(n, h, w, c, threads, repeats, which);
  } else {
    Bench<float>(n, h, w, c, threads, repeats, which);
  }
  return 0;
}
