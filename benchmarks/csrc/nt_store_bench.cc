// Ordinary against non-temporal (streaming) stores on this machine: y = a·x + b over one
// array, split in halves between `threads` threads that stay alive across rounds (a spin
// barrier, no thread start in the timing), every variant once per round, interleaved, median
// over rounds (with one thread, its CPU time). GB/s counts the bytes the program asks for (read x + write y); an ordinary
// store also reads each line of y for ownership first, which is what streaming stores avoid.
//
// Variants per size and dtype:
//   map/ordinary, map/stream          the pass alone, the same arrays every call
//   map+read/ordinary, map+read/stream  the pass, then a sum over y by the same threads: what
//                                     a consumer of y pays (from cache, or from memory after
//                                     a streaming store evicted it) — the cost side of
//                                     streaming small outputs
//
//   g++ -O3 -march=native -std=c++17 -pthread benchmarks/csrc/nt_store_bench.cc -o /tmp/ntb
//   /tmp/ntb [threads=2] [rounds=9] [MiB of x, ...]   (default sizes 1 4 8 16 32 64 100)

#include <immintrin.h>
#include <time.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <thread>
#include <vector>

namespace {

typedef float F32V __attribute__((vector_size(64)));
typedef uint32_t U32V __attribute__((vector_size(64)));
typedef uint16_t U16V __attribute__((vector_size(32)));

inline F32V Load(const float* p) {
  F32V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline F32V Load(const uint16_t* p) {
  U16V h;
  std::memcpy(&h, p, sizeof h);
  U32V w = __builtin_convertvector(h, U32V) << 16;
  F32V v;
  std::memcpy(&v, &w, sizeof v);
  return v;
}
// Round-to-nearest-even bf16 without NaN handling (the cost of the kernels' NaN select is
// not what this program measures).
inline U16V ToHalf(F32V v) {
  U32V u;
  std::memcpy(&u, &v, sizeof u);
  return __builtin_convertvector((u + 0x7fffu + ((u >> 16) & 1u)) >> 16, U16V);
}

template <bool kStream>
inline void Store(float* p, F32V v) {
  if constexpr (kStream) {
    // Halves by shuffles (a memcpy into __m256 went through the stack, lane by lane).
    _mm256_stream_ps(p, __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7));
    _mm256_stream_ps(p + 8, __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15));
  } else {
    std::memcpy(p, &v, sizeof v);
  }
}
template <bool kStream>
inline void Store(uint16_t* p, F32V v) {
  U16V h = ToHalf(v);
  if constexpr (kStream) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), reinterpret_cast<__m256i>(h));
  } else {
    std::memcpy(p, &h, sizeof h);
  }
}

template <bool kStream, typename T>
void MapRange(const T* x, T* y, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; i += 16) Store<kStream>(y + i, Load(x + i) * 2.0f + 1.0f);
  if constexpr (kStream) _mm_sfence();
}
template <typename T>
float SumRange(const T* y, int64_t begin, int64_t end) {
  F32V a{}, b{};
  for (int64_t i = begin; i < end; i += 32) {
    a += Load(y + i);
    b += Load(y + i + 16);
  }
  a += b;
  float s = 0;
  for (int l = 0; l < 16; ++l) s += a[l];
  return s;
}

// The calling thread plus threads − 1 workers, each running job(t) for every Run.
class Crew {
 public:
  explicit Crew(int threads) : threads_(threads) {
    for (int t = 1; t < threads; ++t) workers_.emplace_back([this, t] { Work(t); });
  }
  ~Crew() {
    stop_ = true;
    generation_.fetch_add(1);
    for (auto& w : workers_) w.join();
  }
  void Run(const std::function<void(int)>& job) {
    job_ = &job;
    done_.store(0);
    generation_.fetch_add(1, std::memory_order_release);
    job(0);
    while (done_.load(std::memory_order_acquire) != threads_ - 1) {
    }
  }

 private:
  void Work(int t) {
    uint64_t seen = 0;
    for (;;) {
      uint64_t g;
      while ((g = generation_.load(std::memory_order_acquire)) == seen) _mm_pause();
      seen = g;
      if (stop_) return;
      (*job_)(t);
      done_.fetch_add(1, std::memory_order_release);
    }
  }
  int threads_;
  std::vector<std::thread> workers_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> done_{0};
  const std::function<void(int)>* job_ = nullptr;
  std::atomic<bool> stop_{false};
};

