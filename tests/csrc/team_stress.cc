// Stress test of jaxbn's scheduler (jaxbn/csrc/team.h), built and run by tests/cpu/test_team.py:
// more pool threads than cores, many kernel calls of several loops each, and checks that every
// index of every loop runs exactly once, that a task's exception reaches Run's caller and
// leaves the Team usable, that a pool whose Schedule runs inline works, and that the 16-bit
// loop field of the ticket wraps without harm. Exits 0 and prints "ok" on success; on a
// failure prints what failed and exits 1; a hang is killed by alarm() (exit by SIGALRM).
//
//   team_stress [threads=16] [calls=20000] [seconds=240]

#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <random>
#include <stdexcept>
#include <thread>
#include <vector>

#include "team.h"
#include "thread_pool.h"

namespace {

using jaxbn_test::Pool;

// A pool whose Schedule runs the task inline, as ffi::ThreadPool does when scheduling fails.
struct InlinePool {
  int64_t num_threads() const { return 16; }
  template <typename F>
  void Schedule(F&& f) { f(); }
};

int failures = 0;
std::thread::id main_thread;
std::atomic<int64_t> by_helpers{0}, total{0};  // indices run, and those run by pool threads

void Fail(const char* what, int64_t call, int64_t n, int64_t index, int count) {
  if (++failures <= 10)
    std::fprintf(stderr, "FAIL %s: call %lld, n = %lld, index %lld ran %d times\n", what,
                 static_cast<long long>(call), static_cast<long long>(n),
                 static_cast<long long>(index), count);
}

// One loop of n indices on `team`; with throw_at >= 0 that index throws. Checks that each index
// ran exactly once (a throwing index counts: it ran) and that Run threw iff an index did.
void Loop(jaxbn::Team& team, int64_t call, int64_t n, int64_t throw_at) {
  std::vector<std::atomic<int>> runs(n);
  for (auto& r : runs) r.store(0, std::memory_order_relaxed);
  std::atomic<int64_t> sink{0};
  bool threw = false;
  try {
    team.Run(n, [&](int64_t i) {
      runs[i].fetch_add(1, std::memory_order_relaxed);
      total.fetch_add(1, std::memory_order_relaxed);
      if (std::this_thread::get_id() != main_thread)
        by_helpers.fetch_add(1, std::memory_order_relaxed);
      if (i == throw_at) throw std::bad_alloc();
      int64_t work = 0;  // a little work, so that helpers overlap
      for (int64_t k = 0; k < (i % 7) * 20; ++k) work += k ^ i;
      sink.fetch_add(work & 1, std::memory_order_relaxed);
    });
  } catch (const std::runtime_error&) {
    threw = true;
  }
  if (threw != (throw_at >= 0)) Fail(threw ? "Run threw without an exception" : "exception lost",
                                     call, n, throw_at, 0);
  for (int64_t i = 0; i < n; ++i) {
    const int count = runs[i].load(std::memory_order_relaxed);
    // More indices than kMaxTasks run in strides of one task: a throw skips the rest of its
    // task's stride, so there only "at most once" holds after the throwing index.
    const bool skipped_ok = throw_at >= 0 && n > jaxbn::Team::kMaxTasks && i > throw_at &&
                            (i - throw_at) % jaxbn::Team::kMaxTasks == 0 && count == 0;
    if (count != 1 && !skipped_ok) Fail("index not run exactly once", call, n, i, count);
  }
}

}  // namespace

int main(int argc, char** argv) {
  const int threads = argc > 1 ? std::atoi(argv[1]) : 16;
  const int64_t calls = argc > 2 ? std::atoll(argv[2]) : 20000;
  const unsigned seconds = argc > 3 ? static_cast<unsigned>(std::atoi(argv[3])) : 240;
  alarm(seconds);  // a hang ends the process (SIGALRM), never the test run
  main_thread = std::this_thread::get_id();

  std::mt19937_64 random(12345);
  const int64_t sizes[] = {2, 3, 15, 16, 17, 64, 100, 1000, 4096};
  auto pick = [&](int64_t k) { return static_cast<int64_t>(random() % k); };
  {
    Pool pool(threads);
    // Kernel calls as the handlers make them: a Team per call, one to three loops each.
    for (int64_t call = 0; call < calls; ++call) {
      jaxbn::Team team(pool);
      const int64_t loops = 1 + pick(3);
      for (int64_t l = 0; l < loops; ++l) {
        const int64_t n = call % 97 == 0 ? jaxbn::Team::kMaxTasks + 1 + pick(5000)
                                         : sizes[pick(std::size(sizes))];
        Loop(team, call, n, call % 13 == 0 ? pick(n) : -1);
      }
    }
    // One Team for more loops than the ticket's 16-bit loop field counts.
    jaxbn::Team team(pool);
    for (int64_t loop = 0; loop < 70000; ++loop) Loop(team, -1, 2 + loop % 3, -1);
  }  // the pool joins: every helper has left
  {
    InlinePool pool;
    for (int64_t call = 0; call < 200; ++call) {
      jaxbn::Team team(pool);
      Loop(team, call, sizes[pick(std::size(sizes))], call % 5 == 0 ? 0 : -1);
      Loop(team, call, 100, -1);
    }
  }
  // Without helpers taking tasks, nothing above tested the scheduler's concurrency.
  if (by_helpers.load() == 0) Fail("no index ran on a pool thread", -1, 0, 0, 0);
  std::printf("%lld indices, %lld on pool threads\n", static_cast<long long>(total.load()),
              static_cast<long long>(by_helpers.load()));
  if (failures > 0) {
    std::fprintf(stderr, "%d failures\n", failures);
    return 1;
  }
  std::printf("ok\n");
  return 0;
}
