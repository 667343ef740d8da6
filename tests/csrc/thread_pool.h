// A plain thread pool for driving jaxbn's Team (jaxbn/csrc/team.h) outside XLA: used by the
// scheduler's stress test (tests/csrc/team_stress.cc) and the per-pass benchmark
// (benchmarks/csrc/pass_bench.cc).

#ifndef JAXBN_TESTS_CSRC_THREAD_POOL_H_
#define JAXBN_TESTS_CSRC_THREAD_POOL_H_

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

namespace jaxbn_test {

// A plain pool: `threads` workers and one queue, like XLA's intra-op pool seen from a Team.
class Pool {
 public:
  explicit Pool(int threads) : threads_(threads) {
    for (int i = 0; i < threads; ++i) workers_.emplace_back([this] { Work(); });
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    ready_.notify_all();
    for (std::thread& t : workers_) t.join();
  }
  int64_t num_threads() const { return threads_; }
  template <typename F>
  void Schedule(F&& f) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      queue_.emplace_back(std::forward<F>(f));
    }
    ready_.notify_one();
  }

 private:
  void Work() {
    for (;;) {
      std::function<void()> f;
      {
        std::unique_lock<std::mutex> lock(mu_);
        ready_.wait(lock, [this] { return stop_ || !queue_.empty(); });
        if (queue_.empty()) return;  // stopping, and nothing left to run
        f = std::move(queue_.front());
        queue_.pop_front();
      }
      f();
    }
  }

  int threads_;
  std::mutex mu_;
  std::condition_variable ready_;
  std::deque<std::function<void()>> queue_;
  bool stop_ = false;
  std::vector<std::thread> workers_;
};

}  // namespace jaxbn_test

#endif  // JAXBN_TESTS_CSRC_THREAD_POOL_H_