// Wall-clock ms, or with one thread the thread's CPU time (which other jobs on a shared
// machine change far less: preemption does not count, memory stalls do).
double NowMs(int threads) {
  if (threads == 1) {
    timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec * 1e-6;
  }
  return std::chrono::duration<double, std::milli>(
             std::chrono::steady_clock::now().time_since_epoch()).count();
}

template <typename T>
void BenchSize(Crew& crew, int threads, int rounds, double mib, const char* dtype) {
  const int64_t n = static_cast<int64_t>(mib * (1 << 20) / sizeof(T)) / 64 * 64;
  T* x = static_cast<T*>(std::aligned_alloc(64, n * sizeof(T)));
  T* y = static_cast<T*>(std::aligned_alloc(64, n * sizeof(T)));
  for (int64_t i = 0; i < n; ++i) {
    const float v = static_cast<float>(i % 1000) * 0.001f;
    if constexpr (sizeof(T) == 4) {
      x[i] = v;
    } else {
      uint32_t u;
      std::memcpy(&u, &v, 4);
      x[i] = static_cast<uint16_t>(u >> 16);
    }
  }
  std::memset(y, 0, n * sizeof(T));
  auto begin = [&](int t) { return n / 64 * t / threads * 64; };
  std::vector<float> sink(threads * 16);
  const char* names[4] = {"map/ordinary", "map/stream", "map+read/ordinary", "map+read/stream"};
  std::vector<std::function<void(int)>> jobs = {
      [&](int t) { MapRange<false>(x, y, begin(t), begin(t + 1)); },
      [&](int t) { MapRange<true>(x, y, begin(t), begin(t + 1)); },
      [&](int t) {
        MapRange<false>(x, y, begin(t), begin(t + 1));
        sink[t * 16] += SumRange(y, begin(t), begin(t + 1));
      },
      [&](int t) {
        MapRange<true>(x, y, begin(t), begin(t + 1));
        sink[t * 16] += SumRange(y, begin(t), begin(t + 1));
      },
  };
  // Calls per timing: about 20 ms of work, at least 1.
  const int calls = std::max(1, static_cast<int>(20.0 / (mib * 2 / 10.0)));
  std::vector<std::vector<double>> ms(jobs.size());
  for (int r = 0; r < rounds + 1; ++r) {
    for (size_t v = 0; v < jobs.size(); ++v) {
      const size_t j = (v + r) % jobs.size();
      crew.Run(jobs[j]);  // untimed: warm
      const double t0 = NowMs(threads);
      for (int c = 0; c < calls; ++c) crew.Run(jobs[j]);
      const double t = (NowMs(threads) - t0) / calls;
      if (r > 0) ms[j].push_back(t);
    }
  }
  const double bytes = 2.0 * n * sizeof(T);  // read x, write y (map+read: + read y, below)
  for (size_t j = 0; j < jobs.size(); ++j) {
    std::sort(ms[j].begin(), ms[j].end());
    const double med = ms[j][ms[j].size() / 2];
    const double counted = j >= 2 ? bytes * 1.5 : bytes;
    std::printf("%-5s %7.1f MiB  %-18s %8.3f ms  %6.1f GB/s  (min %.3f max %.3f)\n", dtype,
                n * sizeof(T) / double(1 << 20), names[j], med, counted / med / 1e6, ms[j].front(),
                ms[j].back());
  }
  std::fflush(stdout);
  std::free(x);
  std::free(y);
  if (sink[0] == 12345.f) std::printf("!\n");
}

}  // namespace

int main(int argc, char** argv) {
  const int threads = argc > 1 ? std::atoi(argv[1]) : 2;
  const int rounds = argc > 2 ? std::atoi(argv[2]) : 9;
  std::vector<double> sizes;
  for (int a = 3; a < argc; ++a) sizes.push_back(std::atof(argv[a]));
  if (sizes.empty()) sizes = {1, 4, 8, 16, 32, 64, 100};
  Crew crew(threads);
  for (double mib : sizes) {
    BenchSize<float>(crew, threads, rounds, mib, "f32");
    BenchSize<uint16_t>(crew, threads, rounds, mib, "bf16");
  }
}
